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


def time_interleaved(fns: Sequence[Callable[[], object]],
                     repeats: int) -> list:
  """Wall times of several callables, alternating between them.

  On a small shared machine other processes come and go within seconds;
  alternating (f, g, f, g, ...) exposes every callable to the same load, so
  ratios between them stay meaningful even when absolute times do not.

  Args:
    fns: zero-argument callables returning jax arrays.
    repeats: timed calls of each.

  Returns:
    One list of `repeats` times (seconds) per callable, in order. Each call
    is followed by `jax.block_until_ready`, because jax dispatches
    asynchronously and an unblocked timer would only measure the dispatch;
    each callable is called once untimed first (compilation, allocation).
  """
  for fn in fns:
    jax.block_until_ready(fn())  # compile + first-touch allocations
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, fn_times in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      fn_times.append(time.perf_counter() - start)
  return times


def gemm_fn(x1, x2) -> Callable[[], object]:
  """The bare `x1 @ x2.T` (jitted, float32, HIGHEST precision), to be timed.

  Args:
    x1, x2: `(N, d)` inputs.

  Returns:
    A zero-argument callable; its time is the floor any kernel computation on
    these inputs pays.
  """
  gemm = jax.jit(lambda a, b: jnp.matmul(
      a, b.T, precision=jax.lax.Precision.HIGHEST))
  return lambda: gemm(x1, x2)


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
      # Other processes on a small shared machine skew timings; the load
      # average at the end of the run tells a reader whether to trust them.
      'loadavg_1min': round(os.getloadavg()[0], 2),
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


def write_benchmark(benchmark: str, records: list, library: str,
                    version: str, quick: bool, prefix: str,
                    columns: Sequence[str], **extra) -> str:
  """Write a benchmark's records as JSON under results/ and print a table.

  The file is `<prefix>_<backend>.json`, or `<prefix>_<backend>_quick.json`
  for a `--quick` run, so a smoke run never overwrites the full numbers.

  Args:
    benchmark: the benchmark's name (pairs ours with the reference's).
    records: one dict per case.
    library: 'ntkjax' or 'neural_tangents'.
    version: the library's version string.
    quick: whether this was a `--quick` run.
    prefix: file-name prefix, e.g. 'fc_kernel' or 'fc_kernel_reference'.
    columns: the record fields printed in the table.
    **extra: more top-level fields (e.g. the protocol's settings).

  Returns:
    The path written.
  """
  payload = dict(benchmark=benchmark, library=library, library_version=version,
                 quick=quick, machine=machine_info(), **extra, cases=records)
  suffix = '_quick' if quick else ''
  path = write_results(f'{prefix}_{jax.default_backend()}{suffix}.json',
                       payload)
  print_table(records, columns)
  print(f'wrote {path}')
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


def ntkjax_source_digest() -> str:
  """SHA-256 of ntkjax's Python sources as they are on disk now (ntkjax/
  may have uncommitted changes, and may change while a benchmark runs)."""
  import hashlib
  import ntkjax
  root = os.path.dirname(os.path.abspath(ntkjax.__file__))
  digest = hashlib.sha256()
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode())
        with open(path, 'rb') as f:
          digest.update(f.read())
  return digest.hexdigest()


def ntkjax_sources_changed(digest: str) -> bool:
  """Whether ntkjax's sources differ from `digest` (taken when the run
  began; `ntkjax_source_digest`), with a warning on stderr if so: the
  numbers may then mix two versions of the code."""
  changed = ntkjax_source_digest() != digest
  if changed:
    print('warning: ntkjax sources changed during the run', file=sys.stderr)
  return changed


def ntkjax_git_state() -> dict:
  """ntkjax's commit and whether ntkjax/ had uncommitted changes."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    return subprocess.run(['git', *args], cwd=root, capture_output=True,
                          text=True).stdout.strip()
  try:
    return {'ntkjax_commit': git('rev-parse', 'HEAD') or None,
            'ntkjax_dirty': bool(git('status', '--porcelain', '--',
                                     'ntkjax'))}
  except OSError:
    return {'ntkjax_commit': None, 'ntkjax_dirty': None}
