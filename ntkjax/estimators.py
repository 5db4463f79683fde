"""scikit-learn-style kernel machines: NTK / NNGP regression and classification.

For people who just want the kernel machine of an infinitely wide network:

    from ntkjax.estimators import NTKRegressor
    model = NTKRegressor(kernel_fn=kernel_fn, diag_reg=1e-4).fit(X, y)
    mean, std = model.predict(X_test, return_std=True)

Estimators (all take `kernel_fn`, `diag_reg`, `diag_reg_absolute_scale`,
`batch_size`, and `optimize`, `builder`, `n_restarts` to fit the kernel's
hyperparameters by marginal likelihood at `fit`; see `NTKRegressor`):

  `NTKRegressor`    the infinite ensemble of networks trained by gradient
                    flow on the MSE to t = inf: mean Theta_* Theta^{-1} y.
  `NNGPRegressor`   the Bayesian posterior of the NNGP: mean K_* K^{-1} y.
  `NTKClassifier`, `NNGPClassifier`
                    the same regressions on centered one-hot targets
                    (1 - 1/C for the class, -1/C for the others, C classes;
                    Arora et al. 2019, Novak et al. 2019), predicting the
                    class of the largest output.

(Theta: NTK, K: NNGP; unstarred train-train, * test-train, ** test-test;
Theta and K are regularized, see `diag_reg`.) All posteriors are
`ntkjax.predict.gp_inference`'s 'ntk' and 'nngp' modes.

scikit-learn is an optional dependency. When scikit-learn >= 1.6 is
importable the estimators subclass `sklearn.base.BaseEstimator` with
`RegressorMixin` / `ClassifierMixin`, validate inputs with scikit-learn's
`validate_data` and work with `clone`, pipelines and grid search. Otherwise
(no scikit-learn, or an older one) they use a minimal built-in base with
the same `get_params` / `set_params` / `score` (R^2 / accuracy) and input
checks, so they still work alone.

Precision: inputs, kernels and outputs are float64 when JAX's x64 mode is
enabled (`jax.config.update('jax_enable_x64', True)`), float32 otherwise;
use float64 for ill-conditioned kernels (tiny `diag_reg`). Results are NumPy
arrays.

Pickling: the fitted state is NumPy arrays. The default `kernel_fn=None`
pickles; a user's `kernel_fn` pickles only if it is picklable by reference
(a module-level function), which closures returned by `stax` are not
(`cloudpickle` handles them).
"""

from __future__ import annotations

import collections
import functools
import inspect
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax import hyper
from ntkjax import predict as _predict
from ntkjax import stax

__all__ = ['HAS_SKLEARN', 'NNGPClassifier', 'NNGPRegressor', 'NTKClassifier',
           'NTKRegressor', 'NotFittedError', 'default_builder',
           'default_kernel_fn']

_Kernels = collections.namedtuple('_Kernels', 'nngp ntk')
"""Train-train kernels as NumPy arrays (`ntk` None for NNGP estimators);
module-level so fitted estimators pickle."""


# ----------------------------------------------------------------------------
# The default architecture.


def default_builder(W_std=1.5, b_std=0.05) -> Callable:
  """The default architecture as a function of its hyperparameters.

  A depth-3 fully connected ReLU network, every layer with the same
  `W_std` and `b_std`,

      stax.serial(stax.Dense(512, W_std, b_std), stax.Relu(),
                  stax.Dense(512, W_std, b_std), stax.Relu(),
                  stax.Dense(1, W_std, b_std)),

  whose infinite-width kernels are analytic (the widths do not enter). The
  estimators fit `W_std` and `b_std` from these defaults with
  `optimize=True` (`ntkjax.hyper.fit`).

  Args:
    W_std: weight standard deviation of every layer (float or traced).
    b_std: bias standard deviation of every layer.

  Returns:
    `kernel_fn(x1, x2=None, get=None)` as returned by `ntkjax.stax`.
  """
  _, _, kernel_fn = stax.serial(
      stax.Dense(512, W_std=W_std, b_std=b_std), stax.Relu(),
      stax.Dense(512, W_std=W_std, b_std=b_std), stax.Relu(),
      stax.Dense(1, W_std=W_std, b_std=b_std))
  return kernel_fn


@functools.lru_cache(maxsize=None)
def default_kernel_fn() -> Callable:
  """The `kernel_fn` the estimators use when given `kernel_fn=None`.

  `default_builder()` at its defaults (W_std=1.5, b_std=0.05), under
  `jax.jit(..., static_argnames='get')`: one compilation per input shape.
  Built once and cached.

  Returns:
    `kernel_fn(x1, x2=None, get=None)` as returned by `ntkjax.stax`.
  """
  return jax.jit(default_builder(), static_argnames='get')


# ----------------------------------------------------------------------------
# Fallbacks, used when scikit-learn (>= 1.6) is not importable.


class _NotFittedError(ValueError, AttributeError):
  """Raised when `predict` is called before `fit` (as scikit-learn's)."""


_NotFittedError.__name__ = _NotFittedError.__qualname__ = 'NotFittedError'


class _FallbackBaseEstimator:
  """Minimal stand-in for `sklearn.base.BaseEstimator`.

  Parameters are the arguments of `__init__`, stored under their own names.
  """

  @classmethod
  def _get_param_names(cls) -> list:
    signature = inspect.signature(cls.__init__)
    return sorted(p.name for p in signature.parameters.values()
                  if p.name != 'self' and p.kind not in (p.VAR_POSITIONAL,
                                                         p.VAR_KEYWORD))

  def get_params(self, deep: bool = True) -> dict:
    """The estimator's parameters.

    Args:
      deep: ignored (no nested estimators); kept for scikit-learn's API.

    Returns:
      dict parameter name -> value.
    """
    del deep
    return {name: getattr(self, name) for name in self._get_param_names()}

  def set_params(self, **params):
    """Set parameters by name.

    Args:
      **params: new values of `__init__` arguments.

    Returns:
      self.
    """
    valid = self._get_param_names()
    for name, value in params.items():
      if name not in valid:
        raise ValueError(f'Invalid parameter {name!r} for estimator '
                         f'{type(self).__name__}. Valid parameters are: '
                         f'{valid!r}.')
      setattr(self, name, value)
    return self

  def __repr__(self):
    """Class name and the parameters that differ from their defaults."""
    changed = []
    for p in inspect.signature(type(self).__init__).parameters.values():
      if p.name == 'self' or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        continue
      value = getattr(self, p.name)
      same = value is p.default or (
          isinstance(value, (numbers.Number, str)) and value == p.default)
      if not same:
        changed.append(f'{p.name}={value!r}')
    return f'{type(self).__name__}({", ".join(changed)})'

  def __getstate__(self):
    return dict(self.__dict__)

  def __setstate__(self, state):
    self.__dict__.update(state)


class _FallbackRegressorMixin:
  """`score` as the coefficient of determination R^2 (scikit-learn's)."""
  _estimator_type = 'regressor'

  def score(self, X, y, sample_weight=None) -> float:
    """R^2 of `predict(X)` against `y`, averaged over outputs.

    Args:
      X: test inputs (n_samples, n_features).
      y: true targets (n_samples,) or (n_samples, n_outputs).
      sample_weight: optional weights (n_samples,).

    Returns:
      1 - sum w (y - y_pred)^2 / sum w (y - mean_w y)^2 (1 for a perfect
      fit of constant targets, 0 for an imperfect one), as a float.
    """
    y = np.asarray(y, dtype=np.float64)
    y_pred = np.asarray(self.predict(X), dtype=np.float64)
    y, y_pred = y.reshape(len(y), -1), y_pred.reshape(len(y_pred), -1)
    w = (np.ones(len(y)) if sample_weight is None
         else np.asarray(sample_weight, dtype=np.float64))[:, None]
    numerator = np.sum(w * (y - y_pred)**2, axis=0)
    center = np.sum(w * y, axis=0) / np.sum(w)
    denominator = np.sum(w * (y - center)**2, axis=0)
    ok = denominator != 0
    r2 = np.where(numerator == 0, 1., 0.)
    r2[ok] = 1 - numerator[ok] / denominator[ok]
    return float(np.mean(r2))


class _FallbackClassifierMixin:
  """`score` as the mean accuracy (scikit-learn's)."""
  _estimator_type = 'classifier'

  def score(self, X, y, sample_weight=None) -> float:
    """(Weighted) fraction of `predict(X)` equal to `y`.

    Args:
      X: test inputs (n_samples, n_features).
      y: true labels (n_samples,).
      sample_weight: optional weights (n_samples,).

    Returns:
      The accuracy, a float in [0, 1].
    """
    correct = np.asarray(self.predict(X)) == np.asarray(y)
    return float(np.average(correct, weights=sample_weight))


def _fallback_check_is_fitted(estimator):
  """Raise `NotFittedError` unless `estimator` has fitted attributes."""
  if not any(k.endswith('_') and not k.startswith('__')
             for k in vars(estimator)):
    raise _NotFittedError(
        f'This {type(estimator).__name__} instance is not fitted yet. Call '
        "'fit' with appropriate arguments before using this estimator.")


def _check_array(x, name: str, ensure_2d: bool):
  """Float64 array, finite, non-empty; 2-d if `ensure_2d`."""
  if hasattr(x, 'toarray') or hasattr(x, 'tocsr'):
    raise TypeError(f'{name}: sparse input is not supported; pass a dense '
                    'array (kernels are dense anyway).')
  x = np.asarray(x)
  if np.iscomplexobj(x):
    raise ValueError(f'{name}: complex data is not supported.')
  x = x.astype(np.float64)
  if ensure_2d and x.ndim != 2:
    raise ValueError(
        f'Expected 2D array for {name}, got shape {x.shape}. Reshape your '
        'data either using array.reshape(-1, 1) if your data has a single '
        'feature or array.reshape(1, -1) if it contains a single sample.')
  if x.ndim == 0 or x.shape[0] < 1 or (x.ndim == 2 and x.shape[1] < 1):
    raise ValueError(f'{name} of shape {x.shape} is empty; at least one '
                     'sample and one feature are required.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'Input {name} contains NaN or infinity.')
  return x


def _fallback_validate(estimator, X, y='no_validation', reset=True):
  """`validate_data`'s role without scikit-learn: arrays and n_features_in_.

  y='no_validation' validates X alone; y=None is an error (fit needs y).
  """
  if y is None:
    raise ValueError(f'{type(estimator).__name__} requires y to be passed, '
                     'but the target y is None.')
  X = _check_array(X, 'X', ensure_2d=True)
  if reset:
    estimator.n_features_in_ = X.shape[1]
  elif X.shape[1] != estimator.n_features_in_:
    raise ValueError(
        f'X has {X.shape[1]} features, but {type(estimator).__name__} is '
        f'expecting {estimator.n_features_in_} features as input.')
  if isinstance(y, str) and y == 'no_validation':
    return X
  return X, y


def _fallback_check_classification_targets(y):
  """Raise for continuous targets (float labels with a fractional part)."""
  y = np.asarray(y)
  if y.dtype.kind == 'f' and np.any(y != np.round(y)):
    raise ValueError('Unknown label type: continuous. Maybe you are trying '
                     'to fit a classifier, which expects discrete classes '
                     'on a regression target with continuous values.')


try:  # scikit-learn is optional; validate_data needs >= 1.6.
  from sklearn.base import BaseEstimator as _BaseEstimator
  from sklearn.base import ClassifierMixin as _ClassifierMixin
  from sklearn.base import RegressorMixin as _RegressorMixin
  from sklearn.exceptions import NotFittedError
  from sklearn.utils.multiclass import check_classification_targets
  from sklearn.utils.validation import check_is_fitted, validate_data
  HAS_SKLEARN = True
except ImportError:
  HAS_SKLEARN = False
  _BaseEstimator = _FallbackBaseEstimator
  _ClassifierMixin = _FallbackClassifierMixin
  _RegressorMixin = _FallbackRegressorMixin
  NotFittedError = _NotFittedError
  check_classification_targets = _fallback_check_classification_targets
  check_is_fitted = _fallback_check_is_fitted


# ----------------------------------------------------------------------------
# The shared kernel machine.


def _working_dtype() -> np.dtype:
  """float64 under JAX's x64 mode, float32 otherwise."""
  return np.dtype(jnp.result_type(float))


def _field(kernels, name: str, kernel_fn):
  """`kernels.name` of what a kernel_fn returned, as a NumPy array."""
  value = getattr(kernels, name, None)
  if value is None:
    raise TypeError(
        f'kernel_fn={kernel_fn!r} returned {type(kernels).__name__}, with no '
        f'{name!r} field; kernel_fn(x1, x2, get=names) must return an object '
        "with the requested fields, as ntkjax.stax's kernel_fn does for a "
        "tuple get=('nngp', 'ntk').")
  return np.asarray(value, dtype=_working_dtype())


class _KernelMachine(_BaseEstimator):
  """Kernel regression with a network's NNGP or NTK (see `NTKRegressor`)."""

  _mode = 'ntk'      # gp_inference's get: 'ntk' or 'nngp'

  def __init__(self, kernel_fn: Optional[Callable] = None,
               diag_reg: float = 1e-6, diag_reg_absolute_scale: bool = False,
               batch_size: Optional[int] = None, optimize: bool = False,
               builder: Optional[Callable] = None, n_restarts: int = 2):
    self.kernel_fn = kernel_fn
    self.diag_reg = diag_reg
    self.diag_reg_absolute_scale = diag_reg_absolute_scale
    self.batch_size = batch_size
    self.optimize = optimize
    self.builder = builder
    self.n_restarts = n_restarts

  # -- parameters, checked at fit time (scikit-learn's convention).

  def _check_params(self):
    if self.kernel_fn is not None and not callable(self.kernel_fn):
      raise TypeError(
          f'kernel_fn must be callable or None, got {self.kernel_fn!r}; pass '
          'the third element of a stax layer, e.g. '
          '`_, _, kernel_fn = stax.serial(...)`.')
    reg = self.diag_reg
    if (isinstance(reg, bool) or not isinstance(reg, numbers.Real)
        or not np.isfinite(reg) or reg < 0):
      raise ValueError(f'diag_reg must be a finite number >= 0, got {reg!r}.')
    size = self.batch_size
    if size is not None and (isinstance(size, bool)
                             or not isinstance(size, numbers.Integral)
                             or size < 1):
      raise ValueError(f'batch_size must be None or an integer >= 1, got '
                       f'{size!r}.')
    if self.optimize not in (True, False):
      raise ValueError(f'optimize must be True or False, got '
                       f'{self.optimize!r}.')
    if self.builder is not None and not self.optimize:
      raise ValueError('builder is used only with optimize=True; pass '
                       'optimize=True, or pass a fixed kernel_fn instead.')
    if self.optimize and self.kernel_fn is not None:
      raise ValueError(
          'optimize=True fits the hyperparameters of builder(**values); a '
          'fixed kernel_fn has none to fit. Pass builder=... (a function of '
          'the hyperparameters returning a kernel_fn) instead of kernel_fn.')
    if self.builder is not None and not callable(self.builder):
      raise TypeError(f'builder must be callable, got {self.builder!r}.')
    restarts = self.n_restarts
    if (isinstance(restarts, bool) or not isinstance(restarts, numbers.Integral)
        or restarts < 1):
      raise ValueError(f'n_restarts must be an integer >= 1, got '
                       f'{restarts!r}.')

  def _kernel_fn(self, fitted: bool = True) -> Callable:
    """The fitted kernel (optimize=True, after fit), else the given one."""
    if fitted and self.__dict__.get('kernel_fn_') is not None:
      return self.kernel_fn_
    return default_kernel_fn() if self.kernel_fn is None else self.kernel_fn

  def _builder(self) -> Callable:
    return default_builder if self.builder is None else self.builder

  def _optimize(self, X, targets):
    """Fit the builder's hyperparameters by evidence (`hyper.fit`), from
    the builder's default values and `diag_reg`."""
    builder = self._builder()
    init = {name: p.default for name, p in
            inspect.signature(builder).parameters.items()
            if isinstance(p.default, float)}
    if not init:
      raise TypeError(
          f'builder {getattr(builder, "__name__", builder)!r} has no keyword '
          'arguments with float defaults; optimize=True fits those, starting '
          'there (e.g. def builder(W_std=1.5, b_std=0.05): ...).')
    # The NTK estimators' mean is the NTK-GP's (see `hyper`).
    return hyper.fit(builder, X, targets, init, get=self._mode,
                     diag_reg=min(max(self.diag_reg, 2e-8), 50.),
                     diag_reg_absolute_scale=self.diag_reg_absolute_scale,
                     restarts=self.n_restarts)

  def _fitted_kernel_fn(self, hyperparameters: dict) -> Callable:
    """builder(**fitted values), jitted as `default_kernel_fn` is."""
    values = {k: v for k, v in hyperparameters.items() if k != hyper.NOISE}
    return jax.jit(self._builder()(**values), static_argnames='get')

  def _names(self) -> tuple:
    """Kernels the mode needs: the NTK posterior's covariance needs both."""
    return ('nngp', 'ntk') if self._mode == 'ntk' else ('nngp',)

  # -- kernels.

  def _row_blocks(self, x):
    """Row blocks of `x`, each padded to `batch_size` rows (fixed shapes).

    Yields:
      (block, n_real): the padding of the last block repeats its last row;
      results for it are dropped (kernels are per pair of inputs).
    """
    n = x.shape[0]
    size = n if self.batch_size is None else min(self.batch_size, n)
    for start in range(0, n, size):
      block = x[start:start + size]
      real = block.shape[0]
      if real < size:
        block = np.concatenate([block, np.repeat(block[-1:], size - real, 0)])
      yield block, real

  def _kernels(self, x1, x2, names=None, kernel_fn=None) -> _Kernels:
    """`kernel_fn(x1, x2, get=names)` as NumPy arrays (absent fields None);
    kernel_fn defaults to `_kernel_fn()`."""
    kernel_fn = self._kernel_fn() if kernel_fn is None else kernel_fn
    names = self._names() if names is None else names
    kernels = kernel_fn(x1, x2, get=names)
    return _Kernels(**{name: _field(kernels, name, kernel_fn)
                       if name in names else None
                       for name in _Kernels._fields})

  def _train_kernels(self, x, kernel_fn) -> _Kernels:
    """Train-train kernels: one symmetric call, or row blocks symmetrized."""
    if self.batch_size is None or self.batch_size >= x.shape[0]:
      return self._kernels(x, None, kernel_fn=kernel_fn)
    blocks = [(self._kernels(block, x, kernel_fn=kernel_fn), real)
              for block, real in self._row_blocks(x)]

    def symmetric(name):
      if getattr(blocks[0][0], name) is None:
        return None
      k = np.concatenate([getattr(b, name)[:real] for b, real in blocks])
      return (k + k.T) / 2
    return _Kernels(**{name: symmetric(name) for name in _Kernels._fields})

  # -- fitting and the posterior.

  def _fit_targets(self, X, targets):
    """Store the training set and build the posterior; targets (N, k)."""
    dtype = _working_dtype()
    X = np.asarray(X, dtype=dtype)
    fitted, kernel_fn = None, None
    if self.optimize:
      fitted = self._optimize(X, targets)
      kernel_fn = self._fitted_kernel_fn(fitted.hyperparameters)
    else:
      kernel_fn = self._kernel_fn(fitted=False)
    kernels = self._train_kernels(X, kernel_fn)
    for name, k in zip(_Kernels._fields, kernels):
      if k is not None and not np.all(np.isfinite(k)):
        raise ValueError(
            f'kernel_fn returned non-finite {name} values on the training '
            'inputs; check the architecture (or use float64 for large '
            'inputs).')
    # Fitted attributes are set only once everything has succeeded.
    self.X_train_ = X
    self.y_train_ = np.asarray(targets, dtype=dtype)
    self.train_kernels_ = kernels
    for name in ('hyperparameters_', 'kernel_fn_', 'diag_reg_',
                 'log_marginal_likelihood_'):
      self.__dict__.pop(name, None)       # from an earlier fit
    if fitted is not None:
      self.hyperparameters_ = fitted.hyperparameters
      self.kernel_fn_ = kernel_fn
      self.diag_reg_ = fitted.hyperparameters[hyper.NOISE]
      self.log_marginal_likelihood_ = fitted.log_marginal_likelihood
    self._build_posterior()
    return self

  def _build_posterior(self):
    self._posterior = _predict.gp_inference(
        self.train_kernels_, self.y_train_,
        diag_reg=self.__dict__.get('diag_reg_', self.diag_reg),
        diag_reg_absolute_scale=self.diag_reg_absolute_scale)

  def _outputs(self, X, return_std: bool):
    """Posterior mean (n, k) and, with `return_std`, std (n,)."""
    check_is_fitted(self)
    X = np.asarray(self._validate(X, reset=False), dtype=_working_dtype())
    means, stds = [], []
    for block, real in self._row_blocks(X):
      k_test_train = self._kernels(block, self.X_train_)
      if not return_std:
        means.append(np.asarray(self._posterior(self._mode, k_test_train))
                     [:real])
        continue
      # Both modes' covariances use the NNGP as the test-test prior.
      k_test_test = self._kernels(block, None, names=('nngp',))
      gaussian = self._posterior(self._mode, k_test_train, k_test_test)
      means.append(np.asarray(gaussian.mean)[:real])
      variance = np.diagonal(np.asarray(gaussian.covariance))[:real]
      stds.append(np.sqrt(np.maximum(variance, 0)))
    dtype = _working_dtype()
    mean = np.concatenate(means).astype(dtype, copy=False)
    std = np.concatenate(stds).astype(dtype, copy=False) if return_std else None
    return mean, std

  def _validate(self, X, y='no_validation', reset=True, **check_params):
    """scikit-learn's `validate_data`, or the fallback; y=None raises."""
    if HAS_SKLEARN:
      return validate_data(self, X, y, reset=reset, **check_params)
    return _fallback_validate(self, X, y, reset=reset)

  # -- pickling: the posterior closure is rebuilt from the arrays.

  def __getstate__(self):
    state = super().__getstate__()
    state = dict(state)
    state.pop('_posterior', None)
    state.pop('kernel_fn_', None)    # a jitted closure: rebuilt on load
    return state

  def __setstate__(self, state):
    super().__setstate__(state)
    if 'hyperparameters_' in self.__dict__:
      self.kernel_fn_ = self._fitted_kernel_fn(self.hyperparameters_)
    if 'train_kernels_' in self.__dict__:
      self._build_posterior()


class _Regressor(_RegressorMixin, _KernelMachine):
  """Regression: fit, predict (optionally with std), score (R^2)."""

  def fit(self, X, y):
    """Condition the kernel machine on the training set.

    Args:
      X: training inputs (n_samples, n_features); finite numbers.
      y: targets (n_samples,) or (n_samples, n_outputs).

    Returns:
      self, with `X_train_`, `y_train_` (always (n_samples, n_outputs)),
      `train_kernels_` (the train-train kernels) and `n_features_in_` set.
    """
    self._check_params()
    if HAS_SKLEARN:
      X, y = self._validate(X, y, multi_output=True, y_numeric=True)
    else:
      X, y = self._validate(X, y)
      y = _check_array(y, 'y', ensure_2d=False)
      if y.ndim not in (1, 2) or len(y) != len(X):
        raise ValueError(f'y of shape {y.shape} does not match X of shape '
                         f'{X.shape}: one target (row) per sample needed.')
    y = np.asarray(y)
    self._fit_targets(X, y.reshape(len(y), -1))
    self._y_1d = y.ndim == 1
    return self

  def predict(self, X, return_std: bool = False):
    """Posterior mean, and optionally the posterior standard deviation.

    Args:
      X: test inputs (n_samples, n_features).
      return_std: also return the posterior standard deviation of each test
        point: sqrt of the diagonal of gp_inference's posterior covariance
        (negative round-off clipped to 0). For `NNGPRegressor` the Bayesian
        posterior, K_** - K_* K^{-1} K_*^T; for `NTKRegressor` the spread
        over random initializations of the infinitely wide network trained
        to convergence (gp_inference's 'ntk' mode, which uses both NNGP and
        NTK): K_** + A K A^T - A K_*^T - K_* A^T with A = Theta_* Theta^{-1}.
        It is the same for every output of a multi-output target.

    Returns:
      mean, shaped like the training targets ((n_samples,) for 1-d y,
      (n_samples, n_outputs) otherwise); with `return_std`, `(mean, std)`
      with std of the same shape.
    """
    mean, std = self._outputs(X, return_std)
    if self._y_1d:
      mean = mean[:, 0]
    if not return_std:
      return mean
    std = std if self._y_1d else np.repeat(std[:, None], mean.shape[1], 1)
    return mean, std

  def __sklearn_tags__(self):
    tags = super().__sklearn_tags__()
    tags.target_tags.multi_output = True
    return tags


class _Classifier(_ClassifierMixin, _KernelMachine):
  """Classification by regression on centered one-hot targets.

  There is no `predict_proba`: the outputs are posterior means of the
  one-hot coding, not probabilities (they can be negative or exceed one),
  and turning them into probabilities (a softmax with some temperature, a
  calibration) is a modelling choice outside the kernel machine.
  """

  def fit(self, X, y):
    """Regress the centered one-hot coding of the labels.

    Args:
      X: training inputs (n_samples, n_features); finite numbers.
      y: labels (n_samples,), any sortable type (ints, strings, ...).

    Returns:
      self, with `classes_` (sorted unique labels), `X_train_`, `y_train_`
      (the (n_samples, n_classes) targets: 1 - 1/C for the label's class,
      -1/C elsewhere), `train_kernels_` and `n_features_in_` set.
    """
    self._check_params()
    X, y = self._validate(X, y)
    if not HAS_SKLEARN:
      y = np.asarray(y)
      if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
      if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f'y of shape {y.shape} does not match X of shape '
                         f'{X.shape}: one label per sample needed.')
      if y.dtype.kind in 'fc' and not np.all(np.isfinite(y)):
        raise ValueError('Input y contains NaN or infinity.')
    check_classification_targets(y)
    self.classes_, index = np.unique(y, return_inverse=True)
    n_classes = len(self.classes_)
    targets = np.full((len(y), n_classes), -1 / n_classes)
    targets[np.arange(len(y)), index.reshape(-1)] += 1
    return self._fit_targets(X, targets)

  def decision_function(self, X):
    """The regression outputs: one score per class.

    Args:
      X: test inputs (n_samples, n_features).

    Returns:
      (n_samples, n_classes) posterior means of the one-hot coding; for two
      classes scikit-learn's binary convention, the (n_samples,) margin
      output[:, 1] - output[:, 0] (> 0 means `classes_[1]`).
    """
    outputs, _ = self._outputs(X, return_std=False)
    if outputs.shape[1] == 2:
      return outputs[:, 1] - outputs[:, 0]
    return outputs

  def predict(self, X):
    """The class with the largest output.

    Args:
      X: test inputs (n_samples, n_features).

    Returns:
      (n_samples,) labels from `classes_`.
    """
    outputs, _ = self._outputs(X, return_std=False)
    return self.classes_[np.argmax(outputs, axis=1)]


_PARAMETERS_DOC = """
  Args:
    kernel_fn: `kernel_fn(x1, x2=None, get=names)` returning an object with
      fields `nngp` (and `ntk` for the NTK estimators), arrays (N1, N2), as
      the third element of an `ntkjax.stax` layer does; `x2=None` means
      `x2 = x1`. It must be a function of each pair of inputs (batch-
      independent), as analytic and empirical kernels are (bind an
      empirical kernel's params: `functools.partial(kernel_fn,
      params=params)`). Wrap it in `jax.jit(kernel_fn,
      static_argnames='get')` for speed. None: the depth-3 ReLU network of
      `default_kernel_fn` (jitted).
    diag_reg: ridge added to the train-train kernel, times the mean of its
      diagonal unless `diag_reg_absolute_scale` (gp_inference's convention).
      With a small value the mean interpolates the training targets.
    diag_reg_absolute_scale: add `diag_reg` itself.
    batch_size: None computes each kernel in one call; an integer computes
      kernels in blocks of that many rows (padded to a fixed shape, so a
      jitted kernel_fn compiles once), bounding memory by
      batch_size * n_train per kernel.
    optimize: fit the hyperparameters at `fit` by maximizing the evidence
      of the training targets (`ntkjax.hyper.fit`: the NNGP evidence for
      the NNGP estimators, the NTK-GP evidence for the NTK ones), starting
      from the builder's numeric defaults and `diag_reg`, which is fitted
      too. The fitted values are in `hyperparameters_` (with `diag_reg`),
      the evidence in `log_marginal_likelihood_`; `diag_reg_` is the noise
      used. The train-train kernel is then computed whole (n_train^2).
    builder: with `optimize=True`, `builder(**hyperparameters)` -> kernel_fn;
      its keyword arguments with float defaults are fitted, starting there
      (e.g. `def builder(W_std=1.5, b_std=0.05, depth=3): return
      stax.serial(...)[2]` fits W_std and b_std; depth keeps its default).
      None: `default_builder` (the default architecture). Module-level builders keep the estimator
      picklable.
    n_restarts: optimizer runs (the first from the defaults, the others
      from random starts around them); the best evidence wins.
"""


class NTKRegressor(_Regressor):
  __doc__ = """Kernel regression with the NTK: the trained infinite network.

  The mean is Theta_* (Theta + reg I)^{-1} y: the output of an infinitely
  wide network trained to convergence by gradient flow on the MSE (averaged
  over initializations; Jacot et al. 2018, Lee et al. 2019), i.e.
  `ntkjax.predict.gp_inference(...)('ntk', ...)`. Multi-output targets are
  supported; the kernel acts as Theta (x) I on outputs.
  """ + _PARAMETERS_DOC
  _mode = 'ntk'


class NNGPRegressor(_Regressor):
  __doc__ = """Kernel regression with the NNGP: the Bayesian infinite network.

  The mean is K_* (K + reg I)^{-1} y and `predict(..., return_std=True)`
  adds the GP posterior standard deviation: exact Bayesian inference with
  the network's prior (Lee et al. 2018), with `diag_reg` the observation
  noise variance (relative to the mean prior variance unless
  `diag_reg_absolute_scale`).
  """ + _PARAMETERS_DOC
  _mode = 'nngp'


class NTKClassifier(_Classifier):
  __doc__ = """Classification by NTK regression on centered one-hot labels.

  `decision_function` gives the NTK regression outputs, `predict` the class
  of the largest one; no `predict_proba` (see `_Classifier`).
  """ + _PARAMETERS_DOC
  _mode = 'ntk'


class NNGPClassifier(_Classifier):
  __doc__ = """Classification by NNGP regression on centered one-hot labels.

  `decision_function` gives the NNGP posterior means, `predict` the class of
  the largest one; no `predict_proba` (see `_Classifier`).
  """ + _PARAMETERS_DOC
  _mode = 'nngp'
