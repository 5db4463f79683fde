"""Shared helpers for the benchmark scripts: timing, machine info, output.

This module imports only the standard library, numpy and jax, never ntkjax
or neural_tangents, so both our benchmarks and the reference scripts (which
run in a separate virtualenv with an older jax) can use it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'results')


def make_inputs(n: int, d: int, seed: int = 0):
  """Two *different* random normal float32 batches.

  Args:
    n: number of samples in each batch.
    d: feature dimension.
    seed: numpy seed; fixed so that runs (and the reference) see the same data.

  Returns:
    `(x1, x2)`, jax arrays of shape `(n, d)`, dtype float32.
  """
  # numpy, not jax.random, so the reference venv (older jax) draws the same.
  rng = np.random.default_rng(seed)
  x1 = rng.standard_normal((n, d), dtype=np.float32)
  x2 = rng.standard_normal((n, d), dtype=np.float32)
  return jnp.asarray(x1), jnp.asarray(x2)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `fn()` after one untimed warm-up call.

  Args:
    fn: a zero-argument callable returning jax arrays (or pytrees of them).
    repeats: number of timed calls.

  Returns:
    The median time in seconds. Each call is followed by
    `jax.block_until_ready`, because jax dispatches asynchronously and an
    unblocked timer would only measure the dispatch.
  """
  jax.block_until_ready(fn())  # compile + first-touch allocations
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def gemm_seconds(x1, x2, repeats: int) -> float:
  """Median time of the bare `x1 @ x2.T` (jitted, float32, HIGHEST precision).

  Args:
    x1, x2: `(N, d)` inputs.
    repeats: number of timed calls.

  Returns:
    Median seconds; the floor any kernel computation on these inputs pays.
  """
  gemm = jax.jit(lambda a, b: jnp.matmul(
      a, b.T, precision=jax.lax.Precision.HIGHEST))
  return median_seconds(lambda: gemm(x1, x2), repeats)


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, in MiB.

  Returns:
    The high-water mark (monotone over the process lifetime, so a later case
    reports at least the earlier cases' peak). Linux reports KiB, macOS bytes.
  """
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  scale = 1 / 1024**2 if sys.platform == 'darwin' else 1 / 1024
  return round(peak * scale, 1)


def machine_info() -> dict:
  """Where the numbers came from.

  Returns:
    A dict with cpu count, python/jax/jaxlib versions, backend, device kind.
  """
  try:
    import jaxlib
    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = None
  device = jax.devices()[0]
  return {
      'cpu_count': os.cpu_count(),
      'platform': platform.platform(),
      'processor': platform.processor() or platform.machine(),
      'python': platform.python_version(),
      'jax_version': jax.__version__,
      'jaxlib_version': jaxlib_version,
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
  }


def write_results(filename: str, payload: dict) -> str:
  """Write `payload` as JSON under `benchmarks/results/`.

  Args:
    filename: file name (no directory).
    payload: JSON-serializable dict.

  Returns:
    The path written.
  """
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, filename)
  with open(path, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=False)
    f.write('\n')
  return path


def print_table(rows: Sequence[dict], columns: Sequence[str]):
  """Print `rows` as a fixed-width text table.

  Args:
    rows: dicts with (at least) the keys in `columns`.
    columns: the keys to show, in order.
  """
  def fmt(value):
    if isinstance(value, float):
      return f'{value:.4g}'
    return str(value)
  cells = [[fmt(r.get(c, '')) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells))
            for i, c in enumerate(columns)]
  print('  '.join(c.rjust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print('  '.join(v.rjust(w) for v, w in zip(row, widths)))
