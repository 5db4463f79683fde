"""Pooling and flattening: `AvgPool`, `SumPool`, `GlobalAvgPool`,
`GlobalSumPool`, `Flatten`.

These layers are linear and have no parameters, so their kernels are the
covariances of linear maps of the features (no new randomness):

* window pooling, per spatial axis with windows of f and stride s,
      nngp'(o, o') = c sum_{a, b} nngp(o s + a, o' s + b)
  (c = 1 / f^2 for averages, 1 for sums; with `normalize_edges` the average
  divides by the number of non-padding entries of each window). Unlike a
  convolution this mixes *different* positions a != b, so it needs the
  covariances between all pairs of positions: a pixel-diagonal kernel
  cannot be pooled (neural-tangents accepts one and silently pools its
  diagonal, which is not the pooled features' kernel).
* global pooling: nngp' = mean (or sum) over all pairs of positions.
* `Flatten`: the features become (N, P C) with P positions, so the
  channel-averaged second moment is the mean over positions of the
  same-position covariance, nngp' = (1/P) sum_p nngp(p, p) (Novak et al.
  2019): only the pixel diagonal is needed, so layers before a `Flatten`
  run pixel-diagonal (cost ~ N^2 P instead of N^2 P^2).

A pooled Gaussian field is again Gaussian (of the same random weights, so
its independence bookkeeping keeps the input's components). Pooled or
flattened non-Gaussian features are mixtures across positions; a
nonlinearity applied to them directly raises a `KernelError` (put a
Dense/Conv first, as every practical architecture does).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ntkjax.kernel import Kernel, Spatial
from ntkjax.stax import _features as features
from ntkjax.stax._conv import (box_window_sum, check_padding, spatial_axes,
                              window_center_mask, window_geometry)
from ntkjax.stax._features import KernelError
from ntkjax.stax._layer import (Layer, layer, single_kernel,
                               zero_masked_outputs)


def _needs_full(output_diagonal: bool) -> bool:
  del output_diagonal  # pooling needs all pairs of positions, whatever follows
  return False


def _any_layout(output_diagonal: bool) -> bool:
  del output_diagonal  # Flatten needs the pixel diagonal only
  return True


def _require_full(k: Kernel, name: str):
  if k.spatial.ndim == 0:
    raise KernelError(f'{name} needs spatial features (batch, spatial..., '
                      f'channels) but received shape {tuple(k.shape1)}.')
  if k.spatial.diagonal:
    raise KernelError(
        f'{name} needs the covariances between different positions, but the '
        'kernel it received keeps only same-position ones '
        '(diagonal_spatial=True). Call kernel_fn with diagonal_spatial=False '
        '(the default) or pool before the layer that dropped them.')


def _check_window(window_shape, strides, name):
  window_shape = tuple(window_shape)
  if not window_shape or any(not isinstance(w, int) or w < 1
                             for w in window_shape):
    raise ValueError(f'{name}: window_shape must be positive ints, got '
                     f'{window_shape!r}.')
  strides = (1,) * len(window_shape) if strides is None else tuple(strides)
  if len(strides) != len(window_shape) or any(
      not isinstance(t, int) or t < 1 for t in strides):
    raise ValueError(f'{name}: strides must be {len(window_shape)} positive '
                     f'ints, got {strides!r}.')
  return window_shape, strides


def _check_axes(batch_axis: int, channel_axis: int, name: str):
  if (batch_axis, channel_axis) != (0, -1):
    raise NotImplementedError(
        f'{name}: only batch_axis=0, channel_axis=-1 are supported; transpose '
        'your inputs to (batch, spatial..., channels).')


def _pool(window_shape, strides, padding, normalize_edges, average: bool,
          name: str) -> Layer:
  """AvgPool / SumPool."""
  window_shape, strides = _check_window(window_shape, strides, name)
  padding = check_padding(padding, name)
  ndim = len(window_shape)
  circular = padding == 'CIRCULAR'
  # Edge normalization only changes anything where SAME pads with zeros.
  by_count = average and normalize_edges and padding == 'SAME'

  def geometry(shape):
    if len(shape) != ndim + 2:
      raise ValueError(f'{name}: inputs must have rank {ndim + 2} (batch, '
                       f'{ndim} spatial axes, channels); got shape '
                       f'{tuple(shape)}.')
    return window_geometry(shape[1:-1], window_shape, strides, padding, name)

  def init_fn(key, input_shape):
    sizes, _ = geometry(input_shape)
    return (input_shape[0],) + sizes + (input_shape[-1],), ()

  def counts(sizes, pads, d, n_in):
    """Non-padding entries of each window along axis d (1-d array)."""
    ones = jnp.ones((n_in,))
    return box_window_sum(ones, 0, sizes[d], window_shape[d], strides[d],
                          pads[d], False)

  def apply_fn(params, x, mask=None, **kwargs):
    sizes, pads = geometry(x.shape)
    out = zero_masked_outputs(x, mask)
    for d in range(ndim):
      axis = 1 + d
      total = box_window_sum(out, axis, sizes[d], window_shape[d], strides[d],
                             pads[d], circular)
      if by_count:
        shape = [1] * x.ndim
        shape[axis] = sizes[d]
        total = total / counts(sizes, pads, d, x.shape[axis]).reshape(shape)
      elif average:
        total = total / window_shape[d]
      out = total
    return out

  def kernel_map(k):
    k = single_kernel(k, name)
    if k.spatial.ndim != ndim:
      raise KernelError(
          f'{name} needs inputs with {ndim} spatial axes (rank {ndim + 2}); '
          f'received features of shape {tuple(k.shape1)}.')
    _require_full(k, name)
    sizes, pads = geometry(k.shape1)

    def pool_axes(a, axes, n_in, d):
      for axis in axes:
        total = box_window_sum(a, axis, sizes[d], window_shape[d], strides[d],
                               pads[d], circular)
        if by_count:
          shape = [1] * total.ndim
          shape[axis] = sizes[d]
          total = total / counts(sizes, pads, d, n_in).reshape(shape)
        elif average:
          total = total / window_shape[d]
        a = total
      return a

    def pool(a):
      for d in range(ndim):
        a = pool_axes(a, spatial_axes(k, d), k.shape1[1 + d], d)
      return a

    def pool_means(m):
      for d in range(ndim):
        m = pool_axes(m, (d,), k.shape1[1 + d], d)
      return m

    shape1 = (k.shape1[0],) + sizes + (k.shape1[-1],)
    shape2 = (k.shape2[0],) + sizes + (k.shape2[-1],)
    nngp, ntk, cov1, cov2 = features.masked_arrays(k)  # masked: zeros
    return features.linear_map_kernel(
        k, pool(nngp), pool(ntk), pool(cov1), pool(cov2), pool_means,
        k.spatial, shape1, shape2, zero_masked_means=True)

  return layer(name, init_fn, apply_fn, kernel_map, _needs_full,
               mask_fn=lambda mask: window_center_mask(
                   mask, window_shape, strides, padding, name))



def AvgPool(window_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
            padding: str = 'VALID', normalize_edges: bool = False,
            batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """Average pooling over windows of the spatial axes.

  Args:
    window_shape: window size per spatial axis.
    strides: strides (default 1 per axis, as in neural-tangents).
    padding: 'VALID', 'SAME' or 'CIRCULAR'.
    normalize_edges: with 'SAME', divide by the number of non-padding
      entries of each window instead of the window size.
    batch_axis: only 0.
    channel_axis: only -1.

  Returns:
    A `Layer`.
  """
  name = f'AvgPool({tuple(window_shape)})'
  _check_axes(batch_axis, channel_axis, name)
  return _pool(window_shape, strides, padding, normalize_edges, True, name)


def SumPool(window_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
            padding: str = 'VALID', batch_axis: int = 0,
            channel_axis: int = -1) -> Layer:
  """Sum pooling over windows of the spatial axes (see `AvgPool`)."""
  name = f'SumPool({tuple(window_shape)})'
  _check_axes(batch_axis, channel_axis, name)
  return _pool(window_shape, strides, padding, False, False, name)


def _global(average: bool, name: str) -> Layer:
  def init_fn(key, input_shape):
    if len(input_shape) < 3:
      raise ValueError(f'{name}: inputs must have spatial axes (batch, '
                       f'spatial..., channels); got shape {tuple(input_shape)}.')
    return (input_shape[0], input_shape[-1]), ()

  def apply_fn(params, x, mask=None, **kwargs):
    axes = tuple(range(1, x.ndim - 1))
    if mask is None:
      return jnp.mean(x, axes) if average else jnp.sum(x, axes)
    total = jnp.sum(zero_masked_outputs(x, mask), axes)
    # Averages over the unmasked positions (a fully masked sample gives 0).
    return total / _unmasked_counts(mask)[:, None] if average else total

  def kernel_map(k):
    k = single_kernel(k, name)
    _require_full(k, name)
    # Sums over all (pairs of) positions, the leading axes; averages divide
    # by P1 P2 (P^2 for an input with itself, P for means), P the number of
    # unmasked positions of each sample.
    def reduce(a, batch_axes):
      # A product with a vector of ones, not jnp.sum: XLA CPU fuses the
      # last activation's formulas into a reduction (and splits them at
      # each select, materializing broadcast constants), but never into a
      # dot, so the last layer stays two fusions (benchmark CNN: 1.2x).
      rest = a.shape[a.ndim - batch_axes:]
      flat = a.reshape((-1,) + rest)
      ones = jnp.ones((flat.shape[0],), a.dtype)
      return jnp.tensordot(ones, flat, axes=1,
                           precision=jax.lax.Precision.HIGHEST)

    dtype = k.nngp.dtype
    if k.mask1 is None:
      count1 = jnp.full((k.shape1[0],), math.prod(k.shape1[1:-1]), dtype)
      count2 = jnp.full((k.shape2[0],), math.prod(k.shape2[1:-1]), dtype)
    else:
      count1 = _unmasked_counts(k.mask1).astype(dtype)
      count2 = _unmasked_counts(k.mask2).astype(dtype)
    if not average:
      count1, count2 = jnp.ones_like(count1), jnp.ones_like(count2)
    pair = 1. / (count1[:, None] * count2[None, :])
    nngp, ntk, cov1, cov2 = features.masked_arrays(k)
    return features.linear_map_kernel(
        k, reduce(nngp, 2) * pair, reduce(ntk, 2) * pair,
        reduce(cov1, 1) / count1**2, reduce(cov2, 1) / count2**2,
        (lambda m: reduce(m, 1) / count1, lambda m: reduce(m, 1) / count2),
        Spatial(0), (k.shape1[0], k.shape1[-1]), (k.shape2[0], k.shape2[-1]),
        zero_masked_means=True)

  return layer(name, init_fn, apply_fn, kernel_map, _needs_full,
               mask_fn=_all_positions_masked)


def _unmasked_counts(mask):
  """Unmasked positions per sample (at least 1, so a fully masked sample's
  average is 0, not NaN)."""
  counts = jnp.sum(~mask, tuple(range(1, mask.ndim)))
  return jnp.maximum(counts, 1)


def _all_positions_masked(mask):
  """A sample is masked once all of its positions are (global pooling,
  Flatten)."""
  return jnp.all(mask, tuple(range(1, mask.ndim)))


def GlobalAvgPool(batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """Mean over all spatial positions: (N, S..., C) -> (N, C)."""
  _check_axes(batch_axis, channel_axis, 'GlobalAvgPool')
  return _global(True, 'GlobalAvgPool()')


def GlobalSumPool(batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """Sum over all spatial positions: (N, S..., C) -> (N, C)."""
  _check_axes(batch_axis, channel_axis, 'GlobalSumPool')
  return _global(False, 'GlobalSumPool()')


def Flatten(batch_axis: int = 0, batch_axis_out: int = 0) -> Layer:
  """(N, S..., C) -> (N, prod(S) C), row-major (see the module docstring)."""
  name = 'Flatten()'
  if (batch_axis, batch_axis_out) != (0, 0):
    raise NotImplementedError(f'{name}: only batch_axis=0 is supported.')

  def init_fn(key, input_shape):
    return (input_shape[0], math.prod(input_shape[1:])), ()

  def apply_fn(params, x, mask=None, **kwargs):
    return zero_masked_outputs(x, mask).reshape(x.shape[0], -1)

  def kernel_map(k):
    k = single_kernel(k, name)
    if k.spatial.ndim == 0:
      return k  # already (batch, features)
    spatial = k.spatial

    def mean(a, batch_axes):
      a = spatial.same_positions(a, batch_axes)
      return jnp.mean(a, tuple(range(a.ndim - batch_axes)))

    shape1 = (k.shape1[0], math.prod(k.shape1[1:]))
    shape2 = (k.shape2[0], math.prod(k.shape2[1:]))
    # Masked positions are zeros among the P positions (neural-tangents).
    nngp, ntk, cov1, cov2 = features.masked_arrays(k)
    return features.linear_map_kernel(
        k, mean(nngp, 2), mean(ntk, 2), mean(cov1, 1), mean(cov2, 1),
        lambda m: jnp.mean(m, tuple(range(m.ndim - 1))), Spatial(0),
        shape1, shape2, keeps_gaussian=False, zero_masked_means=True)

  return layer(name, init_fn, apply_fn, kernel_map, _any_layout,
               mask_fn=_all_positions_masked)
