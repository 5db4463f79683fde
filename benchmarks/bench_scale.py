"""ntkjax.batch at scale: out-of-core store, symmetric blocks, Dask scaling.

Three cases, each with the goal stated in the issue; the script measures and
reports whether each goal is met (no timing asserts anywhere).

FC network (cases 1 and 2; NTK parameterization, W_std 1.5, b_std 0.05):

    stax.serial(Dense(512), Relu(), Dense(512), Relu(), Dense(1))

on x = numpy.random.default_rng(0).standard_normal((N, 784), float32) (the
x1 of _common.make_inputs), get='ntk'.

1. out_of_core: the N x N NTK with x2=None (N = 40,000: 6.4 GB as float32
   if held whole), written by `ntkjax.batch(kernel_fn, B, store=<tmp>.zarr,
   progress=False)(x, None, 'ntk')` into a store in a temporary directory
   under /tmp (deleted afterwards). B = 4000: 55 blocks of i <= j (10 x 10
   grid) rather than 210 at B = 2000, because an off-diagonal 4000-block costs
   ~15 ns per entry against ~26 ns at 2000 (XLA's GEMM and fused elementwise
   loops run better on bigger tiles), fewer blocks mean fewer per-block
   costs (dispatch, chunk files, markers), and a block is only 64 MB, so the
   process stays far below the 2 GB goal. Each store run is a fresh child
   process doing only that run (its peak RSS, ru_maxrss, is the number
   reported; interpreter, imports and the 125 MB input included) and its
   time is the `batch(...)` call alone, cold as a user would run it
   (tracing, compilation, fingerprint and store creation included; reported
   separately). "In memory" is the same 55 blocks computed by
   `jax.jit(kernel_fn, static_argnames='get')` in this process (x2=None on
   diagonal blocks, as batch does), results discarded after
   `block_until_ready`, warm (both block shapes compiled first). R = 3
   repeats of (in-memory pass, store run). Goals: peak RSS < 2 GB (2e9
   bytes) and store / in-memory <= 1.2.
   Floors: the blocks' GEMMs are 55 x 2 B^2 d = 1.38 TFLOP (the elementwise
   layers add O(entries)); the store must write 55 x 64 MB = 3.5 GB, and on
   a machine whose cores XLA already keeps busy, the CPU that writing takes
   (copies into the page cache, checksums, encoding) comes out of the
   compute's. The same run writes those bytes raw (`ndarray.tofile` of one
   64 MB block, 55 times, no fsync, into the same temporary directory:
   `raw_write_seconds`), and reports the CPU seconds of the in-memory pass
   and of the store run (all threads).
   The child also records where the time went (its own wrappers around
   BlockJob.compute, KernelStore.write/done/__init__, the checksum, and
   jax.monitoring's compile events; nothing in ntkjax is changed): setup
   before the first block, compute seconds (summed over blocks, the first
   block of each shape compiles), write and checksum seconds (in writer
   threads, overlapping compute), and the tail after the last block.
   Entries of the stored kernel straddling blocks (below the diagonal too)
   are checked against the jitted kernel_fn.

2. symmetric: N = 8000, B = 1000, in memory
   (`ntkjax.batch(kernel_fn, 1000, store_on_device=False, progress=False)`):
   x2=None (36 blocks of an 8 x 8 grid) against x2=x.copy() (all 64), one
   warm-up call each, then R = 5 repeats of (x2=None call, x2=x.copy()
   call). Goal: x2=None / x2=x.copy() <= 0.55. Floor: if a diagonal block
   costs what an off-diagonal one does, the ratio is at least 36 / 64 =
   0.5625 (`block_count_floor`). Also reported: the same blocks through a
   warm jitted kernel_fn alone (`blocks_ratio`: what the kernels themselves
   cost, without batch's per-call work) and the seconds each call spends
   tracing and compiling (jax.monitoring's compile events; batch traces the
   block function on every call, and, before ntkjax kept compiled block
   functions between calls, compiled it on every call too).

3. dask_scaling: CNN blocks, stax.serial(Conv(32, (3, 3), SAME), Relu(),
   Conv(32, (3, 3), SAME), Relu(), GlobalAvgPool(), Dense(1)), x1 and x2 two
   different batches of N = 400 8x8x1 images (rng as above), B = 50, x2
   given so all 64 blocks are computed, get='ntk', no store, results
   assembled in the client. `distributed.LocalCluster(n_workers=W,
   threads_per_worker=1, processes=True, env=...)` for W = 1 and W = 2,
   both clusters up at once; env (passed on to each worker's Nanny; what the
   workers see is recorded, from client.run) makes XLA and BLAS
   single-threaded in the workers before jax starts there: XLA_FLAGS=
   --xla_cpu_multi_thread_eigen=false, OMP/OPENBLAS/MKL_NUM_THREADS=1.
   That flag alone leaves XLA:CPU running this CNN's blocks on ~1.8 cores
   (one process, quiet machine: CPU/wall 1.78, against 0.97 under
   `taskset -c 0`), so each worker process is also pinned to one core
   (worker k of a cluster to core k, every thread, through client.run,
   before jax computes anything there). Each worker's CPU seconds per
   second of a timed call are reported (`worker_cores_max_*`: <= ~1
   confirms one core), and so are the seconds a worker spends tracing and
   compiling per call. One untimed call per cluster (imports, first
   compile), then R = 5 repeats of (W = 1 call, W = 2 call). Goal:
   speed-up t(W=1) / t(W=2) >= 1.7. Floor: 2 on two workers, less the
   serial part of a call (client-side setup, whatever tracing and
   compilation each worker repeats per call, Dask's per-task overhead).
   For comparison the same blocks also run as plain Dask tasks with a
   jitted kernel_fn kept on each worker between calls (`raw_dask_*`: the
   scaling Dask itself allows on this machine). Each call runs with its
   client made the current one (`client.as_current()`): batch's Dask
   executor calls `distributed.as_completed` without `loop=`, which needs a
   default client.

Ratios. Every repeat waits (up to 60 s) for other processes to go quiet,
runs an untimed spin-up (on this VM the first call after a few idle seconds
is ~0.3 s slower), then times its pair back to back, which of the two goes
first alternating between repeats; the goal is judged on the median of the
per-repeat ratios (`*_per_repeat`), which is robust to load that comes and
goes between repeats; the ratio of the medians is reported too. Each repeat
records `other_cores` (cores other processes kept busy meanwhile; see
_watch.py): on this 2-core machine, timings, ratios and above all the Dask
speed-up suffer when it is well above 0. `*_quiet` numbers are medians over
the repeats with other_cores < 0.3 (None if there were none).

Output: benchmarks/results/scale_<backend>.json (scale_<backend>_quick.json
for --quick): machine info, ntkjax's git state, and one record per case with
its numbers, `goal`, `goal_value`, `goal_met` and a `status` stating the
verdict (shown in the README table).

Usage:
    python benchmarks/bench_scale.py                  # full sizes (~7 min)
    python benchmarks/bench_scale.py --quick          # N = 4000, 2000, 200
    python benchmarks/bench_scale.py --cases dask_scaling   # a subset
                                                      # (printed, not written)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

# Run as a script: make the helpers next to this file importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _common  # noqa: E402
import _watch  # noqa: E402
import ntkjax  # noqa: E402
from ntkjax import stax  # noqa: E402

D = 784
WIDTH, W_STD, B_STD = 512, 1.5, 0.05
CASES = ('out_of_core', 'symmetric', 'dask_scaling')
# (N, batch size, repeats) per case, full and --quick.
SIZES = {
    'out_of_core': ((40_000, 4000, 3), (4000, 1000, 2)),
    'symmetric': ((8000, 1000, 5), (2000, 1000, 3)),
    'dask_scaling': ((400, 50, 5), (200, 50, 2)),
}
GOALS = {
    'out_of_core': 'peak RSS < 2 GB and store / in-memory <= 1.2',
    'symmetric': 'x2=None / x2=x.copy() <= 0.55',
    'dask_scaling': 'speed-up 1 -> 2 workers >= 1.7',
}
RSS_GOAL_BYTES = 2e9
STORE_RATIO_GOAL, SYM_RATIO_GOAL, SPEEDUP_GOAL = 1.2, 0.55, 1.7
WORKER_ENV = {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false',
              'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1',
              'MKL_NUM_THREADS': '1'}
QUIET_CORES, QUIET_WAIT_SECONDS = 0.3, 60
CHILD_TIMEOUT_SECONDS, CHILD_RSS_LIMIT_GB, MIN_AVAILABLE_GIB = 1800, 8., 1.5
COLUMNS = ('case', 'N', 'batch_size', 'kernel_seconds_median', 'goal_value',
           'goal_met', 'peak_rss_mib', 'other_cores_max')


def fc_kernel_fn():
  """The FC network's kernel_fn (not jitted)."""
  return stax.serial(stax.Dense(WIDTH, W_STD, B_STD), stax.Relu(),
                     stax.Dense(WIDTH, W_STD, B_STD), stax.Relu(),
                     stax.Dense(1, W_STD, B_STD)).kernel_fn


def cnn_kernel_fn():
  """The CNN's kernel_fn (not jitted)."""
  return stax.serial(stax.Conv(32, (3, 3), padding='SAME'), stax.Relu(),
                     stax.Conv(32, (3, 3), padding='SAME'), stax.Relu(),
                     stax.GlobalAvgPool(), stax.Dense(1)).kernel_fn


def inputs(n: int, shape: tuple, seed: int = 0, count: int = 1):
  """`count` float32 standard normal batches of n samples (numpy)."""
  rng = np.random.default_rng(seed)
  out = [rng.standard_normal((n,) + shape, dtype=np.float32)
         for _ in range(count)]
  return out[0] if count == 1 else out


def upper_blocks(n: int, size: int) -> list:
  """Blocks (i, j), i <= j, of an n x n symmetric kernel in size-blocks."""
  grid = n // size
  return [(i, j) for i in range(grid) for j in range(i, grid)]


def median(values):
  values = list(values)
  return statistics.median(values) if values else None


def rounded(value, digits: int = 4):
  return None if value is None else round(float(value), digits)


def rounded_list(values, digits: int = 4) -> list:
  return [rounded(v, digits) for v in values]


class OtherLoad:
  """Cores other processes keep busy from now until `cores()` (see
  _watch.py). Our own child processes count as ours once reaped; for live
  ones (Dask workers) pass their CPU seconds as `ours`."""

  def __init__(self):
    self.start = _watch._other_cpu()
    self.wall = time.perf_counter()

  def cores(self, ours: float = 0.) -> float:
    wall = time.perf_counter() - self.wall
    return round(max(0., _watch._other_cpu() - self.start - ours) / wall, 2)


def quiet_wait() -> float:
  """Wait (up to QUIET_WAIT_SECONDS) for other processes to go quiet."""
  return _watch.wait_quiet(QUIET_CORES, QUIET_WAIT_SECONDS)


def paired(numerators, denominators, other_cores) -> dict:
  """Per-repeat ratios, their median, the ratio of medians, and the median
  ratio over quiet repeats."""
  ratios = [a / b for a, b in zip(numerators, denominators)]
  quiet = [r for r, o in zip(ratios, other_cores) if o < QUIET_CORES]
  return {'per_repeat': rounded_list(ratios), 'median': median(ratios),
          'of_medians': median(numerators) / median(denominators),
          'quiet': median(quiet), 'quiet_repeats': len(quiet)}


def cpu_times() -> tuple:
  """(user, system) CPU seconds of this process so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime, usage.ru_stime


def compile_listener():
  """Sum jax.monitoring durations by event ('/jax/core/compile/...')."""
  totals = {}

  def listen(event, duration, **_):
    totals[event] = totals.get(event, 0.) + duration
  jax.monitoring.register_event_duration_secs_listener(listen)
  return totals


def compile_seconds(totals: dict) -> float:
  """Tracing + lowering + XLA compilation seconds in `totals`."""
  return sum(v for k, v in totals.items() if k.startswith('/jax/core/compile'))


source_digest = _common.ntkjax_source_digest


git_state = _common.ntkjax_git_state


def verdict(met: bool, text: str, quiet=None, quiet_repeats: int = 0) -> str:
  """The record's status line."""
  if quiet is not None and quiet_repeats:
    text += f'; quiet repeats only ({quiet_repeats}): {quiet:.3g}'
  return f'goal {"met" if met else "missed"}: {text}'


def spot_boxes(n: int, size: int) -> list:
  """Small (rows, cols) slices of an n x n kernel: across the first block
  edge (diagonal and off-diagonal blocks), far above and far below the
  diagonal (a mirrored block)."""
  e = min(size, n - 2)
  return [((e - 2, e + 2), (e - 2, e + 2)), ((0, 3), (n - 3, n)),
          ((n - 3, n), (0, 3)), ((n // 2 - 1, n // 2 + 2), (1, 4))]


# ----------------------------------------------------------------------------
# Case 1: out of core (the child process does the store run).


def _instrument() -> dict:
  """Wrap the store run's parts with timers (this process only)."""
  from ntkjax.scale import blocks, store
  log = {k: [] for k in ('compute', 'write', 'checksum', 'fingerprint',
                         'open', 'done')}

  def wrap(owner, name, key):
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
      start = time.perf_counter()
      try:
        return original(*args, **kwargs)
      finally:
        log[key].append((start, time.perf_counter()))
    setattr(owner, name, timed)

  wrap(blocks.BlockJob, 'compute', 'compute')
  wrap(blocks.BlockJob, 'fingerprint', 'fingerprint')
  wrap(store.KernelStore, '__init__', 'open')
  wrap(store.KernelStore, 'write', 'write')
  wrap(store.KernelStore, 'done', 'done')
  wrap(store, 'checksum', 'checksum')   # looked up by name in write()
  return log


def store_child(n: int, size: int, directory: str) -> dict:
  """The store run alone, in this (fresh) process; returns its record."""
  log = _instrument()
  compiles = compile_listener()
  x = inputs(n, (D,))
  kernel_fn = fc_kernel_fn()
  rss_before = _common.peak_rss_mib()
  path = os.path.join(directory, 'ntk.zarr')
  cpu0 = cpu_times()
  start = time.perf_counter()
  kernel = ntkjax.batch(kernel_fn, size, store=path, progress=False)(
      x, None, 'ntk')
  end = time.perf_counter()
  cpu1 = cpu_times()
  peak = _common.peak_rss_mib()
  spans = lambda key: [b - a for a, b in log[key]]
  computes = sorted(log['compute'])
  first_compute, last_compute = computes[0][0], max(b for _, b in computes)
  compute = [b - a for a, b in computes]
  stored_bytes = sum(os.path.getsize(os.path.join(root, f))
                     for root, _, files in os.walk(path) for f in files)
  boxes = [np.asarray(kernel[r0:r1, c0:c1]).tolist()
           for (r0, r1), (c0, c1) in spot_boxes(n, size)]
  return {
      'store_seconds': end - start,
      # CPU seconds of the whole process during the call (all threads).
      'cpu_user_seconds': cpu1[0] - cpu0[0],
      'cpu_system_seconds': cpu1[1] - cpu0[1],
      'peak_rss_mib': peak,
      'rss_before_call_mib': rss_before,
      'blocks': len(compute),
      'setup_seconds': first_compute - start,
      'fingerprint_seconds': sum(spans('fingerprint')),
      'store_open_seconds': sum(spans('open')),
      'store_done_seconds': sum(spans('done')),
      'compile_seconds': compile_seconds(compiles),
      # The first block of each shape (diagonal, off-diagonal) compiles.
      'compute_seconds_total': sum(compute),
      'compute_seconds_first_two': sum(compute[:2]),
      'compute_seconds_rest': sum(compute[2:]),
      'compute_span_seconds': last_compute - first_compute,
      'write_seconds_total': sum(spans('write')),
      'checksum_seconds_total': sum(spans('checksum')),
      'tail_seconds': end - last_compute,
      'stored_bytes': stored_bytes,
      'spot_boxes': boxes,
  }


def raw_write_seconds(directory: str, count: int, size: int) -> tuple:
  """Write `count` float32 size x size blocks raw (no fsync).

  Returns:
    (wall seconds, CPU seconds of this process).
  """
  block = np.random.default_rng(1).standard_normal((size, size),
                                                   dtype=np.float32)
  path = os.path.join(directory, 'raw')
  os.makedirs(path)
  cpu0 = sum(cpu_times())
  start = time.perf_counter()
  for k in range(count):
    block.tofile(os.path.join(path, f'{k}.bin'))
  seconds = time.perf_counter() - start
  cpu = sum(cpu_times()) - cpu0
  shutil.rmtree(path)
  return seconds, cpu


def out_of_core(n: int, size: int, repeats: int) -> dict:
  """Case 1 (see the module docstring)."""
  assert n % size == 0, 'N must be a multiple of the batch size'
  x = inputs(n, (D,))
  f = jax.jit(fc_kernel_fn(), static_argnames='get')
  blocks = upper_blocks(n, size)

  def block(i, j):
    xj = None if i == j else x[j * size:(j + 1) * size]
    return f(x[i * size:(i + 1) * size], xj, get='ntk')

  start = time.perf_counter()
  jax.block_until_ready(block(0, 0))
  jax.block_until_ready(block(0, 1))   # both block shapes compiled
  warmup = time.perf_counter() - start

  def memory_pass() -> tuple:
    cpu0 = sum(cpu_times())
    begin = time.perf_counter()
    for i, j in blocks:
      jax.block_until_ready(block(i, j))
    return time.perf_counter() - begin, sum(cpu_times()) - cpu0

  memory, memory_cpu, runs, other, waited, failures = [], [], [], [], [], []
  raw_write = (None, None)
  for r in range(repeats):
    waited.append(quiet_wait())
    jax.block_until_ready(block(0, 1))   # spin-up after the idle wait
    load = OtherLoad()
    directory = tempfile.mkdtemp(prefix='ntkjax_bench_scale_', dir='/tmp')
    try:
      if r % 2 == 0:   # alternate which of the pair runs first
        seconds, cpu = memory_pass()
      result = _watch.run(
          [sys.executable, os.path.abspath(__file__), '--store-child', str(n),
           str(size), directory], CHILD_TIMEOUT_SECONDS, CHILD_RSS_LIMIT_GB,
          MIN_AVAILABLE_GIB)
      if r % 2 == 1:
        seconds, cpu = memory_pass()
      repeat_other = load.cores()
      if r == 0:
        raw_write = raw_write_seconds(directory, len(blocks), size)
    finally:
      shutil.rmtree(directory, ignore_errors=True)
    lines = [l for l in result['stdout'].splitlines() if l.startswith('{')]
    if result['killed'] or result['returncode'] or not lines:
      tail = (result['stderr'].strip().splitlines() or ['?'])[-1][:300]
      failures.append(result['killed'] or
                      f'failed (exit {result["returncode"]}): {tail}')
      continue
    memory.append(seconds)
    memory_cpu.append(cpu)
    other.append(repeat_other)
    runs.append(dict(json.loads(lines[-1]),
                     child_wall_seconds=result['wall_seconds']))
    print(f'  out_of_core repeat {r}: memory {seconds:.2f} s, store '
          f'{runs[-1]["store_seconds"]:.2f} s, peak RSS '
          f'{runs[-1]["peak_rss_mib"]:.0f} MiB, other processes '
          f'{repeat_other} cores', flush=True)

  record = {'case': 'out_of_core', 'N': n, 'batch_size': size, 'd': D,
            'get': 'ntk', 'blocks': len(blocks), 'repeats': repeats,
            'goal': GOALS['out_of_core'],
            'quiet_wait_seconds': waited,
            'memory_warmup_seconds': rounded(warmup)}
  if not runs:
    record.update(status='; '.join(failures), goal_met=None)
    return record
  store = [r['store_seconds'] for r in runs]
  ratio = paired(store, memory, other)
  # ... and counting the in-memory pass's compilation too (each store run
  # is cold: it compiles in its own process).
  ratio_cold = median(s / (m + warmup) for s, m in zip(store, memory))
  # The reported breakdown is that of the run closest to the median.
  typical = min(runs, key=lambda r: abs(r['store_seconds'] - median(store)))
  expected = [np.asarray(f(x[r0:r1], x[c0:c1], get='ntk'))
              for (r0, r1), (c0, c1) in spot_boxes(n, size)]
  spot_error = max(
      float(np.max(np.abs(np.asarray(got) - want) / np.abs(want).max()))
      for run in runs for got, want in zip(run['spot_boxes'], expected))
  peak = max(r['peak_rss_mib'] for r in runs)
  rss_ok = peak * 1024**2 < RSS_GOAL_BYTES
  met = rss_ok and ratio['median'] <= STORE_RATIO_GOAL
  store_cpu = [r['cpu_user_seconds'] + r['cpu_system_seconds'] for r in runs]
  record.update(
      kernel_seconds_median=rounded(median(store)),
      memory_seconds=rounded_list(memory),
      memory_seconds_median=rounded(median(memory)),
      store_seconds=rounded_list(store),
      store_seconds_median=rounded(median(store)),
      ratio_store_to_memory_per_repeat=ratio['per_repeat'],
      ratio_store_to_memory=rounded(ratio['median']),
      ratio_store_to_memory_of_medians=rounded(ratio['of_medians']),
      ratio_store_to_memory_quiet=rounded(ratio['quiet']),
      ratio_store_to_memory_plus_compile=rounded(ratio_cold),
      peak_rss_mib=peak, peak_rss_gb=round(peak * 1024**2 / 1e9, 3),
      goal_value=rounded(ratio['median'], 3), goal_met=met,
      status=verdict(
          met, f'peak RSS {peak * 1024**2 / 1e9:.2f} GB '
          f'{"<" if rss_ok else ">="} 2 GB, store / in-memory '
          f'{ratio["median"]:.3g} '
          f'{"<=" if ratio["median"] <= STORE_RATIO_GOAL else ">"} '
          f'{STORE_RATIO_GOAL}', ratio['quiet'], ratio['quiet_repeats']),
      memory_cpu_seconds=rounded_list(memory_cpu),
      store_cpu_seconds=rounded_list(store_cpu),
      raw_write_seconds=rounded(raw_write[0]),
      raw_write_cpu_seconds=rounded(raw_write[1]),
      raw_write_bytes=len(blocks) * size * size * 4,
      spot_check_max_relative_error=spot_error,
      store_run={k: rounded(v) if isinstance(v, float) else v
                 for k, v in typical.items() if k != 'spot_boxes'},
      other_cores=other, other_cores_max=max(other))
  if failures:
    record['failed_repeats'] = failures
  return record


# ----------------------------------------------------------------------------
# Case 2: symmetric vs full.


def symmetric(n: int, size: int, repeats: int) -> dict:
  """Case 2 (see the module docstring)."""
  assert n % size == 0, 'N must be a multiple of the batch size'
  x = inputs(n, (D,))
  x2 = x.copy()
  kernel_fn = fc_kernel_fn()
  batched = ntkjax.batch(kernel_fn, size, store_on_device=False,
                         progress=False)
  compiles = compile_listener()
  calls = {'sym': lambda: batched(x, None, 'ntk'),
           'full': lambda: batched(x, x2, 'ntk')}
  results = {name: call() for name, call in calls.items()}   # warm-up
  rel = float(np.max(np.abs(results['sym'] - results['full'])) /
              np.max(np.abs(results['full'])))
  del results

  # The same blocks through a warm jitted kernel_fn, nothing else.
  f = jax.jit(kernel_fn, static_argnames='get')
  grid = n // size
  sym_blocks = upper_blocks(n, size)
  full_blocks = [(i, j) for i in range(grid) for j in range(grid)]
  sl = lambda a, k: a[k * size:(k + 1) * size]

  def blocks_pass(blocks, mirror):
    """mirror: x2=None on diagonal blocks (as batch does for x2=None);
    else every block against x2."""
    begin = time.perf_counter()
    for i, j in blocks:
      xj = (None if i == j else sl(x, j)) if mirror else sl(x2, j)
      jax.block_until_ready(f(sl(x, i), xj, get='ntk'))
    return time.perf_counter() - begin
  blocks_pass(sym_blocks[:2], True)    # compile both shapes
  blocks_pass(full_blocks[:1], False)

  times = {name: [] for name in calls}
  compile_per_call = {name: [] for name in calls}
  block_times = {'sym': [], 'full': []}
  other, waited = [], []
  for r in range(repeats):
    waited.append(quiet_wait())
    for call in calls.values():
      call()   # spin-up: the first call after an idle wait is slower
    load = OtherLoad()
    for name in (('sym', 'full') if r % 2 == 0 else ('full', 'sym')):
      call = calls[name]
      before = compile_seconds(compiles)
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
      compile_per_call[name].append(compile_seconds(compiles) - before)
    block_times['sym'].append(blocks_pass(sym_blocks, True))
    block_times['full'].append(blocks_pass(full_blocks, False))
    other.append(load.cores())

  ratio = paired(times['sym'], times['full'], other)
  blocks_ratio = paired(block_times['sym'], block_times['full'], other)
  floor = len(sym_blocks) / len(full_blocks)
  met = ratio['median'] <= SYM_RATIO_GOAL
  return {
      'case': 'symmetric', 'N': n, 'batch_size': size, 'd': D, 'get': 'ntk',
      'repeats': repeats, 'goal': GOALS['symmetric'],
      'quiet_wait_seconds': waited,
      'kernel_seconds_median': rounded(median(times['sym'])),
      'sym_seconds': rounded_list(times['sym']),
      'full_seconds': rounded_list(times['full']),
      'sym_seconds_median': rounded(median(times['sym'])),
      'full_seconds_median': rounded(median(times['full'])),
      'ratio_sym_to_full_per_repeat': ratio['per_repeat'],
      'ratio_sym_to_full': rounded(ratio['median']),
      'ratio_sym_to_full_of_medians': rounded(ratio['of_medians']),
      'ratio_sym_to_full_quiet': rounded(ratio['quiet']),
      'sym_blocks': len(sym_blocks), 'full_blocks': len(full_blocks),
      'block_count_floor': rounded(floor),
      'compile_seconds_per_call_sym': rounded(median(compile_per_call['sym'])),
      'compile_seconds_per_call_full': rounded(
          median(compile_per_call['full'])),
      'blocks_only_sym_seconds_median': rounded(median(block_times['sym'])),
      'blocks_only_full_seconds_median': rounded(median(block_times['full'])),
      'blocks_ratio': rounded(blocks_ratio['median']),
      'blocks_ratio_quiet': rounded(blocks_ratio['quiet']),
      'sym_vs_full_max_relative_difference': rel,
      'goal_value': rounded(ratio['median'], 3), 'goal_met': met,
      'status': verdict(
          met, f'x2=None / x2=x.copy() {ratio["median"]:.3g} '
          f'{"<=" if met else ">"} {SYM_RATIO_GOAL} (block-count floor '
          f'{floor:.3g})', ratio['quiet'], ratio['quiet_repeats']),
      'peak_rss_mib': _common.peak_rss_mib(),
      'other_cores': other, 'other_cores_max': max(other),
  }


# ----------------------------------------------------------------------------
# Case 3: Dask scaling. Functions run on workers are pickled by value.


def _worker_setup(dask_worker):
  """On a worker: sum jax compile events; report the env it sees."""
  import jax as wjax
  totals = {}

  def listen(event, duration, **_):
    totals[event] = totals.get(event, 0.) + duration
  wjax.monitoring.register_event_duration_secs_listener(listen)
  dask_worker.bench_compile_totals = totals
  return {k: os.environ.get(k) for k in WORKER_ENV}


def _pin_to(core: int):
  """A function pinning every thread of a worker process to `core` (new
  threads inherit it, and XLA sizes its thread pools from the affinity of
  the thread that starts it); returns the affinity it ends with."""
  def pin(dask_worker):
    for tid in os.listdir('/proc/self/task'):
      try:
        os.sched_setaffinity(int(tid), {core})
      except OSError:   # a thread that just ended
        pass
    return sorted(os.sched_getaffinity(0))
  return pin


def _worker_counters(dask_worker):
  """On a worker: (CPU seconds, compile seconds) so far."""
  import resource as wresource
  usage = wresource.getrusage(wresource.RUSAGE_SELF)
  totals = getattr(dask_worker, 'bench_compile_totals', {})
  return (usage.ru_utime + usage.ru_stime,
          sum(v for k, v in totals.items()
              if k.startswith('/jax/core/compile')))


def _raw_block(x1, x2, i, j, size):
  """A plain Dask task: one block with a jitted kernel_fn kept on the
  worker between tasks and calls (what batch could do)."""
  from distributed import get_worker
  worker = get_worker()
  f = getattr(worker, 'bench_raw_fn', None)
  if f is None:
    f = worker.bench_raw_fn = jax.jit(cnn_kernel_fn(), static_argnames='get')
  return np.asarray(f(x1[i * size:(i + 1) * size],
                      x2[j * size:(j + 1) * size], get='ntk'))


def dask_scaling(n: int, size: int, repeats: int) -> dict:
  """Case 3 (see the module docstring)."""
  from distributed import Client, LocalCluster
  assert n % size == 0, 'N must be a multiple of the batch size'
  logging.getLogger('distributed').setLevel(logging.ERROR)
  x1, x2 = inputs(n, (8, 8, 1), count=2)
  kernel_fn = cnn_kernel_fn()
  grid = n // size
  clusters, clients, env_seen, pinned = {}, {}, {}, {1: [], 2: []}
  try:
    for workers in (1, 2):
      clusters[workers] = LocalCluster(
          n_workers=workers, threads_per_worker=1, processes=True,
          dashboard_address=':0', silence_logs=logging.ERROR,
          env=dict(WORKER_ENV))   # passed on to each worker's Nanny
      clients[workers] = Client(clusters[workers], set_as_default=False)
      # Before jax computes anything there (its thread pools start then).
      for core, address in enumerate(sorted(
          clients[workers].scheduler_info()['workers'])):
        pinned[workers].append(clients[workers].run(
            _pin_to(core % os.cpu_count()), workers=[address])[address])
      env_seen[workers] = list(clients[workers].run(_worker_setup).values())
    batched = {w: ntkjax.batch(kernel_fn, size, client=clients[w],
                               store_on_device=False, progress=False)
               for w in clients}
    futures_x = {w: clients[w].scatter([x1, x2], broadcast=True)
                 for w in clients}

    def call(w):
      with clients[w].as_current():   # see the module docstring
        return batched[w](x1, x2, 'ntk')

    def raw_call(w):
      a, b = futures_x[w]
      clients[w].gather([
          clients[w].submit(_raw_block, a, b, i, j, size, pure=False)
          for i in range(grid) for j in range(grid)])

    def counters(w):
      values = list(clients[w].run(_worker_counters).values())
      return [v[0] for v in values], [v[1] for v in values]

    def timed(w, fn) -> tuple:
      """(seconds, busiest worker's cores, its compile seconds, workers'
      CPU seconds) of one call."""
      cpu0, comp0 = counters(w)
      start = time.perf_counter()
      fn(w)
      wall = time.perf_counter() - start
      cpu1, comp1 = counters(w)
      used = [b - a for a, b in zip(cpu0, cpu1)]
      return (wall, max(used) / wall,
              max(b - a for a, b in zip(comp0, comp1)), sum(used))

    results = {w: call(w) for w in clients}   # warm-up
    for w in clients:
      raw_call(w)   # warm-up: compiles once per worker, kept
    times, raw = {1: [], 2: []}, {1: [], 2: []}
    cores, compile_per_call = {1: [], 2: []}, {1: [], 2: []}
    other, other_raw, waited = [], [], []
    for r in range(repeats):
      waited.append(quiet_wait())
      for w in clients:
        call(w)   # spin-up: the first call after an idle wait is slower
        raw_call(w)
      order = (1, 2) if r % 2 == 0 else (2, 1)
      load, ours = OtherLoad(), 0.
      for w in order:
        wall, busiest, compiled, used = timed(w, call)
        times[w].append(wall)
        cores[w].append(busiest)
        compile_per_call[w].append(compiled)
        ours += used
      other.append(load.cores(ours))
      load, ours = OtherLoad(), 0.
      for w in order:
        wall, _, _, used = timed(w, raw_call)
        raw[w].append(wall)
        ours += used
      other_raw.append(load.cores(ours))
  finally:
    for client in clients.values():
      client.close()
    for cluster in clusters.values():
      cluster.close()

  # Check against the jitted kernel_fn here, on a few blocks.
  f = jax.jit(kernel_fn, static_argnames='get')
  error = 0.
  for i, j in ((0, 0), (0, grid - 1), (grid - 1, 0)):
    want = np.asarray(f(x1[i * size:(i + 1) * size],
                        x2[j * size:(j + 1) * size], get='ntk'))
    for got in results.values():
      part = got[i * size:(i + 1) * size, j * size:(j + 1) * size]
      error = max(error, float(np.max(np.abs(part - want)) /
                               np.max(np.abs(want))))
  speedup = paired(times[1], times[2], other)
  raw_speedup = paired(raw[1], raw[2], other_raw)
  met = speedup['median'] >= SPEEDUP_GOAL
  return {
      'case': 'dask_scaling', 'N': n, 'batch_size': size,
      'input_shape': [8, 8, 1], 'get': 'ntk', 'blocks': grid * grid,
      'repeats': repeats, 'goal': GOALS['dask_scaling'],
      'quiet_wait_seconds': waited, 'worker_env': WORKER_ENV,
      'worker_env_seen': {str(w): v for w, v in env_seen.items()},
      'kernel_seconds_median': rounded(median(times[2])),
      'seconds_1_worker': rounded_list(times[1]),
      'seconds_2_workers': rounded_list(times[2]),
      'seconds_median_1_worker': rounded(median(times[1])),
      'seconds_median_2_workers': rounded(median(times[2])),
      'speedup_per_repeat': speedup['per_repeat'],
      'speedup': rounded(speedup['median']),
      'speedup_of_medians': rounded(speedup['of_medians']),
      'speedup_quiet': rounded(speedup['quiet']),
      'worker_cores_pinned': {str(w): v for w, v in pinned.items()},
      # CPU seconds per wall second of the busiest worker of a timed call.
      'worker_cores_max_1_worker': rounded(max(cores[1]), 3),
      'worker_cores_max_2_workers': rounded(max(cores[2]), 3),
      'worker_compile_seconds_per_call_1_worker': rounded(
          median(compile_per_call[1])),
      'worker_compile_seconds_per_call_2_workers': rounded(
          median(compile_per_call[2])),
      'raw_dask_seconds_median_1_worker': rounded(median(raw[1])),
      'raw_dask_seconds_median_2_workers': rounded(median(raw[2])),
      'raw_dask_speedup_per_repeat': raw_speedup['per_repeat'],
      'raw_dask_speedup': rounded(raw_speedup['median']),
      'raw_dask_speedup_quiet': rounded(raw_speedup['quiet']),
      'max_relative_error_vs_local': error,
      'goal_value': rounded(speedup['median'], 3), 'goal_met': met,
      'status': verdict(
          met, f'speed-up {speedup["median"]:.3g} {">=" if met else "<"} '
          f'{SPEEDUP_GOAL} (plain Dask tasks, compiled once: '
          f'{raw_speedup["median"]:.3g})', speedup['quiet'],
          speedup['quiet_repeats']),
      'peak_rss_mib': _common.peak_rss_mib(),
      'other_cores': other, 'other_cores_raw_dask': other_raw,
      'other_cores_max': max(other),
  }


RUNNERS = {'out_of_core': out_of_core, 'symmetric': symmetric,
           'dask_scaling': dask_scaling}


def main(argv=None) -> int:
  """Run the cases; write the JSON file (all cases) and print a table.

  Args:
    argv: command-line arguments (None for sys.argv).

  Returns:
    The process exit code.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='smoke sizes: N = 4000, 2000, 200')
  parser.add_argument('--cases', nargs='+', choices=CASES,
                      default=list(CASES),
                      help='run only these (printed, not written)')
  parser.add_argument('--store-child', nargs=3,
                      metavar=('N', 'BATCH_SIZE', 'DIR'),
                      help=argparse.SUPPRESS)   # case 1's child process
  args = parser.parse_args(argv)
  if args.store_child:
    n, size, directory = args.store_child
    print(json.dumps(store_child(int(n), int(size), directory)))
    return 0
  start = time.perf_counter()
  digest = source_digest()
  records = []
  for case in args.cases:
    n, size, repeats = SIZES[case][1 if args.quick else 0]
    print(f'running {case}: N={n}, batch_size={size}, repeats={repeats}',
          flush=True)
    record = RUNNERS[case](n, size, repeats)
    print(f'  {record.get("status")}', flush=True)
    records.append(record)
  sources = {'ntkjax_sources_sha256': digest,
             'ntkjax_sources_changed_during_run':
                 _common.ntkjax_sources_changed(digest)}
  if list(args.cases) != list(CASES):
    _common.print_table(records, COLUMNS)
    print(json.dumps(records, indent=2))
    return 0
  _common.write_benchmark(
      'scale', records, 'ntkjax', ntkjax.__version__, args.quick, 'scale',
      COLUMNS, goals=GOALS, quiet_cores=QUIET_CORES,
      quiet_wait_seconds=QUIET_WAIT_SECONDS,
      total_seconds=round(time.perf_counter() - start, 1), **git_state(),
      **sources)
  return 0


if __name__ == '__main__':
  sys.exit(main())
