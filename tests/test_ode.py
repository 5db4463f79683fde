"""Tests of `ntkjax.ode.odeint` (adaptive Dormand–Prince 5(4)) against exact
solutions.

Expected values never come from `odeint` itself:

* linear systems y' = A y: y(t) = expm(A (t - t0)) y0, with
  `jax.scipy.linalg.expm` (Padé approximation, independent of any ODE code);
  A is a random 4x4 matrix shifted so that all eigenvalues have negative
  real part (a decaying, non-normal system; for seed 0 it also oscillates);
* a pytree state whose leaves follow independent linear laws, each solved by
  its own exponential;
* a time-dependent right-hand side y' = cos(t) (exact sin(t) - sin(t0)) and
  y' = t y (exact y0 exp((t^2 - t0^2) / 2)), which fail if the stages are
  evaluated at the wrong times;
* repeated and zero-length output times: the state at equal times is equal,
  and at ts[0] it is y0 exactly;
* convergence: the global error decreases as rtol tightens;
* `max_steps` exhaustion: outputs that were not reached are NaN; every
  finite output is accurate (never silently wrong).

Tolerances. `odeint` controls the local error per step in the mixed norm
atol + rtol |y|; the global error of such a controller on these stable,
smooth problems stays within a small multiple of the local tolerance.  We
allow 100 (rtol |y| + atol): a method of the wrong order, a wrong tableau
entry or a wrong stage time gives errors many orders of magnitude larger.
"""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest

from ntkjax import ode


def _stable_matrix(seed=0, n=4):
  """A random non-normal matrix with all eigenvalues at Re <= -0.5."""
  a = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, n)))
  shift = np.max(np.linalg.eigvals(a).real) + 0.5
  a = a - shift * np.eye(n)
  assert np.max(np.linalg.eigvals(a).real) < -0.4
  return jnp.asarray(a)


def _linear_exact(a, y0, ts):
  return np.stack([np.asarray(jsl.expm(a * (t - ts[0])) @ y0) for t in ts])


def _assert_within(actual, exact, rtol, atol, factor=100.):
  actual, exact = np.asarray(actual), np.asarray(exact)
  tol = factor * (rtol * np.abs(exact) + atol)
  err = np.abs(actual - exact)
  assert np.all(np.isfinite(actual))
  assert np.all(err <= tol), (
      f'max error {err.max():.3g}, max allowed {tol.max():.3g}\n'
      f'{actual}\n{exact}')


def test_linear_system_matches_matrix_exponential():
  a = _stable_matrix()
  assert np.any(np.abs(np.linalg.eigvals(a).imag) > 0.1)  # it oscillates
  y0 = jnp.array([1., -2., 0.5, 3.])
  ts = jnp.array([0., 0.1, 0.7, 2., 5.])
  out = ode.odeint(lambda y, t: a @ y, y0, ts)
  assert out.shape == (5, 4)
  np.testing.assert_array_equal(out[0], y0)
  _assert_within(out, _linear_exact(a, y0, ts), rtol=1e-8, atol=1e-10)


def test_linear_system_nonzero_initial_time_and_tight_tolerance():
  a = _stable_matrix(seed=3)
  y0 = jnp.array([0.3, 1., -1., 2.])
  ts = jnp.array([1.5, 1.75, 3., 4.5])
  out = ode.odeint(lambda y, t: a @ y, y0, ts, rtol=1e-11, atol=1e-13)
  _assert_within(out, _linear_exact(a, y0, ts), rtol=1e-11, atol=1e-13)


def test_matrix_state():
  """A (4, 3) state: three independent columns under the same A."""
  a = _stable_matrix(seed=1)
  y0 = jax.random.normal(jax.random.PRNGKey(5), (4, 3))
  ts = jnp.array([0., 0.5, 1.5])
  out = ode.odeint(lambda y, t: a @ y, y0, ts)
  assert out.shape == (3, 4, 3)
  exact = np.stack([np.asarray(jsl.expm(a * t) @ y0) for t in ts])
  _assert_within(out, exact, rtol=1e-8, atol=1e-10)


def test_pytree_state():
  """Leaves evolve under their own laws; structure and shapes preserved."""
  a = _stable_matrix(seed=2)
  rates = jnp.array([[0.5, 1.], [2., 0.25]])
  y0 = {'vec': jnp.array([1., 2., -1., 0.5]),
        'pair': (jnp.array([[1., -1.], [3., 2.]]), jnp.array(2.))}

  def fn(y, t):
    return {'vec': a @ y['vec'],
            'pair': (-rates * y['pair'][0], 3. * jnp.ones_like(y['pair'][1]))}

  ts = jnp.array([0., 0.4, 1.3])
  out = ode.odeint(fn, y0, ts)
  assert jax.tree.structure(out) == jax.tree.structure(y0)
  assert out['vec'].shape == (3, 4)
  assert out['pair'][0].shape == (3, 2, 2)
  assert out['pair'][1].shape == (3,)
  _assert_within(out['vec'], _linear_exact(a, y0['vec'], ts), 1e-8, 1e-10)
  exact_pair = np.stack([np.exp(-rates * t) * y0['pair'][0] for t in ts])
  _assert_within(out['pair'][0], exact_pair, 1e-8, 1e-10)
  _assert_within(out['pair'][1], 2. + 3. * ts, 1e-8, 1e-10)


@pytest.mark.parametrize('t0', [0., 1.])
def test_time_dependent_rhs_cos(t0):
  ts = t0 + jnp.array([0., 0.5, 2., 7.])
  y0 = jnp.zeros(())
  out = ode.odeint(lambda y, t: jnp.cos(t), y0, ts)
  exact = np.sin(np.asarray(ts)) - np.sin(t0)
  _assert_within(out, exact, rtol=1e-8, atol=1e-10)


def test_time_dependent_rhs_depending_on_state():
  """y' = t y, y(t0) = y0: y = y0 exp((t^2 - t0^2) / 2)."""
  ts = jnp.array([-1., -0.5, 0., 0.8, 1.2])
  y0 = jnp.array([1., -2.])
  out = ode.odeint(lambda y, t: t * y, y0, ts)
  exact = np.exp((np.asarray(ts)[:, None]**2 - 1.) / 2) * np.asarray(y0)
  _assert_within(out, exact, rtol=1e-8, atol=1e-10)


def test_repeated_time_points():
  a = _stable_matrix()
  y0 = jnp.array([1., -2., 0.5, 3.])
  ts = jnp.array([0., 0., 0.5, 0.5, 0.5, 1.2, 1.2])
  out = np.asarray(ode.odeint(lambda y, t: a @ y, y0, ts))
  np.testing.assert_array_equal(out[0], y0)
  np.testing.assert_array_equal(out[1], y0)
  np.testing.assert_array_equal(out[2], out[3])
  np.testing.assert_array_equal(out[2], out[4])
  np.testing.assert_array_equal(out[5], out[6])
  _assert_within(out, _linear_exact(a, y0, ts), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize('ts', [[0.7], [0.7, 0.7], [0., 0., 0.]])
def test_zero_length_interval_returns_initial_state(ts):
  a = _stable_matrix()
  y0 = jnp.array([1., -2., 0.5, 3.])
  out = np.asarray(ode.odeint(lambda y, t: a @ y, y0, jnp.array(ts)))
  assert out.shape == (len(ts), 4)
  np.testing.assert_array_equal(out, np.broadcast_to(y0, out.shape))


def test_error_decreases_as_rtol_tightens():
  a = _stable_matrix()
  y0 = jnp.array([1., -2., 0.5, 3.])
  ts = jnp.array([0., 1., 3.])
  exact = _linear_exact(a, y0, ts)
  errors = []
  for rtol in [1e-3, 1e-5, 1e-7, 1e-9, 1e-11]:
    out = ode.odeint(lambda y, t: a @ y, y0, ts, rtol=rtol, atol=rtol * 1e-2)
    err = np.max(np.abs(np.asarray(out) - exact))
    errors.append(err)
    # Each solve meets its own tolerance...
    tol = 100 * (rtol * np.max(np.abs(exact)) + rtol * 1e-2)
    assert err <= tol, (rtol, err)
  # ...and the error shrinks steadily with rtol (until round-off).
  errors = np.array(errors)
  assert np.all(errors[1:] < errors[:-1]), errors
  assert errors[-1] < 1e-9 and errors[0] > 1e-7, errors


def test_jit_and_matches_unjitted():
  a = _stable_matrix()
  y0 = jnp.array([1., -2., 0.5, 3.])
  ts = jnp.array([0., 0.3, 2.])
  jitted = jax.jit(lambda y0, ts: ode.odeint(lambda y, t: a @ y, y0, ts))
  out = jitted(y0, ts)
  _assert_within(out, _linear_exact(a, y0, ts), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize('max_steps', [1, 5, 20, 60])
def test_max_steps_exhaustion_gives_nan_never_wrong_values(max_steps):
  a = _stable_matrix()
  y0 = jnp.array([1., -2., 0.5, 3.])
  ts = jnp.array([0., 0.05, 0.5, 2., 10., 40.])
  exact = _linear_exact(a, y0, ts)
  out = np.asarray(ode.odeint(lambda y, t: a @ y, y0, ts, max_steps=max_steps))
  finite_rows = np.all(np.isfinite(out), axis=1)
  nan_rows = np.all(np.isnan(out), axis=1)
  # Each row is either entirely a valid state or entirely NaN...
  assert np.all(finite_rows | nan_rows), out
  # ...the initial state is always there, and the reached rows are a prefix.
  assert finite_rows[0]
  reached = int(finite_rows.sum())
  assert np.all(finite_rows[:reached]) and np.all(nan_rows[reached:])
  # With so few steps the final time cannot be reached.
  assert nan_rows[-1]
  # Every finite row is accurate.
  _assert_within(out[finite_rows], exact[finite_rows], rtol=1e-8, atol=1e-10)


def test_enough_steps_reaches_every_output():
  """The NaN rows above are due to max_steps, not to the problem."""
  a = _stable_matrix()
  y0 = jnp.array([1., -2., 0.5, 3.])
  ts = jnp.array([0., 0.05, 0.5, 2., 10., 40.])
  out = ode.odeint(lambda y, t: a @ y, y0, ts)
  _assert_within(out, _linear_exact(a, y0, ts), rtol=1e-8, atol=1e-10)
