"""Transposed and locally connected convolutions: `ConvTranspose`,
`ConvLocal` (1, 2 or 3 spatial axes; `Conv` and the window geometry
they share are in `_conv.py`).

Transposed convolution (`ConvTranspose`, `lax.conv_transpose`: the input
dilated by the stride, s - 1 zeros between entries, then a stride-1
convolution without flipping the filter). Per axis, output o receives input
position i through filter entry k when i s = o + k - lo:

    z(o) = W_std / sqrt(F C) sum_{k, c} W[k, c, :] x(i(o, k), c) + b_std b,

over the k for which i(o, k) is an integer in [0, n). lo is lax's transposed
padding: VALID f - 1 (n s + max(f - s, 0) outputs); SAME n s outputs,
lo = f - 1 if s > f - 1 else ceil((f + s - 2) / 2); CIRCULAR (neural-
tangents' convention: the VALID output wrapped onto n s positions, its
first max(f - s, 0) // 2 dropped) n s outputs, i taken modulo n, lo = f - 1
- max(f - s, 0) // 2 (`transpose_geometry`). The weights are shared over
positions and independent over k and channels, so the derivation of Conv
gives, with the same offset k on both sides,

    nngp'(o, o') = W_std^2 / F sum_k nngp(i(o, k), i(o', k)) + b_std^2,
    ntk'(o, o')  = nngp'(o, o') + W_std^2 / F sum_k ntk(i(o, k), i(o', k))

(k over the offsets for which both positions exist): the diagonal
convolution of the stride-dilated, padded covariance. o = o' reads the same
input position, so pixel-diagonal stays pixel-diagonal. The normalization
is the fan-in F C of the finite network (neural-tangents' convention), not
the number of offsets that reach o (about F / s per axis): strided layers
shrink the variance, in the kernel as in the finite network. Standard
parameterization as for Conv.

Locally connected layer (`ConvLocal`; Novak et al. 2019, "LCN"): Conv with
a separate filter W[o] and bias b[o] at every output position o. The
weights of different positions are independent (and those of one position
independent over a and channels), so

    nngp'(o, o') = [o = o'] (W_std^2 / F sum_a nngp(o s + a, o s + a)
                             + b_std^2),
    ntk'(o, o')  = [o = o'] (nngp'(o, o)
                             + W_std^2 / F sum_a ntk(o s + a, o s + a));

the cross-position NTK vanishes too, as the contribution of the earlier
layers' parameters is sum W[o] W[o'] (...), whose mean is 0 for o != o'.
Only same-position covariances of the input enter, and on the pixel
diagonal the kernel is Conv's. In the full layout (a pooling layer
follows) the entries between different positions are zeros. Standard
parameterization as for Conv, the bias term 1 on the diagonal only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax.numpy as jnp
from jax import lax

from ntkjax.stax import _features as features
from ntkjax.stax._conv import (box_window_sum, check_rank, check_spatial_input,
                              conv_arguments, init_shared_filter,
                              spatial_axes, window_center_mask,
                              window_geometry)
from ntkjax.stax._layer import (Layer, layer, single_kernel,
                               zero_masked_outputs)


def transpose_geometry(sizes: Sequence[int], window: Sequence[int],
                       strides: Sequence[int], padding: str):
  """Output sizes and paddings of a transposed convolution, per axis.

  The transposed convolution is out(o) = sum_k W[k] D(o + k), k < f, with D
  the input dilated by the stride (s - 1 zeros between entries, D(i s + lo)
  = x(i)) and padded by (lo, hi): `lax.conv_transpose`'s paddings for VALID
  (n s + max(f - s, 0) outputs) and SAME (n s outputs). CIRCULAR (n s
  outputs, neural-tangents' convention: the VALID output folded onto n s
  positions, its first max(f - s, 0) // 2 entries dropped) is the same with
  D periodic: the dilated input padded to one period n s, then wrapped
  around by (lo, hi).

  Returns:
    (output sizes, ((lo, hi), ...)).
  """
  outs, pads = [], []
  for n, f, s in zip(sizes, window, strides):
    if padding == 'VALID':
      outs.append(n * s + max(f - s, 0))
      pads.append((f - 1, s - 1 + max(f - s, 0)))
    elif padding == 'SAME':
      lo = f - 1 if s > f - 1 else -(-(f + s - 2) // 2)
      outs.append(n * s)
      pads.append((lo, f + s - 2 - lo))
    else:
      crop = max(f - s, 0) // 2
      outs.append(n * s)
      pads.append((f - 1 - crop, crop))
  return tuple(outs), tuple(pads)


def dilate_and_pad(a, axes: Sequence[int], stride: int, pad: tuple,
                   circular: bool):
  """The array D of `transpose_geometry` along `axes` (one spatial axis:
  both position axes of a covariance, or the one axis of the features)."""
  zero = jnp.zeros((), a.dtype)
  config = [(0, 0, 0)] * a.ndim
  if not circular:
    for axis in axes:
      config[axis] = (pad[0], pad[1], stride - 1)
    return lax.pad(a, zero, config)
  for axis in axes:
    config[axis] = (0, stride - 1, stride - 1)   # one period, n s entries
  a = lax.pad(a, zero, config)
  widths = [(0, 0)] * a.ndim
  for axis in axes:
    widths[axis] = pad
  return jnp.pad(a, widths, mode='wrap')


def transposed_diagonal_sum(a, axes: Sequence[int], size: int, window: int,
                            stride: int, pad: tuple, circular: bool):
  """sum_k D[o + k, o' + k] (one axis: D[o + k]) with D = `dilate_and_pad`
  of `a`: the transposed convolution of a covariance along one spatial
  axis, same offset k on both sides."""
  a = dilate_and_pad(a, axes, stride, pad, circular)
  total = None
  for offset in range(window):
    part = a
    for axis in axes:
      part = lax.slice_in_dim(part, offset, offset + size, axis=axis)
    total = part if total is None else total + part
  return total


def ConvTranspose(out_chan: int, filter_shape: Sequence[int],
                  strides: Optional[Sequence[int]] = None,
                  padding: str = 'VALID', W_std=1., b_std=None,
                  dimension_numbers=None, parameterization: str = 'ntk',
                  s: tuple = (1, 1)) -> Layer:
  """A transposed (fractionally strided) convolution with shared weights.

  The finite network is `lax.conv_transpose` (no kernel flip), scaled like
  `Conv` (fan-in F C, F = prod(filter_shape)); see the module docstring for
  the paddings and the kernel.

  Args:
    out_chan: output channels of the finite network.
    filter_shape: filter size per spatial axis (1, 2 or 3 axes).
    strides: upsampling factor per spatial axis (default 1).
    padding: 'VALID' (n s + max(f - s, 0) outputs), 'SAME' (n s outputs)
      or 'CIRCULAR' (n s outputs, periodic).
    W_std: weight standard deviation.
    b_std: bias standard deviation; None means no bias.
    dimension_numbers: lax-style (lhs, rhs, out) specs; channels-last only,
      e.g. ('NHWC', 'HWIO', 'NHWC') (the default).
    parameterization: 'ntk' or 'standard' (as for `Conv`).
    s: width scalings (s0, s1) of the standard parameterization; only s0
      enters.

  Returns:
    A `Layer`.
  """
  name, filter_shape, strides, padding, dims, affine = conv_arguments(
      'ConvTranspose', out_chan, filter_shape, strides, padding, W_std, b_std,
      dimension_numbers, parameterization, s)
  ndim = len(filter_shape)
  window = math.prod(filter_shape)
  circular = padding == 'CIRCULAR'

  def geometry(input_shape):
    check_rank(input_shape, ndim, name)
    return transpose_geometry(input_shape[1:-1], filter_shape, strides,
                              padding)

  def init_fn(key, input_shape):
    sizes, _ = geometry(input_shape)
    params = init_shared_filter(key, input_shape[-1], out_chan, filter_shape,
                                affine)
    return (input_shape[0],) + sizes + (out_chan,), params

  def transpose(x, w):
    if circular:
      # The periodic dilated input, then a stride-1 VALID convolution: the
      # sum out(o) = sum_k W[k] D(o + k) of `transpose_geometry`.
      _, pads = geometry(x.shape)
      for d in range(ndim):
        x = dilate_and_pad(x, (1 + d,), strides[d], pads[d], True)
      return lax.conv_general_dilated(x, w, (1,) * ndim, 'VALID',
                                      dimension_numbers=dims)
    return lax.conv_transpose(x, w, strides, padding, dimension_numbers=dims)

  def mask_fn(mask):
    # An output position is masked when no unmasked input reaches it (then
    # a masked tail gives exactly the transposed conv of the truncated
    # input; the reference masks it when ANY masked input reaches it).
    kept = (~mask)[..., None].astype(jnp.float32)
    reached = transpose(kept, jnp.ones(filter_shape + (1, 1), jnp.float32))
    return reached[..., 0] < 0.5

  def apply_fn(params, x, mask=None, **kwargs):
    w, b = params
    if x.ndim != ndim + 2 or x.shape[-1] != w.shape[-2]:
      raise ValueError(
          f'{name}: input of shape {x.shape} does not fit parameters '
          f'initialized for {w.shape[-2]} channels and {ndim} spatial axes.')
    x = zero_masked_outputs(x, mask)  # masked positions contribute nothing
    y = transpose(x, w)
    return affine.output(y, b, window * x.shape[-1])

  def kernel_map(k):
    k = features.zero_masked(single_kernel(k, name))
    check_spatial_input(k, ndim, name)
    sizes, pads = geometry(k.shape1)

    def convolve(a, batch_axes):
      del batch_axes  # the position axes are the same in nngp and cov
      for d in range(ndim):
        a = transposed_diagonal_sum(a, spatial_axes(k, d), sizes[d],
                                    filter_shape[d], strides[d], pads[d],
                                    circular)
      return a / window

    return affine.kernel(k, convolve, window * k.channels,
                         (k.shape1[0],) + sizes + (out_chan,),
                         (k.shape2[0],) + sizes + (out_chan,))

  # o = o' reads the same input position at every offset: pixel-diagonal in,
  # pixel-diagonal out (the default, `keeps_layout`).
  return layer(name, init_fn, apply_fn, kernel_map, mask_fn=mask_fn)


def _local_embed(spatial_full: bool, sizes: Sequence[int]):
  """Same-position arrays (S..., batch) -> the full layout (S1, S1', ...,
  batch) with zeros between different positions; the identity for a
  pixel-diagonal layout."""
  def embed(a, batch_axes):
    if not spatial_full:
      return a
    ndim = len(sizes)
    out = a.reshape(sum(((n, 1) for n in sizes), ()) + a.shape[ndim:])
    for d, n in enumerate(sizes):
      shape = [1] * out.ndim
      shape[2 * d] = shape[2 * d + 1] = n
      out = out * jnp.eye(n, dtype=out.dtype).reshape(shape)
    return out
  return embed


def ConvLocal(out_chan: int, filter_shape: Sequence[int],
              strides: Optional[Sequence[int]] = None, padding: str = 'VALID',
              W_std=1., b_std=None, dimension_numbers=None,
              parameterization: str = 'ntk', s: tuple = (1, 1)) -> Layer:
  """A locally connected layer: a convolution with unshared weights.

  Every output position o has its own filter and bias:

      z(o) = W_std / sqrt(F C) sum_{a, c} W[o, c F + a, :] x(o s + a - lo, c)
             + b_std b[o]

  (parameters W of shape (out sizes..., F C, out_chan), input channel
  major as in `lax.conv_general_dilated_local` and neural-tangents, and b
  of shape (out sizes..., out_chan)); paddings as in `Conv`. See the
  module docstring for the kernel.

  Args:
    out_chan: output channels of the finite network.
    filter_shape: filter size per spatial axis (1, 2 or 3 axes).
    strides: stride per spatial axis (default 1).
    padding: 'VALID', 'SAME' or 'CIRCULAR'.
    W_std: weight standard deviation.
    b_std: bias standard deviation; None means no bias.
    dimension_numbers: lax-style (lhs, rhs, out) specs; channels-last only,
      e.g. ('NHWC', 'HWIO', 'NHWC') (the default).
    parameterization: 'ntk' or 'standard' (as for `Conv`).
    s: width scalings (s0, s1) of the standard parameterization; only s0
      enters.

  Returns:
    A `Layer`.
  """
  name, filter_shape, strides, padding, dims, affine = conv_arguments(
      'ConvLocal', out_chan, filter_shape, strides, padding, W_std, b_std,
      dimension_numbers, parameterization, s)
  ndim = len(filter_shape)
  window = math.prod(filter_shape)
  circular = padding == 'CIRCULAR'
  letters = 'abc'[:ndim]

  def geometry(input_shape):
    check_rank(input_shape, ndim, name)
    return window_geometry(input_shape[1:-1], filter_shape, strides, padding,
                           name)

  def init_fn(key, input_shape):
    sizes, _ = geometry(input_shape)
    fan_in = window * input_shape[-1]
    params = affine.init(key, sizes + (fan_in, out_chan), sizes + (out_chan,),
                         fan_in)
    return (input_shape[0],) + sizes + (out_chan,), params

  def apply_fn(params, x, mask=None, **kwargs):
    w, b = params
    x = zero_masked_outputs(x, mask)  # masked positions contribute nothing
    sizes, pads = geometry(x.shape)
    if tuple(w.shape[:-2]) != sizes or w.shape[-2] != window * x.shape[-1]:
      raise ValueError(
          f'{name}: input of shape {x.shape} does not fit parameters of shape '
          f'{w.shape} (output positions {tuple(w.shape[:-2])}, '
          f'{w.shape[-2]} = filter size x input channels); call init_fn '
          'with the input shape you apply to.')
    if circular:
      x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),), mode='wrap')
      pads = ((0, 0),) * ndim
    # (N, out..., C F), input channel major.
    patches = lax.conv_general_dilated_patches(
        x, filter_shape, strides, pads, dimension_numbers=dims,
        precision=lax.Precision.HIGHEST)
    y = jnp.einsum(f'n{letters}i,{letters}io->n{letters}o', patches, w,
                   precision=lax.Precision.HIGHEST)
    return affine.output(y, b, window * x.shape[-1])

  def kernel_map(k):
    k = features.zero_masked(single_kernel(k, name))
    check_spatial_input(k, ndim, name)
    sizes, pads = geometry(k.shape1)

    def convolve(a, batch_axes):
      # Only same-position covariances reach the output (Conv's diagonal).
      a = k.spatial.same_positions(a, batch_axes)
      for d in range(ndim):
        a = box_window_sum(a, d, sizes[d], filter_shape[d], strides[d],
                           pads[d], circular)
      return a / window

    return affine.kernel(k, convolve, window * k.channels,
                         (k.shape1[0],) + sizes + (out_chan,),
                         (k.shape2[0],) + sizes + (out_chan,),
                         embed=_local_embed(k.spatial.full, sizes))

  # The layout passes through: pixel-diagonal in and out before a Flatten;
  # before a pooling layer the full layout, with zeros between different
  # positions (a kernel map cannot tell which its output must be, so it
  # keeps its input's).
  return layer(name, init_fn, apply_fn, kernel_map,
               mask_fn=lambda mask: window_center_mask(
                   mask, filter_shape, strides, padding, name))
