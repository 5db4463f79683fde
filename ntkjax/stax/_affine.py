"""The affine primitive shared by Dense, Conv, ConvTranspose and ConvLocal.

Each of these layers computes, per output position and channel, a linear
map of `fan_in` input entries (the channels, or a filter's window times the
channels) followed by a bias. Only the map differs (a matrix product, a
convolution, a transposed or unshared one); the scaling, the bias, the two
parameterizations and the kernel rule are the same, and live here:

NTK parameterization (default; Jacot et al. 2018):
    z = W_std / sqrt(fan_in) * (x . W) + b_std * b,     W, b ~ N(0, 1),
    nngp' = W_std^2 T[nngp] + b_std^2,     ntk' = nngp' + W_std^2 T[ntk].
Standard parameterization (Sohl-Dickstein et al. 2020):
    z = (x . W) / sqrt(s0) + b,   W ~ N(0, W_std^2 s0 / fan_in),
                                  b ~ N(0, b_std^2),
    nngp' = W_std^2 T[nngp] + b_std^2,
    ntk'  = (fan_in / s0) T[nngp] + W_std^2 T[ntk] + [1 if there is a bias],
since dz/dW = x / sqrt(s0) and dz/db = 1 (the NTK then grows with the
width, as it does for finite networks trained in that parameterization).
Here T is the layer's linear map of a covariance *averaged* over its
window (the identity for Dense; (1/F) sum over filter offsets for
convolutions), so that W_std^2 T[nngp] is the variance of the scaled sum.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax.kernel import Kernel
from ntkjax.stax import _features as features
from ntkjax.stax._layer import check_nonnegative

PARAMETERIZATIONS = ('ntk', 'standard')

# (array, batch_axes) -> array: a layer's linear map of a covariance
# (batch_axes: 2 for nngp/ntk, 1 for cov1/cov2).
CovarianceMap = Callable[[Any, int], Any]


# eq=False: W_std may be an array (differentiated), which has no == or hash.
@dataclasses.dataclass(frozen=True, eq=False)
class Affine:
  """Scaling, bias and kernel rule of one affine layer (module docstring).

  Build it with `Affine.checked`, which validates the arguments the way
  every affine layer reports them.

  Attributes:
    name: the layer's name, for error messages.
    W_std: weight standard deviation (a float or an array).
    b_std: bias standard deviation, or None for no bias.
    parameterization: 'ntk' or 'standard'.
    s0: the standard parameterization's input width scaling.
  """
  name: str
  W_std: Any
  b_std: Any
  parameterization: str
  s0: float

  @classmethod
  def checked(cls, name: str, W_std, b_std, parameterization: str,
              s: Sequence[float] = (1, 1)) -> 'Affine':
    """Validate a layer's affine arguments.

    Args:
      name: the layer's name.
      W_std, b_std: standard deviations (finite, >= 0; b_std may be None).
      parameterization: 'ntk' or 'standard'.
      s: width scalings `(s0, s1)` of the standard parameterization; only
        s0 enters the layer.

    Returns:
      An `Affine`.
    """
    if parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"{name}: parameterization must be 'ntk' or "
                       f"'standard', got {parameterization!r}.")
    check_nonnegative(W_std, 'W_std', name)
    check_nonnegative(b_std, 'b_std', name)
    try:
      s0, s1 = s
      ok = all(np.isfinite(v) and v > 0 for v in (float(s0), float(s1)))
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f'{name}: s={s!r} must be a pair (s0, s1) of positive '
                       'numbers (the width scalings of the standard '
                       'parameterization).')
    return cls(name, W_std, b_std, parameterization, float(s0))

  @property
  def has_bias(self) -> bool:
    return self.b_std is not None

  def init(self, key, weight_shape: tuple, bias_shape: tuple, fan_in: int):
    """Parameters (w, b): N(0, 1) entries, scaled by W_std sqrt(s0 /
    fan_in) and b_std in the standard parameterization (the NTK one scales
    in `output`). b is None without a bias."""
    key_w, key_b = jax.random.split(key)
    w = jax.random.normal(key_w, weight_shape)
    b = jax.random.normal(key_b, bias_shape) if self.has_bias else None
    if self.parameterization == 'standard':
      w = w * (self.W_std * jnp.sqrt(self.s0 / fan_in))
      b = None if b is None else b * self.b_std
    return w, b

  def output(self, contraction, b, fan_in: int):
    """The layer's output from `contraction` = x . W (the raw sum over the
    fan-in, any linear map) and the bias parameter b (or None)."""
    if self.parameterization == 'ntk':
      y = contraction * (self.W_std / jnp.sqrt(fan_in))
      return y if b is None else y + self.b_std * b
    y = contraction / jnp.sqrt(self.s0)
    return y if b is None else y + b

  def kernel(self, k: Kernel, transform: CovarianceMap, fan_in, shape1: tuple,
             shape2: tuple, arrays: Optional[tuple] = None,
             embed: Optional[CovarianceMap] = None) -> Kernel:
    """The output Kernel (a Gaussian field) of the affine layer.

    Args:
      k: the input Kernel.
      transform: the layer's window-averaged linear map T of covariances.
      fan_in: entries summed per output (channels x window size).
      shape1, shape2: the output's feature shapes (batch first).
      arrays: (nngp, ntk, cov1, cov2) to map instead of k's own (e.g. with
        masked positions zeroed), or None.
      embed: applied to the final moments (ConvLocal: zeros between
        different positions), or None.

    Returns:
      The output `Kernel`.
    """
    nngp_in, ntk_in, cov1_in, cov2_in = arrays or (k.nngp, k.ntk, k.cov1,
                                                  k.cov2)
    w2 = self.W_std**2
    b2 = self.b_std**2 if self.has_bias else 0.
    embed = embed or (lambda a, batch_axes: a)
    mapped_nngp = transform(nngp_in, 2)
    nngp = w2 * mapped_nngp + b2
    cov1 = embed(w2 * transform(cov1_in, 1) + b2, 1)
    # One batch (x2 = None) shares its variances: map them once.
    cov2 = cov1 if k.x1_is_x2 and cov2_in is cov1_in else embed(
        w2 * transform(cov2_in, 1) + b2, 1)
    # The raw inputs have no parameters: their NTK is 0, skip its pass.
    mapped_ntk = 0. if k.is_input else transform(ntk_in, 2)
    if self.parameterization == 'ntk':
      ntk = nngp + w2 * mapped_ntk
    else:
      ntk = (fan_in / self.s0) * mapped_nngp + w2 * mapped_ntk
      ntk = ntk + 1. if self.has_bias else ntk
    return features.gaussian_kernel(embed(nngp, 2), embed(ntk, 2), cov1, cov2,
                                    k, shape1=tuple(shape1),
                                    shape2=tuple(shape2))


def same_array(a, batch_axes: int):
  """The identity covariance map (Dense)."""
  del batch_axes
  return a
