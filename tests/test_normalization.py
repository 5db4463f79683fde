"""LayerNorm: its kernel against Monte Carlo of the finite networks, exact
identities, and clear errors."""
import numpy as np
import pytest
from conftest import check_layers_against_monte_carlo

from ntkjax import stax

WIDTH = 512


def _dense():
  return stax.Dense(WIDTH, W_std=1.4, b_std=0.3)


def test_layer_norm_after_relu_matches_monte_carlo(inputs):
  """ReLU features have a non-zero channel mean: the kernel must center
  them (nngp - m m') before scaling, as the finite layer does."""
  check_layers_against_monte_carlo(
      lambda: stax.serial(_dense(), stax.Relu(), stax.LayerNorm(), _dense(),
                          stax.Erf()),
      inputs, 'relu_norm', WIDTH, key=len('relu_norm'))


def test_nonlinearity_after_layer_norm_of_gaussian_matches_monte_carlo(
    inputs):
  """LayerNorm of pre-activations is a per-sample rescaled Gaussian field,
  so a nonlinearity may follow it directly."""
  check_layers_against_monte_carlo(
      lambda: stax.serial(_dense(), stax.LayerNorm(), stax.Relu()),
      inputs, 'norm_relu', WIDTH, key=len('norm_relu'))


def test_layer_norm_of_gaussian_is_the_correlation(inputs):
  """For zero-mean Gaussian features, nngp' = nngp / sqrt(q1 q2): the
  correlation (eps = 0), whose diagonal on x with itself is 1."""
  x1, _ = inputs
  base = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2))
  net = stax.serial(base, stax.LayerNorm(eps=0.))
  k = base.kernel_fn(x1, None, ('nngp', 'cov1'))
  expected = np.asarray(k.nngp) / np.sqrt(np.outer(k.cov1, k.cov1))
  normed = net.kernel_fn(x1, None, ('nngp', 'ntk'))
  np.testing.assert_allclose(normed.nngp, expected, rtol=1e-12)
  np.testing.assert_allclose(np.diagonal(normed.nngp), 1., rtol=1e-12)
  ntk = base.kernel_fn(x1, None, 'ntk')
  np.testing.assert_allclose(
      normed.ntk, np.asarray(ntk) / np.sqrt(np.outer(k.cov1, k.cov1)),
      rtol=1e-12)


def test_layer_norm_acts_per_position_on_images():
  """On images LayerNorm normalizes each position over channels; with 1x1
  images the kernel is the fully connected one."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5))
  body = lambda conv: stax.serial(
      conv, stax.Relu(), stax.LayerNorm(), stax.Dense(4), stax.Erf())
  flat = body(stax.Dense(6, W_std=1.5, b_std=0.2)).kernel_fn(x, None, 'ntk')
  image = body(stax.Conv(6, (1, 1), W_std=1.5, b_std=0.2)).kernel_fn(
      x.reshape(3, 1, 1, 5), None, 'ntk')
  np.testing.assert_allclose(image[:, :, 0, 0, 0, 0], flat, rtol=1e-12)


def test_finite_layer_norm_normalizes_channels():
  """The finite layer: zero mean and unit variance over the channel axis."""
  _, apply_fn, _ = stax.LayerNorm(eps=0.)
  x = np.random.default_rng(1).standard_normal((2, 3, 7)) * 3 + 1
  y = np.asarray(apply_fn((), x))
  np.testing.assert_allclose(y.mean(-1), 0., atol=1e-12)
  np.testing.assert_allclose(y.var(-1), 1., rtol=1e-12)


def test_layer_norm_errors(inputs):
  x1, x2 = inputs
  with pytest.raises(NotImplementedError, match='channel axis'):
    stax.LayerNorm(axis=(1, 2))
  net = stax.serial(_dense(), stax.Relu(), stax.LayerNorm(), stax.Relu())
  with pytest.raises(stax.KernelError, match='Dense'):
    net.kernel_fn(x1, x2)
  with pytest.raises(ValueError, match='eps'):
    stax.LayerNorm(eps=-1.)
