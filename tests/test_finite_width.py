"""Tests for ntkjax.finite_width: Monte Carlo against finite-width theory.

Fixed seeds throughout. Bands are in units of the Monte Carlo standard
error estimated from the seeds themselves (4 s.e.: a false alarm has
probability ~6e-5 per check for a Gaussian estimate).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax import finite_width, stax

KEY = jax.random.PRNGKey(0)
X = jax.random.normal(jax.random.PRNGKey(1), (6, 8))


def _one_hidden_layer(activation):
  return lambda n: stax.serial(stax.Dense(n, 1.5, 0.1), activation,
                               stax.Dense(1, 1.5, 0.1))


def test_fit_power_law_recovers_an_exact_power():
  widths = np.array([10., 100., 1000.])
  values = 3. * widths[:, None]**-0.5 * np.array([[0.9, 1.1]])
  slope, slope_stderr, intercept, mean, _ = finite_width.fit_power_law(
      widths, values)
  assert slope == pytest.approx(-0.5, abs=1e-12)
  assert intercept == pytest.approx(math.log(3.), abs=1e-12)
  assert slope_stderr > 0
  np.testing.assert_allclose(mean, 3. * widths**-0.5)


def test_kernel_fluctuations_shrink_like_inverse_sqrt_width():
  # Each NTK entry averages n i.i.d. channel terms: fluctuation ~ n^-1/2.
  # Widths 64 .. 1024 with 16 seeds give a slope standard error ~0.04. The
  # mean's O(1/n) bias enters |Theta_n - Theta|^2 at O(1/n^2) against the
  # fluctuations' O(1/n): a relative correction O(1/n), negligible here.
  result = finite_width.kernel_fluctuations(
      _one_hidden_layer(stax.Relu()), X, [64, 256, 1024], 16, KEY)
  assert result.values.shape == (3, 16)
  assert abs(result.slope + 0.5) < 4 * result.slope_stderr
  assert result.slope_stderr < 0.06   # the test has power against slope -1


def test_kernel_drift_is_lazy():
  # Smooth activation (erf): the NTK moves by O(1/n) during training
  # (Dyer & Gur-Ari 2020), inside Lee et al.'s O(n^-1/2) bound. Widths
  # 256 .. 4096 (past the small-width transient). n * drift has a skewed
  # spread (~2 .. 25 across seeds), so 24 seeds are needed for a slope
  # standard error ~0.07, small enough to tell -1 from -1/2 at 4 s.e.
  y = jnp.sin(X[:, :1])
  result = finite_width.kernel_drift(_one_hidden_layer(stax.Erf()), X, y,
                                     [256, 1024, 4096], 24, KEY, steps=100)
  assert abs(result.slope + 1.) < 4 * result.slope_stderr
  assert result.slope < -0.5 - 4 * result.slope_stderr
  assert result.mean[-1] < 0.01   # lazy: a relative change below 1 %


@pytest.mark.parametrize('activation, depth, width', [('linear', 32, 32),
                                                      ('relu', 16, 32)])
def test_jacobian_norm_factor(activation, depth, width):
  # log G is a sum of `depth` i.i.d. layer terms (module docstring), so the
  # seed average is Gaussian to good approximation; its exact mean is
  # finite_width.exact_log_gain. 400 seeds: s.e. ~0.07 for L / n = 1.
  result = finite_width.jacobian_norms([depth], [width], KEY, activation,
                                       n_seeds=400)
  mean = float(result.log_gain_mean[0])
  stderr = float(result.log_gain_stderr[0])
  exact = float(result.log_gain_exact[0])
  assert abs(mean - exact) < 4 * stderr
  # The typical factor is far from 1 (E[G] = 1 but log G drifts): linear
  # exp(-L / (2n)) = exp(-1/2), ReLU exp(-5 L / (4n)) = exp(-5/8).
  assert exact < -0.4 and abs(mean) > 4 * stderr
  # Leading order, per layer: linear E log(chi2_n / n) = -1/n - 1/(3 n^2)
  # + O(n^-3); ReLU E log(2 chi2_K / n) = E[psi(K/2) - log(K/2)]
  # + E log(2K/n) = (-2/n - 2/n^2 - 4/(3 n^2)) + (-1/(2n) - 3/(4 n^2)) + ...
  # = -5/(2n) - 4.1/n^2 + O(n^-3). So the gap is below 5 L / n^2.
  leading = float(result.log_gain_leading[0])
  assert abs(exact - leading) < 5 * depth / width**2
  np.testing.assert_allclose(result.factor_leading,
                             np.exp(leading / 2), rtol=1e-14)


def test_exact_log_gain_values():
  # Linear, one layer of width 2: E log(chi2_2 / 2) = psi(1) + log(2/2)
  # = -Euler's gamma.
  assert finite_width.exact_log_gain(1, 2, 'linear') == pytest.approx(
      -0.5772156649015329, abs=1e-12)
  # ReLU, width 1: K = 1 given K >= 1, so E log(2 chi2_1 / 1) = log 2 +
  # psi(1/2) + log 2 = 2 log 2 - gamma - 2 log 2 = -gamma.
  assert finite_width.exact_log_gain(1, 1, 'relu') == pytest.approx(
      -0.5772156649015329, abs=1e-12)


def test_ntk_diagonal_spread():
  # ReLU, He init, no biases (Hanin & Nica 2020). Exact facts tested:
  # E[Theta(x, x)] is the infinite-width value (their Theorem 1: no width
  # correction to the mean), within 4 s.e.; and the normalized second moment
  # grows with L / n. Their exp(5 L / n) is an asymptotic scale ("up to
  # factors bounded in L / n"): each layer's contribution to Theta has
  # normalized second moment ~(1 + 5/n)^L, and the sum of L + 1 imperfectly
  # correlated contributions has less (Cauchy-Schwarz), so the ratio lies
  # between 1 and exp(5 L / n) (measured: log ratio ~ 3 L / n here).
  result = finite_width.ntk_diagonal_spread([2, 8], [16, 16], KEY, n_seeds=600)
  assert np.all(np.abs(result.mean - result.infinite_width)
                < 4 * result.mean_stderr)
  assert np.all(result.ratio > 1 + 4 * result.ratio_stderr)
  assert result.ratio[1] - result.ratio[0] > 4 * np.hypot(*result.ratio_stderr)
  assert np.all(result.ratio + 4 * result.ratio_stderr < result.predicted)
  np.testing.assert_allclose(result.predicted,
                             np.exp(5 * np.array([2, 8]) / 16))


def test_plots():
  pytest.importorskip('matplotlib')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  scaling = finite_width.WidthScaling(
      np.array([10, 100]), np.ones((2, 2)), np.array([1., 0.3]),
      np.array([0.1, 0.03]), -0.52, 0.01, 0.)
  ax = finite_width.plot_width_scaling(scaling)
  assert ax.get_xscale() == 'log'
  plt.close(ax.figure)
  one = np.ones(1)
  norms = finite_width.JacobianNorms(
      one * 8, one * 16, -one / 2, one / 10, -one / 2, -one / 2,
      *[np.exp(-one / 4)] * 3)
  plt.close(finite_width.plot_jacobian_norms(norms).figure)
  spread = finite_width.NtkSpread(*[one * v for v in (2, 16, 1.5, 0.1, 1.87,
                                                       1.8, 3., 0.1, 3.)])
  plt.close(finite_width.plot_ntk_spread(spread).figure)


def test_bad_inputs():
  with pytest.raises(ValueError, match='widths'):
    finite_width.kernel_fluctuations(_one_hidden_layer(stax.Relu()), X,
                                     [64], 4, KEY)
  with pytest.raises(ValueError, match='n_seeds'):
    finite_width.kernel_fluctuations(_one_hidden_layer(stax.Relu()), X,
                                     [8, 16], 1, KEY)
  with pytest.raises(ValueError, match='activation'):
    finite_width.jacobian_norms([2], [4], KEY, 'tanh')
  with pytest.raises(ValueError, match='get'):
    finite_width.kernel_fluctuations(_one_hidden_layer(stax.Relu()), X,
                                     [8, 16], 2, KEY, get='cov1')
