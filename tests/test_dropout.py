"""Dropout in train mode: Monte Carlo over weights AND masks, exact
identities (different batches, blocks, batch()), and errors.

The Monte Carlo estimates draw one mask per forward pass of the whole batch
(as a training step does) and use it for every sample's features and
gradients, so they estimate exactly the kernel Dropout documents: entries of
a sample with itself at one position are scaled by 1/rate, all others are
unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from conftest import assert_monte_carlo_close, empirical_nngp, empirical_ntk
from ntkjax import stax
from ntkjax.stax._dropout import Dropout


# Blocked and unblocked runs compute the same entries in different XLA
# programs: equal up to float64 rounding through a few layers. (Before
# dual._correlation took rho within 4 eps of 1 as 1, a sample with itself
# differed by O(sqrt(eps)) ~ 1e-8 through the ReLU arc-cosine.)
RTOL_SAME_SAMPLE = 1e-11


def _monte_carlo(network, x, n_seeds, kind, key=0):
  """Mean and standard error of the empirical kernel of `network` on the
  batch x with itself, over weights and dropout masks."""
  init_fn, apply_fn, _ = network
  estimator = empirical_nngp if kind == 'nngp' else empirical_ntk

  @jax.jit
  def one(seed_key):
    init_key, mask_key = jax.random.split(seed_key)
    _, params = init_fn(init_key, x.shape)
    f = lambda p, inputs: apply_fn(p, inputs, key=mask_key)
    return estimator(f, params, x, x)

  values = np.stack([np.asarray(one(k)) for k in
                     jax.random.split(jax.random.PRNGKey(key), n_seeds)])
  return values.mean(0), values.std(0, ddof=1) / np.sqrt(n_seeds)


def _inputs(n=4, d=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, d)))


@pytest.mark.parametrize('rate', [0.5, 0.8])
def test_fully_connected_dropout_matches_monte_carlo(rate):
  width = 512
  x = _inputs()
  body = lambda: [stax.Dense(width, W_std=1.5, b_std=0.2), stax.Relu(),
                  Dropout(rate)]
  wide = stax.serial(*body(), stax.Dense(width, W_std=1.2, b_std=0.1))
  narrow = stax.serial(*body(), stax.Dense(2, W_std=1.2, b_std=0.1))
  nngp = wide.kernel_fn(x, None, 'nngp')
  ntk = narrow.kernel_fn(x, None, 'ntk')
  # The dropout scaling is visible: the diagonal grows by about 1/rate.
  no_dropout = stax.serial(stax.Dense(width, W_std=1.5, b_std=0.2),
                           stax.Relu(), stax.Dense(2, W_std=1.2, b_std=0.1))
  plain = no_dropout.kernel_fn(x, None, 'nngp')
  assert np.allclose(np.asarray(nngp) - np.diag(np.diag(nngp)),
                     np.asarray(plain) - np.diag(np.diag(plain)))
  assert np.all(np.diag(nngp) > np.diag(plain) * (1 + 0.5 * (1 / rate - 1)))
  assert_monte_carlo_close(_monte_carlo(wide, x, 24, 'nngp'), nngp, width,
                           'dropout nngp')
  assert_monte_carlo_close(_monte_carlo(narrow, x, 96, 'ntk'), ntk, width,
                           'dropout ntk')


def test_spatial_dropout_scales_same_sample_same_position_only():
  """1-d conv features: Monte Carlo of the full (N, N, S, S) output kernel."""
  width = 256
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 2)))
  network = stax.serial(stax.Conv(width, (2,), padding='SAME', b_std=0.1),
                        stax.Relu(), Dropout(0.6),
                        stax.Conv(width, (2,), padding='CIRCULAR',
                                  W_std=1.3))
  exact = network.kernel_fn(x, None, 'nngp')  # (N, N, S, S)
  init_fn, apply_fn, _ = network

  @jax.jit
  def one(seed_key):
    init_key, mask_key = jax.random.split(seed_key)
    _, params = init_fn(init_key, x.shape)
    f = apply_fn(params, x, key=mask_key)
    return jnp.einsum('nsc,mtc->nmst', f, f) / f.shape[-1]

  values = np.stack([np.asarray(one(k)) for k in
                     jax.random.split(jax.random.PRNGKey(3), 32)])
  estimate = (values.mean(0), values.std(0, ddof=1) / np.sqrt(32))
  assert_monte_carlo_close(estimate, exact, width, 'spatial dropout nngp')


def test_different_batches_are_the_off_diagonal_block_of_one_batch():
  """For x2 given, masks of x1 and x2 samples are independent: the kernel is
  the off-diagonal block of the kernel of the concatenated batch."""
  network = stax.serial(stax.Dense(8, b_std=0.3), stax.Erf(), Dropout(0.5),
                        stax.Dense(1))
  x1, x2 = _inputs(3), _inputs(2, seed=5)
  both = network.kernel_fn(jnp.concatenate([x1, x2]), None, ('nngp', 'ntk'))
  cross = network.kernel_fn(x1, x2, ('nngp', 'ntk', 'cov1', 'cov2'))
  np.testing.assert_allclose(cross.nngp, both.nngp[:3, 3:], rtol=1e-12)
  np.testing.assert_allclose(cross.ntk, both.ntk[:3, 3:], rtol=1e-12)
  np.testing.assert_allclose(cross.cov1, np.diag(both.nngp)[:3], rtol=1e-12)
  np.testing.assert_allclose(cross.cov2, np.diag(both.nngp)[3:], rtol=1e-12)


def test_blocked_and_batched_kernels_keep_the_same_sample_scaling():
  """Large spatial kernels are computed in blocks of pairs (and batch()
  splits at the Python level): both must still scale exactly the pairs of
  a sample with itself."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((40, 6, 6, 1)))
  network = stax.serial(stax.Conv(4, (3, 3), padding='SAME', b_std=0.1),
                        stax.Relu(), Dropout(0.7),
                        stax.Conv(4, (3, 3), padding='SAME'),
                        stax.GlobalAvgPool(), stax.Dense(1))
  whole = network.kernel_fn(x)  # get=None: one unblocked computation
  expected = np.asarray(whole.spatial.public(whole.ntk, 2))
  kernel_fn = jax.jit(network.kernel_fn, static_argnames='get')
  blocked = kernel_fn(x, None, 'ntk')  # 40 x 40 x 36^2 pairs: blocked
  np.testing.assert_allclose(blocked, expected, rtol=RTOL_SAME_SAMPLE)
  batched = ntkjax.batch(network.kernel_fn, batch_size=16)(x, None, 'ntk')
  np.testing.assert_allclose(batched, expected, rtol=RTOL_SAME_SAMPLE)


def test_test_mode_and_rate_one_are_the_identity():
  x = _inputs()
  base = stax.serial(stax.Dense(8, b_std=0.1), stax.Relu(), stax.Dense(1))
  for layer in (Dropout(0.3, mode='test'), Dropout(1.0)):
    network = stax.serial(stax.Dense(8, b_std=0.1), stax.Relu(), layer,
                          stax.Dense(1))
    np.testing.assert_allclose(network.kernel_fn(x, None, 'ntk'),
                               base.kernel_fn(x, None, 'ntk'), rtol=1e-12)
  _, params = Dropout(0.3, mode='test').init_fn(jax.random.PRNGKey(0),
                                                x.shape)
  np.testing.assert_array_equal(Dropout(0.3, 'test').apply_fn(params, x), x)


def test_finite_dropout_keeps_and_rescales():
  x = jnp.ones((200, 50))
  y = Dropout(0.25).apply_fn((), x, rng=jax.random.PRNGKey(0))
  values = set(np.unique(np.asarray(y)).tolist())
  assert values <= {0., 4.}
  assert abs(float(jnp.mean(y == 4.)) - 0.25) < 0.01


def test_errors():
  with pytest.raises(ValueError, match='keeping'):
    Dropout(0.)
  with pytest.raises(ValueError, match='keeping'):
    Dropout(1.5)
  with pytest.raises(ValueError, match="mode"):
    Dropout(0.5, mode='eval')
  with pytest.raises(ValueError, match='random key'):
    Dropout(0.5).apply_fn((), jnp.ones((2, 3)))
  network = stax.serial(stax.Dense(8), Dropout(0.5), stax.Relu())
  with pytest.raises(stax.KernelError, match='Relu'):
    network.kernel_fn(_inputs())
