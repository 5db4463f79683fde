"""Reference timings for bench_fc_kernel.py, with neural-tangents.

Same network, data and protocol as benchmarks/bench_fc_kernel.py (see its
docstring for the flop floor): depth-3 fully connected network of width 512,
Dense(W_std=1.5, b_std=0.05), Act in {Relu, Erf}, d = 784, two different
random normal float32 batches x1, x2 of N samples (same numpy seed, so the
same data), `jax.jit(kernel_fn, static_argnames='get')` called on
`(x1, x2, ('nngp', 'ntk'))`: one warm-up call, then the median of R timed
calls with `jax.block_until_ready` (R = 5 for N <= 1000, else 3). The bare
GEMM `x1 @ x2.T` (float32, Precision.HIGHEST) is timed in the same process,
so ratio_to_gemm is comparable with ours even though the jax versions differ.

This script runs ONLY in a separate virtualenv outside the repository;
neural-tangents is never a dependency of ntkjax, and this file must not import
ntkjax. Create the venv with (Python 3.11):

    python3 -m venv /tmp/nt_ref_venv
    /tmp/nt_ref_venv/bin/pip install --upgrade pip
    /tmp/nt_ref_venv/bin/pip install neural-tangents==0.6.5 jax==0.4.25 \
        jaxlib==0.4.25 numpy==1.26.4 scipy==1.12.0 tensorflow==2.15.1 \
        tf2jax==0.3.5

and run it from the repository root:

    /tmp/nt_ref_venv/bin/python benchmarks/reference_fc_kernel.py [--sizes 1000 4000 | --quick]

Output: benchmarks/results/fc_kernel_reference_<backend>.json, with the same
per-case fields as ours (benchmarks/run_all.py puts them side by side).
"""

from __future__ import annotations

import argparse
import os
import sys

# Run as a script: make `_common` (next to this file) importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import _common  # noqa: E402

try:
  import neural_tangents as nt  # noqa: E402
  from neural_tangents import stax  # noqa: E402
except ImportError:
  sys.exit('reference_fc_kernel.py needs neural-tangents; run it with the '
           'reference venv (see this file\'s docstring), e.g. '
           '/tmp/nt_ref_venv/bin/python benchmarks/reference_fc_kernel.py')

D = 784
DEPTH = 3
WIDTH = 512
W_STD, B_STD = 1.5, 0.05
GET = ('nngp', 'ntk')
ACTIVATIONS = {'Relu': stax.Relu, 'Erf': stax.Erf}
COLUMNS = ('activation', 'N', 'kernel_seconds_median', 'gemm_seconds_median',
           'ratio_to_gemm', 'peak_rss_mib')


def build(act_layer, depth: int = DEPTH):
  """The benchmark network in neural-tangents, jitted as its docs advise.

  Args:
    act_layer: a layer constructor, e.g. `stax.Relu`.
    depth: number of hidden (Dense, Act) blocks.

  Returns:
    `jax.jit(kernel_fn, static_argnames='get')`.
  """
  layers = []
  for _ in range(depth):
    layers += [stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), act_layer()]
  layers.append(stax.Dense(1, W_std=W_STD, b_std=B_STD))
  _, _, kernel_fn = stax.serial(*layers)
  return jax.jit(kernel_fn, static_argnames='get')


def repeats_for(n: int) -> int:
  """Timed repeats, as in bench_fc_kernel.py."""
  return 5 if n <= 1000 else 3


def run_case(name: str, n: int, x1, x2, gemm_time: float) -> dict:
  """Time one (activation, N) case.

  Args:
    name: key of `ACTIVATIONS`.
    n: batch size.
    x1, x2: the `(n, D)` inputs.
    gemm_time: median seconds of the bare GEMM on the same inputs.

  Returns:
    The result record for the JSON file.
  """
  kernel_fn = build(ACTIVATIONS[name])
  seconds = _common.median_seconds(lambda: kernel_fn(x1, x2, get=GET),
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
  """Run the reference benchmark; write the JSON file and print a table.

  Args:
    argv: command-line arguments (None for sys.argv).

  Returns:
    The process exit code.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 4000])
  parser.add_argument('--quick', action='store_true', help='N = 200 only')
  args = parser.parse_args(argv)
  sizes = [200] if args.quick else args.sizes

  cases = []
  for n in sizes:
    x1, x2 = _common.make_inputs(n, D)
    gemm_time = _common.gemm_seconds(x1, x2, max(repeats_for(n), 5))
    for name in ACTIVATIONS:
      cases.append(run_case(name, n, x1, x2, gemm_time))
      print(f'  done: {name} N={n}', flush=True)

  backend = jax.default_backend()
  payload = {
      'benchmark': 'fc_kernel',
      'library': 'neural_tangents',
      'library_version': getattr(nt, '__version__', 'unknown'),
      'quick': args.quick,
      'machine': _common.machine_info(),
      'cases': cases,
  }
  path = _common.write_results(f'fc_kernel_reference_{backend}.json', payload)
  _common.print_table(cases, COLUMNS)
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
