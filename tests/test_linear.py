"""Dense in both parameterizations: exact identities and Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_monte_carlo_close, empirical_ntk, monte_carlo
from ntkjax import stax


@pytest.mark.parametrize('parameterization', ['ntk', 'standard'])
def test_single_dense_ntk_is_exact_at_any_init(parameterization, inputs):
  """One Dense layer is linear in its parameters, so its empirical NTK does
  not depend on the draw: NTK param -> W^2 x.y/d + b^2; standard -> x.y + 1."""
  x1, x2 = inputs
  net = stax.Dense(7, W_std=1.7, b_std=0.3, parameterization=parameterization)
  _, params = net.init_fn(jax.random.PRNGKey(0), (-1, x1.shape[-1]))
  np.testing.assert_allclose(empirical_ntk(net.apply_fn, params, x1, x2),
                             net.kernel_fn(x1, x2, 'ntk'), rtol=1e-12)


@pytest.mark.parametrize('parameterization', ['ntk', 'standard'])
def test_deep_dense_matches_monte_carlo(parameterization, inputs):
  """Standard parameterization: the NTK scales with the hidden width
  (Sohl-Dickstein et al. 2020); the Monte Carlo of that same finite network
  must agree."""
  x1, x2 = inputs
  width = 512

  def net(readout):
    return stax.serial(
        stax.Dense(width, W_std=1.4, b_std=0.1, parameterization=parameterization),
        stax.Relu(),
        stax.Dense(readout, W_std=1.2, b_std=0.2, parameterization=parameterization))

  key = jax.random.PRNGKey(11)
  wide, narrow = net(width), net(2)
  nngp = monte_carlo(wide, x1, x2, key, 24, ('nngp',))['nngp']
  ntk = monte_carlo(narrow, x1, x2, key, 96, ('ntk',))['ntk']
  assert_monte_carlo_close(nngp, wide.kernel_fn(x1, x2, 'nngp'), width, 'nngp')
  assert_monte_carlo_close(ntk, narrow.kernel_fn(x1, x2, 'ntk'), width, 'ntk')


def test_no_bias_means_no_bias(inputs):
  x1, x2 = inputs
  with_zero_bias = stax.Dense(3, W_std=1.2, b_std=0.).kernel_fn(x1, x2)
  no_bias = stax.Dense(3, W_std=1.2, b_std=None).kernel_fn(x1, x2)
  np.testing.assert_allclose(with_zero_bias.nngp, no_bias.nngp)
  _, params = stax.Dense(3).init_fn(jax.random.PRNGKey(0), (-1, 6))
  assert params[1] is None


def test_input_kernel_is_mean_over_features(inputs):
  x1, x2 = inputs
  k = stax.Identity().kernel_fn(x1, x2)
  np.testing.assert_allclose(k.nngp, x1 @ x2.T / x1.shape[1], rtol=1e-12)
  np.testing.assert_allclose(k.cov1, jnp.sum(x1**2, 1) / x1.shape[1], rtol=1e-12)
  np.testing.assert_array_equal(k.ntk, 0.)
