"""linearize and taylor_expand against exact expansions and error orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import stax


def _mlp():
  return stax.serial(stax.Dense(32, W_std=1.5, b_std=0.1), stax.Erf(),
                     stax.Dense(3, W_std=1.5, b_std=0.1))


def _setup():
  init_fn, apply_fn, _ = _mlp()
  _, params0 = init_fn(jax.random.PRNGKey(0), (-1, 5))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
  leaves, treedef = jax.tree.flatten(params0)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  direction = jax.tree.unflatten(
      treedef, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  move = lambda eps: jax.tree.map(lambda p, d: p + eps * d, params0, direction)
  return apply_fn, params0, x, move


def test_linearize_is_f_at_the_expansion_point_and_exact_for_linear_f():
  apply_fn, params0, x, move = _setup()
  f_lin = ntkjax.linearize(apply_fn, params0)
  np.testing.assert_allclose(f_lin(params0, x), apply_fn(params0, x), rtol=1e-12)
  # A single Dense layer is affine in its parameters: its linearization is exact.
  dense = stax.Dense(4, W_std=1.3, b_std=0.2)
  _, p0 = dense.init_fn(jax.random.PRNGKey(3), (-1, 5))
  p1 = jax.tree.map(lambda a: 2.5 * a + 1., p0)
  np.testing.assert_allclose(ntkjax.linearize(dense.apply_fn, p0)(p1, x),
                             dense.apply_fn(p1, x), rtol=1e-12)


@pytest.mark.parametrize('degree', [1, 2, 3])
def test_taylor_error_has_the_right_order(degree):
  """|f(p0 + e d) - f_k(p0 + e d)| = O(e^(k+1)): halving e divides it by 2^(k+1)."""
  apply_fn, params0, x, move = _setup()
  f_k = ntkjax.taylor_expand(apply_fn, params0, degree)
  error = lambda eps: float(jnp.max(jnp.abs(apply_fn(move(eps), x)
                                            - f_k(move(eps), x))))
  ratio = error(1e-2) / error(5e-3)
  np.testing.assert_allclose(ratio, 2.**(degree + 1), rtol=0.1)


def test_taylor_degrees_zero_and_one():
  apply_fn, params0, x, move = _setup()
  p = move(0.3)
  np.testing.assert_allclose(ntkjax.taylor_expand(apply_fn, params0, 0)(p, x),
                             apply_fn(params0, x), rtol=1e-12)
  np.testing.assert_allclose(ntkjax.taylor_expand(apply_fn, params0, 1)(p, x),
                             ntkjax.linearize(apply_fn, params0)(p, x),
                             rtol=1e-12)


def test_taylor_is_exact_for_polynomials_in_the_parameters():
  """f(w, x) = w^3 x: the cubic expansion is exact, the quadratic one misses
  exactly (w - w0)^3 x."""
  f = lambda w, x: w['a']**3 * x
  w0, w1, x = {'a': jnp.array(0.7)}, {'a': jnp.array(1.9)}, jnp.array([1., -2.])
  np.testing.assert_allclose(ntkjax.taylor_expand(f, w0, 3)(w1, x), f(w1, x),
                             rtol=1e-12)
  np.testing.assert_allclose(f(w1, x) - ntkjax.taylor_expand(f, w0, 2)(w1, x),
                             (1.9 - 0.7)**3 * x, rtol=1e-12)


def test_mismatched_params_are_an_error():
  apply_fn, params0, x, _ = _setup()
  with pytest.raises(ValueError, match='same init_fn'):
    ntkjax.linearize(apply_fn, params0)(params0[:1], x)
  with pytest.raises(ValueError, match='degree'):
    ntkjax.taylor_expand(apply_fn, params0, -1)
