"""Measures of feature learning: where the kernel description holds and
where it breaks.

At infinite width in the NTK parameterization a network trains as a kernel
machine with its initial NTK (the lazy regime; Jacot et al. 2018, Lee et
al. 2019). A network that learns features changes its kernel. These
functions quantify that change from the empirical NTK before and after
training (`ntkjax.train`):

* `kernel_drift(k0, k1) = ||K1 - K0||_F / ||K0||_F`: zero in the lazy
  limit; O(1/alpha) under the output scale alpha of Chizat, Oyallon & Bach
  2019 (`train(..., output_scale=alpha)`); O(1/n) with width n in the NTK
  parameterization (`finite_width.kernel_drift`).
* `kernel_alignment(k, y)`: the centered kernel-target alignment of Cortes,
  Mohri & Rostamizadeh 2012, <K_c, Y_c>_F / (||K_c||_F ||Y_c||_F) with
  K_c = H K H, Y = y y^T, H = I - 1 1^T / N (`centered=False`: Cristianini
  et al. 2002's). 1 when the kernel is the targets' own Gram matrix; a
  kernel that learns features moves towards it during training (Baratin et
  al. 2021, "Implicit regularization via neural feature alignment").
* `effective_rank(features)`: exp of the entropy of the normalized singular
  values of an (N, n) feature matrix (Roy & Vetterli 2007): k for k equal
  singular values, 1 for a rank-one matrix.
* `after_kernel(...)`: all of the above for one training run, and the test
  accuracy of kernel regression with the initial NTK and with the after-
  training NTK ("after kernel"; Long 2021, "Properties of the after kernel"):
  if the after kernel predicts better, training learned features a kernel
  machine on the initial NTK could not use.

`plot_feature_learning` draws drift and alignment against a dial (alpha, or
width).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ntkjax import _plotting
from ntkjax.empirical import empirical_ntk_fn


def _square(k, name: str) -> np.ndarray:
  k = np.asarray(k, dtype=float)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f'{name} must be an (N, N) kernel matrix, got shape '
                     f'{k.shape}.')
  if not np.all(np.isfinite(k)):
    raise ValueError(f'{name} has NaN or infinite entries.')
  return k


def kernel_drift(k0, k1) -> float:
  """||K1 - K0||_F / ||K0||_F, the relative change of a kernel matrix.

  Args:
    k0: the kernel before training, (N, N).
    k1: the kernel after, (N, N).

  Returns:
    The relative Frobenius distance (a float).
  """
  k0, k1 = _square(k0, 'k0'), _square(k1, 'k1')
  if k0.shape != k1.shape:
    raise ValueError(f'k0 and k1 have shapes {k0.shape} and {k1.shape}.')
  norm = np.linalg.norm(k0)
  if norm == 0:
    raise ValueError('k0 is zero: the relative drift is undefined.')
  return float(np.linalg.norm(k1 - k0) / norm)


def kernel_alignment(k, y, centered: bool = True) -> float:
  """Kernel-target alignment (module docstring).

  Args:
    k: (N, N) kernel matrix.
    y: (N,) or (N, k) targets (one-hot labels for classification).
    centered: center both Gram matrices (Cortes et al. 2012; recommended:
      uncentered alignment is dominated by the kernel's constant part).

  Returns:
    The alignment in [-1, 1] (a float).
  """
  k = _square(k, 'k')
  y = np.asarray(y, dtype=float)
  y = y[:, None] if y.ndim == 1 else y.reshape(y.shape[0], -1)
  if y.shape[0] != k.shape[0]:
    raise ValueError(f'y has {y.shape[0]} rows but the kernel is '
                     f'{k.shape[0]} x {k.shape[0]}.')
  target = y @ y.T
  if centered:
    # H A H without forming H: subtract row and column means, add the mean.
    center = lambda a: (a - a.mean(0, keepdims=True) - a.mean(1, keepdims=True)
                        + a.mean())
    k, target = center(k), center(target)
  norms = np.linalg.norm(k) * np.linalg.norm(target)
  if norms == 0:
    raise ValueError('kernel_alignment: the (centered) kernel or target Gram '
                     'matrix is zero (constant targets?).')
  return float(np.sum(k * target) / norms)


def effective_rank(features) -> float:
  """exp(entropy of the normalized singular values) of a feature matrix.

  Args:
    features: (N, ...) features of N examples (flattened per example).

  Returns:
    The effective rank, in [1, min(N, n)] (a float).
  """
  f = np.asarray(features, dtype=float)
  f = f.reshape(f.shape[0], -1)
  s = np.linalg.svd(f, compute_uv=False)
  if s.sum() == 0:
    raise ValueError('effective_rank: the features are all zero.')
  p = s / s.sum()
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


def _kernel_regression_accuracy(k_train, k_test_train, y_train, y_test,
                                diag_reg: float) -> float:
  """Test accuracy (argmax over outputs; sign for one output) of kernel
  regression K_*(K + diag_reg mean(diag K) I)^-1 y."""
  n = k_train.shape[0]
  reg = diag_reg * np.trace(k_train) / n
  mean = k_test_train @ np.linalg.solve(k_train + reg * np.eye(n), y_train)
  if y_train.shape[1] == 1:
    return float(np.mean(np.sign(mean) == np.sign(y_test)))
  return float(np.mean(mean.argmax(1) == y_test.argmax(1)))


class AfterKernel(NamedTuple):
  """Feature-learning measures of one training run (`after_kernel`).

  Attributes:
    drift: `kernel_drift` of the train-train empirical NTK.
    alignment_before, alignment_after: `kernel_alignment` of it with the
      training targets, before and after training.
    accuracy_before, accuracy_after: test accuracy of kernel regression on
      the training set with the initial and with the after-training NTK.
  """
  drift: float
  alignment_before: float
  alignment_after: float
  accuracy_before: float
  accuracy_after: float


def after_kernel(apply_fn: Callable, params_before, params_after, x_train,
                 y_train, x_test, y_test, diag_reg: float = 1e-4,
                 vmap_axes=0) -> AfterKernel:
  """How much a training run changed the network's kernel, and whether the
  change helps (module docstring).

  Args:
    apply_fn: `apply_fn(params, x)`, outputs (N, k).
    params_before: parameters at initialization.
    params_after: parameters after training (`train(...).params`; not of a
      linearized model).
    x_train: training inputs.
    y_train: training targets (N, k), one-hot for classes (k = 1: labels by
      sign).
    x_test: test inputs.
    y_test: test targets, like y_train.
    diag_reg: ridge, relative to the mean of the kernel's diagonal.
    vmap_axes: as in `empirical_ntk_fn` (0: per-example networks).

  Returns:
    An `AfterKernel`.
  """
  y_train = np.asarray(y_train, dtype=float).reshape(len(y_train), -1)
  y_test = np.asarray(y_test, dtype=float).reshape(len(y_test), -1)
  ntk_fn = empirical_ntk_fn(apply_fn, vmap_axes=vmap_axes)
  x_train, x_test = jnp.asarray(x_train), jnp.asarray(x_test)

  def kernels(params):
    return (np.asarray(ntk_fn(x_train, None, params), dtype=float),
            np.asarray(ntk_fn(x_test, x_train, params), dtype=float))

  (k0, k0_test), (k1, k1_test) = kernels(params_before), kernels(params_after)
  return AfterKernel(
      drift=kernel_drift(k0, k1),
      alignment_before=kernel_alignment(k0, y_train),
      alignment_after=kernel_alignment(k1, y_train),
      accuracy_before=_kernel_regression_accuracy(k0, k0_test, y_train,
                                                  y_test, diag_reg),
      accuracy_after=_kernel_regression_accuracy(k1, k1_test, y_train, y_test,
                                                 diag_reg))


def plot_feature_learning(dial: Sequence[float],
                          results: Sequence[AfterKernel],
                          label: str = 'output scale alpha',
                          axes: Optional[Sequence] = None):
  """Drift, alignment and kernel-regression accuracy against a dial.

  Args:
    dial: the values of the dial (alpha, width, ...), one per result.
    results: `AfterKernel`s, one per dial value.
    label: the dial's axis label.
    axes: three matplotlib Axes, or None for a new figure.

  Returns:
    The three Axes.
  """
  if len(dial) != len(results):
    raise ValueError(f'{len(dial)} dial values for {len(results)} results.')
  if axes is None:
    _, axes = _plotting.pyplot().subplots(1, 3, figsize=(13, 3.8))
  dial = np.asarray(dial, dtype=float)
  axes[0].loglog(dial, [r.drift for r in results], 'o-')
  axes[0].set_ylabel('kernel drift ||K_T - K_0|| / ||K_0||')
  axes[1].semilogx(dial, [r.alignment_before for r in results], 'o--',
                   label='initial NTK')
  axes[1].semilogx(dial, [r.alignment_after for r in results], 'o-',
                   label='after training')
  axes[1].set_ylabel('centered kernel-target alignment')
  axes[2].semilogx(dial, [r.accuracy_before for r in results], 'o--',
                   label='initial NTK')
  axes[2].semilogx(dial, [r.accuracy_after for r in results], 'o-',
                   label='after kernel')
  axes[2].set_ylabel('kernel regression test accuracy')
  for ax in axes:
    ax.set_xlabel(label)
  axes[1].legend()
  return axes
