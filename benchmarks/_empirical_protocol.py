"""Empirical NTK benchmark protocol, shared by ours and the reference.

`bench_empirical_ntk.py` (ntkjax) and `reference_empirical_ntk.py`
(neural-tangents, separate venv with an older jax) differ only in how they
build `ntk_fn`; the network, data, cases, memory check, timing, record fields
and output live here so the two cannot drift apart. Imports neither library.

Network: `stax.serial(Dense(1024), Relu(), Dense(1024), Relu(), Dense(1024),
Relu(), Dense(O))` (NTK parameterization, default W_std / b_std), params from
`init_fn(PRNGKey(0), (-1, 784))`; x1, x2 two *different* batches of N = 128
random normal float32 samples (`_common.make_inputs`, N = 16 with --quick).
Cases: implementation x O in (1, 10) x vmap_axes in (None, 0), trace_axes=().

Per case, in a fresh subprocess (so peak RSS is that case's alone):
`fn = jax.jit(lambda a, b, p: ntk_fn(a, b, p))` is lowered and compiled
(`fn.lower(x1, x2, params).compile()`, lower_seconds / compile_seconds), and
XLA's buffer plan is read from `compiled.memory_analysis()` (planned_gb:
temporaries + arguments + outputs; None where the jax version reports nothing,
as jax 0.4.25 on CPU does). A plan over MEMORY_LIMIT_GB is recorded as
'skipped: XLA plans X GB ...' without running. Otherwise one warm-up call
(warmup_seconds), then REPEATS timed calls of the compiled function, each
followed by `jax.block_until_ready` (1 timed call if the warm-up took over
SLOW_WARMUP_SECONDS; 'repeats' says how many): kernel_seconds_median / _min,
peak_rss_mib (ru_maxrss, includes jax's baseline), timed_cores_used (CPU
seconds / wall seconds of the timed calls). The parent (see _watch.py) waits
until other processes are nearly idle before each case, kills a case after
CASE_TIMEOUT_SECONDS ('failed: timeout') or as soon as the child's RSS passes
MEMORY_LIMIT_GB or the machine's available memory drops under
MIN_AVAILABLE_GIB ('failed: killed ...'; the plan check alone cannot protect
a 24 GiB machine where the plan is unknown), and records wall_seconds,
quiet_wait_seconds and other_cores (cores used by other processes during the
case: a timing with other_cores well above 0 is inflated).

Flop floor: the forward pass on N samples is 2 N (784*1024 + 2*1024^2 +
1024*O) flops (~0.74 GFLOP at N = 128). A structured NTK needs about one
forward and one backward (cotangent) pass per output per side, 2 (1 + O)
forward passes, plus the Gram matrices of layer inputs, 2 N^2 (784 + 3*1024)
flops, and, for O > 1 with trace_axes=(), of cotangents, 2 N^2 O^2 (3*1024 +
O): ~3.1 GFLOP at O = 1, ~27 GFLOP at O = 10 (floor_gflop in each record).
Jacobian contraction and NTK-vector products instead pay ~N O num_params
per side (materialized Jacobians / cotangents), num_params ~2.9e6.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import jax

import _common
import _watch

D = 784
WIDTH = 1024
DEPTH = 3
N = 128
N_QUICK = 16
OUTPUT_DIMS = (1, 10)
VMAP_AXES = (None, 0)
TRACE_AXES = ()
REPEATS = 3
SLOW_WARMUP_SECONDS = 30.
MEMORY_LIMIT_GB = 20.
MIN_AVAILABLE_GIB = 1.5
CASE_TIMEOUT_SECONDS = 900
QUIET_CORES = 0.3
QUIET_WAIT_SECONDS = 300
COLUMNS = ('implementation', 'O', 'vmap_axes', 'N', 'status',
           'kernel_seconds_median', 'repeats', 'compile_seconds',
           'planned_gb', 'peak_rss_mib', 'other_cores', 'auto_choice')


def network(stax, output_dim: int):
  """The benchmark MLP, built with either library's `stax`.

  Args:
    stax: `ntkjax.stax` or `neural_tangents.stax` (same constructors).
    output_dim: width O of the last Dense layer.

  Returns:
    `(init_fn, apply_fn)`.
  """
  layers = []
  for _ in range(DEPTH):
    layers += [stax.Dense(WIDTH), stax.Relu()]
  init_fn, apply_fn, _ = stax.serial(*layers, stax.Dense(output_dim))
  return init_fn, apply_fn


def num_params(output_dim: int) -> int:
  """Weights and biases of `network(stax, output_dim)`."""
  widths = [D] + [WIDTH] * DEPTH + [output_dim]
  return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def floor_gflop(n: int, output_dim: int) -> float:
  """The structured NTK's flop floor (module docstring), in GFLOP."""
  forward = 2 * n * (D * WIDTH + (DEPTH - 1) * WIDTH**2 + WIDTH * output_dim)
  grams = 2 * n**2 * (D + DEPTH * WIDTH)
  grams += 2 * n**2 * output_dim**2 * (DEPTH * WIDTH + output_dim)
  return (2 * (1 + output_dim) * forward + grams) / 1e9


def case_key(impl_name: str, output_dim: int, n: int,
             vmap_axes: Optional[int]) -> dict:
  """The fields that identify a case (benchmarks/run_all.py pairs on them)."""
  return {'implementation': impl_name, 'O': output_dim, 'N': n,
          'vmap_axes': vmap_axes, 'd': D, 'width': WIDTH, 'depth': DEPTH}


def planned_gb(compiled) -> Optional[float]:
  """XLA's planned buffers (temporaries + arguments + outputs), in GB.

  Args:
    compiled: a `jax.stages.Compiled`.

  Returns:
    The total in units of 1e9 bytes, or None if this jax reports no plan
    (the attribute is missing, raises, or is all zeros, as on jax 0.4.25 CPU).
  """
  try:
    stats = compiled.memory_analysis()
    stats = stats[0] if isinstance(stats, (list, tuple)) else stats
    total = sum(int(getattr(stats, f'{kind}_size_in_bytes', 0) or 0)
                for kind in ('temp', 'argument', 'output'))
  except Exception:  # noqa: BLE001 -- any failure means "no plan"
    return None
  return total / 1e9 if total > 0 else None


def run_case(make_ntk_fn: Callable, stax, impl_name: str, output_dim: int,
             n: int, vmap_axes: Optional[int],
             describe: Optional[Callable] = None) -> dict:
  """Check the memory plan of one case and time it, in this process.

  Args:
    make_ntk_fn: `(apply_fn, impl_name, vmap_axes) -> ntk_fn(x1, x2, params)`.
    stax: the library's stax module.
    impl_name: implementation name, e.g. 'STRUCTURED_DERIVATIVES'.
    output_dim: O.
    n: samples per batch.
    vmap_axes: None or 0.
    describe: optional `(apply_fn, x1, x2, params, impl_name, vmap_axes) ->
      dict` of extra fields (e.g. AUTO's choice), called before compiling.

  Returns:
    The case record (fields in the module docstring).
  """
  record = dict(case_key(impl_name, output_dim, n, vmap_axes),
                num_params=num_params(output_dim),
                floor_gflop=round(floor_gflop(n, output_dim), 3))
  init_fn, apply_fn = network(stax, output_dim)
  _, params = init_fn(jax.random.PRNGKey(0), (-1, D))
  x1, x2 = _common.make_inputs(n, D)
  try:
    ntk_fn = make_ntk_fn(apply_fn, impl_name, vmap_axes)
    if describe is not None:
      record.update(describe(apply_fn, x1, x2, params, impl_name, vmap_axes))
    fn = jax.jit(lambda a, b, p: ntk_fn(a, b, p))
    start = time.perf_counter()
    lowered = fn.lower(x1, x2, params)
    record['lower_seconds'] = time.perf_counter() - start
    compiled = lowered.compile()
    record['compile_seconds'] = time.perf_counter() - start
  except NotImplementedError as error:
    record.update(status='not implemented', error=str(error),
                  peak_rss_mib=_common.peak_rss_mib())
    return record
  gb = planned_gb(compiled)
  record['planned_gb'] = None if gb is None else round(gb, 3)
  if gb is not None and gb > MEMORY_LIMIT_GB:
    record.update(status=f'skipped: XLA plans {gb:.1f} GB of buffers '
                         f'(limit {MEMORY_LIMIT_GB:g} GB)',
                  peak_rss_mib=_common.peak_rss_mib())
    return record
  start = time.perf_counter()
  jax.block_until_ready(compiled(x1, x2, params))  # first-touch allocations
  record['warmup_seconds'] = warmup = time.perf_counter() - start
  repeats = 1 if warmup > SLOW_WARMUP_SECONDS else REPEATS
  if repeats < REPEATS:
    record['note'] = (f'warm-up took {warmup:.0f} s > '
                      f'{SLOW_WARMUP_SECONDS:g} s: 1 timed call')
  times = []
  cpu = _watch.cpu_seconds()
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x1, x2, params))
    times.append(time.perf_counter() - start)
  cores = (_watch.cpu_seconds() - cpu) / sum(times)
  record.update(status='ok', repeats=repeats, timed_cores_used=round(cores, 2),
                kernel_seconds_median=statistics.median(times),
                kernel_seconds_min=min(times),
                peak_rss_mib=_common.peak_rss_mib())
  return record


def run_subprocess(script: str, impl_name: str, output_dim: int, n: int,
                   vmap_axes: Optional[int], quick: bool) -> dict:
  """Run one case as `script --case ...` in a fresh, watched interpreter.

  Waits for a quiet machine first (`_watch.wait_quiet`). Returns the child's
  record, or a 'failed: ...' one, plus wall_seconds, quiet_wait_seconds and
  other_cores (cores other processes used meanwhile; see _watch.py).
  """
  command = [sys.executable, script, '--case', impl_name, str(output_dim),
             str(vmap_axes)] + (['--quick'] if quick else [])
  waited = _watch.wait_quiet(QUIET_CORES, QUIET_WAIT_SECONDS)
  result = _watch.run(command, CASE_TIMEOUT_SECONDS, MEMORY_LIMIT_GB,
                      MIN_AVAILABLE_GIB)
  extra = {'wall_seconds': result['wall_seconds'],
           'quiet_wait_seconds': waited,
           'other_cores': result['other_cores']}
  lines = [l for l in result['stdout'].splitlines() if l.startswith('{')]
  if result['killed'] is None and result['returncode'] == 0 and lines:
    return dict(json.loads(lines[-1]), **extra)
  tail = (result['stderr'].strip().splitlines() or ['?'])[-1][:300]
  status = result['killed'] or f'failed (exit {result["returncode"]}): {tail}'
  return dict(case_key(impl_name, output_dim, n, vmap_axes), status=status,
              highest_rss_mib_seen=result['highest_rss_mib_seen'], **extra)


def main(argv, *, script: str, stax, make_ntk_fn: Callable,
         implementations: Sequence[str], library: str, version: str,
         prefix: str, describe: Optional[Callable] = None,
         finish: Optional[Callable] = None, extra: Optional[dict] = None
         ) -> int:
  """A benchmark script's main: one case (child) or all of them (parent).

  Args:
    argv: command-line arguments (None for sys.argv).
    script: the calling script's path (re-run for each case).
    stax, make_ntk_fn, describe: as in `run_case`.
    implementations, library, version: what runs, and its name and version.
    prefix: output file prefix, e.g. 'empirical_ntk'.
    finish: optional `records -> None`, called on all records before writing.
    extra: extra top-level fields of the JSON.

  Returns:
    The process exit code.
  """
  parser = argparse.ArgumentParser(description=f'{library}: empirical NTK')
  parser.add_argument('--quick', action='store_true',
                      help=f'N = {N_QUICK} instead of {N}')
  parser.add_argument('--case', nargs=3, metavar=('IMPL', 'O', 'VMAP'),
                      help='run one case (VMAP: None or 0) here, print JSON')
  args = parser.parse_args(argv)
  n = N_QUICK if args.quick else N
  if args.case:
    impl_name, output_dim = args.case[0], int(args.case[1])
    vmap_axes = None if args.case[2] == 'None' else int(args.case[2])
    print(json.dumps(run_case(make_ntk_fn, stax, impl_name, output_dim, n,
                              vmap_axes, describe)))
    return 0
  start = time.perf_counter()
  records = []
  for output_dim in OUTPUT_DIMS:
    for vmap_axes in VMAP_AXES:
      for impl_name in implementations:
        print(f'running {impl_name} O={output_dim} vmap_axes={vmap_axes} '
              f'N={n}', flush=True)
        record = run_subprocess(os.path.abspath(script), impl_name,
                                output_dim, n, vmap_axes, args.quick)
        print(f'  {record["status"]}: '
              f'{record.get("kernel_seconds_median", "-")} s, '
              f'{record["wall_seconds"]} s wall, other processes used '
              f'{record["other_cores"]} cores', flush=True)
        records.append(record)
  if finish is not None:
    finish(records)
  protocol = {'trace_axes': list(TRACE_AXES), 'repeats': REPEATS,
              'slow_warmup_seconds': SLOW_WARMUP_SECONDS,
              'memory_limit_gb': MEMORY_LIMIT_GB,
              'case_timeout_seconds': CASE_TIMEOUT_SECONDS,
              'quiet_cores': QUIET_CORES,
              'quiet_wait_seconds': QUIET_WAIT_SECONDS}
  _common.write_benchmark(
      'empirical_ntk', records, library, version, args.quick, prefix, COLUMNS,
      protocol=protocol, total_seconds=round(time.perf_counter() - start, 1),
      **(extra or {}))
  return 0
