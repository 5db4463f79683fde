"""Empirical NTK benchmark protocol, shared by ours and the reference.

`bench_empirical_ntk.py` (ntkjax) and `reference_empirical_ntk.py`
(neural-tangents, separate venv with an older jax) differ only in the library
they pass in; the networks, data, cases, memory check, timing, record fields
and output live here so the two cannot drift apart. Imports neither library.

Networks (each library's `stax`, NTK parameterization, default W_std, no
biases -- both libraries' default b_std is None), params from
`init_fn(PRNGKey(0), (-1,) + input shape)`, x1 and x2 two *different*
batches of N = 128 random normal float32 samples (`_common.make_inputs`,
reshaped; N = 16 with --quick):

- 'mlp': `serial(Dense(1024), Relu(), Dense(1024), Relu(), Dense(1024),
  Relu(), Dense(O))` on d = 784 inputs, ~2.9e6 parameters.
- 'cnn': `serial(Conv(64, (3, 3), padding='SAME'), Relu(), Conv(64, (3, 3),
  padding='SAME'), Relu(), Conv(64, (3, 3), padding='SAME'), Relu(),
  GlobalAvgPool(), Dense(O))` on 8 x 8 x 1 (NHWC) images, 74304 + 64 O
  parameters.

Cases, per network: implementation x O in (1, 10) x vmap_axes in (None, 0),
trace_axes=(), and for each O one 'default call', implementation 'DEFAULT'
(vmap_axes recorded as 'default'): `empirical_ntk_fn(apply_fn,
trace_axes=())` with the library's own defaults for everything else (these
are recorded in `library_defaults`). Where those defaults name a concrete
implementation and vmap_axes that this run also times explicitly (the
reference's are JACOBIAN_CONTRACTION and None), the DEFAULT record is that
case's record (`same_as`), not a second run of the identical jitted call;
`--no-alias` times it anyway.

Per case, in a fresh subprocess (so peak RSS is that case's alone):
`fn = jax.jit(lambda a, b, p: ntk_fn(a, b, p))` is lowered and compiled
(`fn.lower(x1, x2, params).compile()`, lower_seconds / compile_seconds), and
XLA's buffer plan is read from `compiled.memory_analysis()` (planned_gb:
temporaries + arguments + outputs; None where the jax version reports nothing,
as jax 0.4.25 on CPU does). A plan over MEMORY_LIMIT_GB is recorded as
'skipped: XLA plans X GB ...' without running. Otherwise one warm-up call
(warmup_seconds), then REPEATS timed calls of the compiled function, each
followed by `jax.block_until_ready` (about FAST_SECONDS worth of calls, up
to MAX_REPEATS, for cases of milliseconds; 1 timed call if the warm-up took over
SLOW_WARMUP_SECONDS, i.e. where 1 + REPEATS calls would pass ~2 minutes;
'repeats' says how many): kernel_seconds_median / _min, peak_rss_mib
(ru_maxrss, includes jax's baseline), timed_cores_used (CPU seconds / wall
seconds of the timed calls). The parent (see _watch.py) waits until other
processes are nearly idle before each case (at most QUIET_WAIT_SECONDS per
case and QUIET_WAIT_TOTAL_SECONDS per run, so a busy machine cannot stretch
a run by hours), kills a case after CASE_TIMEOUT_SECONDS ('failed: timeout')
or as soon as the child's RSS passes MEMORY_LIMIT_GB or the machine's
available memory drops under MIN_AVAILABLE_GIB ('failed: killed ...'; the
plan check alone cannot protect a 24 GiB machine where the plan is unknown),
and records wall_seconds, quiet_wait_seconds, other_cores (cores used by
other processes during the case: a timing with other_cores well above 0 is
inflated) and measured_at.

Flop floors (floor_gflop in each record). MLP: the forward pass on N samples
is F = 2 N (784*1024 + 2*1024^2 + 1024*O) flops (~0.74 GFLOP at N = 128). A
structured NTK needs about one forward and one backward (cotangent) pass per
output per side, 2 (1 + O) F, plus the Gram matrices of layer inputs,
2 N^2 (784 + 3*1024) flops, and, for O > 1 with trace_axes=(), of
cotangents, 2 N^2 O^2 (3*1024 + O): ~3.1 GFLOP at O = 1, ~27 GFLOP at
O = 10. Jacobian contraction and NTK-vector products instead pay ~N O
num_params per side (materialized Jacobians / cotangents). CNN: F = 2 N (64
positions x 9 x (64 + 2*64^2) + 64 O) flops (~1.2 GFLOP at N = 128). Here
weight sharing makes the structured route's Gram matrices run over all
N x 64 positions (~2 (64 N)^2 x 9*64 flops per layer, ~77 GFLOP), so the
floor is the Jacobian route: per side one forward pass plus, per output, a
cotangent and a per-sample weight-gradient pass, 2 (1 + 2 O) F, plus the
contraction 2 N^2 O^2 num_params: ~9.7 GFLOP at O = 1, ~297 GFLOP at O = 10.

Command line (both scripts): `--network`, `--implementations`, `--outputs`
and `--cases` (glob patterns on 'network:IMPLEMENTATION:O:vmap_axes', e.g.
'cnn:*:10:*' or '*:DEFAULT:*:*') select a subset. A subset is printed, not
written, unless `--update` merges its records into the existing results file
(the others are kept, each with its own measured_at); the full selection
rewrites the file.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import inspect
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import jax

import _common
import _watch

NETWORKS = ('mlp', 'cnn')
D = 784
WIDTH = 1024
DEPTH = 3
CNN_SHAPE = (8, 8, 1)
CNN_CHANNELS = 64
CNN_FILTER = (3, 3)
CNN_DEPTH = 3
N = 128
N_QUICK = 16
OUTPUT_DIMS = (1, 10)
VMAP_AXES = (None, 0)
TRACE_AXES = ()
DEFAULT = 'DEFAULT'
DEFAULT_VMAP = 'default'
REPEATS = 3
FAST_SECONDS = 2.     # cases faster than FAST_SECONDS / REPEATS repeat more
MAX_REPEATS = 200
# A warm-up over 30 s means 1 + 3 calls would take over ~2 minutes.
SLOW_WARMUP_SECONDS = 30.
MEMORY_LIMIT_GB = 20.
MIN_AVAILABLE_GIB = 1.5
# The slowest case measured so far took ~350 s (reference
# JACOBIAN_CONTRACTION, MLP, O = 10, vmap_axes=None); a case far beyond that
# is a regression worth a 'failed: timeout', not an hour of the run.
CASE_TIMEOUT_SECONDS = 600
QUIET_CORES = 0.3
# Waiting for quiet is bounded so that a machine that stays busy adds at
# most 5 minutes to a run (~60 cases x ~5 s is already spent measuring).
QUIET_WAIT_SECONDS = 60
QUIET_WAIT_TOTAL_SECONDS = 300
# A --quick run is a smoke test of the scripts: it need not wait for quiet.
QUIET_WAIT_SECONDS_QUICK = 10
COLUMNS = ('network', 'implementation', 'O', 'vmap_axes', 'N', 'status',
           'kernel_seconds_median', 'repeats', 'compile_seconds',
           'planned_gb', 'peak_rss_mib', 'other_cores', 'auto_choice')


def input_shape(net: str) -> tuple:
  """One sample's shape: (784,) for the MLP, (8, 8, 1) for the CNN."""
  return (D,) if net == 'mlp' else CNN_SHAPE


def network(stax, net: str, output_dim: int):
  """A benchmark network, built with either library's `stax`.

  Args:
    stax: `ntkjax.stax` or `neural_tangents.stax` (same constructors).
    net: 'mlp' or 'cnn' (module docstring).
    output_dim: width O of the last Dense layer.

  Returns:
    `(init_fn, apply_fn)`.
  """
  layers = []
  if net == 'mlp':
    for _ in range(DEPTH):
      layers += [stax.Dense(WIDTH), stax.Relu()]
  elif net == 'cnn':
    for _ in range(CNN_DEPTH):
      layers += [stax.Conv(CNN_CHANNELS, CNN_FILTER, padding='SAME'),
                 stax.Relu()]
    layers.append(stax.GlobalAvgPool())
  else:
    raise ValueError(f'unknown network {net!r}; expected one of {NETWORKS}')
  init_fn, apply_fn, _ = stax.serial(*layers, stax.Dense(output_dim))
  return init_fn, apply_fn


def num_params(net: str, output_dim: int) -> int:
  """Weights of `network(stax, net, output_dim)` (no biases: b_std=None)."""
  if net == 'mlp':
    widths = [D] + [WIDTH] * DEPTH + [output_dim]
  else:
    taps = math.prod(CNN_FILTER)
    widths = [CNN_SHAPE[-1] * taps] + [CNN_CHANNELS * taps] * (CNN_DEPTH - 1)
    return (sum(w * CNN_CHANNELS for w in widths) +
            CNN_CHANNELS * output_dim)
  return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def floor_gflop(net: str, n: int, output_dim: int) -> float:
  """The flop floor of one case (module docstring), in GFLOP."""
  if net == 'mlp':
    forward = 2 * n * (D * WIDTH + (DEPTH - 1) * WIDTH**2 +
                       WIDTH * output_dim)
    grams = 2 * n**2 * (D + DEPTH * WIDTH)
    grams += 2 * n**2 * output_dim**2 * (DEPTH * WIDTH + output_dim)
    return (2 * (1 + output_dim) * forward + grams) / 1e9
  positions = math.prod(CNN_SHAPE[:-1])
  head = CNN_CHANNELS * output_dim
  forward = 2 * n * (positions * (num_params(net, output_dim) - head) + head)
  contraction = 2 * n**2 * output_dim**2 * num_params(net, output_dim)
  return (2 * (1 + 2 * output_dim) * forward + contraction) / 1e9


def make_data(net: str, n: int):
  """The case's inputs: two different float32 batches of `n` samples."""
  shape = input_shape(net)
  x1, x2 = _common.make_inputs(n, math.prod(shape))
  return x1.reshape((n,) + shape), x2.reshape((n,) + shape)


def case_key(net: str, impl_name: str, output_dim: int, n: int,
             vmap_axes) -> dict:
  """The fields that identify a case (benchmarks/run_all.py pairs on them)."""
  key = {'network': net, 'implementation': impl_name, 'O': output_dim,
         'N': n, 'vmap_axes': vmap_axes}
  if net == 'mlp':
    key.update(d=D, width=WIDTH, depth=DEPTH)
  else:
    key.update(input_shape=list(CNN_SHAPE), width=CNN_CHANNELS,
               depth=CNN_DEPTH)
  return key


def case_label(net: str, impl_name: str, output_dim: int, vmap_axes) -> str:
  """'network:IMPLEMENTATION:O:vmap_axes', what --cases patterns match."""
  return f'{net}:{impl_name}:{output_dim}:{vmap_axes}'


def record_label(record: dict) -> str:
  """`case_label` of a record (records from before the CNN are MLP ones)."""
  return case_label(record.get('network', 'mlp'), record['implementation'],
                    record['O'], record['vmap_axes'])


def select_cases(networks: Sequence[str], implementations: Sequence[str],
                 outputs: Sequence[int], patterns: Sequence[str]) -> list:
  """The cases to run, in run order.

  Args:
    networks: subset of NETWORKS.
    implementations: explicit implementation names, plus DEFAULT for the
      default calls.
    outputs: subset of OUTPUT_DIMS (any positive O works).
    patterns: fnmatch patterns on `case_label`; empty means all.

  Returns:
    `(net, impl_name, O, vmap_axes)` tuples. Each (net, O)'s DEFAULT case
    comes after its explicit cases, so it can reuse one of them (`same_as`).
  """
  cases = []
  for net in networks:
    for output_dim in outputs:
      group = [(net, impl, output_dim, vmap_axes) for vmap_axes in VMAP_AXES
               for impl in implementations if impl != DEFAULT]
      if DEFAULT in implementations:
        group.append((net, DEFAULT, output_dim, DEFAULT_VMAP))
      cases += [c for c in group if not patterns or any(
          fnmatch.fnmatchcase(case_label(*c), p) for p in patterns)]
  return cases


def library_defaults(empirical_ntk_fn: Callable) -> dict:
  """The defaults of `empirical_ntk_fn`'s vmap_axes and implementation.

  Args:
    empirical_ntk_fn: the library's `empirical_ntk_fn`.

  Returns:
    {'vmap_axes': None, an int, or the repr of anything else (e.g. an
    automatic-detection marker), 'implementation': the enum member's name
    (or repr)}; a parameter the signature lacks is reported as 'absent'.
  """
  params = inspect.signature(empirical_ntk_fn).parameters
  out = {}
  for name in ('vmap_axes', 'implementation'):
    value = params[name].default if name in params else 'absent'
    if name == 'implementation' and hasattr(value, 'name'):
      value = value.name
    elif not (value is None or isinstance(value, (int, str))):
      value = repr(value)
    out[name] = value
  return out


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


def make_ntk_fn(empirical_ntk_fn: Callable, implementation_enum, apply_fn,
                impl_name: str, vmap_axes) -> Callable:
  """A library's `ntk_fn(x1, x2, params)` for one case.

  Args:
    empirical_ntk_fn: the library's `empirical_ntk_fn`.
    implementation_enum: the library's `NtkImplementation`.
    apply_fn: the network's apply function.
    impl_name: an implementation's name, or DEFAULT for the default call.
    vmap_axes: None or 0 (ignored for DEFAULT).

  Returns:
    The function to jit.
  """
  if impl_name == DEFAULT:
    # Only trace_axes is given: the "default call" is whatever the
    # library does when the user says nothing else.
    return empirical_ntk_fn(apply_fn, trace_axes=TRACE_AXES)
  return empirical_ntk_fn(apply_fn, trace_axes=TRACE_AXES,
                          vmap_axes=vmap_axes,
                          implementation=implementation_enum[impl_name])


def run_case(library: dict, net: str, impl_name: str, output_dim: int,
             n: int, vmap_axes) -> dict:
  """Check the memory plan of one case and time it, in this process.

  Args:
    library: the script's library description (see `main`).
    net: 'mlp' or 'cnn'.
    impl_name: implementation name, e.g. 'STRUCTURED_DERIVATIVES', or DEFAULT.
    output_dim: O.
    n: samples per batch.
    vmap_axes: None, 0, or DEFAULT_VMAP.

  Returns:
    The case record (fields in the module docstring).
  """
  record = dict(case_key(net, impl_name, output_dim, n, vmap_axes),
                floor_gflop=round(floor_gflop(net, n, output_dim), 3),
                xla_flags=os.environ.get('XLA_FLAGS', ''))
  init_fn, apply_fn = network(library['stax'], net, output_dim)
  _, params = init_fn(jax.random.PRNGKey(0), (-1,) + input_shape(net))
  record['num_params'] = sum(p.size for p in jax.tree_util.tree_leaves(params))
  x1, x2 = make_data(net, n)
  if impl_name == DEFAULT:
    record['library_defaults'] = library_defaults(library['empirical_ntk_fn'])
  try:
    ntk_fn = make_ntk_fn(library['empirical_ntk_fn'],
                         library['implementation_enum'], apply_fn, impl_name,
                         vmap_axes)
    if library.get('describe') is not None:
      record.update(library['describe'](apply_fn, x1, x2, params, impl_name,
                                        vmap_axes))
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
  if warmup < FAST_SECONDS / REPEATS:
    # Millisecond cases: 3 calls are at the mercy of one stall; time about
    # FAST_SECONDS of calls (at most MAX_REPEATS) for a stable median.
    repeats = min(MAX_REPEATS, max(REPEATS, int(FAST_SECONDS /
                                                max(warmup, 1e-4))))
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


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')


def run_subprocess(script: str, case: tuple, n: int, quick: bool,
                   quiet_seconds: float) -> dict:
  """Run one case as `script --case ...` in a fresh, watched interpreter.

  Args:
    script: the benchmark script's absolute path.
    case: `(net, impl_name, O, vmap_axes)`.
    n: samples per batch (for the record of a case that died).
    quick: pass --quick.
    quiet_seconds: the longest to wait for a quiet machine first
      (`_watch.wait_quiet`; 0 starts at once).

  Returns:
    The child's record, or a 'failed: ...' one, plus wall_seconds,
    quiet_wait_seconds, other_cores (cores other processes used meanwhile;
    see _watch.py) and measured_at.
  """
  net, impl_name, output_dim, vmap_axes = case
  command = [sys.executable, script, '--case', net, impl_name,
             str(output_dim), str(vmap_axes)] + (['--quick'] if quick else [])
  waited = _watch.wait_quiet(QUIET_CORES, quiet_seconds)
  measured_at = _now()
  result = _watch.run(command, CASE_TIMEOUT_SECONDS, MEMORY_LIMIT_GB,
                      MIN_AVAILABLE_GIB)
  extra = {'wall_seconds': result['wall_seconds'],
           'quiet_wait_seconds': waited,
           'other_cores': result['other_cores'], 'measured_at': measured_at}
  lines = [l for l in result['stdout'].splitlines() if l.startswith('{')]
  if result['killed'] is None and result['returncode'] == 0 and lines:
    return dict(json.loads(lines[-1]), **extra)
  tail = (result['stderr'].strip().splitlines() or ['?'])[-1][:300]
  status = result['killed'] or f'failed (exit {result["returncode"]}): {tail}'
  return dict(case_key(net, impl_name, output_dim, n, vmap_axes),
              status=status,
              highest_rss_mib_seen=result['highest_rss_mib_seen'], **extra)


def alias_of(defaults: dict, implementations: Sequence[str]):
  """The explicit case a DEFAULT call is identical to, if this run has one.

  Args:
    defaults: `library_defaults(...)`.
    implementations: the explicit implementations this library runs.

  Returns:
    `(impl_name, vmap_axes)`, or None where the defaults are not a plain
    implementation with vmap_axes in VMAP_AXES (e.g. AUTO, or automatic
    example-axis detection): then DEFAULT is timed on its own.
  """
  impl, vmap_axes = defaults['implementation'], defaults['vmap_axes']
  if impl in implementations and impl != 'AUTO' and vmap_axes in VMAP_AXES:
    return impl, vmap_axes
  return None


def order_key(record: dict, implementations: Sequence[str]) -> tuple:
  """Sort key putting records in `select_cases` order."""
  impls = list(implementations) + [DEFAULT]
  vmaps = list(VMAP_AXES) + [DEFAULT_VMAP]
  net = record.get('network', 'mlp')
  impl = record['implementation']
  return (NETWORKS.index(net) if net in NETWORKS else len(NETWORKS),
          record['O'], impl == DEFAULT,
          vmaps.index(record['vmap_axes'])
          if record['vmap_axes'] in vmaps else len(vmaps),
          impls.index(impl) if impl in impls else len(impls))


def merge_into_file(path: str, records: list, implementations: Sequence[str]
                    ) -> list:
  """`records` in place of the same cases of the results file at `path`.

  Args:
    path: the existing results file (missing or malformed: nothing kept).
    records: this run's records.
    implementations: for the order of the result.

  Returns:
    The old records of cases this run did not measure, plus `records`, in
    case order. Old records without 'network' (written before the CNN was
    added) count as MLP ones, so they are replaced, not duplicated.
  """
  try:
    with open(path) as f:
      old = json.load(f)['cases']
  except (OSError, ValueError, KeyError, TypeError):
    old = []
  new = {(record_label(r), r['N']) for r in records}
  kept = [r for r in old if isinstance(r, dict) and 'implementation' in r
          and (record_label(r), r.get('N')) not in new]
  return sorted(kept + records, key=lambda r: order_key(r, implementations))


def parse_args(argv, library_name: str, implementations: Sequence[str]):
  """The command line shared by both scripts (module docstring)."""
  parser = argparse.ArgumentParser(description=f'{library_name}: empirical NTK')
  parser.add_argument('--quick', action='store_true',
                      help=f'N = {N_QUICK} instead of {N}')
  parser.add_argument('--network', nargs='+', choices=NETWORKS,
                      default=list(NETWORKS))
  parser.add_argument('--implementations', nargs='+', metavar='IMPL',
                      help=f'subset of {", ".join(implementations)}, '
                           f'{DEFAULT}; others are ignored (the reference '
                           'has no timed AUTO)')
  parser.add_argument('--outputs', nargs='+', type=int,
                      default=list(OUTPUT_DIMS), metavar='O')
  parser.add_argument('--cases', nargs='+', default=[], metavar='PATTERN',
                      help="glob patterns on 'network:IMPL:O:vmap_axes', "
                           "e.g. 'cnn:*:10:*' or '*:DEFAULT:*:*'")
  parser.add_argument('--update', action='store_true',
                      help='merge a subset into the existing results file '
                           '(without it a subset is printed, not written)')
  parser.add_argument('--no-alias', action='store_true',
                      help=f'time {DEFAULT} even where it is the same call '
                           'as an explicit case of this run')
  parser.add_argument('--variant', metavar='NAME',
                      help='write <prefix>_NAME_<backend>.json instead, for '
                           'runs under non-default settings (e.g. XLA_FLAGS '
                           'in the environment; every record keeps them)')
  parser.add_argument('--case', nargs=4, metavar=('NET', 'IMPL', 'O', 'VMAP'),
                      help='run one case here and print its JSON (VMAP: '
                           f'None, 0 or {DEFAULT_VMAP})')
  return parser.parse_args(argv)


def main(argv, *, script: str, library: dict, prefix: str,
         finish: Optional[Callable] = None, extra: Optional[dict] = None
         ) -> int:
  """A benchmark script's main: one case (child) or a selection (parent).

  Args:
    argv: command-line arguments (None for sys.argv).
    script: the calling script's path (re-run for each case).
    library: {'name', 'version', 'stax', 'empirical_ntk_fn',
      'implementation_enum', 'implementations' (explicit names timed),
      optionally 'describe': `(apply_fn, x1, x2, params, impl_name,
      vmap_axes) -> dict` of extra fields, called before compiling}.
    prefix: output file prefix, e.g. 'empirical_ntk'.
    finish: optional `records -> None`, called on all records (merged ones
      included) before writing.
    extra: extra top-level fields of the JSON.

  Returns:
    The process exit code.
  """
  implementations = tuple(library['implementations'])
  args = parse_args(argv, library['name'], implementations)
  n = N_QUICK if args.quick else N
  if args.case:
    net, impl_name, output_dim, vmap_axes = args.case
    vmap_axes = {'None': None, DEFAULT_VMAP: DEFAULT_VMAP}.get(
        vmap_axes, vmap_axes)
    vmap_axes = vmap_axes if vmap_axes in (None, DEFAULT_VMAP) else int(
        vmap_axes)
    print(json.dumps(run_case(library, net, impl_name, int(output_dim), n,
                              vmap_axes)))
    return 0
  chosen = implementations + (DEFAULT,)
  if args.implementations:
    chosen = tuple(i for i in chosen if i in args.implementations)
  cases = select_cases(args.network, chosen, args.outputs, args.cases)
  full = cases == select_cases(NETWORKS, implementations + (DEFAULT,),
                               OUTPUT_DIMS, [])
  if not cases:
    print(f'{library["name"]}: no case selected; nothing to do')
    return 0
  defaults = library_defaults(library['empirical_ntk_fn'])
  alias = None if args.no_alias else alias_of(defaults, implementations)
  start, started_at, quiet_budget = time.perf_counter(), _now(), \
      QUIET_WAIT_TOTAL_SECONDS
  records, by_label = [], {}
  for case in cases:
    net, impl_name, output_dim, vmap_axes = case
    same = alias and impl_name == DEFAULT and by_label.get(
        case_label(net, alias[0], output_dim, alias[1]))
    if same:
      # The identical jitted call was just timed: reuse it, say so.
      record = dict(same, implementation=DEFAULT, vmap_axes=DEFAULT_VMAP,
                    library_defaults=defaults, same_as=record_label(same))
      print(f'{case_label(*case)}: same call as {record["same_as"]}')
    else:
      print(f'running {case_label(*case)} N={n}', flush=True)
      record = run_subprocess(os.path.abspath(script), case, n, args.quick,
                              min(QUIET_WAIT_SECONDS_QUICK if args.quick
                                  else QUIET_WAIT_SECONDS, quiet_budget))
      quiet_budget = max(0., quiet_budget - record['quiet_wait_seconds'])
      print(f'  {record["status"]}: '
            f'{record.get("kernel_seconds_median", "-")} s, '
            f'{record["wall_seconds"]} s wall, other processes used '
            f'{record["other_cores"]} cores', flush=True)
    records.append(record)
    by_label[case_label(*case)] = record
  if args.variant:
    prefix = f'{prefix}_{args.variant}'
  path = os.path.join(
      _common.RESULTS_DIR, f'{prefix}_{jax.default_backend()}'
      f'{"_quick" if args.quick else ""}.json')
  if not full and not args.update:
    if finish is not None:
      finish(records)
    _common.print_table(records, COLUMNS)
    print(f'a subset: not written (add --update to merge it into {path})')
    return 0
  if not full:
    records = merge_into_file(path, records, implementations)
  if finish is not None:
    finish(records)
  protocol = {'trace_axes': list(TRACE_AXES), 'repeats': REPEATS,
              'slow_warmup_seconds': SLOW_WARMUP_SECONDS,
              'memory_limit_gb': MEMORY_LIMIT_GB,
              'case_timeout_seconds': CASE_TIMEOUT_SECONDS,
              'quiet_cores': QUIET_CORES,
              'quiet_wait_seconds': QUIET_WAIT_SECONDS,
              'quiet_wait_total_seconds': QUIET_WAIT_TOTAL_SECONDS}
  last_run = {'started_at': started_at, 'finished_at': _now(),
              'cases': [case_label(*c) for c in cases] if not full else 'all',
              'seconds': round(time.perf_counter() - start, 1)}
  # A variant is its own benchmark for run_all.py (not paired with the
  # reference, not mixed into the default settings' summary).
  _common.write_benchmark(
      'empirical_ntk' + (f'_{args.variant}' if args.variant else ''), records, library['name'], library['version'],
      args.quick, prefix, COLUMNS, protocol=protocol,
      library_defaults=defaults, last_run=last_run,
      total_seconds=last_run['seconds'], **(extra or {}))
  return 0
