"""Quadrature kernels against independent integration, at every variance and
on the diagonal (issue 17).

`quadrature.expect_2d` / `expect_1d` compute E[f(u) g(v)] and E[f(u)] for the
nonlinearities with no closed form (and chains, and their derivatives). The
reference here is computed differently: nested adaptive Gauss-Kronrod
quadrature (scipy's QUADPACK, relative tolerance 1e-10) in Cartesian
coordinates after whitening,

    E[f(u) g(v)] = int f(s1 x) [ int g(s2 (rho x + sqrt(1 - rho^2) z))
                                 phi(z) dz ] phi(x) dx,

each integral split at the kink of its function (x = 0; z = z* where the
argument of g vanishes) and given breakpoints at the activation's scale, in
float64 with scalar `math` twins of the functions. At rho = +-1 it is the
1-d integral E[f(u) g(+-(s2/s1) u)].

Errors are measured relative to sqrt(E[f^2] E[g^2]), the Cauchy-Schwarz
bound on |E[f g]| (relative to E[f g] itself they are undefined where it
vanishes, e.g. E[tanh(u) tanh(v)] at rho = 0).

Tolerances: the accuracy documented at `dual.DEFAULT_QUADRATURE_DEGREE`,
1e-6, for the default degree 24, where the rule's largest error on these
grids is 2.3e-7 (E[erf(relu)'(u) erf(relu)'(v)] at k11 = 1e4, k22 = 10,
rho = 1; 5e-8 or less elsewhere). At degree 48 the errors are 8e-12 or
less, and the bound is 1e-9.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from ntkjax import stax
from ntkjax.stax import _dual as dual, _quadrature as quadrature

VARIANCES = (1e-3, 0.1, 1., 10., 100., 1e3, 1e4)
CORRELATIONS = (-1., -0.9, 0., 0.5, 0.99, 1.)
# Pairs of unequal variances (k11, k22), and their correlations.
UNEQUAL = ((1e-2, 1e2), (1e2, 1.), (1e4, 10.))
UNEQUAL_CORRELATIONS = (0.5, 0.99, 1.)

# The documented accuracy at the default degree (module docstring).
DEFAULT_TOL = 1e-6
# Degree 48: twice the nodes per panel; the errors (spectral in them) fall
# to < 1e-11 of the scale; the bound leaves room for rounding in the sums.
HIGH_DEGREE, HIGH_TOL = 48, 1e-9


# ---- The reference. ---------------------------------------------------------

_SQRT_2PI = math.sqrt(2 * math.pi)
_RANGE = 11.  # standard deviations integrated over: the mass beyond is 4e-28


def _normal(z):
  return math.exp(-z * z / 2) / _SQRT_2PI


def _quad(fun, lo, hi, points):
  points = sorted({p for p in points if lo < p < hi})
  if hi <= lo:
    return 0.
  # Where an integral is ~0 (odd functions at rho = 0) QUADPACK cannot
  # reach 1e-10 relative and warns; it stops at rounding, ~1e-16 absolute.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', integrate.IntegrationWarning)
    return integrate.quad(fun, lo, hi, points=points or None, epsabs=0.,
                          epsrel=1e-10, limit=400)[0]


def _activation_points(kink, scale, sign=1.):
  """Breakpoints at 1, 3, 9, 27 activation units from a kink."""
  return [kink + sign * c * scale for c in (1., 3., 9., 27.)]


def reference_1d(fn, s):
  """E[fn(s z)], z ~ N(0, 1), split at the kink 0."""
  if s == 0:
    return fn(0.)
  points = _activation_points(0., 1. / s) + [1., 3.]
  return sum(_quad(lambda z, side=side: fn(side * s * z) * _normal(z),
                   0., _RANGE, points) for side in (1., -1.))


def reference_2d(f, g, s1, s2, rho):
  """E[f(u) g(v)], (u, v) ~ N(0, [[s1^2, rho s1 s2], [., s2^2]])."""
  if abs(rho) == 1.:
    return reference_1d(lambda u: f(u) * g(rho * s2 / s1 * u), s1)
  spread = math.sqrt(1. - rho * rho)
  t = s2 * spread

  def inner(x):
    """E_z[g(s2 (rho x + spread z))]: split at the kink z* of g."""
    kink = -rho * x / spread
    total = 0.
    for lo, hi, sign in ((-_RANGE, min(kink, _RANGE), -1.),
                         (max(kink, -_RANGE), _RANGE, 1.)):
      points = _activation_points(kink, 1. / t, sign) + [0.]
      total += _quad(lambda z: g(s2 * (rho * x + spread * z)) * _normal(z),
                     lo, hi, points)
    return total

  points = _activation_points(0., 1. / s1) + [1., 3.]
  if rho != 0:  # where H(x) = E_z[g] changes: the wedge, g's scale
    points += [c * spread / abs(rho) for c in (0.5, 2.)]
    points += [c / (s2 * abs(rho)) for c in (1., 9.)]
  return sum(_quad(lambda x, side=side: f(side * s1 * x) * inner(side * x)
                   * _normal(x), 0., _RANGE, points) for side in (1., -1.))


# ---- The functions: as the layers evaluate them, and scalar twins. ---------

def _sigmoid(x):
  if x >= 0:
    return 1. / (1. + math.exp(-x))
  e = math.exp(x)
  return e / (1. + e)


def _sech2(x):
  e = math.exp(-2. * abs(x))
  return 4. * e / (1. + e)**2


_GELU_C = math.sqrt(2. / math.pi)
_SELU_SCALE, _SELU_ALPHA = 1.0507009873554804934, 1.6732632423543772848


def _gelu_tanh(x):
  return 0.5 * x * (1. + math.tanh(_GELU_C * (x + 0.044715 * x**3)))


def _d_gelu_tanh(x):
  y = _GELU_C * (x + 0.044715 * x**3)
  return (0.5 * (1. + math.tanh(y))
          + 0.5 * x * _sech2(y) * _GELU_C * (1. + 3 * 0.044715 * x * x))


def _erf_relu(x):
  return jax.scipy.special.erf(jnp.maximum(x, 0.))


# name: (phi for jax, phi for math, phi' for math); phi' for jax is
# quadrature.derivative(phi), as the layers compute the NTK.
FUNCTIONS = {
    'tanh': (jnp.tanh, math.tanh, _sech2),
    'sigmoid': (jax.nn.sigmoid, _sigmoid,
                lambda x: _sigmoid(x) * (1. - _sigmoid(x))),
    'softplus': (jax.nn.softplus,
                 lambda x: max(x, 0.) + math.log1p(math.exp(-abs(x))),
                 _sigmoid),
    'silu': (jax.nn.silu, lambda x: x * _sigmoid(x),
             lambda x: _sigmoid(x) * (1. + x * (1. - _sigmoid(x)))),
    'gelu_tanh': (functools.partial(jax.nn.gelu, approximate=True),
                  _gelu_tanh, _d_gelu_tanh),
    'relu': (jax.nn.relu, lambda x: max(x, 0.), lambda x: float(x > 0)),
    'abs': (jnp.abs, abs, lambda x: 1. if x > 0 else -1.),
    'elu': (jax.nn.elu, lambda x: x if x > 0 else math.expm1(x),
            lambda x: 1. if x > 0 else math.exp(x)),
    'selu': (jax.nn.selu,
             lambda x: _SELU_SCALE * (x if x > 0 else
                                      _SELU_ALPHA * math.expm1(x)),
             lambda x: _SELU_SCALE * (1. if x > 0 else
                                      _SELU_ALPHA * math.exp(x))),
    'erf(relu)': (_erf_relu, lambda x: math.erf(max(x, 0.)),
                  lambda x: 2. / math.sqrt(math.pi) * math.exp(-x * x)
                  if x > 0 else 0.),
    'relu(tanh)': (lambda x: jax.nn.relu(jnp.tanh(x)),
                   lambda x: max(math.tanh(x), 0.),
                   lambda x: _sech2(x) if x > 0 else 0.),
}
# Every function on the full grid would take minutes of scipy; these do,
# the others get a sparser one (all variance decades but 1e3 and 0.1 / 10,
# every correlation but 0).
FULL_GRID = ('tanh', 'erf(relu)', 'selu')
SPARSE_VARIANCES = (1e-3, 1., 100., 1e4)
SPARSE_CORRELATIONS = (-1., -0.9, 0.5, 0.99, 1.)


def _integrand(name, derivative: bool):
  """(jax function, math function) of phi or phi'."""
  fn, phi, d_phi = FUNCTIONS[name]
  return (quadrature.derivative(fn), d_phi) if derivative else (fn, phi)


def _cases(name):
  """(k11, k22, rho) triples of the grid for one function."""
  full = name in FULL_GRID
  cases = [(v, v, rho) for v in (VARIANCES if full else SPARSE_VARIANCES)
           for rho in (CORRELATIONS if full else SPARSE_CORRELATIONS)]
  if full:
    cases += [(k11, k22, rho) for k11, k22 in UNEQUAL
              for rho in UNEQUAL_CORRELATIONS]
  return cases


@functools.cache
def _references(name, derivative: bool):
  """(cases, E[f g], the scale sqrt(E[f^2] E[g^2])) by scipy, once."""
  _, phi = _integrand(name, derivative)
  cases = _cases(name)
  values = np.array([reference_2d(phi, phi, math.sqrt(k11), math.sqrt(k22),
                                  rho) for k11, k22, rho in cases])
  second = functools.cache(
      lambda k: reference_1d(lambda u: phi(u)**2, math.sqrt(k)))
  scale = np.array([math.sqrt(second(k11) * second(k22))
                    for k11, k22, _ in cases])
  return cases, values, scale


def _errors(name, derivative: bool, degree: int):
  cases, expected, scale = _references(name, derivative)
  fn, _ = _integrand(name, derivative)
  k11, k22, rho = (np.array(c) for c in zip(*cases))
  got = quadrature.expect_2d(fn, fn, rho * np.sqrt(k11 * k22), k11, k22, degree)
  return cases, np.abs(np.asarray(got) - expected) / scale


# ---- Tests. ------------------------------------------------------------------

@pytest.mark.parametrize('derivative', [False, True], ids=['phi', "phi'"])
@pytest.mark.parametrize('name', sorted(FUNCTIONS))
def test_default_degree_at_every_variance_and_correlation(name, derivative):
  """E[phi phi] and E[phi' phi'] within the documented 1e-6 at variances
  1e-3 .. 1e4 and correlations -1 .. 1 (the diagonal included)."""
  cases, errors = _errors(name, derivative, dual.DEFAULT_QUADRATURE_DEGREE)
  worst = int(np.argmax(errors))
  assert errors[worst] <= DEFAULT_TOL, (
      f'error {errors[worst]:.1e} at (k11, k22, rho) = {cases[worst]}')


@pytest.mark.parametrize('derivative', [False, True], ids=['phi', "phi'"])
@pytest.mark.parametrize('name', ['tanh', 'erf(relu)'])
def test_error_falls_with_degree(name, derivative):
  """More nodes, smaller errors: degree 48 within 1e-9 (module docstring)."""
  cases, errors = _errors(name, derivative, HIGH_DEGREE)
  worst = int(np.argmax(errors))
  assert errors[worst] <= HIGH_TOL, (
      f'error {errors[worst]:.1e} at (k11, k22, rho) = {cases[worst]}')


@pytest.mark.parametrize('name', ['tanh', 'softplus', 'erf(relu)', 'selu'])
def test_expect_1d_at_every_variance(name):
  """E[phi(u)] and E[phi(u)^2], the layers' means and variances (degree 64
  there; the default 24 here), within 1e-6 of sqrt(E[phi^2])."""
  fn, phi, _ = FUNCTIONS[name]
  k = np.array(VARIANCES)
  second = np.array([reference_1d(lambda u: phi(u)**2, math.sqrt(v))
                     for v in k])
  first = np.array([reference_1d(phi, math.sqrt(v)) for v in k])
  got_first = np.asarray(quadrature.expect_1d(fn, k, dual.DEFAULT_QUADRATURE_DEGREE))
  got_second = np.asarray(quadrature.expect_1d(lambda u: fn(u)**2, k,
                                         dual.DEFAULT_QUADRATURE_DEGREE))
  np.testing.assert_allclose(got_first, first, rtol=0,
                             atol=DEFAULT_TOL * np.sqrt(second).min())
  np.testing.assert_array_less(np.abs(got_second - second),
                               DEFAULT_TOL * second)


def test_tanh_layer_kernels_against_reference():
  """Dense -> Tanh through the layer API, the diagonal included: NNGP =
  E[tanh(u) tanh(v)] and NTK = K E[tanh'(u) tanh'(v)] with K the Dense
  layer's covariance x x^T / d. The rows give pre-activation variances
  from 6e-3 to 6e3; the errors are taken relative to the Cauchy-Schwarz
  scale of each entry, as above."""
  x = np.array([[0.1, 0.05], [1., -0.2], [3., 2.], [-30., 10.], [100., 50.]])
  _, _, kernel_fn = stax.serial(stax.Dense(1, W_std=1.), stax.Tanh())
  out = kernel_fn(x, None, ('nngp', 'ntk'))
  cov = x @ x.T / x.shape[1]
  var = np.diag(cov)
  nngp, ntk = np.zeros_like(cov), np.zeros_like(cov)
  nngp_scale, ntk_scale = np.zeros_like(cov), np.zeros_like(cov)
  for i in range(len(x)):
    for j in range(i + 1):
      s1, s2 = math.sqrt(var[i]), math.sqrt(var[j])
      rho = max(-1., min(1., cov[i, j] / (s1 * s2)))
      if i == j:
        rho = 1.
      nngp[i, j] = nngp[j, i] = reference_2d(math.tanh, math.tanh, s1, s2,
                                             rho)
      ntk[i, j] = ntk[j, i] = cov[i, j] * reference_2d(_sech2, _sech2, s1,
                                                       s2, rho)
      nngp_scale[i, j] = nngp_scale[j, i] = math.sqrt(
          reference_1d(lambda u: math.tanh(u)**2, s1)
          * reference_1d(lambda u: math.tanh(u)**2, s2))
      ntk_scale[i, j] = ntk_scale[j, i] = abs(cov[i, j]) * math.sqrt(
          reference_1d(lambda u: _sech2(u)**2, s1)
          * reference_1d(lambda u: _sech2(u)**2, s2))
  np.testing.assert_array_less(np.abs(np.asarray(out.nngp) - nngp),
                               DEFAULT_TOL * nngp_scale)
  np.testing.assert_array_less(np.abs(np.asarray(out.ntk) - ntk),
                               DEFAULT_TOL * ntk_scale + 1e-300)


def test_float32_is_finite_at_any_variance():
  """float32: finite kernels for variances from 0 to 1e30 (the former rule
  formed no products of variances either), and within float32 rounding
  (1e-6 relative to the scale, ~10 ulp) of float64 where both are
  representable."""
  fn = jnp.tanh
  d_fn = quadrature.derivative(fn)
  k = np.array([0., 1e-30, 1e-8, 1., 1e4, 1e8, 1e16, 1e30])
  for rho in (1., 0.99, -0.5):
    for f in (fn, d_fn, jax.nn.softplus):
      got = quadrature.expect_2d(f, f, (rho * k).astype(np.float32),
                           k.astype(np.float32), k.astype(np.float32), 24)
      assert got.dtype == jnp.float32
      assert np.all(np.isfinite(np.asarray(got))), (f, rho)
  moderate = np.array([1e-3, 1., 1e3])
  for rho in (1., 0.5):
    for f in (fn, d_fn):
      f32 = quadrature.expect_2d(f, f, (rho * moderate).astype(np.float32),
                           moderate.astype(np.float32),
                           moderate.astype(np.float32), 24)
      f64 = quadrature.expect_2d(f, f, rho * moderate, moderate, moderate, 24)
      scale = quadrature.expect_2d(f, f, moderate, moderate, moderate, 24)
      np.testing.assert_array_less(np.abs(np.asarray(f32) - f64),
                                   1e-6 * np.asarray(scale))
