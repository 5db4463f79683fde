"""Float32 kernels at any input scale and weight variance, and the errors
that replace NaN or infinite kernels (issue 17).

The reference for each float32 kernel is the same network's kernel in
float64 (x64 is on in the tests), whose formulas are checked against
quadrature and Monte Carlo elsewhere (test_elementwise.py); here the
question is only whether float32 keeps its digits. The rewritten formulas
themselves are checked against the textbook ones in float64 below.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax import predict, stax
from ntkjax.stax import _dual as dual, _elementwise as elementwise

X = np.random.RandomState(0).randn(5, 6)

BOUNDED = {
    'Erf': stax.Erf(),
    'Erf(a=2, b=0.3, c=0.1)': stax.Erf(a=2., b=0.3, c=0.1),
    'Sigmoid_like': stax.Sigmoid_like(),
    'Gelu': stax.Gelu(),
}


def _kernels(activation, x, w_std):
  _, _, kernel_fn = stax.serial(stax.Dense(8, W_std=w_std, b_std=0.1),
                                activation, stax.Dense(8, W_std=1.5),
                                activation, stax.Dense(1))
  return kernel_fn(x, None, ('nngp', 'ntk'))


def _relative_to_scale(k32, k64):
  """max |k32 - k64| / sqrt(k64_ii k64_jj): each entry's error against its
  natural size (entries near 0 off the diagonal have no relative digits to
  keep)."""
  k32, k64 = np.asarray(k32, np.float64), np.asarray(k64)
  diag = np.sqrt(np.abs(np.diagonal(k64)))
  return np.max(np.abs(k32 - k64) / np.outer(diag, diag))


@pytest.mark.parametrize('name', sorted(BOUNDED))
@pytest.mark.parametrize('scale, w_std', [(1e-6, 1.), (1., 1.), (1e4, 1.),
                                          (1e8, 1.), (1e15, 1.), (1., 1e3),
                                          (1e4, 1e3)])
def test_float32_kernels_keep_their_digits(name, scale, w_std):
  """Issue 17 asks ~1e-5 relative at any input scale and W_std. Float32
  rounds to 6e-8; the two layers' formulas take a few tens of operations,
  so ~1e-6 is expected. (Before the rewrite: inf/NaN past variance ~1e4 in
  the erf NTK, 3.5% off at 1e4, NaN for GELU at 1e4.)"""
  x = X * scale
  k32 = _kernels(BOUNDED[name], x.astype(np.float32), w_std)
  k64 = _kernels(BOUNDED[name], x, w_std)
  for field in ('nngp', 'ntk'):
    got, want = getattr(k32, field), getattr(k64, field)
    assert got.dtype == jnp.float32 and want.dtype == jnp.float64
    assert np.all(np.isfinite(got)), field
    assert _relative_to_scale(got, want) < 1e-5, field


@pytest.mark.parametrize('activation', [stax.Relu(), stax.LeakyRelu(0.2),
                                        stax.Abs()])
def test_relu_family_kernels_are_homogeneous_in_float32(activation):
  """Without biases a ReLU-family network's kernels scale exactly as
  |x|^2: K(s x) = s^2 K(x). In float32 this holds up to s ~ 1e18 (kernels
  ~1e36; the products of entries ~1e19 would overflow, so the inputs are
  scaled by a power of two first)."""
  _, _, kernel_fn = stax.serial(stax.Dense(8, W_std=1.5), activation,
                                stax.Dense(8, W_std=1.5), activation,
                                stax.Dense(1))
  x = X.astype(np.float32)
  base = kernel_fn(x, None, ('nngp', 'ntk'))
  for s in (1e-10, 1e10, 1e18):
    scaled = kernel_fn(x * np.float32(s), None, ('nngp', 'ntk'))
    for field in ('nngp', 'ntk'):
      got = np.asarray(getattr(scaled, field), np.float64) / s**2
      want = np.asarray(getattr(base, field), np.float64)
      assert _relative_to_scale(got, want) < 1e-5, (s, field)


def _textbook_gelu_nngp(k12, k11, k22):
  p = (1 + k11) * (1 + k22)
  d = jnp.sqrt(p - k12**2)
  return (k12 / 4 + (k12**2 + k11 * k22 * d**2) / (2 * jnp.pi * p * d)
          + k12 * jnp.arctan2(k12, d) / (2 * jnp.pi))


def _textbook_erf_nngp(k12, k11, k22, b=1.3):
  b2 = b * b
  return 2 / jnp.pi * jnp.arcsin(
      2 * b2 * k12 / jnp.sqrt((1 + 2 * b2 * k11) * (1 + 2 * b2 * k22)))


def test_rewritten_formulas_equal_the_textbook_ones_in_float64():
  """In float64 at moderate variances (where the textbook forms are
  accurate) the cancellation-free forms agree to rounding, NNGP and NTK
  factor, the latter against autodiff of the textbook NNGP (Price's
  theorem: E[phi' phi'] = d E[phi phi] / d k12); this also checks the
  hand-derived GELU NTK factor."""
  gelu, erf = elementwise.gelu_activation(), dual.erf(1., 1.3, 0.)
  pairs = [(gelu.nngp, _textbook_gelu_nngp),
           (gelu.ntk_factor, jax.grad(_textbook_gelu_nngp)),
           (erf.nngp, _textbook_erf_nngp),
           (erf.ntk_factor, jax.grad(_textbook_erf_nngp))]
  for k11 in (1e-3, 0.3, 1., 10.):
    for k22 in (1e-3, 1., 10.):
      for rho in (-0.99, -0.5, 0., 0.5, 0.9):
        k12 = rho * np.sqrt(k11 * k22)
        for ours, textbook in pairs:
          got = float(ours(jnp.float64(k12), jnp.float64(k11),
                           jnp.float64(k22)))
          want = float(textbook(k12, k11, k22))
          assert got == pytest.approx(want, rel=1e-10, abs=1e-14)


# Eagerly the checks raise the error itself; under jit, when the program
# runs, as a JaxRuntimeError whose text carries the error's type and message.
FROM_CHECKS = (ValueError, FloatingPointError, jax.errors.JaxRuntimeError)


class NanInputsTest(chex.TestCase):
  """`kernel_fn` with NaN inputs raises with and without jit
  (`chex.variants` runs each test both ways)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_inputs_raise(self):
    _, _, kernel_fn = stax.serial(stax.Dense(8), stax.Erf(), stax.Dense(1))
    run = self.variant(lambda a, b: kernel_fn(a, b, 'ntk'))
    x = X.copy()
    x[1, 2] = np.nan
    with pytest.raises(FROM_CHECKS, match='kernel_fn: x1 contains NaN'):
      np.asarray(run(x, None))
    with pytest.raises(FROM_CHECKS, match='kernel_fn: x2 contains NaN'):
      np.asarray(run(X, x))
    # Good input through the same function is untouched.
    chex.assert_trees_all_close(run(X, None), kernel_fn(X, None, 'ntk'),
                                rtol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_an_overflowing_kernel_raises(self):
    """x ~ 2e19 gives input kernels ~1e38 and, after W_std^2 = 2.25, more
    than float32 holds: the true kernel is not representable."""
    _, _, kernel_fn = stax.serial(stax.Dense(8, W_std=1.5), stax.Relu(),
                                  stax.Dense(1))
    run = self.variant(lambda a: kernel_fn(a, None, 'nngp'))
    x = (X * 2e19).astype(np.float32)
    with pytest.raises(FROM_CHECKS, match='NaN or infinite entries'):
      np.asarray(run(x))
    # The same network in float64 has the kernel.
    assert np.all(np.isfinite(run(X * 2e19)))


def test_the_eager_overflow_error_says_what_to_do():
  _, _, kernel_fn = stax.serial(stax.Dense(8, W_std=1.5), stax.Relu(),
                                stax.Dense(1))
  with pytest.raises(FloatingPointError, match='overflow.*jax_enable_x64'):
    kernel_fn((X * 2e19).astype(np.float32), None, 'nngp')


K, Y = np.eye(3) + 0.5, np.ones((3, 1))


PREDICT_CASES = {
    'negative-definite': (-K, Y, 1., 'negative diagonal'),
    'non-symmetric': (K + np.triu(np.full((3, 3), 4.5), 1), Y, 1.,
                      'not symmetric'),
    'nan kernel': (np.where(np.eye(3, dtype=bool)[::-1], np.nan, K), Y, 1.,
                   'k_train_train has NaN'),
    'nan targets': (K, Y * np.nan, 1., 'y_train has NaN'),
    'negative t': (K, Y, -1., r't=-1.0 must be >= 0'),
}


class PredictChecksTest(chex.TestCase):
  """predict's input checks, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_bad_input_raises(self):
    run = self.variant(
        lambda k, y, t: predict.gradient_descent_mse(k, y)(t))
    for name, (k, y, t, words) in PREDICT_CASES.items():
      with self.subTest(name), pytest.raises(
          FROM_CHECKS + (predict.solvers.NotPositiveDefiniteError,),
          match=words):
        np.asarray(run(k, y, t))
    chex.assert_trees_all_close(run(K, Y, 1.),
                                predict.gradient_descent_mse(K, Y)(1.))
