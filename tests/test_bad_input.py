"""A catalogue of bad input: each entry is a call a user might make, the
error class it must raise and words the message must contain (the argument
or layer, and what is wrong). Issue 17 asks for one catalogue across the
public API; entries are added here whenever an argument is added or a silent
wrong answer is found. (Other modules' own checks live in their test files:
test_hyper.py, test_estimators*.py, test_predict.py, test_signal.py, ...)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import predict, solvers, stax

NAN, INF = float('nan'), float('inf')
X = jnp.ones((3, 4))


def _concat_kernel(axis):
  _, _, kernel_fn = stax.serial(
      stax.FanOut(2), stax.parallel(stax.Dense(3), stax.Dense(3)),
      stax.FanInConcat(axis=axis))
  return kernel_fn(X, None, 'nngp')


def _concat_init(axis):
  init_fn, _, _ = stax.serial(
      stax.FanOut(2), stax.parallel(stax.Dense(3), stax.Dense(3)),
      stax.FanInConcat(axis=axis))
  return init_fn(jax.random.PRNGKey(0), X.shape)


def _empirical(kind):
  f = lambda p, x: (x @ p, x @ p)        # two outputs
  fn = (ntkjax.empirical_ntk_fn if kind == 'ntk' else
        ntkjax.empirical_nngp_fn)(f)
  return fn(X, X, jnp.ones((4, 2)))


K, Y = np.eye(3) + 0.5, np.ones((3, 1))


def _apply_with(params_of):
  """Apply a net ending in Dense(1) with the params `params_of` gives."""
  init_3, _, _ = stax.serial(stax.Dense(3), stax.Relu(), stax.Dense(3))
  _, apply_1, _ = stax.serial(stax.Dense(3), stax.Relu(), stax.Dense(1))
  _, params = init_3(jax.random.PRNGKey(0), X.shape)
  return apply_1(params_of(params), X)


def _with(k=None, y=None, t=1., fn='gd'):
  k = K if k is None else k
  y = Y if y is None else y
  if fn == 'gp':
    return predict.gp_inference(k, y)('nngp', K)
  return predict.gradient_descent_mse(k, y)(t)


def _entry(k, i, j, value):
  k = k.copy()
  k[i, j] = value
  return k


CATALOGUE = {
    # Activation constructors: a NaN/inf parameter would give a NaN kernel.
    'Erf(b=nan)': (lambda: stax.Erf(b=NAN), ValueError, 'Erf: b=nan'),
    'Erf(a=inf)': (lambda: stax.Erf(a=INF), ValueError, 'Erf: a=inf'),
    'LeakyRelu(nan)': (lambda: stax.LeakyRelu(NAN), ValueError,
                       'LeakyRelu: alpha=nan'),
    'ABRelu(1, inf)': (lambda: stax.ABRelu(1., INF), ValueError,
                       'ABRelu: b=inf'),
    'Sin(c=nan)': (lambda: stax.Sin(c=NAN), ValueError, 'Sin: c=nan'),
    'Cos(b=inf)': (lambda: stax.Cos(b=INF), ValueError, 'Cos: b=inf'),
    'Exp(a=nan)': (lambda: stax.Exp(a=NAN), ValueError, 'Exp: a=nan'),
    'Gaussian(b=nan)': (lambda: stax.Gaussian(b=NAN), ValueError,
                        'Gaussian: b=nan'),
    'Rbf(gamma=nan)': (lambda: stax.Rbf(NAN), ValueError, 'Rbf: gamma=nan'),
    'Polynomial([1, nan])': (lambda: stax.Polynomial([1., NAN]), ValueError,
                             r'Polynomial: coef\[1\]=nan'),
    'Elu(alpha=nan)': (lambda: stax.Elu(alpha=NAN), ValueError,
                       'Elu: alpha=nan'),
    'Erf(b="x")': (lambda: stax.Erf(b='x'), ValueError, "Erf: b='x'"),
    'ElementwiseNumerical(deg=600)': (
        lambda: stax.ElementwiseNumerical(jnp.tanh, 600), ValueError,
        r'deg=600 must be an int in \[1, 512\]'),
    'Tanh(deg=2.5)': (lambda: stax.Tanh(deg=2.5), ValueError,
                      r'Tanh\(\): deg=2.5 must be an int'),
    'Dense(W_std=nan)': (lambda: stax.Dense(3, W_std=NAN), ValueError,
                         'W_std=nan must be a finite number'),
    # The affine primitive (Dense, Conv, ConvTranspose, ConvLocal).
    "Dense(parameterization='NTK')": (
        lambda: stax.Dense(3, parameterization='NTK'), ValueError,
        "Dense\\(3\\): parameterization must be 'ntk' or 'standard'"),
    'Dense(s=(0, 1))': (lambda: stax.Dense(3, s=(0, 1)), ValueError,
                        r'Dense\(3\): s=\(0, 1\) must be a pair'),
    'ConvLocal(s=2)': (lambda: stax.ConvLocal(3, (2,), s=2), ValueError,
                       r'ConvLocal\(3, \(2,\)\): s=2 must be a pair'),
    'ConvTranspose(b_std=-1)': (
        lambda: stax.ConvTranspose(3, (2,), b_std=-1.), ValueError,
        'b_std=-1.0 must be a finite number >= 0'),
    # Combinators take layers; a constructor passed uncalled is named.
    'serial(Dense(2), Relu)': (
        lambda: stax.serial(stax.Dense(2), stax.Relu), TypeError,
        r'serial: argument 1 is function, not a layer .*stax.Relu\(\)'),
    'parallel(Dense(2), (f, g, h))': (
        lambda: stax.parallel(stax.Dense(2), (len, len, len)), TypeError,
        'parallel: argument 1 has kernel_fn .* not an ntkjax kernel_fn'),
    'repeat(3, 2)': (lambda: stax.repeat(3, 2), TypeError,
                     'repeat: is int, not a layer'),
    # Layers are frozen: a changed kernel_fn would change every network
    # that shares the layer.
    'kernel_fn.mask_fn = ...': (
        lambda: setattr(stax.Dense(2).kernel_fn, 'mask_fn', None),
        AttributeError, r'Dense\(2\).kernel_fn is immutable'),
    # Combinators: an out-of-range axis used to wrap onto the channel axis.
    'FanInConcat(axis=5) kernel': (lambda: _concat_kernel(5), ValueError,
                                   'axis=5 is out of range for 2-d'),
    'FanInConcat(axis=-3) init': (lambda: _concat_init(-3), ValueError,
                                  'axis=-3 is out of range'),
    # kernel_fn keyword arguments: bool('no') is True.
    "diagonal_spatial='no'": (
        lambda: stax.Dense(1)[2](X, None, 'nngp', diagonal_spatial='no'),
        TypeError, 'diagonal_spatial must be True, False or None'),
    # Empirical kernels of a function with several outputs.
    'empirical_ntk_fn(f -> tuple)': (lambda: _empirical('ntk'), TypeError,
                                     'returned tuple, not one array'),
    'empirical_nngp_fn(f -> tuple)': (lambda: _empirical('nngp'), TypeError,
                                      'returned tuple, not one array'),
    # apply_fn with another network's params: a (3, 3) output from a net
    # ending in Dense(1), or params=[] returning the input.
    "apply_fn(another net's params)": (
        lambda: _apply_with(lambda p: p), ValueError,
        r'Dense\(1\): the weights have 3 outputs, not 1'),
    'apply_fn(params=[])': (lambda: _apply_with(lambda p: []), ValueError,
                            'params has 0 entries but this network has 3'),
    'apply_fn(params[:2])': (lambda: _apply_with(lambda p: p[:2]), ValueError,
                             'params has 2 entries'),
    'apply_fn(params=None)': (lambda: _apply_with(lambda p: None), ValueError,
                              'params has NoneType'),
    # predict: these returned confident numbers (zeros, -0.4) or NaN.
    'gradient_descent_mse t=-1': (lambda: _with(t=-1.), ValueError,
                                  'gradient_descent_mse: t=-1.0 must be >= 0'),
    'gradient_descent_mse t=nan': (lambda: _with(t=NAN), ValueError,
                                   'must be >= 0'),
    'gradient_descent_mse NaN kernel': (
        lambda: _with(k=_entry(K, 0, 0, NAN)), ValueError,
        'k_train_train has NaN'),
    'gradient_descent_mse NaN targets': (
        lambda: _with(y=np.full((3, 1), NAN)), ValueError, 'y_train has NaN'),
    'gradient_descent_mse non-symmetric kernel': (
        lambda: _with(k=_entry(K, 0, 1, 5.)), ValueError, 'not symmetric'),
    'gradient_descent_mse negative-definite kernel': (
        lambda: _with(k=-K), solvers.NotPositiveDefiniteError,
        'negative diagonal entry'),
    'gp_inference negative-definite kernel': (
        lambda: _with(k=-K, fn='gp'), solvers.NotPositiveDefiniteError,
        'k_train_train.nngp has a negative diagonal'),
    'gp_inference NaN targets': (
        lambda: _with(y=np.full((3, 1), NAN), fn='gp'), ValueError,
        'gp_inference: y_train has NaN'),
    'gradient_descent_mse learning_rate=-1': (
        lambda: predict.gradient_descent_mse(K, Y, learning_rate=-1.),
        ValueError, 'learning_rate must be >= 0'),
    # A kernel past float32's range: inf/NaN before, now a clear error.
    'kernel_fn overflowing float32': (
        lambda: stax.serial(stax.Dense(3, W_std=1.5), stax.Relu(),
                            stax.Dense(1))[2](
                                (X * 3e19).astype(jnp.float32), None, 'nngp'),
        FloatingPointError, 'overflow'),
    # A nonlinear branch beside a per-sample rescaling of the same field.
    'Relu(z) * LayerNorm(z)': (
        lambda: stax.serial(stax.Dense(3), stax.FanOut(2), stax.parallel(
            stax.Relu(), stax.LayerNorm()), stax.FanInProd())[2](X, None,
                                                               'nngp'),
        ValueError, 'FanInProd: its branches are one Gaussian field scaled'),
    # NaN inputs are padding only with mask_constant=NaN.
    'kernel_fn(NaN inputs)': (
        lambda: stax.Dense(1)[2](X.at[0, 0].set(NAN), None, 'nngp'),
        ValueError, 'x1 contains NaN'),
}


@pytest.mark.parametrize('name', sorted(CATALOGUE))
def test_bad_input_raises_a_clear_error(name):
  call, error, words = CATALOGUE[name]
  with pytest.raises(error, match=words):
    call()


def test_the_fixed_cases_still_accept_good_input():
  """The checks reject only bad input: the same calls with good values run
  and give finite kernels."""
  for layer in (stax.Erf(b=2.), stax.LeakyRelu(0.1), stax.ABRelu(-0.5, 1.),
                stax.Sin(c=0.3), stax.Polynomial([1., 0.5]), stax.Elu(0.5)):
    k = stax.serial(stax.Dense(8), layer, stax.Dense(1))[2](X, None, 'nngp')
    assert np.all(np.isfinite(k))
  assert _concat_kernel(-1).shape == (3, 3)
  assert _concat_init(1)[0] == (3, 6)
  k = stax.Dense(1)[2](X, None, 'nngp', diagonal_spatial=np.bool_(False))
  assert np.all(np.isfinite(k))
  # A float32 kernel symmetric only to rounding is accepted.
  rounded = (K + 1e-7 * np.triu(np.ones((3, 3)), 1)).astype(np.float32)
  assert np.all(np.isfinite(_with(k=rounded)))
  assert np.all(np.isfinite(_with(t=0.)))
