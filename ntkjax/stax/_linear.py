"""Affine layers: `Dense` and `Identity`.

Dense is the affine primitive (`_affine.py`: NTK or standard
parameterization, fan-in = input channels) with the identity as its
covariance map:
    NTK:       z = W_std / sqrt(n_in) * x W + b_std * b,
               nngp' = W_std^2 nngp + b_std^2,  ntk' = nngp' + W_std^2 ntk;
    standard:  z = x W / sqrt(s0) + b,
               ntk' = (n_in / s0) nngp + W_std^2 ntk + [1 if there is a bias].
"""

from __future__ import annotations

from ntkjax.stax._affine import Affine, same_array
from ntkjax.stax._layer import Layer, layer, single_kernel


def Dense(out_dim: int, W_std=1., b_std=None, batch_axis: int = 0,
          channel_axis: int = -1, parameterization: str = 'ntk',
          s: tuple = (1, 1)) -> Layer:
  """A fully connected layer acting on the last (channel) axis.

  Args:
    out_dim: output width of the finite network.
    W_std: weight standard deviation (a float, or an array to differentiate
      the kernel with respect to it).
    b_std: bias standard deviation; None means no bias.
    batch_axis: only the default 0 is supported.
    channel_axis: only the default -1 is supported.
    parameterization: 'ntk' or 'standard' (see `_affine.py`).
    s: width scalings `(s0, s1)` for the standard parameterization: the weight
      matrix has shape `(s0 * in, s1 * out)` in the width-scaling sense of
      Sohl-Dickstein et al. 2020; only `s0` enters the kernel.

  Returns:
    A `Layer`.
  """
  name = f'Dense({out_dim})'
  if not isinstance(out_dim, int) or out_dim < 1:
    raise ValueError(f'{name}: out_dim must be a positive int, got {out_dim!r}.')
  affine = Affine.checked(name, W_std, b_std, parameterization, s)
  if (batch_axis, channel_axis) != (0, -1):
    raise NotImplementedError(
        f'{name}: only batch_axis=0, channel_axis=-1 are supported; transpose '
        'your inputs to (batch, ..., channels).')

  def init_fn(key, input_shape):
    in_dim = input_shape[-1]
    params = affine.init(key, (in_dim, out_dim), (out_dim,), in_dim)
    return tuple(input_shape[:-1]) + (out_dim,), params

  def apply_fn(params, x, **kwargs):
    w, b = params
    if x.shape[-1] != w.shape[0]:
      raise ValueError(f'{name}: input has {x.shape[-1]} features but the '
                       f'parameters were initialized for {w.shape[0]}; call '
                       'init_fn with the input shape you apply to.')
    if w.shape[-1] != out_dim:
      raise ValueError(f'{name}: the weights have {w.shape[-1]} outputs, not '
                       f'{out_dim}: params of another network? Pass the '
                       "params returned by this network's init_fn.")
    return affine.output(x @ w, b, x.shape[-1])

  def kernel_map(k):
    k = single_kernel(k, name)
    return affine.kernel(k, same_array, k.channels,
                         k.shape1[:-1] + (out_dim,), k.shape2[:-1] + (out_dim,))

  return layer(name, init_fn, apply_fn, kernel_map)


def Identity() -> Layer:
  """The identity map; its kernel map leaves the Kernel unchanged."""
  return layer('Identity()', lambda key, shape: (shape, ()),
               lambda params, x, **kwargs: x, lambda k: k)
