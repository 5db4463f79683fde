"""Dropout: `Dropout(rate, mode)`.

Finite network (train mode; `rate` is the KEEP probability, as in
neural-tangents and jax.example_libraries.stax): each entry of the features
is kept with probability `rate` and rescaled,

    y = m h / rate,       m ~ Bernoulli(rate), independent per entry.

Kernel. The masks are independent of the features and of each other, and
E[m / rate] = 1, E[(m / rate)^2] = 1 / rate. So E[y(x_i, p) y(x_j, p')]
equals E[h h'] unless both factors use the same mask entry, i.e. the same
sample and the same position (in one forward pass over the batch):

    nngp'_ij(p, p') = nngp_ij(p, p') (1 + (1/rate - 1) [i = j] [p = p']),
    cov1'_i(p, p')  = cov1_i(p, p')  (1 + (1/rate - 1) [p = p']),

and the NTK likewise (the gradient of y with respect to earlier parameters
is m/rate times that of h). "Same sample" is known when x2 is None, also
inside blocked computations (`Kernel.same_sample`); for two different
batches x1, x2 the masks are independent and only cov1/cov2 change. This is
the kernel of one draw of the masks shared by all layers' gradients, as in
neural-tangents.

After dropout the features are no longer a Gaussian field (a Gaussian times
an independent Bernoulli), so a nonlinearity may not follow directly; a
Dense/Conv after it sees a Gaussian field with the covariance above (the
usual place for dropout: before an affine layer). Test mode is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax.stax import _features as features
from ntkjax.stax._layer import Layer, is_concrete, layer, single_kernel


def _scale_same_positions(a, spatial, scale, batch_axes: int):
  """a * (1 + (scale - 1) [p = p'] [same batch entries]).

  Args:
    a: an nngp/ntk (batch_axes=2) or cov (1) array, positions first.
    spatial: its `Spatial` layout.
    scale: a scalar, or an array broadcastable against the trailing batch
      axes (the same-sample indicator scaled) — the factor applied where
      the positions agree.
    batch_axes: number of trailing batch axes.

  Returns:
    The scaled array.
  """
  if not spatial.full:
    return a * scale
  sizes = a.shape[:-batch_axes][::2]
  same = None
  for d, size in enumerate(sizes):
    eye = jnp.eye(size, dtype=bool)
    shape = [1] * (2 * len(sizes))
    shape[2 * d], shape[2 * d + 1] = size, size
    eye = eye.reshape(shape)
    same = eye if same is None else same & eye
  same = same.reshape(same.shape + (1,) * batch_axes)
  return jnp.where(same, a * scale, a)


def Dropout(rate: float, mode: str = 'train') -> Layer:
  """Dropout with keep probability `rate` (see the module docstring).

  Args:
    rate: probability of KEEPING an entry, in (0, 1] (neural-tangents'
      convention; 1 is the identity).
    mode: 'train' (random masks; the kernel of one draw) or 'test' (the
      identity).

  Returns:
    A `Layer`. Its apply_fn needs `key=` (or `rng=`) in train mode.
  """
  name = f'Dropout(rate={rate})'
  if mode not in ('train', 'test'):
    raise ValueError(f"{name}: mode must be 'train' or 'test', got {mode!r}.")
  if is_concrete(rate):
    value = np.asarray(rate)
    if value.shape != () or not (0 < float(value) <= 1):
      raise ValueError(
          f'{name}: rate is the probability of keeping an entry and must be a '
          'number in (0, 1] (neural-tangents convention; rate=1 keeps all).')

  def init_fn(key, input_shape):
    return input_shape, ()

  def apply_fn(params, x, *, key=None, rng=None, **kwargs):
    if mode == 'test':
      return x
    key = rng if key is None else key
    if key is None:
      raise ValueError(f"{name}: apply_fn needs a random key in train mode: "
                       "pass key=jax.random.key(...) (or rng=...), or build "
                       "the layer with mode='test'.")
    keep = jax.random.bernoulli(key, rate, x.shape)
    return jnp.where(keep, x / rate, jnp.zeros((), x.dtype))

  def kernel_map(k):
    k = single_kernel(k, name)
    if mode == 'test':
      return k
    spatial = k.spatial
    factor = 1. / rate
    same = k.same_sample()
    cov1 = _scale_same_positions(k.cov1, spatial, factor, 1)
    cov2 = cov1 if k.cov2 is k.cov1 else _scale_same_positions(
        k.cov2, spatial, factor, 1)
    if same is None:
      nngp, ntk = k.nngp, k.ntk
    else:
      scale = jnp.where(same, factor, 1.).astype(k.nngp.dtype)
      nngp = _scale_same_positions(k.nngp, spatial, scale, 2)
      ntk = _scale_same_positions(k.ntk, spatial, scale, 2)
    return features.linear_map_kernel(
        k, nngp, ntk, cov1, cov2, lambda m: m, spatial, k.shape1, k.shape2,
        keeps_gaussian=False)

  return layer(name, init_fn, apply_fn, kernel_map)
