"""Input checks of `ntkjax.predict`, run on concrete arrays only.

A training kernel that is not a kernel (NaN entries, not symmetric, a
negative diagonal), NaN targets or negative times would otherwise come
back as confident numbers (zeros, -7e10) or NaN. Under `jit` (tracers) and
for kernels stored on disk (checked by `solvers` as they are read) the
checks are skipped. Each costs one pass over the N x N kernel, against the
O(N^3) factorization that follows.
"""

from __future__ import annotations

import jax
import numpy as np

from ntkjax import solvers


def _concrete(*values) -> bool:
  return not any(isinstance(v, jax.core.Tracer)
                 for v in jax.tree.leaves(values))


def check_nonnegative(who: str, **values):
  """Each value (a number or None) is >= 0 (NaN fails too)."""
  for name, value in values.items():
    if value is not None and not float(value) >= 0:
      raise ValueError(f'{who}: {name} must be >= 0, got {value}.')


def check_kernel(k, name: str, who: str):
  """k (N, N) in memory: finite, symmetric to sqrt(eps) of its largest
  entry (blocked float32 computations differ by rounding), diagonal >= 0
  (a negative-definite or sign-flipped kernel has a negative diagonal)."""
  if not hasattr(k, 'shape') or not _concrete(k) or len(k.shape) != 2:
    return
  k = np.asarray(k)
  if not np.all(np.isfinite(k)):
    raise ValueError(f'{who}: {name} has NaN or infinite entries; recompute '
                     'it (float64 for large inputs).')
  scale = float(np.max(np.abs(k))) if k.size else 0.
  tol = np.sqrt(np.finfo(k.dtype).eps) * scale
  asymmetry = float(np.max(np.abs(k - k.T))) if k.size else 0.
  if asymmetry > tol:
    raise ValueError(
        f'{who}: {name} is not symmetric (max |K - K^T| = {asymmetry:.3g}, '
        f'largest entry {scale:.3g}); a train-train kernel is K(x, x): '
        'compute it with x2=None.')
  lowest = float(np.min(np.diagonal(k))) if k.size else 0.
  if lowest < -tol:
    raise solvers.NotPositiveDefiniteError(
        f'{who}: {name} has a negative diagonal entry ({lowest:.3g}); a '
        'kernel is positive semidefinite (check its sign and its layout).')


def check_targets(y, who: str):
  """Training targets (or initial outputs) are finite."""
  if _concrete(y) and not np.all(np.isfinite(np.asarray(y))):
    raise ValueError(f'{who}: y_train has NaN or infinite entries.')


def check_times(t, who: str):
  """Times are >= 0 and not NaN (None means t = inf)."""
  if t is None or not _concrete(t):
    return
  ts = np.asarray(t, dtype=float)
  if np.any(np.isnan(ts)) or np.any(ts < 0):
    raise ValueError(f'{who}: t={t!r} must be >= 0 (None for t = inf); '
                     'training runs forward from t = 0.')
