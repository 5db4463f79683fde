"""An adaptive Runge–Kutta integrator (Dormand–Prince 5(4)) in pure JAX.

`odeint(fn, y0, ts)` integrates dy/dt = fn(y, t) from ts[0] and returns y at
every time in `ts` (non-decreasing). It exists because
`jax.experimental.ode.odeint` is deprecated and a library dependency (e.g.
diffrax) would be heavier than the 80 lines needed for the smooth,
non-stiff function-space ODEs of `ntkjax.predict`.

Method: the Dormand–Prince embedded pair (Dormand & Prince 1980; Hairer,
Nørsett & Wanner, "Solving ODEs I", II.5) with first-same-as-last, error
measured in the mixed norm  |err| / (atol + rtol max(|y|, |y_new|))  (RMS
over all entries), step size control h *= clip(0.9 err^(-1/5), 0.2, 10).
The loop is a `lax.while_loop`, so it jit-compiles; it is not
reverse-differentiable (use a fixed grid and `jax.grad` through the
closed forms instead).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Butcher tableau of Dormand–Prince 5(4).
_C = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1])
_A = [[],
      [1 / 5],
      [3 / 40, 9 / 40],
      [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
      [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
_B5 = np.array([35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0])
_B4 = np.array([5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200,
                187 / 2100, 1 / 40])


def _tree_axpy(h, coeffs, ks, y):
  """y + h sum_i coeffs[i] ks[i] over pytrees (zero coefficients skipped)."""
  out = y
  for c, k in zip(coeffs, ks):
    if c != 0:
      out = jax.tree.map(lambda o, kk, c=c: o + (h * c) * kk, out, k)
  return out


def _step(fn, y, f0, t, h):
  """One Dormand–Prince step: (y_new, f_new, error estimate tree)."""
  ks = [f0]
  for i in range(1, 7):
    yi = _tree_axpy(h, _A[i], ks, y)
    ks.append(fn(yi, t + _C[i] * h))
  y_new = _tree_axpy(h, _B5, ks, y)
  err = _tree_axpy(h, _B5 - _B4, ks, jax.tree.map(jnp.zeros_like, y))
  return y_new, ks[-1], err


def _error_norm(err, y, y_new, rtol, atol):
  leaves = zip(jax.tree.leaves(err), jax.tree.leaves(y),
               jax.tree.leaves(y_new))
  total, count = 0., 0
  for e, a, b in leaves:
    scale = atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
    total = total + jnp.sum((e / scale)**2)
    count += e.size
  return jnp.sqrt(total / max(count, 1))


def odeint(fn: Callable, y0, ts, rtol: float = 1e-8, atol: float = 1e-10,
           max_steps: int = 100_000):
  """Solution of dy/dt = fn(y, t), y(ts[0]) = y0, at the times `ts`.

  Args:
    fn: `fn(y, t) -> dy/dt`, same pytree structure as y.
    y0: initial state (a pytree of arrays).
    ts: 1-d array of non-decreasing times; ts[0] is the initial time.
    rtol: relative error tolerance per step.
    atol: absolute error tolerance per step.
    max_steps: bound on accepted + rejected steps in total; if reached the
      remaining outputs are NaN (never silently wrong).

  Returns:
    The states at `ts`, each leaf with a leading axis of len(ts).
  """
  ts = jnp.asarray(ts)
  dtype = jnp.result_type(*jax.tree.leaves(y0))
  ts = ts.astype(dtype)
  f0 = fn(y0, ts[0])
  span = jnp.maximum(ts[-1] - ts[0], 1e-30)
  out0 = jax.tree.map(lambda a: jnp.zeros((ts.shape[0],) + a.shape, a.dtype)
                      .at[0].set(a), y0)

  def cond(state):
    _, _, _, _, index, steps, _ = state
    return (index < ts.shape[0]) & (steps < max_steps)

  def body(state):
    y, f, t, h, index, steps, out = state
    target = ts[index]
    # At an output time: record it and move to the next one.
    at_target = t >= target
    h_try = jnp.minimum(h, target - t)
    y_new, f_new, err = _step(fn, y, f, t, jnp.where(at_target, 0., h_try))
    norm = _error_norm(err, y, y_new, rtol, atol)
    accept = (norm <= 1.) & ~at_target
    factor = jnp.clip(0.9 * jnp.where(norm > 0, norm, 1e-10)**-0.2, 0.2, 10.)
    h_next = jnp.where(at_target, h, jnp.where(
        accept & (h_try < h), h, h_try * factor))
    y = jax.tree.map(lambda a, b: jnp.where(accept, b, a), y, y_new)
    f = jax.tree.map(lambda a, b: jnp.where(accept, b, a), f, f_new)
    t = jnp.where(accept, t + h_try, t)
    out = jax.tree.map(
        lambda o, a: jnp.where(at_target, o.at[index].set(a), o), out, y)
    return y, f, t, h_next, index + at_target, steps + 1, out

  h0 = span * 1e-3
  state = (y0, f0, ts[0], h0, jnp.asarray(1), jnp.asarray(0), out0)
  state = jax.lax.while_loop(cond, body, state)
  index, out = state[4], state[6]
  # Outputs never reached (max_steps exhausted) are NaN, not zeros.
  done = jnp.arange(ts.shape[0]) < index
  return jax.tree.map(
      lambda o: jnp.where(done.reshape((-1,) + (1,) * (o.ndim - 1)), o,
                          jnp.nan), out)
