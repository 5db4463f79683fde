"""Fully connected kernel benchmark protocol, shared by ours and the reference.

`bench_fc_kernel.py` (ntkjax) and `reference_fc_kernel.py` (neural-tangents,
separate venv) differ only in how they build and call the kernel function;
the network hyperparameters, data, sizes, repeats, record fields and output
live here so the two cannot drift apart. Imports neither library.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Sequence


import _common

D = 784
DEPTH = 3
WIDTH = 512
W_STD, B_STD = 1.5, 0.05
GET = ('nngp', 'ntk')
ACTIVATIONS = ('Relu', 'Erf')
DEFAULT_SIZES = (1000, 4000)
QUICK_SIZES = (200,)
COLUMNS = ('activation', 'N', 'kernel_seconds_median', 'gemm_seconds_median',
           'ratio_to_gemm', 'kernel_seconds_min', 'peak_rss_mib')


def network_layers(stax, act_name: str, depth: int = DEPTH) -> list:
  """The benchmark network's layers, built with either library's `stax`.

  Args:
    stax: `ntkjax.stax` or `neural_tangents.stax` (same constructor names).
    act_name: 'Relu' or 'Erf'.
    depth: number of hidden (Dense, Act) blocks.

  Returns:
    The list of layers to pass to `stax.serial`.
  """
  act = getattr(stax, act_name)
  layers = []
  for _ in range(depth):
    layers += [stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), act()]
  layers.append(stax.Dense(1, W_std=W_STD, b_std=B_STD))
  return layers


def repeats_for(n: int) -> int:
  """Timed repeats: fewer for big N, where one call already takes seconds."""
  return 5 if n <= 1000 else 3


def parse_sizes(argv, description: str) -> tuple:
  """Parse `--sizes N [N ...]` and `--quick`.

  Args:
    argv: command-line arguments (None for sys.argv).
    description: help text.

  Returns:
    `(sizes, quick)`.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--sizes', type=int, nargs='+',
                      default=list(DEFAULT_SIZES),
                      help='batch sizes N (default: 1000 4000)')
  parser.add_argument('--quick', action='store_true',
                      help='N = 200 only (a smoke run)')
  args = parser.parse_args(argv)
  return (list(QUICK_SIZES) if args.quick else args.sizes), args.quick


def run(build: Callable[[str], Callable], call: Callable,
        sizes: Sequence[int]) -> list:
  """Time every (N, activation) case.

  Args:
    build: `act_name -> kernel_fn` (already jitted however the library wants).
    call: `(kernel_fn, x1, x2) -> kernels`, the call being timed.
    sizes: batch sizes N.

  Returns:
    One record per case, with the fields documented in bench_fc_kernel.py.
  """
  records = []
  for n in sizes:
    x1, x2 = _common.make_inputs(n, D)
    repeats = repeats_for(n)
    gemm = _common.gemm_fn(x1, x2)
    for act_name in ACTIVATIONS:
      kernel_fn = build(act_name)
      # Kernel and GEMM calls alternate, so both see the same machine load.
      times, gemm_times = _common.time_interleaved(
          [lambda: call(kernel_fn, x1, x2), gemm], repeats)
      median = statistics.median(times)
      gemm_median = statistics.median(gemm_times)
      records.append({
          'activation': act_name,
          'N': n,
          'd': D,
          'depth': DEPTH,
          'width': WIDTH,
          'repeats': repeats,
          'kernel_seconds_median': median,
          'gemm_seconds_median': gemm_median,
          'ratio_to_gemm': median / gemm_median,
          # Minima are less sensitive to other processes on a shared machine.
          'kernel_seconds_min': min(times),
          'gemm_seconds_min': min(gemm_times),
          'gemm_gflops_per_second': 2 * n * n * D / gemm_median / 1e9,
          'peak_rss_mib': _common.peak_rss_mib(),
      })
      print(f'  done: {act_name} N={n}: {median:.4g} s '
            f'({median / gemm_median:.3g} x GEMM)', flush=True)
  return records


def write(records: list, library: str, version: str, quick: bool,
          prefix: str) -> str:
  """Write `<prefix>_<backend>[_quick].json` under results/, print a table
  (`_common.write_benchmark`)."""
  return _common.write_benchmark('fc_kernel', records, library, version, quick,
                                 prefix, COLUMNS)
