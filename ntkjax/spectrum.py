"""Spectra of infinite-width kernels, and how they change with depth.

For the NTK Theta on a training set, gradient descent on the loss
|f - y|^2 / 2 moves the outputs by f <- f - eta Theta (f - y), so in the
eigenbasis of Theta (eigenvalues lambda_i) each component of the residual
decays by (1 - eta lambda_i) per step (Jacot et al. 2018; Lee et al. 2019):

* the largest stable learning rate is eta_max = 2 / lambda_max;
* the i-th component converges in about 1 / (eta lambda_i) steps (its time
  constant), so the slowest takes kappa / (eta lambda_max) with the condition
  number kappa = lambda_max / lambda_min.

(With ntkjax.predict's normalized loss |f - y|^2 / (2 |y|), Theta is divided
by |y|: multiply eta_max by |y|, as `predict.max_learning_rate` does.)

Depth (Xiao, Pennington & Schoenholz 2020, "Disentangling trainability and
generalization in deep neural networks"): for a fully connected network with
weight / bias standard deviations (W_std, b_std) and chi1 the mean-field
slope of `ntkjax.signal`,

* ordered phase (chi1 < 1): all correlations c -> 1, so the NNGP and the NTK
  tend to constant matrices; lambda_min / lambda_max -> 0 and the condition
  number grows without bound with depth (training becomes impossible);
* chaotic phase (chi1 > 1): the NTK's diagonal grows like chi1^L while its
  off-diagonal grows at the slower rate chi_c < chi1, so Theta / Theta_ii
  tends to the identity and the condition number tends to 1 (trainable, but
  the kernel no longer generalizes);
* on the critical line (chi1 = 1) both deviations are only polynomial in L.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax import _plotting, stax
from ntkjax.stax import Layer


class Spectrum(NamedTuple):
  """Eigen-summary of a symmetric kernel matrix.

  Attributes:
    eigenvalues: (N,) ascending (`jnp.linalg.eigvalsh`); for a stack of
      kernels (..., N).
    lambda_min, lambda_max: smallest and largest eigenvalue.
    condition_number: lambda_max / lambda_min (inf when lambda_min <= 0,
      i.e. a kernel singular to working precision).
    max_learning_rate: 2 / lambda_max, the stability limit of gradient
      descent on |f - y|^2 / 2 with this kernel as the NTK.
  """
  eigenvalues: jax.Array
  lambda_min: jax.Array
  lambda_max: jax.Array
  condition_number: jax.Array
  max_learning_rate: jax.Array


class DepthSweep(NamedTuple):
  """Kernel spectra of one architecture at depths 1 .. L_max.

  Attributes:
    depths: (D,) ints.
    ntk: a `Spectrum` of the NTK, each field with a leading (D,) axis.
    nngp: a `Spectrum` of the NNGP, the same.
    diagonal_error: (D,) max_i |nngp_ii - cov_i| / cov_i, a check of the
      kernel recursion itself: c = 1 on the diagonal is an unstable fixed
      point in the chaotic phase, so rounding errors there grow like chi1^L
      (for chi1 ~ 2, to O(1) by depth ~45 in float64). Spectra at depths
      where this is not small are not to be trusted.
    label: a description, used in plots.
  """
  depths: np.ndarray
  ntk: Spectrum
  nngp: Spectrum
  diagonal_error: np.ndarray
  label: str = ''


def _symmetric_matrix(kernel, name: str):
  k = jnp.asarray(kernel)
  if k.ndim < 2 or k.shape[-1] != k.shape[-2]:
    raise ValueError(f'{name}: expected a square (N, N) kernel matrix, got '
                     f'shape {k.shape}. For kernels with output axes, choose '
                     'trace_axes so that the kernel is (N, N).')
  return k


@jax.jit
def _spectrum_of(k) -> Spectrum:
  # The kernels are symmetric in exact arithmetic; symmetrize so eigvalsh
  # does not read only one (rounded) triangle.
  k = (k + jnp.swapaxes(k, -1, -2)) / 2
  eigenvalues = jnp.linalg.eigvalsh(k)
  lo, hi = eigenvalues[..., 0], eigenvalues[..., -1]
  condition = jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1.), jnp.inf)
  return Spectrum(eigenvalues, lo, hi, condition, 2. / hi)


def kernel_spectrum(kernel) -> Spectrum:
  """Eigenvalues, extremes, condition number and eta_max of a kernel matrix.

  Args:
    kernel: (N, N) symmetric matrix (or a stack (..., N, N)); e.g.
      `kernel_fn(x, None, 'ntk')`. Use float64 for ill-conditioned kernels.

  Returns:
    A `Spectrum`.
  """
  return _spectrum_of(_symmetric_matrix(kernel, 'kernel_spectrum'))


def spectrum(kernel_fn: Callable, x, get: str = 'ntk') -> Spectrum:
  """The `Spectrum` of `kernel_fn(x, None, get)` (Theta(X, X) or K(X, X)).

  Args:
    kernel_fn: an infinite-width `kernel_fn` (e.g. from `stax.serial`).
    x: (N, d) inputs.
    get: 'ntk' or 'nngp'.

  Returns:
    A `Spectrum`.
  """
  if get not in ('ntk', 'nngp'):
    raise ValueError(f"get={get!r}: choose 'ntk' or 'nngp'.")
  return kernel_spectrum(kernel_fn(x, None, get))


def convergence_times(eigenvalues, learning_rate: float):
  """Time constants 1 / (eta lambda_i) of gradient descent, in steps.

  Under f <- f - eta Theta (f - y) the residual's component along the i-th
  eigenvector shrinks by (1 - eta lambda_i) per step, i.e. by e after about
  1 / (eta lambda_i) steps (exactly, for gradient flow).

  Args:
    eigenvalues: eigenvalues of the NTK (e.g. `Spectrum.eigenvalues`).
    learning_rate: eta > 0.

  Returns:
    An array like `eigenvalues`; inf where lambda_i <= 0 (never converges).
  """
  if not learning_rate > 0:
    raise ValueError(f'learning_rate={learning_rate!r} must be > 0.')
  lam = jnp.asarray(eigenvalues)
  return jnp.where(lam > 0, 1. / (learning_rate * jnp.where(lam > 0, lam, 1.)),
                   jnp.inf)


# ----------------------------------------------------------------------------
# Depth sweeps.


def _fully_connected_sweep(x, max_depth: int, activation: Layer, W_std, b_std):
  """Kernels of serial([Dense, act] * L, Dense) for L = 1..max_depth.

  One pass: the hidden block's kernel map is applied L_max times and the
  readout's at every depth, instead of building L_max networks (L_max^2
  layer applications).
  """
  dense = stax.Dense(1, W_std, b_std)   # the width does not enter kernels
  kernel = dense.kernel_fn(x)
  outs = []
  for _ in range(max_depth):
    kernel = activation.kernel_fn(kernel)
    outs.append(dense.kernel_fn(kernel, get=_FIELDS))
    kernel = dense.kernel_fn(kernel)
  return outs


_FIELDS = ('nngp', 'ntk', 'cov1')


def _diagonal_error(nngp, cov):
  diagonal = jnp.diagonal(nngp, axis1=-2, axis2=-1)
  return jnp.max(jnp.abs(diagonal - cov) / jnp.abs(cov), axis=-1)


def depth_sweep(x, max_depth: int, *, network_fn: Optional[Callable] = None,
                activation: Optional[Layer] = None, W_std=1., b_std=0.,
                label: Optional[str] = None) -> DepthSweep:
  """NTK and NNGP spectra at depths 1 .. max_depth.

  Give either `network_fn(depth) -> Layer` (any architecture family), or an
  elementwise `activation` layer with `W_std`, `b_std` for the fully
  connected family

      serial(*[Dense(n, W_std, b_std), activation] * depth,
             Dense(1, W_std, b_std))

  (depth = number of hidden layers), computed in one pass over the layers.

  Args:
    x: (N, d) inputs.
    max_depth: largest depth (>= 1).
    network_fn: depth -> Layer.
    activation: e.g. `stax.Erf()`, for the fully connected family.
    W_std: its weight standard deviation.
    b_std: its bias standard deviation.
    label: plot label (default: describes the family).

  Returns:
    A `DepthSweep`.
  """
  if not isinstance(max_depth, (int, np.integer)) or max_depth < 1:
    raise ValueError(f'max_depth={max_depth!r} must be an int >= 1.')
  if (network_fn is None) == (activation is None):
    raise ValueError('depth_sweep: give exactly one of network_fn and '
                     'activation (with W_std, b_std).')
  depths = np.arange(1, max_depth + 1)
  if network_fn is not None:
    kernels = [network_fn(int(d)).kernel_fn(x, None, _FIELDS) for d in depths]
    label = label or getattr(network_fn, '__name__', 'network_fn')
  else:
    if not isinstance(activation, Layer):
      raise ValueError(f'activation={activation!r} must be a stax Layer '
                       'such as stax.Erf().')
    kernels = _fully_connected_sweep(x, int(max_depth), activation, W_std,
                                     b_std)
    label = label or (f'{activation.kernel_fn.name}, W_std^2={W_std**2:.3g}, '
                      f'b_std^2={b_std**2:.3g}')
  nngp, ntk, cov = (jnp.stack([getattr(k, name) for k in kernels])
                    for name in _FIELDS)
  return DepthSweep(depths, kernel_spectrum(ntk), kernel_spectrum(nngp),
                    np.asarray(_diagonal_error(nngp, cov)), label)



_TRUSTED_DIAGONAL_ERROR = 1e-6


def plot_depth_sweep(sweeps: Union[DepthSweep, Sequence[DepthSweep]],
                     axes=None, kernel: str = 'ntk'):
  """Condition number and lambda_min / lambda_max against depth.

  Args:
    sweeps: one `DepthSweep` or several (e.g. ordered, critical, chaotic).
    axes: two matplotlib Axes (default: a new 1 x 2 figure's).
    kernel: 'ntk' or 'nngp'.

  Returns:
    The two Axes: left the condition number (log scale), right
    lambda_min / lambda_max. Depths whose `diagonal_error` exceeds 1e-6
    are not drawn.
  """
  if isinstance(sweeps, DepthSweep):
    sweeps = [sweeps]
  if axes is None:
    _, axes = _plotting.pyplot().subplots(1, 2, figsize=(10, 4))
  for sweep in sweeps:
    s = getattr(sweep, kernel)
    # Depths where the recursion lost accuracy (see DepthSweep) are left out.
    trusted = np.asarray(sweep.diagonal_error) < _TRUSTED_DIAGONAL_ERROR
    cond = np.where(trusted, np.asarray(s.condition_number), np.nan)
    ratio = np.where(trusted, np.asarray(s.lambda_min / s.lambda_max), np.nan)
    axes[0].semilogy(sweep.depths, cond, '.-', label=sweep.label)
    axes[1].semilogy(sweep.depths, np.maximum(ratio, 1e-300), '.-',
                     label=sweep.label)
  axes[0].axhline(1., color='gray', lw=0.5)
  axes[0].set_ylabel(f'condition number of the {kernel.upper()}')
  axes[1].set_ylabel('lambda_min / lambda_max')
  for ax in axes:
    ax.set_xlabel('depth L (hidden layers)')
  axes[0].legend(fontsize='small')
  return axes
