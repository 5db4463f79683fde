"""The estimators against dense linear algebra and scikit-learn's checks.

Expected values are computed here from the kernels with `numpy.linalg.solve`:
the posterior mean K_* (K + reg I)^{-1} y, the NNGP posterior variance
K_** - K_* (K + reg I)^{-1} K_*^T and the NTK ensemble variance
K_** + A K A^T - A K_*^T - K_* A^T (A = Theta_* (Theta + reg I)^{-1}),
with reg = diag_reg * mean(diag) (or diag_reg itself when absolute).
"""

import collections
import importlib.util
import pickle
import sys

import jax
import numpy as np
import pytest

from ntkjax import estimators, stax
from ntkjax.estimators import (NNGPClassifier, NNGPRegressor, NTKClassifier,
                               NTKRegressor)

if estimators.HAS_SKLEARN:
  from sklearn.base import clone
  from sklearn.metrics import r2_score
  from sklearn.utils.estimator_checks import parametrize_with_checks

needs_sklearn = pytest.mark.skipif(not estimators.HAS_SKLEARN,
                                   reason='scikit-learn is not installed')

REGRESSORS = (NTKRegressor, NNGPRegressor)
CLASSIFIERS = (NTKClassifier, NNGPClassifier)
MODE = {NTKRegressor: 'ntk', NNGPRegressor: 'nngp', NTKClassifier: 'ntk',
        NNGPClassifier: 'nngp'}

_Kernels = collections.namedtuple('_Kernels', 'nngp ntk')


class ArcCosKernel:
  """Dense(512, 1.5, 0.05) -> Relu -> Dense(1, 1.5, 0.05) kernels, in NumPy.

  The arc-cosine closed forms (Cho & Saul 2009) with stax's conventions:
  K0 = 1.5^2 x1.x2 / d + 0.05^2, then NNGP = 1.5^2 E[relu relu] + 0.05^2
  and NTK = NNGP + 1.5^2 E[relu' relu'] K0. Used for scikit-learn's checks:
  it needs no XLA compilation for each of their many input shapes, and, a
  module-level class, it pickles by reference (stax's closures do not).
  """

  def __call__(self, x1, x2=None, get=None):
    x1 = np.asarray(x1, np.float64)
    x2 = x1 if x2 is None else np.asarray(x2, np.float64)
    w, b, d = 1.5**2, 0.05**2, x1.shape[1]
    k12 = w * x1 @ x2.T / d + b
    k11 = w * np.sum(x1**2, 1) / d + b
    k22 = w * np.sum(x2**2, 1) / d + b
    norms = np.sqrt(np.outer(k11, k22))
    theta = np.arccos(np.clip(k12 / norms, -1, 1))
    relu = norms * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (
        2 * np.pi)
    relu_grad = (np.pi - theta) / (2 * np.pi)
    nngp = w * relu + b
    return _Kernels(nngp, nngp + w * relu_grad * k12)

  def __repr__(self):
    return 'ArcCosKernel()'


def _data(n_train=12, n_test=5, d=4, outputs=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n_train, d))
  x_test = rng.normal(size=(n_test, d))
  y = np.stack([np.sin(x[:, 0]) + x[:, 1], np.cos(x[:, 2])][:outputs], -1)
  return x, x_test, y


def _kernels(x1, x2=None):
  k = estimators.default_kernel_fn()(x1, x2, get=('nngp', 'ntk'))
  return np.asarray(k.nngp), np.asarray(k.ntk)


def _reg(k, diag_reg, absolute):
  return diag_reg if absolute else diag_reg * np.mean(np.diag(k))


# ----------------------------------------------------------------------------
# Against dense linear algebra.


def test_default_kernel_fn_is_the_documented_network():
  x, x_test, _ = _data()
  _, _, kernel_fn = stax.serial(
      stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu(),
      stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu(),
      stax.Dense(1, W_std=1.5, b_std=0.05))
  expected = jax.jit(kernel_fn, static_argnames='get')(
      x_test, x, get=('nngp', 'ntk'))
  nngp, ntk = _kernels(x_test, x)
  np.testing.assert_allclose(nngp, expected.nngp, rtol=1e-12)
  np.testing.assert_allclose(ntk, expected.ntk, rtol=1e-12)


@pytest.mark.parametrize('absolute', [False, True])
@pytest.mark.parametrize('cls', REGRESSORS)
def test_mean_is_the_regularized_kernel_solve(cls, absolute):
  x, x_test, y = _data()
  diag_reg = 0.3 if absolute else 1e-2
  k = dict(zip(('nngp', 'ntk'), _kernels(x)))[MODE[cls]]
  k_test = dict(zip(('nngp', 'ntk'), _kernels(x_test, x)))[MODE[cls]]
  reg = _reg(k, diag_reg, absolute)
  expected = k_test @ np.linalg.solve(k + reg * np.eye(len(x)), y)

  model = cls(diag_reg=diag_reg, diag_reg_absolute_scale=absolute).fit(x, y)
  mean = model.predict(x_test)
  assert isinstance(mean, np.ndarray) and mean.dtype == np.float64
  np.testing.assert_allclose(mean, expected, rtol=1e-9, atol=1e-12)
  # A 1-d target gives 1-d predictions of the same values.
  mean_1d = cls(diag_reg=diag_reg, diag_reg_absolute_scale=absolute).fit(
      x, y[:, 0]).predict(x_test)
  assert mean_1d.shape == (len(x_test),)
  np.testing.assert_allclose(mean_1d, expected[:, 0], rtol=1e-9, atol=1e-12)


def test_nngp_std_is_the_posterior_covariance_diagonal():
  x, x_test, y = _data()
  diag_reg = 1e-2
  k, _ = _kernels(x)
  k_test, _ = _kernels(x_test, x)
  k_test_test, _ = _kernels(x_test)
  inverse = np.linalg.inv(k + _reg(k, diag_reg, False) * np.eye(len(x)))
  covariance = k_test_test - k_test @ inverse @ k_test.T
  expected = np.sqrt(np.diag(covariance))

  model = NNGPRegressor(diag_reg=diag_reg).fit(x, y[:, 0])
  mean, std = model.predict(x_test, return_std=True)
  np.testing.assert_allclose(mean, k_test @ inverse @ y[:, 0], rtol=1e-9)
  np.testing.assert_allclose(std, expected, rtol=1e-7)
  # Multi-output targets share the covariance: one column per output.
  _, std_2d = NNGPRegressor(diag_reg=diag_reg).fit(x, y).predict(
      x_test, return_std=True)
  np.testing.assert_allclose(std_2d, np.stack([expected] * 2, -1), rtol=1e-7)


def test_ntk_std_is_the_ensemble_covariance_diagonal():
  x, x_test, y = _data()
  diag_reg = 1e-2
  nngp, ntk = _kernels(x)
  nngp_test, ntk_test = _kernels(x_test, x)
  nngp_test_test, _ = _kernels(x_test)
  reg = _reg(ntk, diag_reg, False)
  a = ntk_test @ np.linalg.inv(ntk + reg * np.eye(len(x)))
  covariance = (nngp_test_test + a @ nngp @ a.T - a @ nngp_test.T
                - nngp_test @ a.T)

  mean, std = NTKRegressor(diag_reg=diag_reg).fit(x, y[:, 0]).predict(
      x_test, return_std=True)
  np.testing.assert_allclose(mean, a @ y[:, 0], rtol=1e-9)
  np.testing.assert_allclose(std, np.sqrt(np.diag(covariance)), rtol=1e-6)


@pytest.mark.parametrize('cls', REGRESSORS)
def test_tiny_diag_reg_interpolates_with_zero_std(cls):
  x, _, y = _data()
  mean, std = cls(diag_reg=1e-12).fit(x, y[:, 0]).predict(x, return_std=True)
  np.testing.assert_allclose(mean, y[:, 0], atol=1e-6)
  prior_std = np.sqrt(np.diag(_kernels(x)[0]))
  assert np.all(std >= 0) and np.all(std < 1e-3 * prior_std), std


@pytest.mark.parametrize('cls', REGRESSORS)
def test_batch_size_gives_the_same_predictions(cls):
  x, x_test, y = _data(n_test=7)
  kernel_fn = ArcCosKernel()
  whole = cls(kernel_fn=kernel_fn, diag_reg=1e-3).fit(x, y)
  blocks = cls(kernel_fn=kernel_fn, diag_reg=1e-3, batch_size=5).fit(x, y)
  np.testing.assert_allclose(blocks.train_kernels_.nngp,
                             whole.train_kernels_.nngp, rtol=1e-13)
  for a, b in zip(whole.predict(x_test, return_std=True),
                  blocks.predict(x_test, return_std=True)):
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_float32_without_x64():
  x, x_test, y = _data()
  jax.config.update('jax_enable_x64', False)
  try:
    mean, std = NTKRegressor(kernel_fn=ArcCosKernel(), diag_reg=1e-2).fit(
        x, y).predict(x_test, return_std=True)
  finally:
    jax.config.update('jax_enable_x64', True)
  assert mean.dtype == std.dtype == np.float32
  expected = NTKRegressor(kernel_fn=ArcCosKernel(), diag_reg=1e-2).fit(
      x, y).predict(x_test)
  np.testing.assert_allclose(mean, expected, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------
# Classification.


def _blobs(n_per_class, seed):
  """Three well separated clusters with string labels."""
  rng = np.random.default_rng(seed)
  centers = np.array([[3., 0., 0.], [-3., 0., 1.], [0., 3., -1.]])
  labels = np.array(['emu', 'cat', 'dog'])
  x = np.concatenate([c + 0.5 * rng.normal(size=(n_per_class, 3))
                      for c in centers])
  return x, np.repeat(labels, n_per_class)


@pytest.mark.parametrize('cls', CLASSIFIERS)
def test_classifier_learns_separable_blobs(cls):
  x, y = _blobs(10, seed=1)
  x_test, y_test = _blobs(20, seed=2)
  model = cls(kernel_fn=ArcCosKernel()).fit(x, y)
  assert list(model.classes_) == ['cat', 'dog', 'emu']
  assert model.score(x, y) == 1.0
  assert model.score(x_test, y_test) >= 0.95
  predictions = model.predict(x_test)
  assert predictions.dtype == y.dtype and set(predictions) <= set(y)
  # Targets: 1 - 1/C for the label's class, -1/C elsewhere.
  index = np.searchsorted(model.classes_, y)
  np.testing.assert_allclose(model.y_train_[np.arange(len(y)), index], 2 / 3)
  np.testing.assert_allclose(model.y_train_.sum(1), 0, atol=1e-15)
  scores = model.decision_function(x_test)
  assert scores.shape == (len(x_test), 3)
  np.testing.assert_array_equal(model.classes_[scores.argmax(1)], predictions)


def test_binary_decision_function_is_the_margin():
  x, y = _blobs(10, seed=3)
  keep = y != 'dog'
  model = NTKClassifier(kernel_fn=ArcCosKernel()).fit(x[keep], y[keep])
  x_test, _ = _blobs(5, seed=4)
  margin = model.decision_function(x_test)
  assert margin.shape == (len(x_test),)
  np.testing.assert_array_equal(
      model.predict(x_test), np.where(margin > 0, 'emu', 'cat'))


# ----------------------------------------------------------------------------
# Parameters, cloning, pickling, errors.


@pytest.mark.parametrize('cls', REGRESSORS + CLASSIFIERS)
def test_get_params_set_params(cls):
  model = cls()
  assert model.get_params() == {'kernel_fn': None, 'diag_reg': 1e-6,
                                'diag_reg_absolute_scale': False,
                                'batch_size': None, 'optimize': False,
                                'builder': None, 'n_restarts': 2}
  kernel_fn = ArcCosKernel()
  assert model.set_params(kernel_fn=kernel_fn, diag_reg=0.5) is model
  assert model.kernel_fn is kernel_fn and model.diag_reg == 0.5
  with pytest.raises(ValueError, match='Invalid parameter'):
    model.set_params(width=3)


@needs_sklearn
@pytest.mark.parametrize('cls', REGRESSORS)
def test_clone_round_trip(cls):
  x, x_test, y = _data()
  kernel_fn = ArcCosKernel()
  model = cls(kernel_fn=kernel_fn, diag_reg=1e-3, batch_size=4).fit(x, y)
  copy = clone(model)
  assert copy.get_params() == {**model.get_params(),
                               'kernel_fn': copy.kernel_fn}
  assert not hasattr(copy, 'X_train_')
  with pytest.raises(estimators.NotFittedError):
    copy.predict(x_test)
  np.testing.assert_array_equal(copy.fit(x, y).predict(x_test),
                                model.predict(x_test))


@pytest.mark.parametrize('cls', (NTKRegressor, NNGPClassifier))
def test_pickle_with_the_default_kernel(cls):
  x, x_test, y = _data()
  y = y[:, 0] if cls is NTKRegressor else (y[:, 0] > 0.5)
  model = cls().fit(x, y)
  again = pickle.loads(pickle.dumps(model))
  np.testing.assert_array_equal(again.predict(x_test), model.predict(x_test))


@pytest.mark.parametrize('params, error, match', [
    ({'diag_reg': -1.}, ValueError, 'diag_reg'),
    ({'diag_reg': float('nan')}, ValueError, 'diag_reg'),
    ({'batch_size': 0}, ValueError, 'batch_size'),
    ({'kernel_fn': 'relu'}, TypeError, 'kernel_fn'),
])
def test_invalid_parameters_raise_at_fit(params, error, match):
  x, _, y = _data()
  model = NNGPRegressor(**params)      # __init__ only stores them
  with pytest.raises(error, match=match):
    model.fit(x, y)


def test_non_finite_kernel_raises_and_leaves_the_model_unfitted():
  x, _, y = _data()

  def broken(x1, x2=None, get=None):
    k = ArcCosKernel()(x1, x2)
    return _Kernels(np.where(k.nngp > 1, np.nan, k.nngp), k.ntk)
  model = NTKRegressor(kernel_fn=broken)
  with pytest.raises(ValueError, match='non-finite nngp'):
    model.fit(x, y)
  assert not hasattr(model, 'X_train_')


# ----------------------------------------------------------------------------
# Without scikit-learn.


def _without_sklearn(monkeypatch):
  """A fresh copy of ntkjax.estimators, imported with sklearn unimportable.

  sklearn stays unimportable until the test ends (`monkeypatch`), so
  anything computed with scikit-learn must come before the call.
  """
  for name in list(sys.modules):
    if name == 'sklearn' or name.startswith('sklearn.'):
      monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.setitem(sys.modules, 'sklearn', None)
  spec = importlib.util.spec_from_file_location(
      '_estimators_without_sklearn', estimators.__file__)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_fallback_without_sklearn(monkeypatch):
  x, x_test, y = _data()
  y_test, w = y[:5] + 0.1, np.linspace(0.5, 2, 5)
  kernel_fn = ArcCosKernel()
  reference = NTKRegressor(kernel_fn=kernel_fn, diag_reg=1e-3).fit(x, y)
  reference_mean = reference.predict(x_test)
  reference_score = reference.score(x_test, y_test, w)

  module = _without_sklearn(monkeypatch)
  assert not module.HAS_SKLEARN
  model = module.NTKRegressor(kernel_fn=kernel_fn, diag_reg=1e-3)
  assert repr(model) == 'NTKRegressor(kernel_fn=ArcCosKernel(), diag_reg=0.001)'
  assert model.get_params() == {'batch_size': None, 'diag_reg': 1e-3,
                                'diag_reg_absolute_scale': False,
                                'kernel_fn': kernel_fn, 'optimize': False,
                                'builder': None, 'n_restarts': 2}
  with pytest.raises(module.NotFittedError):
    model.predict(x_test)
  model.fit(x, y)
  np.testing.assert_array_equal(model.predict(x_test), reference_mean)
  assert model.score(x_test, y_test, w) == pytest.approx(reference_score,
                                                         rel=1e-12)
  # The errors scikit-learn's validation would raise.
  with pytest.raises(ValueError, match='features'):
    model.predict(x_test[:, :3])
  with pytest.raises(ValueError, match='2D'):
    model.predict(x_test[0])
  with pytest.raises(ValueError, match='NaN'):
    model.fit(np.where(x > 1, np.nan, x), y)
  with pytest.raises(ValueError, match='requires y'):
    model.fit(x, None)
  with pytest.raises(ValueError, match='Invalid parameter'):
    model.set_params(depth=2)

  xb, yb = _blobs(10, seed=1)
  classifier = module.NNGPClassifier(kernel_fn=kernel_fn).fit(xb, yb)
  assert list(classifier.classes_) == ['cat', 'dog', 'emu']
  assert classifier.score(xb, yb) == 1.0
  with pytest.raises(ValueError, match='Unknown label type'):
    classifier.fit(xb, np.linspace(0, 1, len(xb)))


@needs_sklearn
def test_fallback_r2_matches_sklearn(monkeypatch):
  rng = np.random.default_rng(5)
  y, y_pred = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
  y[:, 1] = 3.                  # constant target: sklearn's 1-or-0 rule
  w = rng.uniform(size=6)
  y_pred_exact = y_pred.copy()
  y_pred_exact[:, 1] = 3.
  expected = [r2_score(y, y_pred, sample_weight=w), r2_score(y, y_pred_exact)]

  model = _without_sklearn(monkeypatch).NNGPRegressor()
  model.predict = lambda x: y_pred
  assert model.score(None, y, w) == pytest.approx(expected[0], rel=1e-12)
  model.predict = lambda x: y_pred_exact
  assert model.score(None, y) == pytest.approx(expected[1], rel=1e-12)


# ----------------------------------------------------------------------------
# scikit-learn's estimator checks.


def _sklearn_check_estimators():
  kernel_fn = ArcCosKernel()
  return [cls(kernel_fn=kernel_fn) for cls in REGRESSORS + CLASSIFIERS]


if estimators.HAS_SKLEARN:
  # Every check that applies runs; none is marked as an expected failure.
  # scikit-learn itself skips (SkipTest) the pandas half of
  # check_*_data_not_an_array when pandas is absent, and
  # check_array_api_input unless SCIPY_ARRAY_API=1 is set before scipy is
  # imported (the estimators declare no array API support: they hand
  # arrays to JAX). Checks for sample_weight, predict_proba, partial_fit,
  # class_weight and multilabel targets are not generated: the estimators
  # have no such features.
  @parametrize_with_checks(_sklearn_check_estimators())
  def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
