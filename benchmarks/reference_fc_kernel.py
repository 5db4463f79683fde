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

    /tmp/nt_ref_venv/bin/python benchmarks/reference_fc_kernel.py \
        [--sizes 1000 4000 | --quick]

Output: benchmarks/results/fc_kernel_reference_<backend>.json, with the same
per-case fields as ours (benchmarks/run_all.py puts them side by side).
"""

from __future__ import annotations

import os
import sys

# Run as a script: make the helpers next to this file importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import _fc_protocol as protocol  # noqa: E402

try:
  import neural_tangents as nt  # noqa: E402
  from neural_tangents import stax  # noqa: E402
except ImportError:
  sys.exit('reference_fc_kernel.py needs neural-tangents; run it with the '
           "reference venv (see this file's docstring), e.g. "
           '/tmp/nt_ref_venv/bin/python benchmarks/reference_fc_kernel.py')


def build(act_name: str):
  """neural-tangents' kernel_fn for the network, jitted as its docs advise.

  Args:
    act_name: 'Relu' or 'Erf'.

  Returns:
    `jax.jit(kernel_fn, static_argnames='get')`.
  """
  _, _, kernel_fn = stax.serial(*protocol.network_layers(stax, act_name))
  return jax.jit(kernel_fn, static_argnames='get')


def call(kernel_fn, x1, x2):
  """The timed call: NNGP and NTK between two different batches."""
  return kernel_fn(x1, x2, get=protocol.GET)


def main(argv=None) -> int:
  """Run the reference benchmark; write the JSON file and print a table.

  Args:
    argv: command-line arguments (None for sys.argv).

  Returns:
    The process exit code.
  """
  sizes, quick = protocol.parse_sizes(argv, __doc__.splitlines()[0])
  records = protocol.run(build, call, sizes)
  protocol.write(records, 'neural_tangents', getattr(nt, '__version__', '?'),
                 quick, 'fc_kernel_reference')
  return 0


if __name__ == '__main__':
  sys.exit(main())
