"""Fully connected NNGP + NTK kernel: ntkjax vs. the bare input GEMM.

Network ("depth 3", three hidden layers of width 512, NTK parameterization):

    stax.serial(Dense(512, W_std=1.5, b_std=0.05), Act(),
                Dense(512, W_std=1.5, b_std=0.05), Act(),
                Dense(512, W_std=1.5, b_std=0.05), Act(),
                Dense(1,   W_std=1.5, b_std=0.05))

for Act in {Relu, Erf}, on two *different* batches x1, x2 of N random normal
float32 inputs of dimension d = 784. We time
`kernel_fn(x1, x2, ('nngp', 'ntk'))` (compiled with jax.jit inside
`kernel_fn`): one warm-up call, then the median of R timed calls, each
followed by `jax.block_until_ready` (R = 5 for N <= 1000, else 3).

Flop floor. The input kernel x1 x2^T / d is a GEMM of 2 N^2 d flops (about
25 GFLOP at N = 4000); every later layer is elementwise on the N x N kernels,
O(N^2 * depth) work (a few tens of flops and a couple of transcendentals per
entry per layer, no further GEMM). So the kernel can be no faster than the
GEMM, and for d = 784 the elementwise part should be a modest addition; our
goal is kernel_time <= 2 x gemm_time at N = 4000. The same run times the bare
jitted `x1 @ x2.T` (float32, Precision.HIGHEST, same protocol) and reports
ratio_to_gemm = kernel_seconds_median / gemm_seconds_median.

Output: benchmarks/results/fc_kernel_<backend>.json (backend =
jax.default_backend(), e.g. cpu), one record per (activation, N), plus
machine info. `peak_rss_mib` is the process high-water mark after the case
(monotone across cases in one run).

Usage:
    python benchmarks/bench_fc_kernel.py                 # N = 1000, 4000
    python benchmarks/bench_fc_kernel.py --sizes 1000    # chosen sizes
    python benchmarks/bench_fc_kernel.py --quick         # N = 200 only

The reference numbers (neural-tangents, separate venv) come from
benchmarks/reference_fc_kernel.py, which uses the same protocol and data.
"""

from __future__ import annotations

import argparse
import os
import sys

# Run as a script: make `_common` (next to this file) importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import _common  # noqa: E402
from ntkjax import stax  # noqa: E402

D = 784
DEPTH = 3
WIDTH = 512
W_STD, B_STD = 1.5, 0.05
GET = ('nngp', 'ntk')
ACTIVATIONS = {'Relu': stax.Relu, 'Erf': stax.Erf}
COLUMNS = ('activation', 'N', 'kernel_seconds_median', 'gemm_seconds_median',
           'ratio_to_gemm', 'peak_rss_mib')


def build(act_layer, depth: int = DEPTH):
  """The benchmark network: `depth` x (Dense, Act), then a Dense(1) readout.

  Args:
    act_layer: a layer constructor, e.g. `stax.Relu`.
    depth: number of hidden (Dense, Act) blocks.

  Returns:
    The `kernel_fn` of the network.
  """
  layers = []
  for _ in range(depth):
    layers += [stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), act_layer()]
  layers.append(stax.Dense(1, W_std=W_STD, b_std=B_STD))
  return stax.serial(*layers).kernel_fn


def repeats_for(n: int) -> int:
  """Timed repeats: fewer for big N, where one call already takes seconds."""
  return 5 if n <= 1000 else 3


def run_case(name: str, n: int, x1, x2, gemm_time: float) -> dict:
  """Time one (activation, N) case.

  Args:
    name: key of `ACTIVATIONS`.
    n: batch size (of both x1 and x2).
    x1, x2: the `(n, D)` inputs.
    gemm_time: median seconds of the bare GEMM on the same inputs.

  Returns:
    The result record for the JSON file.
  """
  kernel_fn = build(ACTIVATIONS[name])
  seconds = _common.median_seconds(lambda: kernel_fn(x1, x2, GET),
                                   repeats_for(n))
  return {
      'activation': name,
      'N': n,
      'd': D,
      'depth': DEPTH,
      'width': WIDTH,
      'repeats': repeats_for(n),
      'kernel_seconds_median': seconds,
      'gemm_seconds_median': gemm_time,
      'ratio_to_gemm': seconds / gemm_time,
      'gemm_gflops_per_second': 2 * n * n * D / gemm_time / 1e9,
      'peak_rss_mib': _common.peak_rss_mib(),
  }


def main(argv=None) -> int:
  """Run the benchmark; write the JSON file and print a table.

  Args:
    argv: command-line arguments (None for sys.argv).

  Returns:
    The process exit code.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 4000],
                      help='batch sizes N (default: 1000 4000)')
  parser.add_argument('--quick', action='store_true',
                      help='N = 200 only (a smoke run)')
  args = parser.parse_args(argv)
  sizes = [200] if args.quick else args.sizes

  cases = []
  for n in sizes:
    x1, x2 = _common.make_inputs(n, D)
    # One GEMM time per N, shared by both activations: it depends only on N.
    gemm_time = _common.gemm_seconds(x1, x2, max(repeats_for(n), 5))
    for name in ACTIVATIONS:
      cases.append(run_case(name, n, x1, x2, gemm_time))
      print(f'  done: {name} N={n}', flush=True)

  backend = jax.default_backend()
  payload = {
      'benchmark': 'fc_kernel',
      'library': 'ntkjax',
      'library_version': _library_version(),
      'quick': args.quick,
      'machine': _common.machine_info(),
      'cases': cases,
  }
  path = _common.write_results(f'fc_kernel_{backend}.json', payload)
  _common.print_table(cases, COLUMNS)
  print(f'wrote {path}')
  return 0


def _library_version() -> str:
  import ntkjax
  return getattr(ntkjax, '__version__', 'unknown')


if __name__ == '__main__':
  sys.exit(main())
