"""Normalization: `LayerNorm` over the channel axis and, optionally, over
spatial axes too.

Finite network (as neural-tangents): the features are centered and scaled
by their mean and variance over the axes in `axis`, which must include the
channel axis; for each sample and each position of the axes NOT in `axis`
(a "group" g of positions p, all positions when `axis` holds every spatial
axis, one position for axis=-1),

    y_c(p) = (h_c(p) - mean_{p' in g, c'} h_c'(p'))
             / sqrt(var_{p' in g, c'} h_c'(p') + eps).

Kernel. At infinite width the channel averages of a sample's features
concentrate on their expectations: per position the channel mean
m(p) = E[h(p)] and second moment q(p) = E[h(p)^2] (the same-position
entry of cov1). The group's mean and variance are averages of these over
the group's finitely many positions,

    M(g) = mean_{p in g} m(p),    V(g) = mean_{p in g} q(p) - M(g)^2,

so the layer is a fixed affine map per sample, y(p) = (h(p) - M) / s with
s = sqrt(V + eps), and for samples i, j (g, g' the groups of p, p')

    nngp'_ij(p, p') = (nngp_ij(p, p') - m_i(p) M_j(g') - M_i(g) m_j(p')
                       + M_i(g) M_j(g')) / (s_i(g) s_j(g')),
    ntk'_ij(p, p')  = ntk_ij(p, p') / (s_i(g) s_j(g')),

cov1' likewise, and the output's channel means are (m(p) - M(g)) / s(g).
The parameter gradients of the group mean and variance are averages of n
independent per-channel gradients, so their contribution to the NTK is
O(1/n). The means m come from the features' terms, so LayerNorm after a
ReLU (features with non-zero mean) is exact; neural-tangents implements
LayerNorm for Gaussian (zero-mean) inputs only and raises otherwise.

Only same-position entries q(p) and the per-position means enter M and V,
so normalizing over spatial axes keeps the layout: a pixel-diagonal kernel
in gives a pixel-diagonal kernel out (no covariances between positions are
needed, unlike pooling).

Normalizing over spatial axes without the channel axis has no infinite-width
limit of this kind: per channel the mean over finitely many positions stays
random, so the kernel would be the expectation of a nonlinear function of a
P-dimensional Gaussian vector. As in neural-tangents the kernel then raises
(the finite layer works). Normalizing over the batch axis couples the
samples of a batch (and would depend on how `kernel_fn` cuts the batch into
blocks): not implemented.

A Gaussian field stays Gaussian (scaled per sample); normalized non-Gaussian
features are one opaque term, so a nonlinearity directly after them raises
(put a Dense first, as transformer blocks do).
"""

from __future__ import annotations

from typing import Sequence, Union

import jax.numpy as jnp
import numpy as np

from ntkjax.kernel import Kernel
from ntkjax.stax import _features as features
from ntkjax.stax._features import KernelError
from ntkjax.stax._layer import Layer, check_nonnegative, layer, single_kernel


def _canonical_axes(axis, ndim: int, name: str) -> tuple:
  """`axis` as sorted non-negative axes of features of rank `ndim`."""
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f'{name}: axis {a} is out of range for features of '
                       f'rank {ndim}.')
  return tuple(sorted({int(a) % ndim for a in axes}))


def LayerNorm(axis: Union[int, Sequence[int]] = -1, eps: float = 1e-12,
              batch_axis: int = 0, channel_axis: int = -1) -> Layer:
  """Normalizes the features over `axis` (see the module docstring).

  Args:
    axis: the axes to normalize over; must contain the channel axis for the
      kernel, e.g. -1 (each position over its channels) or (1, 2, 3) for
      images (N, H, W, C) (each sample over all positions and channels).
    eps: added to the variance.
    batch_axis: only 0.
    channel_axis: only -1.

  Returns:
    A `Layer`.
  """
  name = f'LayerNorm(axis={axis})'
  if (batch_axis, channel_axis) != (0, -1):
    raise NotImplementedError(
        f'{name}: only batch_axis=0, channel_axis=-1 are supported; transpose '
        'your inputs to (batch, ..., channels).')
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  if not axes or not all(isinstance(a, (int, np.integer)) for a in axes):
    raise ValueError(f'{name}: axis must be an int or a non-empty sequence of '
                     f'ints, got {axis!r}.')
  check_nonnegative(eps, 'eps', name)

  def apply_fn(params, x, **kwargs):
    over = _canonical_axes(axis, x.ndim, name)
    mean = jnp.mean(x, over, keepdims=True)
    var = jnp.var(x, over, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)

  def spatial_dims(k: Kernel) -> tuple:
    """The normalized spatial axes, 0-based among the spatial axes."""
    ndim = len(k.shape1)
    over = _canonical_axes(axis, ndim, name)
    if ndim - 1 not in over:
      raise KernelError(
          f'{name}: the infinite-width kernel needs the channel axis '
          f'({ndim - 1}, or -1) in axis: only averages over infinitely many '
          'channels concentrate (as in neural-tangents). Add -1 to axis.')
    if 0 in over:
      raise NotImplementedError(
          f'{name}: normalizing over the batch axis couples the samples of a '
          'batch; its kernel is not implemented. Normalize over spatial axes '
          'and channels only.')
    dims = tuple(a - 1 for a in over if a != ndim - 1)
    if dims and getattr(k, 'mask1', None) is not None:
      raise NotImplementedError(
          f'{name}: normalizing over spatial axes of masked inputs '
          '(mask_constant) is not implemented.')
    return dims

  def kernel_map(k):
    k = single_kernel(k, name)
    dims = spatial_dims(k)
    spatial = k.spatial
    whole = features.collapse(k)
    m1, m2 = whole.mean1, whole.mean2          # (S..., N) channel means

    def group_mean(a):
      """mean over the group's positions, broadcast back to every one."""
      if not dims:
        return a
      return jnp.broadcast_to(jnp.mean(a, dims, keepdims=True), a.shape)

    big_m1, big_m2 = group_mean(m1), group_mean(m2)
    q1 = group_mean(spatial.variances(k.cov1))
    q2 = group_mean(spatial.variances(k.cov2))
    inv1 = 1. / jnp.sqrt(q1 - big_m1**2 + eps)
    inv2 = 1. / jnp.sqrt(q2 - big_m2**2 + eps)
    scale = spatial.outer(inv1, inv2)

    if dims:
      # E[(h - M)(h' - M')] = nngp - m m' + (m - M)(m' - M')
      c1, c2 = m1 - big_m1, m2 - big_m2
      nngp = k.nngp - spatial.outer(m1, m2) + spatial.outer(c1, c2)
      own1 = k.cov1 - spatial.self_outer(m1) + spatial.self_outer(c1)
      own2 = k.cov2 - spatial.self_outer(m2) + spatial.self_outer(c2)
      mean1, mean2 = c1 * inv1, c2 * inv2
    else:  # per position: M = m, the output means vanish
      nngp = k.nngp - spatial.outer(m1, m2)
      own1 = k.cov1 - spatial.self_outer(m1)
      own2 = k.cov2 - spatial.self_outer(m2)
      mean1, mean2 = jnp.zeros_like(m1), jnp.zeros_like(m2)

    # The output means are known per batch (not a map of the input's). A
    # zero-mean Gaussian field comes out as itself scaled by 1 / s per
    # sample and group, so branches of it can still be summed
    # (x + LayerNorm(x)).
    return features.linear_map_kernel(
        k, nngp * scale, k.ntk * scale, own1 * spatial.self_outer(inv1),
        own2 * spatial.self_outer(inv2), (lambda _: mean1, lambda _: mean2),
        spatial, k.shape1, k.shape2, rescales=(inv1, inv2))

  return layer(name, lambda key, shape: (shape, ()), apply_fn, kernel_map)
