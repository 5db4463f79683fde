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


def _train(apply_fn, params, x, y, learning_rate, steps):
  """Plain gradient descent on 0.5 * sum of squared errors."""
  loss = lambda p: 0.5 * jnp.sum((apply_fn(p, x) - y)**2)
  step = jax.jit(lambda p: jax.tree.map(
      lambda a, g: a - learning_rate * g, p, jax.grad(loss)(p)))
  for _ in range(steps):
    params = step(params)
  return params


def test_linearized_training_is_kernel_dynamics_with_the_empirical_ntk():
  """For the linearized model, one GD step on 0.5 |f - y|^2 is exactly
  f <- f - lr Theta (f - y) on the training set, and the test outputs move by
  -lr Theta(test, train) (f - y): so after k steps the outputs are given by
  the empirical NTK alone (float64, to rounding)."""
  init_fn, apply_fn, _ = stax.serial(stax.Dense(64, W_std=1.5, b_std=0.1),
                                     stax.Relu(), stax.Dense(1, W_std=1.5))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  x_test = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
  y = jnp.sin(x[:, :1])
  _, params0 = init_fn(jax.random.PRNGKey(2), x.shape)
  f_lin = ntkjax.linearize(apply_fn, params0)
  ntk_fn = ntkjax.empirical_ntk_fn(apply_fn)
  theta, theta_test = ntk_fn(x, None, params0), ntk_fn(x_test, x, params0)
  lr, steps = 0.5 / float(jnp.linalg.eigvalsh(theta)[-1]), 50
  trained = _train(f_lin, params0, x, y, lr, steps)
  f, f_test = apply_fn(params0, x), apply_fn(params0, x_test)
  for _ in range(steps):
    residual = f - y
    f, f_test = f - lr * theta @ residual, f_test - lr * theta_test @ residual
  np.testing.assert_allclose(f_lin(trained, x), f, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(f_lin(trained, x_test), f_test, rtol=1e-9,
                             atol=1e-12)


def test_wide_networks_train_like_their_linearization():
  """The gap between training the network and its linearization (same init,
  same GD) shrinks like width^-1/2 (Lee et al. 2019). Per seed it is noisy
  (it also depends on how far training moves), so average 3 seeds: a 64x
  wider network must have a gap at least 4x smaller (theory: 8x; measured
  ~13x)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  y = jnp.sin(x[:, :1])
  gaps = []
  for width in (64, 4096):
    per_seed = []
    for seed in range(3):
      init_fn, apply_fn, kernel_fn = stax.serial(
          stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
          stax.Dense(1, W_std=1.5))
      _, params0 = init_fn(jax.random.PRNGKey(seed), x.shape)
      lr = 0.5 / float(jnp.linalg.eigvalsh(kernel_fn(x, None, 'ntk'))[-1])
      full = apply_fn(_train(apply_fn, params0, x, y, lr, 100), x)
      f_lin = ntkjax.linearize(apply_fn, params0)
      lin = f_lin(_train(f_lin, params0, x, y, lr, 100), x)
      per_seed.append(float(jnp.linalg.norm(full - lin) / jnp.linalg.norm(lin)))
    gaps.append(np.mean(per_seed))
  assert gaps[1] < gaps[0] / 4, gaps
