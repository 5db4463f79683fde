"""The kernel_fn contract: get, x2=None, jit, grad, numerics, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax import Kernel, stax


def _mlp(**dense):
  return stax.serial(stax.Dense(64, W_std=1.5, b_std=0.05, **dense), stax.Relu(),
                     stax.Dense(64, W_std=1.5, b_std=0.05, **dense), stax.Erf(),
                     stax.Dense(1, W_std=1.5, b_std=0.05, **dense))


def test_get_variants(inputs):
  x1, x2 = inputs
  kernel_fn = _mlp().kernel_fn
  full = kernel_fn(x1, x2)
  assert isinstance(full, Kernel)
  assert full.nngp.shape == (4, 3) and full.cov1.shape == (4,)
  np.testing.assert_array_equal(kernel_fn(x1, x2, 'ntk'), full.ntk)
  pair = kernel_fn(x1, x2, ('nngp', 'ntk'))
  assert pair._fields == ('nngp', 'ntk')
  np.testing.assert_array_equal(pair.nngp, full.nngp)
  with pytest.raises(ValueError, match="unknown get='ntk2'"):
    kernel_fn(x1, x2, 'ntk2')


def test_x2_none_is_symmetric_and_equals_explicit(inputs):
  x1, _ = inputs
  kernel_fn = _mlp().kernel_fn
  sym = kernel_fn(x1, None)
  explicit = kernel_fn(x1, x1)
  for field in ('nngp', 'ntk'):
    value = getattr(sym, field)
    np.testing.assert_array_equal(value, value.T)
    np.testing.assert_allclose(value, getattr(explicit, field), rtol=1e-12)
  np.testing.assert_allclose(jnp.diag(sym.nngp), sym.cov1, rtol=1e-12)


def test_user_jit_and_kernel_input(inputs):
  x1, x2 = inputs
  kernel_fn = _mlp().kernel_fn
  jitted = jax.jit(kernel_fn, static_argnames='get')
  np.testing.assert_allclose(jitted(x1, x2, 'ntk'), kernel_fn(x1, x2, 'ntk'),
                             rtol=1e-12)
  # Several outputs under jit are computed together (one stacked array).
  for get in (('nngp', 'ntk', 'cov1'), None):
    for a, b in zip(jax.tree.leaves(jitted(x1, x2, get)),
                    jax.tree.leaves(kernel_fn(x1, x2, get))):
      np.testing.assert_allclose(a, b, rtol=1e-12)
  # A Kernel can be fed to the next part of a network.
  first = stax.serial(stax.Dense(64, W_std=1.5, b_std=0.05), stax.Relu())
  rest = stax.serial(stax.Dense(64, W_std=1.5, b_std=0.05), stax.Erf(),
                     stax.Dense(1, W_std=1.5, b_std=0.05))
  np.testing.assert_allclose(rest.kernel_fn(first.kernel_fn(x1, x2), get='ntk'),
                             kernel_fn(x1, x2, 'ntk'), rtol=1e-12)


def test_grad_wrt_inputs_matches_finite_differences(inputs):
  x1, x2 = inputs
  kernel_fn = _mlp().kernel_fn
  loss = lambda x: jnp.sum(kernel_fn(x, x2, 'ntk') ** 2)
  grad = jax.grad(loss)(x1)
  direction = jax.random.normal(jax.random.PRNGKey(1), x1.shape)
  h = 1e-6
  fd = (loss(x1 + h * direction) - loss(x1 - h * direction)) / (2 * h)
  np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-6)
  # Symmetric case: the diagonal (rho = 1) must not produce NaNs.
  grad_sym = jax.grad(lambda x: jnp.sum(kernel_fn(x, None, 'nngp')))(x1)
  assert np.all(np.isfinite(grad_sym))


def test_grad_wrt_hyperparameters(inputs):
  """d kernel / d W_std with W_std passed as an array, against finite differences."""
  x1, x2 = inputs

  def ntk_sum(w_std, b_std):
    net = stax.serial(stax.Dense(8, W_std=w_std, b_std=b_std), stax.Relu(),
                      stax.Dense(1, W_std=w_std, b_std=b_std))
    return jnp.sum(net.kernel_fn(x1, x2, 'ntk'))

  w, b = jnp.array(1.3), jnp.array(0.2)
  grads = jax.grad(ntk_sum, argnums=(0, 1))(w, b)
  h = 1e-6
  fd_w = (ntk_sum(w + h, b) - ntk_sum(w - h, b)) / (2 * h)
  fd_b = (ntk_sum(w, b + h) - ntk_sum(w, b - h)) / (2 * h)
  np.testing.assert_allclose(grads, (fd_w, fd_b), rtol=1e-6)


def test_deep_relu_float32_is_finite_symmetric_psd():
  """Depth 100, W_std = 2: variances grow like 2^100 ~ 1e30, near float32's
  limit (3e38); products of variances (1e60) must never be formed."""
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 10), jnp.float32)
  net = stax.serial(stax.Dense(16, W_std=2.), *[
      stax.serial(stax.Relu(), stax.Dense(16, W_std=2.)) for _ in range(99)])
  kernel = net.kernel_fn(x, None)
  for field in ('nngp', 'ntk'):
    k = np.asarray(getattr(kernel, field))
    assert k.dtype == np.float32
    assert np.all(np.isfinite(k)), field
    np.testing.assert_array_equal(k, k.T)
    # PSD up to float32 rounding: eigenvalues >= -N * eps * lambda_max.
    eigenvalues = np.linalg.eigvalsh(k.astype(np.float64))
    assert eigenvalues.min() >= -12 * 1.2e-7 * eigenvalues.max(), field


PSD_NETWORKS = {
    'relu_erf': _mlp,
    'tanh_chain': lambda: stax.serial(stax.Dense(8, W_std=1.4), stax.Tanh(),
                                      stax.Sin(), stax.Dense(1)),
    'residual': lambda: stax.serial(
        stax.Dense(8), stax.Relu(), stax.FanOut(2),
        stax.parallel(stax.Identity(), stax.serial(stax.Dense(8), stax.Gelu())),
        stax.FanInSum(), stax.Dense(1)),
}


@pytest.mark.parametrize('name', sorted(PSD_NETWORKS))
def test_kernels_are_symmetric_psd(name):
  """NNGP and NTK are Gram matrices (of features / of Jacobians): PSD."""
  x = jax.random.normal(jax.random.PRNGKey(5), (20, 6))
  kernel = PSD_NETWORKS[name]().kernel_fn(x, None)
  for field in ('nngp', 'ntk'):
    k = np.asarray(getattr(kernel, field))
    np.testing.assert_array_equal(k, k.T)
    eigenvalues = np.linalg.eigvalsh(k)
    assert eigenvalues.min() >= -1e-10 * eigenvalues.max(), (field, eigenvalues)


def test_float32_default_and_float64_honoured(inputs):
  x1, x2 = inputs
  kernel_fn = _mlp().kernel_fn
  assert kernel_fn(x1.astype(jnp.float32), x2.astype(jnp.float32),
                   'ntk').dtype == jnp.float32
  assert kernel_fn(x1, x2, 'ntk').dtype == jnp.float64
  assert kernel_fn(np.ones((2, 3), np.int32), None, 'nngp').dtype.kind == 'f'


# ---- Bad input: clear errors. -------------------------------------------------


def test_mismatched_feature_dimensions(inputs):
  x1, _ = inputs
  with pytest.raises(ValueError, match='same per-sample shape'):
    _mlp().kernel_fn(x1, jnp.ones((2, 5)))


def test_non_finite_inputs(inputs):
  x1, x2 = inputs
  with pytest.raises(ValueError, match='NaN or infinite'):
    _mlp().kernel_fn(x1.at[0, 0].set(jnp.nan), x2)


def test_wrong_rank_inputs():
  with pytest.raises(ValueError, match=r'\(batch, features\)'):
    _mlp().kernel_fn(jnp.ones((3,)))


def test_dense_acts_per_position_on_spatial_inputs(inputs):
  """(N, S, d) inputs: Dense mixes channels only, so the same-position
  kernel equals the fully connected kernel of each position's features."""
  x1, x2 = inputs
  images1 = jnp.stack([x1, 2 * x1], axis=1)     # (N1, 2 positions, d)
  images2 = jnp.stack([x2, -x2], axis=1)
  kernel_fn = _mlp().kernel_fn
  diagonal = kernel_fn(images1, images2, 'ntk', diagonal_spatial=True)
  full = kernel_fn(images1, images2, 'ntk')
  np.testing.assert_allclose(diagonal[:, :, 0], kernel_fn(x1, x2, 'ntk'),
                             rtol=1e-12)
  np.testing.assert_allclose(diagonal[:, :, 1],
                             kernel_fn(2 * x1, -x2, 'ntk'), rtol=1e-12)
  # The full layout's (p, p') entry pairs position p of x1 with p' of x2.
  np.testing.assert_allclose(full[:, :, 0, 1], kernel_fn(x1, -x2, 'ntk'),
                             rtol=1e-12)
  np.testing.assert_allclose(full[:, :, 1, 1], diagonal[:, :, 1], rtol=1e-12)


@pytest.mark.parametrize('kwargs', [{'W_std': -1.}, {'b_std': -0.1},
                                    {'W_std': float('nan')}])
def test_negative_std(kwargs):
  with pytest.raises(ValueError, match='Dense.*must be a finite number >= 0'):
    stax.Dense(4, **kwargs)


def test_bad_parameterization_and_width():
  with pytest.raises(ValueError, match='parameterization'):
    stax.Dense(4, parameterization='mup')
  with pytest.raises(ValueError, match='out_dim'):
    stax.Dense(0)


def test_unknown_kernel_fn_kwargs(inputs):
  x1, x2 = inputs
  with pytest.raises(TypeError, match='unexpected keyword'):
    _mlp().kernel_fn(x1, x2, 'nngp', diagonal_spatal=True)  # misspelt


def test_apply_fn_checks_feature_dimension(inputs):
  x1, _ = inputs
  init_fn, apply_fn, _ = _mlp()
  _, params = init_fn(jax.random.PRNGKey(0), (-1, 5))
  with pytest.raises(ValueError, match='initialized for 5'):
    apply_fn(params, x1)


def test_layers_are_frozen_and_shareable(inputs):
  """A Layer's fields are read by name and never change after construction;
  a layer shared by two networks (and a pickled copy, as Dask ships it to
  workers) keeps giving the same kernel."""
  cloudpickle = pytest.importorskip("cloudpickle")  # dask's serializer
  x1, x2 = inputs
  block = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.1), stax.Relu())
  net_a = stax.serial(block, stax.Dense(1))
  net_b = stax.serial(stax.Dense(8), block, block)
  before = net_a.kernel_fn(x1, x2, 'ntk')
  with pytest.raises(AttributeError, match='immutable'):
    block.kernel_fn.kernel_map = lambda k: k
  with pytest.raises(AttributeError, match='immutable'):
    del block.kernel_fn.name
  np.testing.assert_array_equal(net_a.kernel_fn(x1, x2, 'ntk'), before)
  assert net_b.kernel_fn.name == ('serial(Dense(8), serial(Dense(8), Relu()), '
                                  'serial(Dense(8), Relu()))')
  copy = cloudpickle.loads(cloudpickle.dumps(stax.Dense(3).kernel_fn))
  assert copy.name == 'Dense(3)'
  # A plain tuple of an ntkjax layer composes like the Layer itself.
  as_tuple = stax.serial(tuple(block), stax.Dense(1))
  np.testing.assert_array_equal(as_tuple.kernel_fn(x1, x2, 'ntk'), before)
