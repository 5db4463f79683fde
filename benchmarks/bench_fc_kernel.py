"""Fully connected NNGP + NTK kernel: ntkjax vs. the bare input GEMM.

Network ("depth 3", three hidden layers of width 512, NTK parameterization):

    stax.serial(Dense(512, W_std=1.5, b_std=0.05), Act(),
                Dense(512, W_std=1.5, b_std=0.05), Act(),
                Dense(512, W_std=1.5, b_std=0.05), Act(),
                Dense(1,   W_std=1.5, b_std=0.05))

for Act in {Relu, Erf}, on two *different* batches x1, x2 of N random normal
float32 inputs of dimension d = 784. We time
`jax.jit(kernel_fn, static_argnames='get')(x1, x2, get=('nngp', 'ntk'))`
(kernel_fn runs op by op unless the caller jits it, as in neural-tangents):
one warm-up call (compilation), then the median of R timed calls, each
followed by `jax.block_until_ready` (R = 5 for N <= 1000, else 3).

Flop floor. The input kernel x1 x2^T / d is a GEMM of 2 N^2 d flops (about
25 GFLOP at N = 4000); every later layer is elementwise on the N x N kernels,
O(N^2 * depth) work (a few tens of flops and a couple of transcendentals per
entry per layer, no further GEMM). So the kernel can be no faster than the
GEMM, and for d = 784 the elementwise part should be a modest addition; our
goal is kernel_time <= 2 x gemm_time at N = 4000. The same run times the bare
jitted `x1 @ x2.T` (float32, Precision.HIGHEST, same protocol, its calls
alternating with the kernel's so that both see the same machine load) and
reports ratio_to_gemm = kernel_seconds_median / gemm_seconds_median.

Output: benchmarks/results/fc_kernel_<backend>.json (backend =
jax.default_backend(), e.g. cpu; fc_kernel_<backend>_quick.json for --quick,
so a smoke run never overwrites the full numbers): machine info (cpu count,
jax/jaxlib versions, backend, device kind, 1-minute load average at the end)
and one record per (activation, N) with activation, N, d, depth, width,
repeats, kernel_seconds_median, gemm_seconds_median, ratio_to_gemm,
kernel_seconds_min, gemm_seconds_min, gemm_gflops_per_second and peak_rss_mib
(the process high-water mark after the case, so monotone across cases in one
run). The protocol itself lives in _fc_protocol.py, shared with the reference
script.

Usage:
    python benchmarks/bench_fc_kernel.py                 # N = 1000, 4000
    python benchmarks/bench_fc_kernel.py --sizes 1000    # chosen sizes
    python benchmarks/bench_fc_kernel.py --quick         # N = 200 only

The reference numbers (neural-tangents, separate venv) come from
benchmarks/reference_fc_kernel.py, which uses the same protocol and data.
"""

from __future__ import annotations

import os
import sys

# Run as a script: make the helpers next to this file importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import _fc_protocol as protocol  # noqa: E402
import ntkjax  # noqa: E402
from ntkjax import stax  # noqa: E402


def build(act_name: str):
  """ntkjax's kernel_fn for the benchmark network, jitted as users are told.

  Args:
    act_name: 'Relu' or 'Erf'.

  Returns:
    `jax.jit(kernel_fn, static_argnames='get')`. kernel_fn itself runs op by
    op (compiling is the caller's choice, as in neural-tangents), so timing
    it bare would measure eager dispatch, not the kernel computation.
  """
  kernel_fn = stax.serial(*protocol.network_layers(stax, act_name)).kernel_fn
  return jax.jit(kernel_fn, static_argnames='get')


def call(kernel_fn, x1, x2):
  """The timed call: NNGP and NTK between two different batches."""
  return kernel_fn(x1, x2, get=protocol.GET)


def main(argv=None) -> int:
  """Run the benchmark; write the JSON file and print a table.

  Args:
    argv: command-line arguments (None for sys.argv).

  Returns:
    The process exit code.
  """
  sizes, quick = protocol.parse_sizes(argv, __doc__.splitlines()[0])
  records = protocol.run(build, call, sizes)
  protocol.write(records, 'ntkjax', ntkjax.__version__, quick, 'fc_kernel')
  return 0


if __name__ == '__main__':
  sys.exit(main())
