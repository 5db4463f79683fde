"""Affine layers: `Dense` and `Identity`.

Dense, NTK parameterization (default; Jacot et al. 2018):
    z = W_std / sqrt(n_in) * x W + b_std * b,     W, b ~ N(0, 1),
    nngp' = W_std^2 nngp + b_std^2,     ntk' = nngp' + W_std^2 ntk.
Standard parameterization (Sohl-Dickstein et al. 2020):
    z = x W / sqrt(s0) + b,   W ~ N(0, W_std^2 s0 / n_in),  b ~ N(0, b_std^2),
    nngp' = W_std^2 nngp + b_std^2,
    ntk'  = (n_in / s0) nngp + W_std^2 ntk + [1 if there is a bias],
since dz/dW_ij = x_i / sqrt(s0) and dz/db = 1. The NTK then grows with the
width, as it does for finite networks trained in that parameterization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ntkjax.stax import features
from ntkjax.stax.layer import (Layer, check_nonnegative, layer,
                               single_kernel)


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
    parameterization: 'ntk' or 'standard' (see module docstring).
    s: width scalings `(s0, s1)` for the standard parameterization: the weight
      matrix has shape `(s0 * in, s1 * out)` in the width-scaling sense of
      Sohl-Dickstein et al. 2020; only `s0` enters the kernel.

  Returns:
    A `Layer`.
  """
  name = f'Dense({out_dim})'
  if not isinstance(out_dim, int) or out_dim < 1:
    raise ValueError(f'{name}: out_dim must be a positive int, got {out_dim!r}.')
  if parameterization not in ('ntk', 'standard'):
    raise ValueError(f"{name}: parameterization must be 'ntk' or 'standard', "
                     f'got {parameterization!r}.')
  if (batch_axis, channel_axis) != (0, -1):
    raise NotImplementedError(
        f'{name}: only batch_axis=0, channel_axis=-1 are supported; transpose '
        'your inputs to (batch, ..., channels).')
  check_nonnegative(W_std, 'W_std', name)
  check_nonnegative(b_std, 'b_std', name)
  s0 = s[0]

  def init_fn(key, input_shape):
    in_dim = input_shape[-1]
    key_w, key_b = jax.random.split(key)
    w = jax.random.normal(key_w, (in_dim, out_dim))
    b = None if b_std is None else jax.random.normal(key_b, (out_dim,))
    if parameterization == 'standard':
      w = w * (W_std * jnp.sqrt(s0 / in_dim))
      b = None if b is None else b * b_std
    return tuple(input_shape[:-1]) + (out_dim,), (w, b)

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
    if parameterization == 'ntk':
      y = (W_std / jnp.sqrt(x.shape[-1])) * (x @ w)
      return y if b is None else y + b_std * b
    y = (x @ w) / jnp.sqrt(s0)
    return y if b is None else y + b

  def kernel_map(k):
    k = single_kernel(k, name)
    w2 = W_std**2
    b2 = 0. if b_std is None else b_std**2
    nngp, cov1, cov2 = (w2 * k.nngp + b2, w2 * k.cov1 + b2, w2 * k.cov2 + b2)
    if parameterization == 'ntk':
      ntk = nngp + w2 * k.ntk
    else:
      ntk = (k.channels / s0) * k.nngp + w2 * k.ntk
      ntk = ntk if b_std is None else ntk + 1.
    return features.gaussian_kernel(
        nngp, ntk, cov1, cov2, k, shape1=k.shape1[:-1] + (out_dim,),
        shape2=k.shape2[:-1] + (out_dim,))

  return layer(name, init_fn, apply_fn, kernel_map)


def Identity() -> Layer:
  """The identity map; its kernel map leaves the Kernel unchanged."""
  return layer('Identity()', lambda key, shape: (shape, ()),
               lambda params, x, **kwargs: x, lambda k: k)
