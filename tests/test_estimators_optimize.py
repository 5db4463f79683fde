"""The estimators' optimize=True: hyperparameters fitted by evidence
(ntkjax.hyper.fit) feed the same posterior as a fixed kernel would."""

import pickle

import numpy as np
import pytest

from ntkjax import estimators, hyper, stax
from ntkjax.estimators import NNGPClassifier, NNGPRegressor, NTKRegressor

needs_sklearn = pytest.mark.skipif(not estimators.HAS_SKLEARN,
                                   reason='scikit-learn is not installed')


def _data(n=24, d=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  x_test = rng.normal(size=(7, d))
  y = np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.05 * rng.normal(size=n)
  return x, x_test, y


def erf_builder(W_std=1.2, b_std=0.2, depth=2):
  """A user builder: float defaults are fitted, the int depth is kept."""
  layers = []
  for _ in range(depth - 1):
    layers += [stax.Dense(256, W_std, b_std), stax.Erf()]
  return stax.serial(*layers, stax.Dense(1, W_std, b_std))[2]


@pytest.mark.parametrize('cls', (NNGPRegressor, NTKRegressor))
def test_optimize_fits_and_predicts_with_the_fitted_kernel(cls):
  x, x_test, y = _data()
  model = cls(optimize=True, n_restarts=1).fit(x, y)
  fitted = model.hyperparameters_
  assert set(fitted) == {'W_std', 'b_std', 'diag_reg'}
  assert model.diag_reg_ == fitted['diag_reg']
  get = 'nngp' if cls is NNGPRegressor else 'ntk'
  # The evidence improved on the starting point (the defaults)...
  start = hyper.log_marginal_likelihood(
      estimators.default_kernel_fn()(x, None, get=get), y, 1e-6, get=get)
  assert model.log_marginal_likelihood_ > start
  # ...and is the evidence of the fitted kernel.
  kernel_fn = estimators.default_builder(fitted['W_std'], fitted['b_std'])
  np.testing.assert_allclose(
      model.log_marginal_likelihood_,
      hyper.log_marginal_likelihood(kernel_fn(x, None, get=get), y,
                                    fitted['diag_reg'], get=get),
      rtol=1e-8)
  # Predictions: those of the same estimator with that kernel fixed.
  fixed = cls(kernel_fn=kernel_fn, diag_reg=fitted['diag_reg']).fit(x, y)
  np.testing.assert_allclose(model.predict(x_test), fixed.predict(x_test),
                             rtol=1e-9, atol=1e-12)
  # A refit without optimize forgets the fitted state.
  model.set_params(optimize=False).fit(x, y)
  assert not hasattr(model, 'hyperparameters_')
  np.testing.assert_allclose(model.predict(x_test),
                             cls().fit(x, y).predict(x_test), rtol=1e-12)


def test_optimize_with_a_user_builder_and_pickle():
  x, x_test, y = _data(seed=1)
  model = NNGPRegressor(optimize=True, builder=erf_builder,
                        n_restarts=1).fit(x, y)
  assert set(model.hyperparameters_) == {'W_std', 'b_std', 'diag_reg'}
  again = pickle.loads(pickle.dumps(model))
  np.testing.assert_array_equal(again.predict(x_test), model.predict(x_test))
  assert again.hyperparameters_ == model.hyperparameters_


@pytest.mark.parametrize('params, error, match', [
    ({'optimize': True, 'kernel_fn': estimators.default_kernel_fn()},
     ValueError, 'Pass builder'),
    ({'builder': erf_builder}, ValueError, 'only with optimize=True'),
    ({'optimize': True, 'builder': lambda W_std: None}, TypeError,
     'float defaults'),
    ({'optimize': True, 'n_restarts': 0}, ValueError, 'n_restarts'),
    ({'optimize': 'yes'}, ValueError, 'optimize must be'),
])
def test_invalid_optimize_parameters_raise_at_fit(params, error, match):
  x, _, y = _data()
  with pytest.raises(error, match=match):
    NNGPRegressor(**params).fit(x, y)


@needs_sklearn
def test_classifier_in_a_pipeline_and_grid_search():
  from sklearn.model_selection import GridSearchCV
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  rng = np.random.default_rng(2)
  centers = np.array([[2., 0.], [-2., 0.], [0., 2.5]])
  labels = np.repeat(np.arange(3), 12)
  x = centers[labels] + 0.7 * rng.normal(size=(36, 2))
  # One evidence over the 3 one-hot columns. (A one-point grid keeps the
  # test short: folds and refit are what GridSearchCV exercises.)
  pipeline = make_pipeline(StandardScaler(),
                           NNGPClassifier(optimize=True, n_restarts=1))
  search = GridSearchCV(pipeline, {'nngpclassifier__diag_reg': [1e-3]},
                        cv=2).fit(x, labels)
  classifier = search.best_estimator_[-1]
  assert set(classifier.hyperparameters_) == {'W_std', 'b_std', 'diag_reg'}
  assert np.isfinite(classifier.log_marginal_likelihood_)
  assert search.best_estimator_.score(x, labels) > 0.9
  assert search.best_score_ > 0.8
