"""Convolutional kernel benchmark protocol, shared by ours and the reference.

Network (issue 4): serial(3 x [Conv(64, (3, 3), padding='SAME'), Relu()],
readout, Dense(1)) with readout GlobalAvgPool() ('pooled') or Flatten()
('flatten'), default W_std = 1, no biases; inputs 8x8x1 images, two
*different* random normal float32 batches x1, x2 of N = 100 and 200 images
(numpy seed 0, so both libraries see the same data). The timed call is
`jax.jit(kernel_fn, static_argnames='get')(x1, x2, ('nngp', 'ntk'))`: one
warm-up call (compilation; its time is recorded as `first_call_seconds`),
then the median of 5 calls (3 at N = 200) with `jax.block_until_ready`.

Floors. The pooled network needs, per layer, every pair of pixels of every
pair of images: N^2 P^2 = 100^2 x 64^2 = 4.1e7 entries, each the sum of 3x3
shifted entries (nngp and ntk: 16 adds) and the ReLU's arc-cosine formulas
(~30 flops incl. one sqrt and a degree-7 polynomial): ~2e9 flops for the
three layers at N = 100, 8e9 at N = 200. The Flatten network needs only the
same-pixel entries, N^2 P = 6.4e5 per layer at N = 100 (P = 64x fewer).

Imports neither library; the scripts pass their own `stax` and call.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

import _common

SIZES = (100, 200)
QUICK_SIZES = (40,)
READOUTS = ('pooled', 'flatten')
CHANNELS = 64
IMAGE = (8, 8, 1)
GET = ('nngp', 'ntk')
REPEATS = 5
REPEATS_LARGE = 3   # N >= 200: one reference call takes ~1 minute
COLUMNS = ('readout', 'N', 'kernel_seconds_median', 'first_call_seconds',
           'kernel_seconds_min', 'peak_rss_mib')


def network_layers(stax, readout: str) -> list:
  """The benchmark network, built with either library's `stax`."""
  layers = []
  for _ in range(3):
    layers += [stax.Conv(CHANNELS, (3, 3), padding='SAME'), stax.Relu()]
  layers.append(stax.GlobalAvgPool() if readout == 'pooled'
                else stax.Flatten())
  layers.append(stax.Dense(1))
  return layers


def inputs(n: int):
  """x1, x2: (n, 8, 8, 1) float32, different draws."""
  rng = np.random.default_rng(0)
  x1 = rng.standard_normal((n,) + IMAGE, dtype=np.float32)
  x2 = rng.standard_normal((n,) + IMAGE, dtype=np.float32)
  return jax.numpy.asarray(x1), jax.numpy.asarray(x2)


def parse(argv, description: str):
  """--quick, --sizes."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--quick', action='store_true', help='N = 40 only')
  parser.add_argument('--sizes', type=int, nargs='+', default=None)
  args = parser.parse_args(argv)
  sizes = QUICK_SIZES if args.quick else tuple(args.sizes or SIZES)
  return sizes, args.quick


def run(stax, sizes) -> list:
  """Time every (readout, N).

  Args:
    stax: the library's stax module.
    sizes: numbers of images per batch.

  Returns:
    One record per case.
  """
  import time
  records = []
  for readout in READOUTS:
    _, _, kernel_fn = stax.serial(*network_layers(stax, readout))
    kernel_fn = jax.jit(kernel_fn, static_argnames='get')
    for n in sizes:
      x1, x2 = inputs(n)
      start = time.perf_counter()
      jax.block_until_ready(kernel_fn(x1, x2, get=GET))
      first = time.perf_counter() - start
      repeats = REPEATS if n < 200 else REPEATS_LARGE
      (times,) = _common.time_interleaved(
          [lambda: kernel_fn(x1, x2, get=GET)], repeats)
      median = statistics.median(times)
      records.append({'readout': readout, 'N': n, 'channels': CHANNELS,
                      'image': list(IMAGE), 'repeats': repeats,
                      'kernel_seconds_median': median,
                      'kernel_seconds_min': min(times),
                      'first_call_seconds': first,
                      'peak_rss_mib': _common.peak_rss_mib()})
      print(f'  done: {readout} N={n}: {median:.3g} s', flush=True)
  return records


def write(records: list, library: str, version: str, quick: bool,
          prefix: str) -> str:
  """Write `<prefix>_<backend>[_quick].json` under results/, print a table
  (`_common.write_benchmark`)."""
  return _common.write_benchmark('cnn_kernel', records, library, version, quick,
                                 prefix, COLUMNS)
