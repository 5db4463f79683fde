"""Convolutions: `Conv` in 1, 2 or 3 spatial dimensions (`ConvTranspose` and
`ConvLocal` are in `_conv_variants.py`).

Finite network (NTK parameterization, the default; Novak et al. 2019,
Arora et al. 2019): for an input x of shape (N, S_1, ..., S_s, C) and a
filter of F = prod(filter_shape) positions,

    z(p) = W_std / sqrt(F C) sum_{a, c} W[a, c, :] x(p s + a - pad, c)
           + b_std b,                                   W, b ~ N(0, 1).

Kernel. Weights are shared across positions but independent across filter
offsets a and channels, so for output positions o, o' (per spatial axis,
with zero or circular padding of the input kernel):

    nngp'(o, o') = W_std^2 / F sum_a nngp(o s + a, o' s + a) + b_std^2,
    ntk'(o, o')  = nngp'(o, o') + W_std^2 / F sum_a ntk(o s + a, o' s + a)

(the sum runs along the diagonal a = a': a "diagonal convolution" of the
covariance; Novak et al. 2019, eq. 7; Arora et al. 2019). Same-position
covariances map to same-position covariances, so a pixel-diagonal kernel
stays pixel-diagonal: nngp'(o, o) = W_std^2 / F sum_a nngp(o s + a, o s + a)
+ b_std^2. The sums are separable over spatial axes; for a pair of position
axes each is `f` contiguous strided slices of the padded pair flattened into
one axis, summed in one vectorized pass (`diagonal_window_sum` says why).

Standard parameterization (Sohl-Dickstein et al. 2020), as for `Dense` (the
affine primitive of `_affine.py`) with fan-in F C: W ~ N(0, W_std^2 s0 /
(F C)), z = sum W x / sqrt(s0) + b, and
    ntk' = (F C / s0) (1/F) sum_a nngp(...) + W_std^2 (1/F) sum_a ntk(...)
           + [1 if there is a bias].
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax.numpy as jnp
from jax import lax

from ntkjax.kernel import Kernel
from ntkjax.stax import _features as features
from ntkjax.stax._features import KernelError
from ntkjax.stax._affine import Affine
from ntkjax.stax._layer import (Layer, layer, single_kernel,
                               zero_masked_outputs)

PADDINGS = ('VALID', 'SAME', 'CIRCULAR')
SPATIAL_LETTERS = {1: 'W', 2: 'HW', 3: 'DHW'}


# ----------------------------------------------------------------------------
# Geometry shared by convolutions and pooling.


def window_geometry(sizes: Sequence[int], window: Sequence[int],
                    strides: Sequence[int], padding: str, layer_name: str):
  """Output sizes and (low, high) paddings of a sliding window, per axis.

  Follows `lax.padtype_to_pads`: 'SAME' (and 'CIRCULAR') pad
  max((out - 1) s + f - n, 0) in total, the smaller half first.

  Args:
    sizes: input spatial sizes.
    window: window (filter) sizes.
    strides: strides.
    padding: 'VALID', 'SAME' or 'CIRCULAR'.
    layer_name: for error messages.

  Returns:
    (output sizes, ((lo, hi), ...)).
  """
  outs, pads = [], []
  for n, f, s in zip(sizes, window, strides):
    if padding == 'VALID':
      if f > n:
        raise KernelError(
            f"{layer_name}: the window ({f}) is larger than the input ({n}) "
            "along a spatial axis with padding='VALID'; use padding='SAME' or "
            'a smaller filter.')
      outs.append((n - f) // s + 1)
      pads.append((0, 0))
    else:
      out = -(-n // s)
      total = max((out - 1) * s + f - n, 0)
      outs.append(out)
      pads.append((total // 2, total - total // 2))
  return tuple(outs), tuple(pads)


def window_center_mask(mask, window: Sequence[int], strides: Sequence[int],
                       padding: str, name: str):
  """Per-position masks (N, S...) after a sliding window: an output position
  is masked when the input position at its window's centre is
  (neural-tangents' convention for Conv and pooling).

  Args:
    mask: boolean (N, S_1, ..., S_s), True = masked.
    window, strides, padding: the window's geometry.
    name: the layer, for errors.

  Returns:
    The output positions' mask.
  """
  sizes, pads = window_geometry(mask.shape[1:], window, strides, padding, name)
  for d, (out, f, s, (lo, _)) in enumerate(zip(sizes, window, strides, pads)):
    start = (f - 1) // 2 - lo
    mask = lax.slice_in_dim(mask, start, start + s * (out - 1) + 1, s, d + 1)
  return mask


def check_padding(padding: str, name: str) -> str:
  """Canonical padding name; a clear error otherwise."""
  if not isinstance(padding, str) or padding.upper() not in PADDINGS:
    raise ValueError(f'{name}: padding must be one of {PADDINGS}, got '
                     f'{padding!r}.')
  return padding.upper()


def pad_axes(a, axes: Sequence[int], pad: tuple, circular: bool):
  """Pads `a` by `pad` = (lo, hi) on each of `axes` (zeros or wrap-around)."""
  if pad == (0, 0):
    return a
  widths = [(0, 0)] * a.ndim
  for axis in axes:
    widths[axis] = pad
  return jnp.pad(a, widths, mode='wrap' if circular else 'constant')


def _strided(a, axis: int, start: int, count: int, stride: int):
  return lax.slice_in_dim(a, start, start + stride * (count - 1) + 1, stride,
                          axis)


def diagonal_window_sum(a, axes: Sequence[int], size: int, window: int,
                        stride: int, pad: tuple, circular: bool):
  """sum_a a[o s + a, o' s + a] over the axes (one axis: a[o s + a]).

  The "diagonal convolution" of a covariance along one spatial axis (its
  x1 and x2 position axes given as `axes`), after padding.

  A pair of adjacent axes, padded to rows of length w, is summed in
  flattened coordinates, (o s + a) w + (o' s + a) = s (o w + o') + a (w + 1):
  after merging the two axes (a free reshape) each term is one strided
  slice of one axis, a contiguous block shifted by a (w + 1), and the
  result, read as (size, w), keeps its first `size` columns. Why: written
  as 2-d slices of a padded array, XLA CPU fused the pad and the slices into
  every consumer (each fusion of the next activation, each pad of the next
  layer), recomputing them with per-element bounds checks, superlinearly in
  depth; in this form it materializes one padded array per axis pair and
  sums it in one vectorized pass (benchmark CNN, 3 layers: ~3x faster).
  """
  if not (len(axes) == 2 and axes[1] == axes[0] + 1
          and a.shape[axes[0]] == a.shape[axes[1]]):
    a = pad_axes(a, axes, pad, circular)
    parts = []
    for offset in range(window):
      part = a
      for axis in axes:
        part = _strided(part, axis, offset, size, stride)
      parts.append(part)
    return sum(parts[1:], parts[0])

  axis, n, (lo, hi) = axes[0], a.shape[axes[0]], pad
  # Row length. Zero padding needs only max(lo, hi) zero columns per row,
  # lo in front of the data, the rest after it: a window running past the
  # end of a row reads the next row's leading zeros (9 instead of 10 for a
  # SAME 3x3 filter: ~10% less memory traffic, measured 5-9% faster).
  # Circular padding pads both sides with data.
  width = n + lo + hi if circular else n + max(lo, hi)
  span = stride * (size * width - 1) + 1     # one slice: size x width outputs
  needed = span + (window - 1) * (width + 1)  # the last slice's end
  # Zero rows past the end keep the last slices in bounds; only outputs in
  # the dropped columns o' >= size read them.
  extra = max(0, -(-needed // width) - (n + lo + hi))
  if circular:
    a = pad_axes(a, axes, pad, True)
    pads = ((0, extra), (0, 0))
  else:
    pads = ((lo, hi + extra), (lo, width - n - lo))
  widths = [(0, 0)] * a.ndim
  widths[axis], widths[axis + 1] = pads
  if any(widths[axis]) or any(widths[axis + 1]):
    a = jnp.pad(a, widths)
  shape = a.shape
  flat = a.reshape(shape[:axis] + (shape[axis] * width,) + shape[axis + 2:])
  total = None
  for offset in range(window):
    start = offset * (width + 1)
    part = lax.slice_in_dim(flat, start, start + span, stride, axis)
    total = part if total is None else total + part
  total = total.reshape(shape[:axis] + (size, width) + shape[axis + 2:])
  return lax.slice_in_dim(total, 0, size, 1, axis + 1)


def box_window_sum(a, axis: int, size: int, window: int, stride: int,
                   pad: tuple, circular: bool):
  """sum_a a[o s + a] along one axis (a pooling window), after padding."""
  a = pad_axes(a, [axis], pad, circular)
  total = None
  for offset in range(window):
    part = _strided(a, axis, offset, size, stride)
    total = part if total is None else total + part
  return total


def spatial_axes(k: Kernel, d: int):
  """Axes of spatial axis d in the (positions-first) arrays of `k`: the
  pair of position axes of a full layout, or the one axis of a diagonal
  one (the same in nngp/ntk and in cov1/cov2)."""
  if k.spatial.full:
    return (2 * d, 2 * d + 1)
  return (d,)


def check_spatial_input(k: Kernel, ndim: int, name: str):
  """Raise unless `k` has `ndim` spatial axes."""
  if k.spatial.ndim != ndim:
    got = len(k.shape1)
    raise KernelError(
        f'{name} needs inputs of rank {ndim + 2} (batch, {ndim} spatial '
        f'axes, channels) but received features of rank {got} (shape '
        f'{tuple(k.shape1)}); reshape the inputs (e.g. add a channel axis '
        'of size 1) or use a layer for that rank.')


# ----------------------------------------------------------------------------
# Conv.


def channels_last_dimension_numbers(dimension_numbers, ndim: int, name: str):
  """lax dimension numbers; only channels-last layouts are supported."""
  letters = SPATIAL_LETTERS[ndim]
  default = ('N' + letters + 'C', letters + 'IO', 'N' + letters + 'C')
  if dimension_numbers is None:
    return default
  lhs, rhs, out = dimension_numbers
  if lhs != out or lhs[0] != 'N' or lhs[-1] != 'C' or rhs[-2:] != 'IO' or (
      rhs[:-2] != lhs[1:-1]):
    raise NotImplementedError(
        f'{name}: dimension_numbers={dimension_numbers!r} is not supported; '
        f'kernels need batch-first, channels-last features, e.g. {default}. '
        'Transpose your inputs (x.transpose(...)) to that layout.')
  return tuple(dimension_numbers)


def conv_arguments(kind: str, out_chan, filter_shape, strides, padding,
                    W_std, b_std, dimension_numbers, parameterization, s):
  """Validated arguments of a convolution-like layer.

  Returns:
    (name, filter_shape, strides, padding, lax dimension numbers, the
    layer's `Affine`).
  """
  try:
    filter_shape = tuple(filter_shape)
  except TypeError:
    raise ValueError(f'{kind}: filter_shape must be a sequence of 1, 2 or 3 '
                     f'positive ints (one per spatial axis), got '
                     f'{filter_shape!r}.') from None
  ndim = len(filter_shape)
  name = f'{kind}({out_chan}, {filter_shape})'
  if ndim not in SPATIAL_LETTERS:
    raise ValueError(f'{name}: filter_shape must have 1, 2 or 3 entries (one '
                     'per spatial axis).')
  if not isinstance(out_chan, int) or out_chan < 1:
    raise ValueError(f'{name}: out_chan must be a positive int.')
  if any(not isinstance(f, int) or f < 1 for f in filter_shape):
    raise ValueError(f'{name}: filter sizes must be positive ints.')
  strides = (1,) * ndim if strides is None else tuple(strides)
  if len(strides) != ndim or any(not isinstance(t, int) or t < 1
                                 for t in strides):
    raise ValueError(f'{name}: strides must be {ndim} positive ints, got '
                     f'{strides!r}.')
  padding = check_padding(padding, name)
  affine = Affine.checked(name, W_std, b_std, parameterization, s)
  dims = channels_last_dimension_numbers(dimension_numbers, ndim, name)
  return name, filter_shape, strides, padding, dims, affine


def check_rank(shape, ndim: int, name: str):
  if len(shape) != ndim + 2:
    raise ValueError(
        f'{name}: inputs must have rank {ndim + 2} (batch, {ndim} spatial '
        f'axes, channels); got shape {tuple(shape)}.')


def init_shared_filter(key, in_chan: int, out_chan: int, filter_shape: tuple,
                       affine: Affine):
  """Parameters (w, b) of a convolution with one filter for all positions:
  w (filter..., in, out), b (out,) or None (`Affine.init`, fan-in F in)."""
  return affine.init(key, filter_shape + (in_chan, out_chan), (out_chan,),
                     math.prod(filter_shape) * in_chan)


def Conv(out_chan: int, filter_shape: Sequence[int],
         strides: Optional[Sequence[int]] = None, padding: str = 'VALID',
         W_std=1., b_std=None, dimension_numbers=None,
         parameterization: str = 'ntk', s: tuple = (1, 1)) -> Layer:
  """A convolution with shared weights (see the module docstring).

  Args:
    out_chan: output channels of the finite network.
    filter_shape: filter size per spatial axis (1, 2 or 3 axes).
    strides: stride per spatial axis (default 1).
    padding: 'VALID', 'SAME' or 'CIRCULAR' (periodic: wrap-around).
    W_std: weight standard deviation.
    b_std: bias standard deviation; None means no bias.
    dimension_numbers: lax-style (lhs, rhs, out) specs; channels-last only,
      e.g. ('NHWC', 'HWIO', 'NHWC') (the default).
    parameterization: 'ntk' or 'standard'.
    s: width scalings (s0, s1) of the standard parameterization.

  Returns:
    A `Layer`.
  """
  name, filter_shape, strides, padding, dims, affine = conv_arguments(
      'Conv', out_chan, filter_shape, strides, padding, W_std, b_std,
      dimension_numbers, parameterization, s)
  ndim = len(filter_shape)
  window = math.prod(filter_shape)

  def geometry(input_shape):
    if len(input_shape) != ndim + 2:
      raise ValueError(
          f'{name}: inputs must have rank {ndim + 2} (batch, {ndim} spatial '
          f'axes, channels); got shape {tuple(input_shape)}.')
    return window_geometry(input_shape[1:-1], filter_shape, strides, padding,
                           name)

  def init_fn(key, input_shape):
    sizes, _ = geometry(input_shape)
    params = init_shared_filter(key, input_shape[-1], out_chan, filter_shape,
                                affine)
    return (input_shape[0],) + sizes + (out_chan,), params

  def apply_fn(params, x, mask=None, **kwargs):
    w, b = params
    if x.ndim != ndim + 2 or x.shape[-1] != w.shape[-2]:
      raise ValueError(
          f'{name}: input of shape {x.shape} does not fit parameters '
          f'initialized for {w.shape[-2]} channels and {ndim} spatial axes.')
    x = zero_masked_outputs(x, mask)  # masked positions contribute nothing
    _, pads = geometry(x.shape)
    if padding == 'CIRCULAR':
      x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),), mode='wrap')
      pads = ((0, 0),) * ndim
    y = lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dims)
    return affine.output(y, b, window * x.shape[-1])

  def kernel_map(k):
    k = single_kernel(k, name)
    check_spatial_input(k, ndim, name)
    sizes, pads = geometry(k.shape1)
    circular = padding == 'CIRCULAR'

    def convolve(a, batch_axes):
      del batch_axes  # the position axes are the same in nngp and cov
      for d in range(ndim):
        axes = spatial_axes(k, d)
        a = diagonal_window_sum(a, axes, sizes[d], filter_shape[d],
                                strides[d], pads[d], circular)
      return a / window

    # Masked input positions are zeros: their covariances drop out.
    return affine.kernel(k, convolve, window * k.channels,
                         (k.shape1[0],) + sizes + (out_chan,),
                         (k.shape2[0],) + sizes + (out_chan,),
                         arrays=features.masked_arrays(k))

  return layer(name, init_fn, apply_fn, kernel_map,
               mask_fn=lambda mask: window_center_mask(
                   mask, filter_shape, strides, padding, name))
