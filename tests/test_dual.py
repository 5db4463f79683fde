"""Closed-form dual activations against independent numerical integration.

* Smooth (entire) nonlinearities: ntkjax's quadrature (`stax._quadrature`) converges
  spectrally, so at degree 96 it is exact to ~1e-12 relative and the closed
  forms must match to 1e-9.
* Positively homogeneous nonlinearities (ReLU family, Sign, relu^n) have
  kinks. For them this file integrates exactly (its own numpy code)
  in polar coordinates: with (u, v) = (s1 r cos a, s2 r cos(a - theta)),
  E[f(u) g(v)] = s1^p s2^q E[r^(p+q)] (1/2pi) int f(cos a) g(cos(a - theta)) da,
  where r^2 ~ chi^2_2 so E[r^m] = 2^(m/2) Gamma(1 + m/2), and the angular
  integral is piecewise smooth between the known kinks, so Gauss–Legendre on
  each piece is exact to machine precision.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax import stax
from ntkjax.stax import _dual as dual, _quadrature as quadrature

# (k11, k12, k22): unequal variances, positive/negative/near-extreme correlations.
COVARIANCES = [
    (1.0, 0.3, 1.0),
    (0.7, -0.4, 1.9),
    (2.5, 2.2, 2.1),
    (0.4, 0.399, 0.4),     # rho ~ 0.9975
    (1.3, -1.29, 1.3),     # rho ~ -0.992
    (1.7, 0.0, 0.2),
    (0.9, 0.9, 0.9),       # rho = 1 exactly (the diagonal)
]


def _grid():
  k11, k12, k22 = (jnp.array(c) for c in zip(*COVARIANCES))
  return k12, k11, k22


SMOOTH = {
    'erf': dual.erf(1.3, 0.8, 0.2),
    'sigmoid_like': dual.erf(0.5, 1 / 2.4020563531719796, 0.5),
    'sin': dual.sin(1.1, 0.9, 0.4),
    'exp': dual.exp(0.7, 0.5),
    'gaussian': dual.gaussian(1.2, -0.6),
    'polynomial': dual.polynomial([0.3, -1.0, 0.5, 0.25]),
    'monomial5': dual.polynomial([0.] * 5 + [1.]),
}


@pytest.mark.parametrize('name', sorted(SMOOTH))
def test_smooth_closed_forms_match_quadrature(name):
  act = SMOOTH[name]
  k12, k11, k22 = _grid()
  d_fn = quadrature.derivative(act.fn)
  nngp_quad = quadrature.expect_2d(act.fn, act.fn, k12, k11, k22, degree=96)
  ntk_quad = quadrature.expect_2d(d_fn, d_fn, k12, k11, k22, degree=96)
  np.testing.assert_allclose(act.nngp(k12, k11, k22), nngp_quad,
                             rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(act.ntk_factor_or_derived()(k12, k11, k22),
                             ntk_quad, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(act.mean(k11), quadrature.expect_1d(act.fn, k11, 96),
                             rtol=1e-9, atol=1e-11)


def test_gelu_closed_form_matches_quadrature():
  # The Gelu formula lives with its layer; reach it through a network:
  # Dense(W_std=1) of inputs x gives pre-activations with covariance x x^T / d.
  x = jnp.array([[1.0, 0.2], [-0.3, 1.4], [0.9, -1.1]])
  net = stax.serial(stax.Dense(1, W_std=1.), stax.Gelu())
  out = net.kernel_fn(x, None, ('nngp', 'ntk'))
  cov = x @ x.T / 2
  k11 = jnp.diag(cov)[:, None] * jnp.ones_like(cov)
  k22 = jnp.diag(cov)[None, :] * jnp.ones_like(cov)
  fn = lambda t: jax.nn.gelu(t, approximate=False)
  d_fn = quadrature.derivative(fn)
  np.testing.assert_allclose(out.nngp, quadrature.expect_2d(fn, fn, cov, k11, k22, 96),
                             rtol=1e-9, atol=1e-12)
  # NTK = ntk_in * E[phi' phi'] with ntk_in = nngp_in for a single Dense layer.
  np.testing.assert_allclose(out.ntk,
                             cov * quadrature.expect_2d(d_fn, d_fn, cov, k11, k22, 96),
                             rtol=1e-9, atol=1e-12)


# ---- Homogeneous nonlinearities: exact polar integration. ------------------


def _polar_expectation(f, g, p, q, k12, k11, k22, kinks=(), pieces_degree=64):
  """E[f(u) g(v)] for f, g positively homogeneous of degrees p, q."""
  s1, s2 = math.sqrt(k11), math.sqrt(k22)
  rho = max(-1., min(1., k12 / (s1 * s2)))
  theta = math.acos(rho)
  breaks = sorted({0., 2 * math.pi, *[
      (a + theta * shift) % (2 * math.pi)
      for a in (math.pi / 2, 3 * math.pi / 2, *kinks) for shift in (0, 1)]})
  nodes, weights = np.polynomial.legendre.leggauss(pieces_degree)
  total = 0.
  for lo, hi in zip(breaks[:-1], breaks[1:]):
    a = (hi - lo) / 2 * nodes + (hi + lo) / 2
    total += (hi - lo) / 2 * np.sum(weights * f(np.cos(a)) * g(np.cos(a - theta)))
  radial = 2**((p + q) / 2) * math.gamma(1 + (p + q) / 2)
  return s1**p * s2**q * radial * total / (2 * math.pi)


def _relu_power(n):
  return lambda x: np.where(x > 0, x, 0.)**n if n else (x > 0).astype(float)


HOMOGENEOUS = {
    # name: (activation, phi (numpy), degree, phi', degree of phi')
    'relu': (dual.ab_relu(0., 1.), _relu_power(1), 1, _relu_power(0), 0),
    'leaky': (dual.ab_relu(0.1, 1.), lambda x: np.where(x < 0, 0.1 * x, x), 1,
              lambda x: np.where(x < 0, 0.1, 1.), 0),
    'abs': (dual.ab_relu(-1., 1.), np.abs, 1, np.sign, 0),
    'abrelu': (dual.ab_relu(-0.4, 2.), lambda x: np.where(x < 0, -0.4 * x, 2 * x),
               1, lambda x: np.where(x < 0, -0.4, 2.), 0),
    'sign': (dual.sign(), np.sign, 0, None, None),
    'relu^0': (dual.rectified_monomial(0), _relu_power(0), 0, None, None),
    'relu^2': (dual.rectified_monomial(2), _relu_power(2), 2,
               lambda x: 2 * _relu_power(1)(x), 1),
    'relu^3': (dual.rectified_monomial(3), _relu_power(3), 3,
               lambda x: 3 * _relu_power(2)(x), 2),
}


@pytest.mark.parametrize('name', sorted(HOMOGENEOUS))
def test_homogeneous_closed_forms_match_polar_integration(name):
  act, phi, p, d_phi, dp = HOMOGENEOUS[name]
  for k11, k12, k22 in COVARIANCES:
    expected = _polar_expectation(phi, phi, p, p, k12, k11, k22)
    got = float(act.nngp(jnp.array(k12), jnp.array(k11), jnp.array(k22)))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12,
                               err_msg=f'{name} nngp at {(k11, k12, k22)}')
    if d_phi is not None:
      expected = _polar_expectation(d_phi, d_phi, dp, dp, k12, k11, k22)
      got = float(act.ntk_factor(jnp.array(k12), jnp.array(k11), jnp.array(k22)))
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12,
                                 err_msg=f'{name} ntk factor at {(k11, k12, k22)}')


@pytest.mark.parametrize('name', ['relu', 'abs', 'abrelu', 'relu^2', 'relu^3'])
def test_homogeneous_means(name):
  act, phi, p, _, _ = HOMOGENEOUS[name]
  for k in (0.3, 1.0, 2.7):
    # E[phi(u)] = k^(p/2) E[r^p] (1/2pi) int phi(cos a) da with g = 1 (q = 0).
    expected = _polar_expectation(phi, lambda x: np.ones_like(x), p, 0, 0., k, 1.)
    np.testing.assert_allclose(float(act.mean(jnp.array(k))), expected,
                               rtol=1e-10)


def test_relu_known_values():
  """Arc-cosine values by hand: k11 = k22 = 1.

  rho = 0: theta = pi/2, E[relu relu] = 1/(2pi), E[step step] = 1/4.
  rho = 1: E[relu(u)^2] = 1/2, E[step] = 1/2.   rho = -1: both 0.
  """
  relu = dual.ab_relu(0., 1.)
  one = jnp.array(1.)
  for k12, nngp, factor in [(0., 1 / (2 * math.pi), 0.25), (1., 0.5, 0.5),
                            (-1., 0., 0.)]:
    np.testing.assert_allclose(relu.nngp(jnp.array(k12), one, one), nngp,
                               atol=1e-15)
    np.testing.assert_allclose(relu.ntk_factor(jnp.array(k12), one, one),
                               factor, atol=1e-15)


def test_arccos_j2_matches_cho_saul():
  """J_2(theta) = 3 sin cos + (pi - theta)(1 + 2 cos^2) (Cho & Saul 2009, eq. 6)."""
  for theta in np.linspace(0.01, math.pi - 0.01, 7):
    rho = math.cos(theta)
    k12 = jnp.array(rho)
    got = float(dual._arccos_kernel(2, k12, jnp.array(1.), jnp.array(1.)))
    expected = (3 * math.sin(theta) * rho + (math.pi - theta)
                * (1 + 2 * rho**2)) / (2 * math.pi)
    # Near theta = pi both formulas cancel O(1) terms: compare absolutely there.
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize('name', sorted(SMOOTH) + ['relu', 'relu^2', 'abrelu'])
def test_price_theorem(name):
  """E[phi' phi'] = d E[phi phi] / d k12 (Price 1958): checks each pair."""
  act = SMOOTH[name] if name in SMOOTH else HOMOGENEOUS[name][0]
  k11, k22 = jnp.array(1.3), jnp.array(0.8)
  for k12 in (-0.6, 0.1, 0.7):
    h = 1e-6
    fd = (act.nngp(jnp.array(k12 + h), k11, k22)
          - act.nngp(jnp.array(k12 - h), k11, k22)) / (2 * h)
    np.testing.assert_allclose(act.ntk_factor(jnp.array(k12), k11, k22), fd,
                               rtol=1e-7)


def test_closed_forms_have_finite_gradients_on_the_diagonal():
  for act in [HOMOGENEOUS[n][0] for n in HOMOGENEOUS] + list(SMOOTH.values()):
    def value(k):
      return act.nngp(k, k, k) + act.ntk_factor_or_derived()(k, k, k)
    grad = jax.grad(value)(jnp.array(0.8))
    assert np.isfinite(grad), act.name


@pytest.mark.parametrize('name', sorted(HOMOGENEOUS))
def test_quadrature_is_exact_at_kinks(name):
  """ntkjax's quadrature (used for chains of nonlinearities) against the
  exact polar integration above, for functions with kinks and jumps at 0.
  The rule splits its panels at both kinks (u = 0, v = 0), so these
  piecewise polynomials of degree <= 3 leave only the Gaussian tail
  rules' error, which degree 48 takes to ~1e-12."""
  act, phi, p, d_phi, dp = HOMOGENEOUS[name]
  k12, k11, k22 = _grid()
  got = quadrature.expect_2d(act.fn, act.fn, k12, k11, k22, 48)
  expected = [_polar_expectation(phi, phi, p, p, k12_, k11_, k22_)
              for k11_, k12_, k22_ in COVARIANCES]
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


CHAINS = {
    'tanh': jnp.tanh,
    'erf(relu)': lambda x: jax.scipy.special.erf(jnp.maximum(x, 0.)),
    "erf(relu)'": quadrature.derivative(
        lambda x: jax.scipy.special.erf(jnp.maximum(x, 0.))),
    'tanh(2 tanh)': lambda x: jnp.tanh(2 * jnp.tanh(x)),
}


@pytest.mark.parametrize('name', sorted(CHAINS))
def test_quadrature_accuracy_contract(name):
  """The accuracy documented at `dual.DEFAULT_QUADRATURE_DEGREE` (1e-6),
  here against the same rule at degree 120 (independent integration is
  tests/test_quadrature_accuracy.py), for smooth functions, chains with
  kinks at 0, their (discontinuous) derivatives and a chain of two
  saturating maps, at pre-activation variances up to 2.5. (A tensor
  Gauss–Hermite rule of the same cost is off by ~1e-2 on erf(relu)'.)"""
  fn = CHAINS[name]
  k12, k11, k22 = _grid()
  default = quadrature.expect_2d(fn, fn, k12, k11, k22, dual.DEFAULT_QUADRATURE_DEGREE)
  reference = quadrature.expect_2d(fn, fn, k12, k11, k22, 120)
  np.testing.assert_allclose(default, reference, rtol=0, atol=1e-6)


def test_polynomial_mixed_moments_by_sampling():
  """Isserlis' moments against direct sampling (10^6 Gaussian pairs)."""
  rng = np.random.default_rng(0)
  cov = np.array([[1.2, 0.5], [0.5, 0.8]])
  z = rng.multivariate_normal([0, 0], cov, size=1_000_000)
  for i, j in [(2, 2), (3, 1), (4, 2), (1, 3)]:
    sample = z[:, 0]**i * z[:, 1]**j
    exact = float(dual._mixed_moment(i, j, 0.5, 1.2, 0.8))
    assert abs(sample.mean() - exact) < 5 * sample.std() / 1000, (i, j)


@pytest.mark.parametrize('degree', [24, 64, 300, 512])
@pytest.mark.parametrize('power', [0, 1])
def test_half_range_rule_integrates_moments_exactly(degree, power):
  """A Gauss rule of `degree` nodes for the weight r^p exp(-r^2/2) on
  [0, inf) (normalized to mass 1) is exact for r^k, k < 2 degree. The
  moments are m_k = 2^(k/2) Gamma((k+p+1)/2) / Gamma((p+1)/2) (substitute
  t = r^2/2); checked up to k = 30, where float64 moments stay accurate."""
  from math import gamma
  nodes, weights = quadrature.half_range_rule(degree, power)
  for k in range(0, 31, 3):
    exact = 2**(k / 2) * gamma((k + power + 1) / 2) / gamma((power + 1) / 2)
    np.testing.assert_allclose(np.sum(weights * nodes**k), exact, rtol=1e-10)


def test_high_degree_kernels_are_finite_and_converged():
  """Degrees of ~300 and more returned NaN (the monic Stieltjes recurrence
  overflowed); now a smooth activation's kernel at degrees 300 and 512
  is finite and converged, and past the maximum the layer refuses."""
  import jax.numpy as jnp
  from ntkjax import stax
  x = np.array([[1., 0.5], [0.2, -1.], [3., 2.]])
  kernel = lambda deg: np.asarray(stax.serial(
      stax.Dense(1, W_std=2.), stax.ElementwiseNumerical(jnp.tanh, deg),
      stax.Dense(1))[2](x, None, 'ntk'))
  # Variances up to ~26 here: degree 64 is converged to ~2e-7, 300 and
  # 512 agree with each other to rounding.
  high = kernel(512)
  np.testing.assert_allclose(kernel(300), high, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(kernel(64), high, rtol=1e-6)
  with pytest.raises(ValueError, match=r'deg=513 must be an int in \[1, 512\]'):
    stax.ElementwiseNumerical(jnp.tanh, 513)
  with pytest.raises(ValueError, match='deg=1000'):
    stax.Tanh(deg=1000)


def test_relu_at_correlation_one_in_float32():
  """A sample with itself: k12 = k11 = k22. Exactly E[relu(u)^2] = k/2 and
  E[relu'(u)^2] = 1/2. Computed rho is 1 - O(eps), and arccos of that is
  ~sqrt(eps) = 3.5e-4 in float32 (1e-4 relative in the NTK factor) unless
  rho within rounding of 1 is taken as 1."""
  relu = dual.ab_relu(0., 1.)
  k = jnp.asarray(np.random.default_rng(0).uniform(0.1, 10., 1000),
                  jnp.float32)
  np.testing.assert_allclose(relu.ntk_factor(k, k, k), 0.5, rtol=1e-6)
  np.testing.assert_allclose(relu.nngp(k, k, k), k / 2, rtol=1e-6)
  # Through a network: the float32 NTK's diagonal within float32 rounding
  # of the float64 one (was 1.5e-4 off).
  x = np.random.default_rng(1).standard_normal((8, 10))
  network = stax.serial(stax.Dense(8, 1.5, 0.1), stax.Relu(),
                        stax.Dense(8, 1.5, 0.1), stax.Relu(), stax.Dense(1))
  ntk32 = network.kernel_fn(x.astype(np.float32), None, 'ntk')
  ntk64 = network.kernel_fn(x, None, 'ntk')
  assert ntk32.dtype == jnp.float32
  np.testing.assert_allclose(np.diag(ntk32), np.diag(ntk64), rtol=2e-6)
