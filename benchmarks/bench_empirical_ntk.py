"""Empirical NTK of a wide MLP: ntkjax's implementations, time and peak memory.

Network (three hidden layers of width 1024, NTK parameterization, default
W_std / b_std):

    stax.serial(Dense(1024), Relu(), Dense(1024), Relu(),
                Dense(1024), Relu(), Dense(O))

on two *different* batches x1, x2 of N = 128 random normal float32 inputs of
dimension d = 784 (N = 16 with --quick), params from `init_fn(key, (-1, 784))`.
We time `jax.jit(lambda x1, x2, p: ntk_fn(x1, x2, p))` with
`ntk_fn = ntkjax.empirical_ntk_fn(apply_fn, trace_axes=(),
implementation=impl)` (so the result is the full (N, N, O, O) NTK): one
warm-up call (compilation), then the median of 3 timed calls, each followed
by `jax.block_until_ready`.

Cases: every `NtkImplementation` (JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS,
STRUCTURED_DERIVATIVES, AUTO) for O = 1 and O = 10. Implementations that
raise NotImplementedError are recorded as "not implemented". Before running
a case we estimate the memory of the per-sample Jacobians / cotangents,
2 sides x N x O x num_params x 4 bytes; a case over MEMORY_LIMIT_GB is
recorded as "skipped: would need ~X GB" without running (at N = 128, O = 10
that is ~30 GB).

Peak memory is the process high-water mark (ru_maxrss), so every case runs
in a fresh subprocess of this script (`--case IMPL O`) and its peak_rss_mib is
that case's alone (it includes jax's own baseline, a few hundred MiB).

Output: benchmarks/results/empirical_ntk_<backend>.json
(empirical_ntk_<backend>_quick.json for --quick): machine info, one record
per (implementation, O), and the reference library's numbers for the same
network as constants (REFERENCE; they were not measured here), also copied
into each matching case of a full run as reference_seconds / reference_status.

Usage:
    python benchmarks/bench_empirical_ntk.py            # N = 128
    python benchmarks/bench_empirical_ntk.py --quick    # N = 16
    python benchmarks/bench_empirical_ntk.py --case NTK_VECTOR_PRODUCTS 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Run as a script: make the helpers next to this file importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import _common  # noqa: E402
import ntkjax  # noqa: E402
from ntkjax import stax  # noqa: E402

D = 784
WIDTH = 1024
DEPTH = 3
N_FULL = 128
N_QUICK = 16
REPEATS = 3
OUTPUT_DIMS = (1, 10)
IMPLEMENTATIONS = ('JACOBIAN_CONTRACTION', 'NTK_VECTOR_PRODUCTS',
                   'STRUCTURED_DERIVATIVES', 'AUTO')
MEMORY_LIMIT_GB = 20.0

# neural-tangents 0.6.5 on a 2-core CPU, same network, N = 128, d = 784, as
# reported in the neural-tangents GitHub issue that motivated this benchmark
# (numbers quoted there; not measured by this script).
REFERENCE = {
    'library': 'neural_tangents',
    'library_version': '0.6.5',
    'source': ('neural-tangents GitHub issue (empirical NTK of this MLP, '
               'N = 128, d = 784, trace_axes=()), 2-core CPU; quoted, '
               'not measured here'),
    'cases': [
        {'implementation': 'JACOBIAN_CONTRACTION', 'O': 1, 'seconds': 5.9},
        {'implementation': 'NTK_VECTOR_PRODUCTS', 'O': 1, 'seconds': 1.3},
        {'implementation': 'STRUCTURED_DERIVATIVES', 'O': 1, 'seconds': 0.69},
        {'implementation': 'JACOBIAN_CONTRACTION', 'O': 10, 'seconds': None,
         'status': 'did not fit in 24 GB'},
        {'implementation': 'NTK_VECTOR_PRODUCTS', 'O': 10, 'seconds': None,
         'status': 'did not fit in 24 GB'},
        {'implementation': 'STRUCTURED_DERIVATIVES', 'O': 10, 'seconds': 7.6},
    ],
}

COLUMNS = ('implementation', 'O', 'N', 'status', 'kernel_seconds_median',
           'peak_rss_mib', 'estimated_gb', 'reference_seconds',
           'reference_status')


def network(output_dim: int):
  """The benchmark network.

  Args:
    output_dim: width O of the last Dense layer.

  Returns:
    `(init_fn, apply_fn)` of the stax network.
  """
  layers = []
  for _ in range(DEPTH):
    layers += [stax.Dense(WIDTH), stax.Relu()]
  init_fn, apply_fn, _ = stax.serial(*layers, stax.Dense(output_dim))
  return init_fn, apply_fn


def num_params(output_dim: int) -> int:
  """Number of parameters (weights and biases) of `network(output_dim)`.

  Args:
    output_dim: width O of the last layer.

  Returns:
    The count, from the shapes `init_fn` would produce.
  """
  widths = [D] + [WIDTH] * DEPTH + [output_dim]
  return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def estimated_gb(n: int, output_dim: int) -> float:
  """Rough memory of the Jacobians / cotangents (both sides), in GB.

  Args:
    n: samples per batch.
    output_dim: O.

  Returns:
    2 * n * O * num_params * 4 bytes, in units of 1e9 bytes.
  """
  return 2 * n * output_dim * num_params(output_dim) * 4 / 1e9


def run_case(impl_name: str, output_dim: int, n: int) -> dict:
  """Time one case in this process (meant to be a fresh subprocess).

  Args:
    impl_name: an `ntkjax.NtkImplementation` member name.
    output_dim: O.
    n: samples per batch.

  Returns:
    A record with status 'ok' and the timings and peak RSS, or status
    'not implemented' if the implementation raises NotImplementedError.
  """
  record = {'implementation': impl_name, 'O': output_dim, 'N': n, 'd': D,
            'width': WIDTH, 'depth': DEPTH, 'repeats': REPEATS,
            'num_params': num_params(output_dim)}
  init_fn, apply_fn = network(output_dim)
  _, params = init_fn(jax.random.PRNGKey(0), (-1, D))
  x1, x2 = _common.make_inputs(n, D)
  try:
    ntk_fn = ntkjax.empirical_ntk_fn(
        apply_fn, trace_axes=(),
        implementation=ntkjax.NtkImplementation[impl_name])
    fn = jax.jit(lambda a, b, p: ntk_fn(a, b, p))
    (times,) = _common.time_interleaved([lambda: fn(x1, x2, params)],
                                        REPEATS)
  except NotImplementedError as error:
    record.update(status='not implemented', error=str(error),
                  peak_rss_mib=_common.peak_rss_mib())
    return record
  record.update(status='ok',
                kernel_seconds_median=statistics.median(times),
                kernel_seconds_min=min(times),
                peak_rss_mib=_common.peak_rss_mib())
  return record


def run_subprocess(impl_name: str, output_dim: int, quick: bool) -> dict:
  """Run one case in a fresh interpreter, so its peak RSS is its own.

  Args:
    impl_name: an `ntkjax.NtkImplementation` member name.
    output_dim: O.
    quick: use N_QUICK samples.

  Returns:
    The child's record, or one with status 'failed: ...' if it crashed.
  """
  command = [sys.executable, os.path.abspath(__file__), '--case', impl_name,
             str(output_dim)] + (['--quick'] if quick else [])
  start = time.perf_counter()
  proc = subprocess.run(command, capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode == 0 and lines:
    return json.loads(lines[-1])
  tail = (proc.stderr.strip().splitlines() or ['?'])[-1]
  return {'implementation': impl_name, 'O': output_dim,
          'N': N_QUICK if quick else N_FULL, 'd': D, 'width': WIDTH,
          'depth': DEPTH, 'status': f'failed (exit {proc.returncode}): {tail}',
          'wall_seconds': round(time.perf_counter() - start, 1)}


def attach_reference(record: dict) -> dict:
  """Copy the matching REFERENCE numbers into `record`.

  Args:
    record: a case record with 'implementation' and 'O'.

  Returns:
    `record`, with reference_seconds / reference_status where known; only
    for N = N_FULL, the size the reference was measured at.
  """
  if record.get('N') != N_FULL:
    return record
  for ref in REFERENCE['cases']:
    if (ref['implementation'], ref['O']) == (record['implementation'],
                                             record['O']):
      if ref['seconds'] is not None:
        record['reference_seconds'] = ref['seconds']
      record['reference_status'] = ref.get('status', 'ok')
  return record


def main(argv=None) -> int:
  """Run every case (each in a subprocess), write the JSON, print a table.

  Args:
    argv: command-line arguments (None for sys.argv).

  Returns:
    The process exit code.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help=f'N = {N_QUICK} instead of {N_FULL}')
  parser.add_argument('--case', nargs=2, metavar=('IMPL', 'O'),
                      help='run one case in this process, print its JSON')
  args = parser.parse_args(argv)
  n = N_QUICK if args.quick else N_FULL

  if args.case:
    impl_name, output_dim = args.case[0], int(args.case[1])
    print(json.dumps(run_case(impl_name, output_dim, n)))
    return 0

  records = []
  for output_dim in OUTPUT_DIMS:
    for impl_name in IMPLEMENTATIONS:
      gb = estimated_gb(n, output_dim)
      if gb > MEMORY_LIMIT_GB and impl_name in ('JACOBIAN_CONTRACTION',
                                                'NTK_VECTOR_PRODUCTS'):
        record = {'implementation': impl_name, 'O': output_dim, 'N': n,
                  'd': D, 'width': WIDTH, 'depth': DEPTH,
                  'status': f'skipped: would need ~{gb:.0f} GB'}
      else:
        print(f'running {impl_name} O={output_dim} N={n}', flush=True)
        record = run_subprocess(impl_name, output_dim, args.quick)
      record['estimated_gb'] = round(gb, 2)
      records.append(attach_reference(record))

  payload = {
      'benchmark': 'empirical_ntk',
      'library': 'ntkjax',
      'library_version': ntkjax.__version__,
      'quick': args.quick,
      'machine': _common.machine_info(),
      'reference': REFERENCE,
      'cases': records,
  }
  suffix = '_quick' if args.quick else ''
  path = _common.write_results(
      f'empirical_ntk_{jax.default_backend()}{suffix}.json', payload)
  _common.print_table(records, COLUMNS)
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
