"""Input checks of `ntkjax.predict`.

A training kernel that is not a kernel (NaN entries, not symmetric, a
negative diagonal), NaN targets or negative times would otherwise come
back as confident numbers (zeros, -7e10) or NaN. Concrete arrays are checked
at once; under `jit` (tracers) the same checks raise when the compiled
program runs (`_runtime_checks.fail_if`). Kernels stored on disk are checked
by `solvers` as they are read. Each costs one pass over the N x N kernel,
against the O(N^3) factorization that follows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ntkjax import _runtime_checks as runtime_checks
from ntkjax import solvers


def _concrete(*values) -> bool:
  return not runtime_checks.is_traced(*values)


def _check_traced_kernel(k, name: str, who: str):
  """`check_kernel`'s three checks, staged to run with the program; returns
  k tied to them."""
  tol = jnp.sqrt(jnp.finfo(k.dtype).eps) * jnp.max(jnp.abs(k))
  k = runtime_checks.fail_if(runtime_checks.any_not_finite(k), ValueError,
                             f'{who}: {name} has NaN or infinite entries; '
                             'recompute it (float64 for large inputs).',
                             keep=k)
  asymmetry = jnp.max(jnp.abs(k - k.T))
  k = runtime_checks.fail_if(
      asymmetry > tol, ValueError,
      lambda a: f'{who}: {name} is not symmetric (max |K - K^T| = {a:.3g}); '
      'a train-train kernel is K(x, x): compute it with x2=None.', asymmetry,
      keep=k)
  lowest = jnp.min(jnp.diagonal(k))
  return runtime_checks.fail_if(
      lowest < -tol, solvers.NotPositiveDefiniteError,
      lambda low: f'{who}: {name} has a negative diagonal entry ({low:.3g}); '
      'a kernel is positive semidefinite (check its sign and its layout).',
      lowest, keep=k)


def check_nonnegative(who: str, **values):
  """Each value (a number or None) is >= 0 (NaN fails too)."""
  for name, value in values.items():
    if value is not None and not float(value) >= 0:
      raise ValueError(f'{who}: {name} must be >= 0, got {value}.')


def check_kernel(k, name: str, who: str):
  """k (N, N) in memory: finite, symmetric to sqrt(eps) of its largest
  entry (blocked float32 computations differ by rounding), diagonal >= 0
  (a negative-definite or sign-flipped kernel has a negative diagonal).
  Returns k (under jit, tied to the checks: use the returned value)."""
  if not hasattr(k, 'shape') or len(k.shape) != 2:
    return k
  if not _concrete(k):
    return _check_traced_kernel(k, name, who) if k.size else k
  checked = k
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
  return checked


def check_targets(y, who: str):
  """Training targets (or initial outputs) are finite; returns y."""
  message = f'{who}: y_train has NaN or infinite entries.'
  if not _concrete(y):
    return runtime_checks.fail_if(runtime_checks.any_not_finite(y),
                                  ValueError, message, keep=y)
  if not np.all(np.isfinite(np.asarray(y))):
    raise ValueError(message)
  return y


def check_times(t, who: str):
  """Times are >= 0 and not NaN (None means t = inf); returns t."""
  if t is None:
    return t
  if not _concrete(t):
    return runtime_checks.fail_if(
        ~(jnp.asarray(t) >= 0), ValueError,
        lambda ts: f'{who}: t={ts} must be >= 0 (None for t = inf); '
        'training runs forward from t = 0.', jnp.asarray(t), keep=t)
  ts = np.asarray(t, dtype=float)
  if np.any(np.isnan(ts)) or np.any(ts < 0):
    raise ValueError(f'{who}: t={t!r} must be >= 0 (None for t = inf); '
                     'training runs forward from t = 0.')
  return t
