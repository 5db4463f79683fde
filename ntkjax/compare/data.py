"""Data for `ntkjax compare`: scikit-learn's digits, or a user's `.npz`.

Both sources go through the same checks and the same preprocessing:

* inputs: every feature standardized with the training set's mean and
  standard deviation (features constant on the training set are only
  centered), then every example scaled to mean square 1 (norm sqrt(d)), so
  all inputs lie on one sphere and the input kernel's diagonal is 1: the
  kernels then depend on angles only, as in the NTK literature;
* targets: integer class labels become one-hot vectors centered by
  subtracting 1 / classes (zero mean over classes, so the infinite-width
  predictions need not fit a constant offset; argmax is unchanged);
  2-d float targets are used as they are (regression or soft labels).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
DIGITS_TRAIN_SIZE = 1000   # of 1,797; the other 797 are the test set
SPLIT_SEED = 0


class DataError(ValueError):
  """Data that cannot be used, with a message that says what and why."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Preprocessed data (float32), ready for the networks and kernels.

  Attributes:
    x_train, x_test: inputs, (N, *features).
    y_train, y_test: targets, (N, outputs).
    labels_train, labels_test: integer classes, or None for regression
      targets (then no accuracy is reported).
    name: where the data came from.
    description: the preprocessing, in words (for the report).
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  labels_train: Optional[np.ndarray]
  labels_test: Optional[np.ndarray]
  name: str
  description: str

  @property
  def n_outputs(self) -> int:
    return self.y_train.shape[1]

  def summary(self) -> dict:
    """JSON-ready facts about the data."""
    return {'source': self.name, 'n_train': int(len(self.x_train)),
            'n_test': int(len(self.x_test)),
            'input_shape': list(self.x_train.shape[1:]),
            'n_outputs': self.n_outputs,
            'classification': self.labels_train is not None,
            'target_rms': float(np.sqrt(np.mean(self.y_test.astype(
                np.float64) ** 2))),
            'preprocessing': self.description}


def load_digits_arrays(images: bool = False):
  """The digits set shipped inside scikit-learn (no download), split in two.

  Args:
    images: (N, 8, 8, 1) images instead of (N, 64) features.

  Returns:
    dict with `x_train, y_train, x_test, y_test` (labels 0..9): a fixed
    random split (seed 0) of `DIGITS_TRAIN_SIZE` training examples and the
    rest for testing.
  """
  try:
    from sklearn.datasets import load_digits
  except ImportError as error:
    raise DataError("the built-in digits data come with scikit-learn: "
                    "pip install 'ntkjax[compare]' (or scikit-learn), or "
                    'pass --data PATH.npz.') from error
  digits = load_digits()
  x, y = digits.data.astype(np.float64), digits.target.astype(np.int64)
  if images:
    x = x.reshape(-1, 8, 8, 1)
  order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  train, test = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
  return {'x_train': x[train], 'y_train': y[train], 'x_test': x[test],
          'y_test': y[test]}


def load_npz_arrays(path: str) -> dict:
  """Reads `x_train, y_train, x_test, y_test` from an `.npz` file.

  Raises:
    DataError: the file is missing or unreadable, or a key is missing.
  """
  if not os.path.isfile(path):
    raise DataError(f'--data {path}: no such file.')
  try:
    with np.load(path, allow_pickle=False) as npz:
      found = list(npz.files)
      missing = [k for k in KEYS if k not in found]
      if missing:
        raise DataError(
            f'--data {path}: missing array(s) {", ".join(missing)}; the file '
            f'must hold {", ".join(KEYS)} (found: '
            f'{", ".join(found) or "none"}). Write it with np.savez(path, '
            'x_train=..., y_train=..., x_test=..., y_test=...).')
      return {k: npz[k] for k in KEYS}
  except DataError:
    raise
  except Exception as error:  # noqa: BLE001 -- numpy raises many kinds here
    raise DataError(f'--data {path}: cannot read it as an .npz archive of '
                    f'arrays ({type(error).__name__}: {error}).') from error


def _is_integral(y: np.ndarray) -> bool:
  if np.issubdtype(y.dtype, np.integer):
    return True
  return (np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y)))
          and bool(np.all(y == np.round(y))))


def check_arrays(arrays: dict, source: str) -> None:
  """Raises a `DataError` naming the array and the problem, if any.

  Checks: numeric dtypes, an example axis with at least one feature,
  matching numbers of inputs and targets, matching per-example shapes
  between train and test, targets 1-d (labels or values) or 2-d, finite
  values, non-negative integer labels, at least 2 training and 1 test
  examples.
  """
  for key in KEYS:
    a = arrays[key]
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number)
                                 or a.dtype == bool):
      raise DataError(f'{source}: {key} has dtype {a.dtype}; numbers are '
                      'needed.')
    if a.ndim == 0:
      raise DataError(f'{source}: {key} is a scalar; it needs an example '
                      'axis first.')
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if x.ndim < 2:
      raise DataError(f'{source}: x_{split} has shape {x.shape}; inputs '
                      'need shape (examples, features...).')
    if len(x) != len(y):
      raise DataError(f'{source}: x_{split} has {len(x)} examples but '
                      f'y_{split} has {len(y)}; they must match.')
    if y.ndim > 2:
      raise DataError(f'{source}: y_{split} has shape {y.shape}; targets are '
                      '1-d (class labels or values) or 2-d (examples, '
                      'outputs).')
  if arrays['x_train'].shape[1:] != arrays['x_test'].shape[1:]:
    raise DataError(f'{source}: x_train examples have shape '
                    f'{arrays["x_train"].shape[1:]} but x_test examples have '
                    f'{arrays["x_test"].shape[1:]}.')
  if arrays['y_train'].shape[1:] != arrays['y_test'].shape[1:]:
    raise DataError(f'{source}: y_train has shape {arrays["y_train"].shape} '
                    f'but y_test has {arrays["y_test"].shape}; targets must '
                    'have the same number of outputs.')
  if len(arrays['x_train']) < 2 or len(arrays['x_test']) < 1:
    raise DataError(f'{source}: need at least 2 training and 1 test examples '
                    f'(got {len(arrays["x_train"])} and '
                    f'{len(arrays["x_test"])}).')
  for key in KEYS:
    a = np.asarray(arrays[key], np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
      where = np.argwhere(bad)[0]
      raise DataError(f'{source}: {key} has {int(bad.sum())} NaN or infinite '
                      f'value(s), the first at index {tuple(where.tolist())}; '
                      'clean or impute the data first.')
  y = arrays['y_train']
  if y.ndim == 1 and _is_integral(y) and _is_integral(arrays['y_test']):
    low = min(y.min(), arrays['y_test'].min())
    if low < 0:
      raise DataError(f'{source}: class labels must be >= 0, found {low}.')


def _take(arrays: dict, train_size: Optional[int],
          test_size: Optional[int], source: str) -> dict:
  out = dict(arrays)
  for split, size in (('train', train_size), ('test', test_size)):
    if size is None:
      continue
    n = len(arrays[f'x_{split}'])
    if size > n:
      raise DataError(f'{source}: --{split}-size {size} is larger than the '
                      f'{n} {split} examples available.')
    out[f'x_{split}'] = arrays[f'x_{split}'][:size]
    out[f'y_{split}'] = arrays[f'y_{split}'][:size]
  return out


def _standardize(x_train: np.ndarray, x_test: np.ndarray):
  """Per-feature standardization fit on train, then rows scaled to norm
  sqrt(d); all-zero rows stay zero."""
  flat_train = x_train.reshape(len(x_train), -1).astype(np.float64)
  flat_test = x_test.reshape(len(x_test), -1).astype(np.float64)
  mean = flat_train.mean(0)
  std = flat_train.std(0)
  # A feature constant on the training set (digits' corner pixels) carries
  # no information there; dividing by its zero std would blow up test rows.
  std = np.where(std > 1e-8 * max(std.max(), 1e-300), std, 1.)

  def scale(flat):
    z = (flat - mean) / std
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    safe = np.where(norm > 0, norm, 1.)
    z = np.where(norm > 0, z * np.sqrt(z.shape[1]) / safe, 0.)
    return z.astype(np.float32)
  return (scale(flat_train).reshape(x_train.shape),
          scale(flat_test).reshape(x_test.shape))


def prepare(arrays: dict, source: str, name: str,
            train_size: Optional[int] = None,
            test_size: Optional[int] = None) -> Dataset:
  """Checks, subsamples (first examples) and preprocesses the arrays.

  Args:
    arrays: dict with `x_train, y_train, x_test, y_test`.
    source: how to name the data in error messages (e.g. '--data f.npz').
    name: the data's name in the results.
    train_size, test_size: keep only the first that many examples.

  Returns:
    A `Dataset`.

  Raises:
    DataError: see `check_arrays`.
  """
  arrays = {k: np.asarray(arrays[k]) for k in KEYS}
  check_arrays(arrays, source)
  arrays = _take(arrays, train_size, test_size, source)
  x_train, x_test = _standardize(arrays['x_train'], arrays['x_test'])
  y_train, y_test = arrays['y_train'], arrays['y_test']
  steps = ['inputs standardized per feature (train mean and std)',
           'each example scaled to norm sqrt(d)']
  if y_train.ndim == 1 and _is_integral(y_train) and _is_integral(y_test):
    # Classes are the distinct labels (train and test), in order:
    # max(label) + 1 made labels 0/2000/4000 into 4001 outputs.
    values = np.unique(np.concatenate([y_train, y_test]).astype(np.int64))
    classes = len(values)
    if classes < 2:
      raise DataError(f'{source}: the labels have a single class; nothing to '
                      'classify.')
    labels_train = np.searchsorted(values, y_train.astype(np.int64))
    labels_test = np.searchsorted(values, y_test.astype(np.int64))
    if values[0] != 0 or values[-1] != classes - 1:
      steps.append(f'labels {values[:3].tolist()}... mapped to classes '
                   f'0..{classes - 1}')
    eye = np.eye(classes, dtype=np.float32) - np.float32(1. / classes)
    y_train, y_test = eye[labels_train], eye[labels_test]
    steps.append(f'labels one-hot over {classes} classes, centered '
                 f'(minus 1/{classes})')
  else:
    labels_train = labels_test = None
    if y_train.ndim == 1:
      y_train, y_test = y_train[:, None], y_test[:, None]
    y_train = y_train.astype(np.float32)
    y_test = y_test.astype(np.float32)
    if y_train.shape[1] >= 2:
      # Soft labels or one-hot vectors: accuracy by argmax still means
      # something.
      labels_train = np.argmax(y_train, 1)
      labels_test = np.argmax(y_test, 1)
      steps.append('2-d targets used as given; accuracy by argmax')
    else:
      steps.append('targets used as given (regression; no accuracy)')
  return Dataset(x_train, y_train, x_test, y_test, labels_train, labels_test,
                 name, '; '.join(steps) + '.')


def load(path: Optional[str], train_size: Optional[int] = None,
         test_size: Optional[int] = None, images: bool = False) -> Dataset:
  """The data `ntkjax compare` runs on.

  Args:
    path: an `.npz` file, or None for scikit-learn's digits.
    train_size, test_size: keep only the first that many examples.
    images: digits as (N, 8, 8, 1) images (ignored for `.npz` data, which
      keep their stored shape).

  Returns:
    A `Dataset`.

  Raises:
    DataError: unusable data, with the reason.
  """
  if path is None:
    arrays = load_digits_arrays(images)
    return prepare(arrays, 'digits', 'scikit-learn digits (8x8, 10 classes)',
                   train_size, test_size)
  arrays = load_npz_arrays(path)
  return prepare(arrays, f'--data {path}', os.path.basename(path), train_size,
                 test_size)
