"""Signal propagation in deep random networks (mean-field theory).

For a fully connected network `h^{l+1} = W_std / sqrt(n) W phi(h^l) + b_std b`
at infinite width, the pre-activations of two inputs are Gaussian with
variances q and correlation c, which evolve layer to layer by
(Poole et al. 2016, "Exponential expressivity in deep neural networks
through transient chaos"; Schoenholz et al. 2017, "Deep information
propagation"):

    q   <- Q(q) = W_std^2 E[phi(sqrt(q) z)^2] + b_std^2,            z ~ N(0, 1)
    c   <- C(c) = (W_std^2 E[phi(u) phi(v)] + b_std^2) / Q(q),
                  (u, v) ~ N(0, q [[1, c], [c, 1]]).

At the fixed point `q*` of Q, C(1) = 1, and its slope there is

    chi1 = dC/dc (c = 1) = W_std^2 E[phi'(sqrt(q*) z)^2]

(Price's theorem: d E[phi(u) phi(v)] / d(q c) = E[phi'(u) phi'(v)]).
chi1 < 1: ordered phase, nearby inputs converge (c* = 1 is stable) and
gradients vanish; chi1 > 1: chaotic phase, c* < 1 and gradients explode;
chi1 = 1: the edge of chaos (He init for ReLU, W_std^2 = 2; Glorot for tanh
at b_std = 0, W_std^2 = 1). Depth scales (Schoenholz et al. 2017, eqs. 5, 9
and 15):

    xi_q^-1    = -log(W_std^2 E[phi'(u)^2 + phi(u) phi''(u)]) = -log Q'(q*),
    xi_c^-1    = -log chi_c,   chi_c = W_std^2 E[phi'(u) phi'(v)] at (q*, c*),
    xi_grad^-1 = -log chi1.

Q'(q*) is computed by differentiating Q (the heat equation
d/dq E[f(sqrt(q) z)] = E[f''] / 2 with f = phi^2 gives the form above), so
kinks such as ReLU's need no phi''. A depth scale is returned signed:
positive for decay, negative for growth (|xi| is the scale), and `inf` at
criticality (rate exactly 1).

Activations are any elementwise layer of `ntkjax.stax` (closed form or
quadrature) or a plain scalar callable `phi`. The Gaussian expectations are
read off the layer's own kernel map, applied to a one-entry Gaussian
`Kernel` with NTK 1: its NNGP is E[phi(u) phi(v)], its NTK E[phi'(u) phi'(v)]
and its diagonal E[phi(u)^2]. A callable is wrapped as
`stax.ElementwiseNumerical(phi)`, i.e. the library's quadrature
(`stax._quadrature`: Gauss rules split at the kinks and scaled to each
variance; `phi'` by forward-mode autodiff) rather than tensor
Gauss-Hermite, which converges only algebraically for kinked functions and
loses accuracy as the variance grows. The results are as accurate as the
layer's kernels: at the default degree 24, E[phi phi] and E[phi' phi']
are within ~2.3e-7 of sqrt(E[phi^2] E[phi^2]) at every variance from 1e-3
to 1e4 (tests/test_quadrature_accuracy.py); `stax.Tanh(deg=48)` or
`stax.ElementwiseNumerical(phi, deg=48)` reaches ~1e-11.

Numerics: fixed points are found by a log-spaced bracket scan followed by
bisection, in fixed iteration counts, so every function is `jit`-compiled
and vectorised over grids of (W_std, b_std). Use float64
(`jax.config.update('jax_enable_x64', True)`) for tight tolerances.
Degenerate cases are documented results, not errors: when Q has no finite
fixed point the variance diverges and `q_star` is `inf`, when the variance
decays to 0 (b_std = 0, ordered) `q_star` is 0; the other quantities are
then their limits, evaluated at q = 1e20 or q = 1e-20 (exact for positively
homogeneous phi such as ReLU, whose chi1 = W_std^2 / 2 at every q).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax import _plotting, stax
from ntkjax.kernel import Kernel
from ntkjax.stax import _features as features

Activation = Union[stax.Layer, Callable]

# The variance range searched for q*; outside it q* is reported as 0 or inf.
_Q_MIN, _Q_MAX = 1e-20, 1e20
_Q_POINTS_PER_DECADE = 4
# Correlation fixed points are searched for 1 - c in [1e-8, 2].
_GAP_MIN = 1e-8
_C_POINTS = 97
# Critical W_std is searched in [1e-2, 1e3].
_W_MIN, _W_MAX, _W_POINTS = 1e-2, 1e3, 101
# Bisection steps: each halves a bracket of width <= ln(10) / 4 (q), or
# ln(W_MAX / W_MIN) / 100 (W_std) in log space, so 64 steps reach the
# resolution of float64.
_BISECTIONS = 64


class MeanField(NamedTuple):
  """Mean-field quantities of a network family at given (W_std, b_std).

  Attributes:
    q_star: fixed point of the variance map (0: the variance decays, inf: it
      diverges).
    c_star: stable fixed point of the correlation map (1 in the ordered phase).
    chi1: W_std^2 E[phi'(u)^2] at q*.
    chi_c: W_std^2 E[phi'(u) phi'(v)] at (q*, c*) (= chi1 when c* = 1).
    q_slope: Q'(q*), the slope of the variance map at its fixed point.
    xi_q, xi_c, xi_grad: depth scales -1 / log of q_slope, chi_c, chi1.
  """
  q_star: jax.Array
  c_star: jax.Array
  chi1: jax.Array
  chi_c: jax.Array
  q_slope: jax.Array
  xi_q: jax.Array
  xi_c: jax.Array
  xi_grad: jax.Array


class DepthScales(NamedTuple):
  """Depth scales (Schoenholz et al. 2017); signed, inf at criticality."""
  xi_q: jax.Array
  xi_c: jax.Array
  xi_grad: jax.Array


class PhaseDiagram(NamedTuple):
  """`MeanField` quantities on a grid, and the critical line.

  Attributes:
    W_std: (nW,) grid of weight standard deviations.
    b_std: (nb,) grid of bias standard deviations.
    mean_field: a `MeanField` of (nb, nW) arrays (rows: b_std).
    critical_W_std: (nb,) the W_std with chi1 = 1 at each b_std (NaN where
      none lies in [1e-2, 1e3]).
  """
  W_std: np.ndarray
  b_std: np.ndarray
  mean_field: MeanField
  critical_W_std: np.ndarray


class LayerStatistics(NamedTuple):
  """Per-layer signal statistics of a network, read off its kernel maps.

  Attributes (leading axis: layers, in order):
    q1: (L, N1) variances E[h(x1_i)^2] of each layer's features.
    q2: (L, N2) the same for x2.
    c: (L, N1, N2) correlations nngp_ij / sqrt(q1_i q2_j).
    chi: (L, N1, N2) the layer's gain on the NTK it receives: the kernel
      maps are affine in the incoming NTK, ntk' = chi * ntk + ..., with
      chi = W_std^2 for a Dense layer and E[phi'(u) phi'(v)] for an
      activation; for a Dense + activation block (pass it as one layer)
      the diagonal of chi is chi1 at that layer's variance, the off-diagonal
      chi_c. It is the factor by which the squared gradient norm grows
      backwards through the layer.
  """
  q1: jax.Array
  q2: jax.Array
  c: jax.Array
  chi: jax.Array


# ----------------------------------------------------------------------------
# Gaussian expectations from an activation's kernel map.


def _gaussian_kernel(q, c, ntk):
  """A one-entry Kernel of a centred Gaussian pair: variances q, correlation c.

  This is the only place that builds a `Kernel` by hand (the same way
  `stax.Dense` builds its output).
  """
  q = jnp.asarray(q)
  nngp = jnp.reshape(c * q, (1, 1))
  ntk = jnp.broadcast_to(jnp.asarray(ntk, nngp.dtype), (1, 1))
  cov = jnp.reshape(q, (1,))
  like = Kernel(nngp, ntk, cov, cov, shape1=(1, 1), shape2=(1, 1))
  return features.gaussian_kernel(nngp, ntk, cov, cov, like)


class _Moments(NamedTuple):
  second: jax.Array   # E[phi(u)^2]
  cross: jax.Array    # E[phi(u) phi(v)]
  slopes: jax.Array   # E[phi'(u) phi'(v)]


def _check_activation_layer(layer: stax.Layer) -> None:
  try:
    _, params = layer.init_fn(jax.random.PRNGKey(0), (1, 2))
  except Exception as error:  # a branching layer, a non-FC layer, ...
    raise ValueError(f'activation: {layer.kernel_fn!r} is not an elementwise '
                     f'activation layer ({error}).') from None
  if jax.tree.leaves(params):
    raise ValueError(
        f'activation: {layer.kernel_fn!r} has parameters; pass a '
        'parameter-free elementwise layer such as stax.Relu() or stax.Tanh() '
        '(W_std and b_std are arguments of the signal functions).')


@functools.lru_cache(maxsize=64)
def _layer_for_callable(phi: Callable) -> stax.Layer:
  return stax.ElementwiseNumerical(phi)


def _as_layer(activation) -> stax.Layer:
  """The activation as a stax Layer (callables are wrapped for quadrature)."""
  if isinstance(activation, stax.Layer):
    _check_activation_layer(activation)
    return activation
  if callable(activation):
    try:
      return _layer_for_callable(activation)
    except TypeError:  # unhashable callable: no caching
      return stax.ElementwiseNumerical(activation)
  raise ValueError(
      f'activation must be an elementwise stax layer (e.g. stax.Relu()) or a '
      f'scalar callable phi(x); got {activation!r}.')


def _moments_fn(layer: stax.Layer) -> Callable:
  """(q, c) -> _Moments for (u, v) ~ N(0, q [[1, c], [c, 1]])."""
  kernel_fn = layer.kernel_fn

  def moments(q, c):
    out = kernel_fn(_gaussian_kernel(q, c, 1.))
    return _Moments(out.cov1[0], out.nngp[0, 0], out.ntk[0, 0])
  return moments


# ----------------------------------------------------------------------------
# Fixed points, in fixed iteration counts (jit- and vmap-friendly).


def _bisect(f, lo, hi, steps: int = _BISECTIONS):
  """Midpoint of [lo, hi] after `steps` bisections keeping f(lo) >= 0 > f(hi).
  """
  def body(_, bracket):
    lo, hi = bracket
    mid = (lo + hi) / 2
    keep_lo = f(mid) < 0
    return jnp.where(keep_lo, lo, mid), jnp.where(keep_lo, mid, hi)
  lo, hi = jax.lax.fori_loop(0, steps, body, (lo, hi))
  return (lo + hi) / 2


def _log_q_grid(q0: float) -> np.ndarray:
  decades = np.log10(_Q_MAX) - np.log10(_Q_MIN)
  grid = np.linspace(np.log(_Q_MIN), np.log(_Q_MAX),
                     int(decades * _Q_POINTS_PER_DECADE) + 1)
  return np.unique(np.append(grid, np.log(q0)))


def _q_star(moments, w2, b2, q0: float):
  """The fixed point of Q reached by iterating from q0 (monotone Q).

  If Q(q0) >= q0 the iteration rises to the first root above q0 (inf if Q
  stays above the diagonal up to 1e20); otherwise it falls to the last root
  below q0 (0 if none above 1e-20). Bracketed on a log grid, then bisected.
  """
  grid = _log_q_grid(q0)
  start = int(np.searchsorted(grid, np.log(q0)))
  t = jnp.asarray(grid)

  def g(log_q):
    q = jnp.exp(log_q)
    return w2 * moments(q, 1.).second + b2 - q

  values = jax.vmap(g)(t)
  nonneg = values >= 0
  index = jnp.arange(len(grid))
  rising = nonneg[start]
  # Rising: first grid point above q0 with g < 0; its predecessor has g >= 0.
  above = (~nonneg) & (index > start)
  first_above = jnp.argmax(above)
  # Falling: last grid point below q0 with g >= 0; its successor has g < 0.
  below = nonneg & (index < start)
  last_below = len(grid) - 1 - jnp.argmax(below[::-1])
  hi_index = jnp.where(rising, first_above, last_below + 1)
  hi_index = jnp.clip(hi_index, 1, len(grid) - 1)
  root = jnp.exp(_bisect(g, t[hi_index - 1], t[hi_index]))
  diverges = rising & ~jnp.any(above)
  vanishes = ~rising & ~jnp.any(below)
  return jnp.where(diverges, jnp.inf, jnp.where(vanishes, 0., root))


def _normalized_c_map(moments, w2, b2, q):
  """c -> (W^2 E[phi(u) phi(v)] + b^2) / (the same at c = 1).

  The denominator is Q(q) computed by the same 2-d rule as the numerator
  (not the 1-d rule of `second`), so C(1) = 1 exactly and C(c) - c near
  c = 1 is not swamped by the two rules' difference (~1e-9 for tanh at
  the default degree, larger than (chi1 - 1)(1 - c) there).
  """
  at_one = w2 * moments(q, 1.).cross + b2
  return lambda c: (w2 * moments(q, c).cross + b2) / at_one


def _c_star(moments, w2, b2, q, chi1):
  """Stable fixed point of the correlation map (1 unless chi1 > 1).

  In the chaotic phase C(c) < c just below c = 1 and C(c) >= c at c = -1
  (C is a correlation). The fixed point is the first crossing of c - C(c)
  from <= 0 to > 0 going up from c = -1, on a grid of 1 - c from 2 down to
  1e-8 (log spaced), then bisected in log(1 - c). Going up from -1 rather
  than down from 1 keeps quadrature noise, which is largest relative to
  c - C(c) ~ (chi1 - 1)(1 - c) right below c = 1, from creating a
  spurious root. A root within 1e-8 of 1 is reported as 1.
  """
  log_gaps = jnp.linspace(np.log(2.), np.log(_GAP_MIN), _C_POINTS)
  c_map = _normalized_c_map(moments, w2, b2, q)

  def g(log_gap):
    c = 1. - jnp.exp(log_gap)
    return c - c_map(c)

  values = jax.vmap(g)(log_gaps)
  crossing = (values[:-1] <= 0) & (values[1:] > 0)
  first = jnp.argmax(crossing)
  found = jnp.any(crossing) & (chi1 > 1)
  # In log(1 - c), g > 0 at the smaller gap (log_gaps[first + 1]).
  gap = jnp.exp(_bisect(g, log_gaps[first + 1], log_gaps[first]))
  return jnp.where(found, 1. - gap, 1.)


def _depth_scale(rate):
  """-1 / log|rate|: signed depth scale, inf where the rate is exactly 1."""
  log_rate = jnp.log(jnp.abs(rate))
  return jnp.where(log_rate == 0, jnp.inf,
                   -1. / jnp.where(log_rate == 0, 1., log_rate))


def _evaluation_variance(q_star):
  return jnp.clip(q_star, _Q_MIN, _Q_MAX)


def _mean_field_point(moments, w_std, b_std, q0: float) -> MeanField:
  w2, b2 = w_std**2, b_std**2
  q_star = _q_star(moments, w2, b2, q0)
  q = _evaluation_variance(q_star)
  chi1 = w2 * moments(q, 1.).slopes
  q_slope = w2 * jax.grad(lambda s: moments(s, 1.).second)(q)
  c_star = _c_star(moments, w2, b2, q, chi1)
  chi_c = w2 * moments(q, c_star).slopes
  return MeanField(q_star, c_star, chi1, chi_c, q_slope, _depth_scale(q_slope),
                   _depth_scale(chi_c), _depth_scale(chi1))


def _chi1_point(moments, w_std, b_std, q0: float):
  w2 = w_std**2
  q = _evaluation_variance(_q_star(moments, w2, b_std**2, q0))
  return w2 * moments(q, 1.).slopes


def _critical_at_zero_bias(moments):
  """(applies, W_c) at b_std = 0 when q = 0 is a fixed point of Q.

  If phi(0) = 0, then with no bias Q(q) ~ W_std^2 S0 q as q -> 0, where S0 =
  lim E[phi'(sqrt(q) z)^2] = phi'(0)^2 (1/2 for ReLU, its one-sided mean).
  Below W_c = 1 / sqrt(S0) the variance decays to q* = 0, where chi1 =
  W_std^2 S0 < 1; at W_c q* leaves 0 and chi1 = 1. So W_c is exact there:
  1 for tanh (Glorot & Bengio 2010), sqrt(pi) / 2 for erf, sqrt(2) for
  ReLU. The bisection cannot find it as precisely: above W_c, chi1 - 1 is
  of second order in q* ~ W_std - W_c, so a quadrature error eps moves
  its root by ~sqrt(eps) (2e-4 for tanh and erf).
  """
  at_zero = moments(_Q_MIN, 1.)
  s0 = at_zero.slopes
  # phi(0) = 0 <=> E[phi(sqrt(q) z)^2] = O(q): S0 q to first order.
  applies = (s0 > 0) & (at_zero.second <= 2 * s0 * _Q_MIN)
  return applies, 1. / jnp.sqrt(jnp.where(s0 > 0, s0, 1.))


def _critical_point(moments, b_std, q0: float):
  """Smallest W_std in [1e-2, 1e3] with chi1 >= 1 (NaN if none); at
  b_std = 0 with phi(0) = 0, the exact 1 / sqrt(S0)
  (`_critical_at_zero_bias`)."""
  applies, exact = _critical_at_zero_bias(moments)
  applies = applies & (b_std == 0) & (exact >= _W_MIN) & (exact <= _W_MAX)
  log_w = jnp.linspace(np.log(_W_MIN), np.log(_W_MAX), _W_POINTS)
  chi1_at = lambda s: _chi1_point(moments, jnp.exp(s), b_std, q0)
  below = jax.vmap(chi1_at)(log_w) < 1
  first = jnp.argmax(~below)
  found = jnp.any(~below) & (first > 0)
  first = jnp.clip(first, 1, _W_POINTS - 1)
  # 1 - chi1 is > 0 at the lower end of the bracket and <= 0 at the upper.
  log_root = _bisect(lambda s: 1. - chi1_at(s), log_w[first - 1], log_w[first])
  return jnp.where(applies, exact, jnp.where(found, jnp.exp(log_root), jnp.nan))


@functools.lru_cache(maxsize=64)
def _compiled(layer: stax.Layer, what: str, q0: float):
  moments = _moments_fn(layer)
  if what == 'mean_field':
    point = lambda w, b: _mean_field_point(moments, w, b, q0)
  elif what == 'chi1':
    point = lambda w, b: _chi1_point(moments, w, b, q0)
  else:
    point = lambda _, b: _critical_point(moments, b, q0)
  return jax.jit(jax.vmap(point))


@functools.lru_cache(maxsize=64)
def _compiled_map(layer: stax.Layer, what: str):
  """Jitted, vectorised Q(q; W, b) or C(c; q, W, b) (one compile per layer)."""
  moments = _moments_fn(layer)
  if what == 'q':
    point = lambda q, w, b: w**2 * moments(q, 1.).second + b**2
  else:
    point = lambda c, q, w, b: _normalized_c_map(moments, w**2, b**2, q)(c)
  return jax.jit(jax.vmap(point))


def _checked(value, name: str, allow_zero: bool = True) -> np.ndarray:
  array = np.asarray(value, dtype=float)
  if not np.all(np.isfinite(array)) or np.any(array < 0) or (
      not allow_zero and np.any(array == 0)):
    bound = '>= 0' if allow_zero else '> 0'
    raise ValueError(f'{name}={value!r} must be finite and {bound} (it is a '
                     'standard deviation or a variance).')
  return array


def _on_grid(layer, what, w_std, b_std, q0):
  """Evaluate a compiled point function on broadcast (W_std, b_std)."""
  w = _checked(w_std, 'W_std')
  b = _checked(b_std, 'b_std')
  q0 = float(_checked(q0, 'q0', allow_zero=False))
  shape = np.broadcast_shapes(w.shape, b.shape)
  dtype = jnp.result_type(float)
  flat_w = jnp.asarray(np.broadcast_to(w, shape).ravel(), dtype)
  flat_b = jnp.asarray(np.broadcast_to(b, shape).ravel(), dtype)
  out = _compiled(layer, what, q0)(flat_w, flat_b)
  return jax.tree.map(lambda a: a.reshape(shape), out)


# ----------------------------------------------------------------------------
# Public functions.


def q_map(activation: Activation, q, W_std=1., b_std=0.):
  """The variance map Q(q) = W_std^2 E[phi(sqrt(q) z)^2] + b_std^2.

  Args:
    activation: an elementwise stax layer or a scalar callable phi.
    q: input variance(s) (>= 0), broadcast against W_std and b_std.
    W_std: weight standard deviation(s).
    b_std: bias standard deviation(s).

  Returns:
    Q(q), an array of the broadcast shape.
  """
  layer = _as_layer(activation)
  q = _checked(q, 'q')
  w, b = _checked(W_std, 'W_std'), _checked(b_std, 'b_std')
  shape = np.broadcast_shapes(q.shape, w.shape, b.shape)
  flat = [jnp.asarray(np.broadcast_to(a, shape).ravel(), jnp.result_type(float))
          for a in (q, w, b)]
  return _compiled_map(layer, 'q')(*flat).reshape(shape)


def correlation_map(activation: Activation, c, W_std=1., b_std=0., q=None):
  """The correlation map C(c) = (W^2 E[phi(u) phi(v)] + b^2) / Q(q).

  (u, v) ~ N(0, q [[1, c], [c, 1]]); at q = q* (the default) Q(q*) = q* and
  this is the map of Poole et al. 2016, eq. 5. Normalizing by Q(q) keeps
  it a correlation (C(1) = 1) at any q; Q(q) is taken as the numerator at
  c = 1 (the same quadrature), so C(1) = 1 exactly.

  Args:
    activation: an elementwise stax layer or a scalar callable phi.
    c: correlation(s) in [-1, 1].
    W_std: weight standard deviation (a scalar).
    b_std: bias standard deviation (a scalar).
    q: input variance; None for q*(W_std, b_std).

  Returns:
    C(c), an array shaped like c.
  """
  layer = _as_layer(activation)
  c = np.asarray(c, dtype=float)
  if np.any(np.abs(c) > 1):
    raise ValueError(f'c={c!r} must lie in [-1, 1] (a correlation).')
  w = float(_checked(W_std, 'W_std'))
  b = float(_checked(b_std, 'b_std'))
  if q is None:
    q = q_star(layer, w, b)
  q = float(np.clip(_checked(q, 'q'), _Q_MIN, _Q_MAX))
  dtype = jnp.result_type(float)
  flat = jnp.asarray(c.ravel(), dtype)
  fill = lambda v: jnp.full(flat.shape, v, dtype)
  return _compiled_map(layer, 'c')(flat, fill(q), fill(w), fill(b)).reshape(
      c.shape)


def mean_field(activation: Activation, W_std=1., b_std=0.,
               q0: float = 1.) -> MeanField:
  """All mean-field quantities at (W_std, b_std), vectorised over both.

  Args:
    activation: an elementwise stax layer or a scalar callable phi.
    W_std: weight standard deviations (broadcast against `b_std`).
    b_std: bias standard deviations (broadcast against `W_std`).
    q0: starting variance of the fixed-point iteration (matters only when Q
      has several stable fixed points).

  Returns:
    A `MeanField` of arrays of the broadcast shape (see module docstring for
    the formulas and the degenerate cases).
  """
  return _on_grid(_as_layer(activation), 'mean_field', W_std, b_std, q0)


def q_star(activation: Activation, W_std=1., b_std=0., q0: float = 1.):
  """Fixed point q* = W_std^2 E[phi(sqrt(q*) z)^2] + b_std^2 (Poole et al.).

  The fixed point reached by iterating the map from `q0` (Q is increasing in
  q for the usual phi, so the iteration is monotone). Returns 0 when the
  variance decays to zero (e.g. tanh with b_std = 0 and W_std <= 1) and
  `inf` when it grows without bound (e.g. ReLU with W_std^2 >= 2, where
  Q(q) = W_std^2 q / 2 + b_std^2 has no finite fixed point).

  Args:
    activation: an elementwise stax layer or a scalar callable phi.
    W_std: weight standard deviations (broadcast against `b_std`).
    b_std: bias standard deviations (broadcast against `W_std`).
    q0: starting variance.

  Returns:
    q*, an array of the broadcast shape.
  """
  return mean_field(activation, W_std, b_std, q0).q_star


def c_star(activation: Activation, W_std=1., b_std=0., q0: float = 1.):
  """Stable fixed point c* of the correlation map at q* (1 when chi1 <= 1).

  Args and Returns: as `q_star`.
  """
  return mean_field(activation, W_std, b_std, q0).c_star


def chi1(activation: Activation, W_std=1., b_std=0., q0: float = 1.):
  """chi1 = W_std^2 E[phi'(sqrt(q*) z)^2] (Poole et al. 2016, eq. 7).

  The slope of the correlation map at c = 1: < 1 ordered, > 1 chaotic,
  = 1 edge of chaos; also the per-layer growth of squared gradient norms
  (Schoenholz et al. 2017).

  Args and Returns: as `q_star`.
  """
  return _on_grid(_as_layer(activation), 'chi1', W_std, b_std, q0)


def chi_c(activation: Activation, W_std=1., b_std=0., q0: float = 1.):
  """chi_c = W_std^2 E[phi'(u) phi'(v)] at (q*, c*) (Schoenholz et al. 2017,
  eq. 9): the slope of the correlation map at its stable fixed point.

  Args and Returns: as `q_star`.
  """
  return mean_field(activation, W_std, b_std, q0).chi_c


def depth_scales(activation: Activation, W_std=1., b_std=0.,
                 q0: float = 1.) -> DepthScales:
  """Depth scales xi_q, xi_c, xi_grad (Schoenholz et al. 2017).

    xi_q^-1    = -log(W^2 E[phi'^2 + phi phi''])  at q*   (variance),
    xi_c^-1    = -log chi_c                        at c*   (correlation),
    xi_grad^-1 = -log chi1                                 (gradients).

  Signed: positive when the deviation decays (|q - q*|, |c - c*|, or the
  gradient norm shrinking backwards), negative when it grows; inf at a rate
  of exactly 1 (criticality: xi_c and xi_grad diverge on the critical line).

  Args: as `q_star`.

  Returns:
    A `DepthScales` of arrays of the broadcast shape.
  """
  m = mean_field(activation, W_std, b_std, q0)
  return DepthScales(m.xi_q, m.xi_c, m.xi_grad)


def critical_W_std(activation: Activation, b_std=0., q0: float = 1.):
  """The W_std at which chi1 = 1 (the edge of chaos) for each b_std.

  The smallest W_std in [1e-2, 1e3] with chi1 >= 1: a log grid brackets it,
  then 64 bisections in log W_std. Where chi1 crosses 1 transversally the
  result is exact to ~1e-15. At b_std = 0 with phi(0) = 0 (tanh, erf,
  ReLU, ...) chi1 only touches 1 to second order above W_c, so there the
  limit q* -> 0 is used instead: W_c = 1 / sqrt(lim E[phi'(sqrt(q) z)^2]) =
  1 / |phi'(0)|, exact. Known values: ReLU
  sqrt(2) (He et al. 2015;
  chi1 = W_std^2 / 2 for any b_std), tanh at b_std = 0: 1 (Glorot & Bengio
  2010), tanh at b_std^2 = 0.05: W_std^2 ~ 1.76 (Schoenholz et al. 2017).

  Args:
    activation: an elementwise stax layer or a scalar callable phi.
    b_std: bias standard deviation(s).
    q0: starting variance for q*.

  Returns:
    The critical W_std (a float for scalar b_std, else an array).

  Raises:
    ValueError: if chi1 < 1 for every W_std in the range at some b_std
      (e.g. Sign, whose phi' = 0) or already >= 1 at W_std = 1e-2.
  """
  layer = _as_layer(activation)
  b = _checked(b_std, 'b_std')
  roots = np.asarray(_on_grid(layer, 'critical', np.zeros_like(b), b, q0))
  if np.any(np.isnan(roots)):
    missing = np.atleast_1d(b)[np.atleast_1d(np.isnan(roots))]
    raise ValueError(
        f'critical_W_std: chi1 does not cross 1 for W_std in [{_W_MIN}, '
        f'{_W_MAX}] at b_std={missing.tolist()}; this activation has no edge '
        'of chaos there.')
  return float(roots) if roots.ndim == 0 else roots


def phase_diagram(activation: Activation, W_std_grid: Sequence[float],
                  b_std_grid: Sequence[float], q0: float = 1.) -> PhaseDiagram:
  """chi1 and the depth scales on a (b_std, W_std) grid, and the critical line.

  Args:
    activation: an elementwise stax layer or a scalar callable phi.
    W_std_grid: (nW,) weight standard deviations.
    b_std_grid: (nb,) bias standard deviations.
    q0: starting variance for q*.

  Returns:
    A `PhaseDiagram`; plot it with `plot_phase_diagram`.
  """
  layer = _as_layer(activation)
  w = np.atleast_1d(_checked(W_std_grid, 'W_std_grid'))
  b = np.atleast_1d(_checked(b_std_grid, 'b_std_grid'))
  fields = _on_grid(layer, 'mean_field', w[None, :], b[:, None], q0)
  critical = _on_grid(layer, 'critical', np.zeros_like(b), b, q0)
  return PhaseDiagram(w, b, jax.tree.map(np.asarray, fields),
                      np.asarray(critical))



def plot_phase_diagram(diagram: PhaseDiagram, ax=None, quantity: str = 'chi1'):
  """Ordered / chaotic regions in the (W_std^2, b_std^2) plane.

  Args:
    diagram: from `phase_diagram`.
    ax: a matplotlib Axes (default: a new figure's).
    quantity: 'chi1' (colour log chi1: blue ordered, red chaotic) or one of
      'xi_q', 'xi_c', 'xi_grad' (colour log10 |xi|).

  Returns:
    The Axes. The black line is the critical line chi1 = 1.
  """
  ax = _plotting.axes(ax)
  from matplotlib import colors
  w2, b2 = diagram.W_std**2, diagram.b_std**2
  if quantity == 'chi1':
    values = np.log(np.maximum(diagram.mean_field.chi1, 1e-300))
    finite = np.abs(values[np.isfinite(values)])
    bound = max(float(np.max(finite, initial=0)), 1e-3)
    mesh = ax.pcolormesh(w2, b2, values, shading='auto', cmap='RdBu_r',
                         norm=colors.TwoSlopeNorm(0., -bound, bound))
    label = 'log chi1 (< 0 ordered, > 0 chaotic)'
  elif quantity in ('xi_q', 'xi_c', 'xi_grad'):
    xi = np.abs(getattr(diagram.mean_field, quantity))
    values = np.log10(np.clip(xi, 1e-3, 1e6))
    mesh = ax.pcolormesh(w2, b2, values, shading='auto', cmap='viridis')
    label = f'log10 |{quantity}|'
  else:
    raise ValueError(f"quantity={quantity!r}: choose 'chi1', 'xi_q', 'xi_c' "
                     "or 'xi_grad'.")
  ax.figure.colorbar(mesh, ax=ax, label=label)
  ok = np.isfinite(diagram.critical_W_std)
  ax.plot(diagram.critical_W_std[ok]**2, b2[ok], 'k-', lw=2,
          label='critical line (chi1 = 1)')
  ax.set_xlabel('W_std^2')
  ax.set_ylabel('b_std^2')
  ax.set_xlim(w2.min(), w2.max())
  ax.set_ylim(b2.min(), b2.max())
  ax.legend(loc='upper left')
  return ax


# ----------------------------------------------------------------------------
# Per-layer statistics of a whole network.


def _ntk_tangent(kernel: Kernel) -> Kernel:
  """Ones on every `ntk` leaf of a Kernel (and of its terms), else zeros."""
  def tangent(path, leaf):
    last = path[-1]
    is_ntk = getattr(last, 'name', None) == 'ntk'
    return jnp.ones_like(leaf) if is_ntk else jnp.zeros_like(leaf)
  return jax.tree_util.tree_map_with_path(tangent, kernel)


def layer_statistics(layers: Sequence[stax.Layer], x1,
                     x2=None) -> LayerStatistics:
  """q, c and the NTK gain chi after each layer, from the layers' kernel maps.

  Each layer's `kernel_fn` is applied to the previous layer's `Kernel`
  (the first to `stax.Identity().kernel_fn(x1, x2)`); chi is the derivative
  of the output NTK along the input NTK (a forward-mode `jax.jvp`), exact
  because every kernel map is affine in the NTK it receives. Pass a block
  such as `stax.serial(stax.Dense(1, W, b), stax.Tanh())` as one layer to
  read chi1 off its diagonal: after enough blocks q -> q*, c -> c* and
  chi -> chi1 (diagonal), chi_c (off-diagonal), as in `mean_field`.

  Args:
    layers: the network as a sequence of Layers (fully connected).
    x1: (N1, d) inputs.
    x2: (N2, d) inputs, or None for x1.

  Returns:
    A `LayerStatistics` stacked over the layers.
  """
  if isinstance(layers, stax.Layer) or not len(layers):
    raise ValueError('layers must be a non-empty sequence of stax Layers '
                     '(the network, layer by layer or block by block).')
  kernel = stax.Identity().kernel_fn(x1, x2)
  q1s, q2s, cs, chis = [], [], [], []
  for position, layer in enumerate(layers):
    if not isinstance(layer, stax.Layer):
      raise ValueError(f'layers[{position}] is {layer!r}, not a stax Layer.')
    apply = lambda k, layer=layer: layer.kernel_fn(k)
    kernel, gain = jax.jvp(apply, (kernel,), (_ntk_tangent(kernel),))
    q1, q2 = kernel.cov1, kernel.cov2
    q1s.append(q1)
    q2s.append(q2)
    cs.append(kernel.nngp / jnp.sqrt(q1[:, None] * q2[None, :]))
    chis.append(gain.ntk)
  return LayerStatistics(*(jnp.stack(a) for a in (q1s, q2s, cs, chis)))
