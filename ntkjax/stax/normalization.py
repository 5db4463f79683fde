"""Normalization: `LayerNorm` over the channel axis.

Finite network: at each position, the features are centered and scaled by
their mean and standard deviation over the channels,

    y_c = (h_c - mean_c' h_c') / sqrt(var_c' h_c' + eps).

Kernel. At infinite width the channel mean and variance of each sample's
features concentrate on their expectations m = E[h] and v = E[h^2] - m^2
(per sample and position), so the layer is a fixed affine map per sample:

    nngp'_ij = (nngp_ij - m_i m_j) / sqrt((v_i + eps)(v_j + eps)),
    ntk'_ij  = ntk_ij / sqrt((v_i + eps)(v_j + eps))

(the parameter gradients of the channel mean and variance are averages of
n independent per-channel gradients, so their contribution to the NTK is
O(1/n)). The means m come from the features' terms, so LayerNorm after a
ReLU (features with non-zero mean) is exact; neural-tangents implements
LayerNorm for Gaussian (zero-mean) inputs only and raises otherwise.

A Gaussian field stays Gaussian (scaled per sample); normalized non-Gaussian
features are one opaque term, so a nonlinearity directly after them raises
(put a Dense first, as transformer blocks do).
"""

from __future__ import annotations

import jax.numpy as jnp

from ntkjax.stax import features
from ntkjax.stax.layer import Layer, check_nonnegative, layer, single_kernel


def LayerNorm(axis=-1, eps: float = 1e-12, batch_axis: int = 0,
              channel_axis: int = -1) -> Layer:
  """Normalizes each position's features over the channel axis.

  Args:
    axis: the axis to normalize over; only the channel axis (-1).
    eps: added to the variance.
    batch_axis, channel_axis: only (0, -1).

  Returns:
    A `Layer`.
  """
  name = f'LayerNorm(axis={axis})'
  if axis not in (-1, (-1,)) or (batch_axis, channel_axis) != (0, -1):
    raise NotImplementedError(
        f'{name}: only normalization over the channel axis (axis=-1, '
        'batch_axis=0, channel_axis=-1) is supported; normalizing over '
        'spatial axes too is not implemented yet.')
  check_nonnegative(eps, 'eps', name)

  def apply_fn(params, x, **kwargs):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)

  def kernel_map(k):
    k = single_kernel(k, name)
    spatial = k.spatial
    whole = features.collapse(k)
    m1, m2 = whole.mean1, whole.mean2
    inv1 = 1. / jnp.sqrt(spatial.variances(k.cov1) - m1**2 + eps)
    inv2 = 1. / jnp.sqrt(spatial.variances(k.cov2) - m2**2 + eps)
    a1, a2 = spatial.pair(inv1, inv2)
    scale = a1 * a2

    def own(cov, m, inv):
      centered = cov - spatial.self_outer(m)
      if not spatial.full:
        return centered * inv**2
      first, second = spatial.self_pair(inv)
      return centered * first * second

    return features.linear_map_kernel(
        k, (k.nngp - spatial.outer(m1, m2)) * scale, k.ntk * scale,
        own(k.cov1, m1, inv1), own(k.cov2, m2, inv2), jnp.zeros_like,
        spatial, k.shape1, k.shape2)

  return layer(name, lambda key, shape: (shape, ()), apply_fn, kernel_map)
