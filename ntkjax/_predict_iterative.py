"""`predict` without dense factorizations: the iterative paths of
`ntkjax.predict` (`solver='cg'`), on `ntkjax.solvers`.

Kept apart from predict.py so that each stays readable; predict.py chooses
the path and passes its layout helpers in (this module imports no other
part of ntkjax but `solvers`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ntkjax import solvers


# Covariances solve one system per test point.
MAX_COV_ROWS = 1000


class System:
  """A train-train kernel K for iterative solves of (K + sigma I) X = B.

  Args:
    settings: `solvers.CG` settings (their history records each solve).
    k: the kernel: an array (in memory or sharded) or a stored one.
    diag_reg, absolute: as in `predict`.
  """

  def __init__(self, settings, k, diag_reg: float, absolute: bool):
    self.settings = settings
    self.op = solvers.operator(k, settings.client)
    self.shift = shift_of(self.op, diag_reg, absolute)
    self.shape = (self.op.size, self.op.size)
    self.dtype = self.op.dtype

  def solve(self, b):
    return jnp.asarray(self.settings.solve(self.op, np.asarray(b, np.float64),
                                           self.shift))


def dense(k, who: str = '', covariance: bool = False):
  """A (test) kernel as an in-memory array, read whole if stored; with
  `covariance`, at most MAX_COV_ROWS rows (one solve per row)."""
  if covariance and k.shape[0] > MAX_COV_ROWS:
    raise ValueError(
        f"{who}: covariances with solver='cg' need one solve per test "
        f'point; {k.shape[0]} test points is more than {MAX_COV_ROWS}. Ask '
        'for the covariance of fewer points at a time, or use '
        "solver='cholesky'.")
  return jnp.asarray(np.asarray(k)) if solvers.is_lazy(k) else k


def shift_of(op, diag_reg: float, absolute: bool) -> float:
  """diag_reg as an absolute diagonal shift (times mean(diag K) unless
  `absolute`)."""
  if absolute or diag_reg == 0:
    return float(diag_reg)
  return float(diag_reg * op.diagonal().mean())


def times(t, learning_rate: float, size: int) -> tuple:
  """(flat array of s = eta t / |y|, the shape of t)."""
  t = np.asarray(t, np.float64)
  return (learning_rate * t / size).ravel(), t.shape


def gradient_descent_mse(settings, k, kept, layout, y_train, learning_rate,
                         diag_reg, absolute, test_matrix):
  """`gradient_descent_mse` without a dense factorization: t = inf by CG,
  finite t by Lanczos on f0 - y:
    f_train(t) = f0 + expm1(-s A) (f0 - y),
    f_test(t)  = f_test(0) + K_* [expm1(-s A) / A] (f0 - y),
  with A = K + sigma I and s = eta t / |y| (the dense path's formulas)."""
  op = solvers.operator(k)
  shift = shift_of(op, diag_reg, absolute)
  y = np.asarray(layout.outputs_to_matrix(y_train)[0], np.float64)
  size = y_train.size

  def predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None):
    if fx_test_0 is not None and k_test_train is None:
      raise ValueError('gradient_descent_mse: fx_test_0 was given without '
                       'k_test_train; pass the test-train kernel too.')
    f0 = jnp.broadcast_to(jnp.asarray(0. if fx_train_0 is None
                                      else fx_train_0), y_train.shape)
    f0 = np.asarray(layout.outputs_to_matrix(f0)[0], np.float64)
    if k_test_train is not None:
      kt, rows = test_matrix(k_test_train)
    if t is None:
      train = np.broadcast_to(y, f0.shape)     # A is regular: the flow ends at y
      if fx_test_0 is not None:
        test_delta = solvers.product(kt, settings.solve(op, y - f0, shift))
    else:
      s, shape = times(t, learning_rate, size)
      functions = [lambda l, s=s_: np.expm1(-l * s) for s_ in s]
      if fx_test_0 is not None:
        functions += [lambda l, s=s_: expm1_over(l, s) for s_ in s]
      out = settings.functions(op, f0 - y, functions, shift)
      train = (f0 + out[:len(s)]).reshape(shape + f0.shape)
      if fx_test_0 is not None:
        test_delta = np.stack([solvers.product(kt, o) for o in out[len(s):]])
        test_delta = test_delta.reshape(shape + test_delta.shape[1:])
    outs = []
    dtype = np.result_type(y_train.dtype, np.float32)
    if fx_train_0 is not None:
      outs.append(layout.matrix_to_outputs(jnp.asarray(train, dtype), kept))
    if fx_test_0 is not None:
      delta = layout.matrix_to_outputs(jnp.asarray(test_delta, dtype), rows)
      outs.append(jnp.asarray(fx_test_0, dtype) + delta)
    return outs[0] if len(outs) == 1 else tuple(outs)
  predict_fn.solver = settings
  return predict_fn


def expm1_over(evals, s):
  """`_expm1_over` in NumPy float64 (for Lanczos' small eigenproblems)."""
  small = evals * s < 1e-8
  safe = np.where(small, 1., evals)
  return np.where(small, -s * (1 - evals * s / 2), np.expm1(-safe * s) / safe)




def ensemble_terms(system: System, kt, y, s, compute_cov: bool,
                   doubled: bool, who: str) -> tuple:
  """`gradient_descent_mse_ensemble`'s products without a factorization.

  With phi_s(A) = expm1(-s A) / A, the dense path's A_s = K_* K^{-1}
  (I - exp(-s K)) is -K_* phi_s(K) (t = inf: K_* K^{-1}).

  Args:
    system: the train kernel's `System`.
    kt: (R, M) test-train kernel; y: (M, T) targets.
    s: None (t = inf) or the times eta t / |y| (any shape).
    compute_cov: whether A_s itself is needed (one solve per test point).
    doubled: also A_{2s} (the NNGP covariance).

  Returns:
    (A_s or None, A_{2s} or None, mean A_s y) as JAX arrays; leading axes
    of s are prepended.
  """
  settings, op, shift = system.settings, system.op, system.shift
  if compute_cov:
    kt = dense(kt, who, covariance=True)
  if s is None:
    if not compute_cov:
      return None, None, jnp.asarray(solvers.product(kt, settings.solve(
          op, np.asarray(y, np.float64), shift)))
    a = jnp.asarray(settings.solve(op, np.asarray(kt, np.float64).T,
                                   shift).T)
    return a, a, a @ jnp.asarray(y, a.dtype)
  shape, s = np.shape(s), np.ravel(s)
  phi = [lambda l, s=s_: expm1_over(l, s) for s_ in s]
  if not compute_cov:
    out = settings.functions(op, np.asarray(y, np.float64), phi, shift)
    mean = -np.stack([solvers.product(kt, o) for o in out])
    return None, None, jnp.asarray(mean.reshape(shape + mean.shape[1:]))
  if doubled:
    phi += [lambda l, s=s_: expm1_over(l, 2 * s) for s_ in s]
  out = settings.functions(op, np.asarray(kt, np.float64).T, phi, shift)
  a_all = -np.swapaxes(out, -1, -2)                          # (F, R, M)
  a = jnp.asarray(a_all[:len(s)].reshape(shape + a_all.shape[1:]))
  a2 = (jnp.asarray(a_all[len(s):].reshape(shape + a_all.shape[1:]))
        if doubled else None)
  return a, a2, a @ jnp.asarray(y, a.dtype)
