"""Gaussian expectations by quadrature, for nonlinearities with no closed form.

`expect_2d(f, g, k12, k11, k22, degree)` is E[f(u) g(v)] for the centred
Gaussian pair (u, v) ~ N(0, [[k11, k12], [k12, k22]]), entrywise, and
`expect_1d(f, k, degree)` is E[f(u)], u ~ N(0, k). `dual.Activation`s
without a closed form (`Tanh`, `ElementwiseNumerical`, chains such as
erf(relu(.))) get their NNGP map E[phi phi], NTK factor E[phi' phi'] (with
phi' = `derivative(phi)`) and mean from here. The rule and its accuracy
are described below; tests/test_quadrature_accuracy.py checks it against
nested adaptive integration (scipy QUADPACK) over a grid of variances and
correlations, the diagonal included.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._dual import DEFAULT_QUADRATURE_DEGREE, _correlation, safe_sqrt

# ----------------------------------------------------------------------------
# Quadrature for any phi: condition on u, panels at the activation's scale.
#
# Two length scales meet in E[f(u) g(v)]: phi's own (its kink at 0 and its
# features, O(1) in u: tanh saturates by |u| ~ 20, sech^2 is a bump of
# width ~1) and the Gaussian's (s = sqrt(variance)). With z ~ N(0, 1) a
# feature of f(s z) has width ~1/s in z, so fixed Gauss rules resolve it
# only while s is O(1): the former polar rule (Gauss-Legendre in the angle,
# half-range Gauss in r) was 3e-7 off on the diagonal of tanh at variance
# 1, 1e-3 at 10, and 1e-2 (E[sech^4]) at 59. On the diagonal (rho = 1) the
# product f g = sech^4 has the width of one feature in both polar
# directions at once (~1/(s r) in the angle, ~1/s in r).
#
# The rule below conditions on u: with x = u / s1 and z ~ N(0, 1)
# independent of x,
#     v = s2 (rho x + sqrt(1 - rho^2) z) = T (z - z*),
#     T = s2 sqrt(1 - rho^2),  z* = -rho x / sqrt(1 - rho^2),
#     E[f(u) g(v)] = E_x[ f(s1 x) H(x) ],   H(x) = E_z[ g(T (z - z*)) ].
# Each factor then has one kink at a known point (x = 0; z = z*) and one
# activation scale (1/s1 in x; 1/T in z), so each 1-d rule is a mesh
# *scaled to that entry*: Gauss-Legendre panels from the kink out to
# _EXTENT / scale (the activation's range, in its own units), then a Gauss
# rule for the Gaussian tail. The number of nodes does not depend on the
# variance, so the accuracy does not either (the error is spectral in the
# nodes per panel). At rho = +-1 (the diagonal) T = 0, the inner integral
# is g(s2 rho x) times the rule's mass (1), and the 2-d integral is the
# 1-d one, with no special case.
#
# Outer rule (x on each side of 0, `_outer_rule`): H is as sharp as g when
# T is small (rho near 1) and a Gaussian-smoothed step of width
# sqrt(1 - rho^2) / |rho| (the thin wedge between the kink lines u = 0 and
# v = 0) otherwise, so the panels are graded from the finest of the
# scales 1/s1, 1/(|rho| s2) and that width to the widest extent (at most
# _CAP standard deviations), followed by a half-range Gauss rule for
# exp(-x^2/2) on [end, inf).
#
# Inner rule (z on each side of z*): panels on [z*, z* + end] where g is
# evaluated at T d, with d fixed per entry, so g runs once per entry there
# and only the Gaussian weights phi(z* + d) change with x; those come from
# equispaced samples phi(z* + k h) = phi(z*) q^k exp(-(k h)^2 / 2),
# q = exp(-z* h) (two exps and Horner sums per x, not one exp per node),
# interpolated to the panel nodes. The rest, [z* + end, inf), is a Gauss
# rule for the weight phi on [a, inf), tabulated for a on a grid
# (`_tail_rules`), with a short Gauss-Legendre gap from z* + end up to the
# grid point a. Both rules are normalized to mass 1, so constants are
# exact. Cost per kernel entry at the default degree 24: f at 112 points,
# g at ~2070 (112 outer nodes x 2 sides x (8 tail + 1 gap) + 52); the
# former polar rule evaluated f and g at 1152 points each.


# Points of the fine discretization of [0, 14]. `leggauss(n)` costs an n x n
# eigenproblem: 4000 points took 6-20 s per process; 800 reproduce the rules
# of degree <= 128 to ~1e-13 (tests/test_dual.py checks against moments).
_DISCRETIZATION_POINTS = 800


@functools.lru_cache(maxsize=1)
def _discretization():
  return np.polynomial.legendre.leggauss(_DISCRETIZATION_POINTS)


@functools.lru_cache(maxsize=64)
def half_range_rule(degree: int, power: int):
  """Gauss rule for the weight r^power exp(-r^2 / 2) on [0, inf), mass 1.

  The recurrence coefficients come from the Stieltjes procedure on a fine
  Gauss–Legendre discretization of [0, 14] (the tail beyond is < e^-98), a
  stable way to get Gauss rules for non-classical weights (Gautschi 2004);
  nodes and weights then follow from the Jacobi matrix (Golub–Welsch).
  """
  x, w = _discretization()
  r = 7. * (x + 1.)
  w = 7. * w * r**power * np.exp(-r**2 / 2)
  w = w / w.sum()
  # Orthonormal polynomials (a Lanczos recurrence in the discrete inner
  # product): the monic ones grow like 14^k and overflowed float64 near
  # degree 300, which returned NaN kernels.
  alphas, off = [], []
  p_prev, p, b = np.zeros_like(r), np.ones_like(r), 0.
  for k in range(degree):
    alpha = np.sum(w * r * p * p)
    alphas.append(alpha)
    q = (r - alpha) * p - b * p_prev
    b = np.sqrt(np.sum(w * q * q))
    if k < degree - 1:
      off.append(b)
    p_prev, p = p, q / b
  off = np.asarray(off)
  nodes, vectors = np.linalg.eigh(np.diag(alphas) + np.diag(off, 1)
                                  + np.diag(off, -1))
  return nodes, vectors[0]**2


# Tuning constants of the rule above, at the default degree 24 (node
# counts scale with the degree, `_scaled_count`). Chosen on E[phi phi] and
# E[phi' phi'] of tanh, sigmoid, softplus, silu, elu and erf(relu) against
# scipy at variances 1e-2 .. 1e4 and correlations -0.9 .. 1: worst error
# 1e-7 of E[phi^2] at equal variances, 2.3e-7 of sqrt(E[f^2] E[g^2]) at
# unequal ones (tests/test_quadrature_accuracy.py).
#
# Activation range, in units of the activation's argument: saturating
# nonlinearities differ from their asymptotes by ~exp(-|u|) (sigmoid,
# softplus, silu) or less, 4e-11 at 24.
_EXTENT = 24.
# Panels near a kink end by this many standard deviations of the Gaussian;
# beyond, a Gauss rule for the Gaussian weight takes over.
_CAP = 2.
# Outer rule: Gauss-Legendre nodes per panel (6 panels per side) and the
# half-range rule for the Gaussian tail.
_OUTER_PANEL_NODES = 8
_OUTER_PANELS = 6
_OUTER_TAIL_NODES = 8
# Inner activation panels, relative to [0, _EXTENT], and their nodes: a
# search over 3-panel meshes with 26 nodes found [0, 2.7, 8.7, 24] best on
# E[sech^4(s z)] (E[tanh'^2], the hardest case), 5e-8 at any s.
_INNER_MESH = (0., 3., 9., 24.)
_INNER_PANEL_NODES = (10, 9, 7)
# Equispaced samples of the Gaussian weight over the inner panels:
# interpolating phi(z* + t), t in [0, 2], from 14 of them errs by < 4e-9
# of phi(0) (by 3e-13 on [0, 1], the blocks at degrees >= 48).
_INNER_SAMPLES = 14
# Gauss rule for phi on [a, inf): nodes, and the grid of tabulated a.
_INNER_TAIL_NODES = 8
_TAIL_GRID_END = 9.
# Kinks further than this (in standard deviations) are placed here: the
# Gaussian weight there is exp(-450), and q^k below stays < e^60 (float32).
_FAR = 30.
# Kernels with up to this many inner nodes in all (outer nodes x inner
# nodes x entries) get g at all of them at once, between jitted stages
# (~3 arrays of 8 bytes each); larger ones scan over chunks of outer nodes
# with this many elements per step.
_SMALL_ELEMENTS = 1 << 22
_CHUNK_ELEMENTS = 1 << 20
_SQRT_2PI = math.sqrt(2 * math.pi)


# Node counts grow in proportion to the degree up to this one, and like its
# square root beyond: the errors fall geometrically in the nodes per panel
# (degree 48 is at rounding error on every activation tested), and linear
# growth made degree 512 cost ~10^6 evaluations of g per kernel entry.
_LINEAR_DEGREES = 48


def _effective_degree(degree: int) -> float:
  """The degree that node counts are proportional to."""
  if degree <= _LINEAR_DEGREES:
    return float(degree)
  return _LINEAR_DEGREES * math.sqrt(degree / _LINEAR_DEGREES)


def _scaled_count(count: int, degree: int) -> int:
  """Nodes at `degree` for a rule with `count` nodes at degree 24."""
  return max(1, round(count * _effective_degree(degree)
                      / DEFAULT_QUADRATURE_DEGREE))


def _gauss_rules(z, w, n: int):
  """Gauss rules (nodes, weights) from discrete measures, row by row.

  z, w: (rows, points) support and weights (rows may differ). The
  Stieltjes/Lanczos recurrence as in `half_range_rule`, vectorized over
  rows; weights keep each row's total mass.
  """
  mass = w.sum(1, keepdims=True)
  w = w / mass
  rows = z.shape[0]
  alphas, offs = np.zeros((rows, n)), np.zeros((rows, max(n - 1, 0)))
  p_prev, p, b = np.zeros_like(z), np.ones_like(z), np.zeros((rows, 1))
  for k in range(n):
    alpha = np.sum(w * z * p * p, 1, keepdims=True)
    alphas[:, k] = alpha[:, 0]
    q = (z - alpha) * p - b * p_prev
    b = np.sqrt(np.sum(w * q * q, 1, keepdims=True))
    if k < n - 1:
      offs[:, k] = b[:, 0]
    p_prev, p = p, q / b
  jacobi = np.zeros((rows, n, n))
  i = np.arange(n)
  jacobi[:, i, i] = alphas
  jacobi[:, i[:-1], i[1:]] = offs
  jacobi[:, i[1:], i[:-1]] = offs
  nodes, vectors = np.linalg.eigh(jacobi)
  return nodes, vectors[:, 0, :]**2 * mass


@functools.lru_cache(maxsize=16)
def _tail_rules(n: int, step: float):
  """Gauss rules for the weight phi(z) on [a, inf), a = -9, -9 + step, .., 9.

  Returns (grid, nodes (n, len(grid)), weights (n, len(grid))); weights sum
  to P(z > a). Discretized on [a, max(a, 0) + 12] (the mass beyond is
  < e^-72). Columns per node, so that looking up a row costs n scalar
  gathers (XLA CPU gathers whole rows ~10x slower).
  """
  grid = np.arange(-_TAIL_GRID_END, _TAIL_GRID_END + step / 2, step)
  x, w = _discretization()
  span = (np.maximum(grid, 0.) + 12. - grid)[:, None]
  z = grid[:, None] + span / 2 * (x + 1)
  w = span / 2 * w * np.exp(-z**2 / 2) / _SQRT_2PI
  nodes, weights = _gauss_rules(z, w, n)
  return grid, nodes.T.copy(), weights.T.copy()


@functools.lru_cache(maxsize=64)
def _rule_constants(degree: int) -> dict:
  """Degree-dependent constants of `expect_2d` / `expect_1d` (numpy)."""
  outer_t, outer_w = np.polynomial.legendre.leggauss(
      _scaled_count(_OUTER_PANEL_NODES, degree))
  tail_t, tail_w = half_range_rule(
      _scaled_count(_OUTER_TAIL_NODES, degree), 0)
  mesh = np.asarray(_INNER_MESH) / _EXTENT
  act_t, act_w = [], []
  for lo, hi, count in zip(mesh[:-1], mesh[1:], _INNER_PANEL_NODES):
    x, w = np.polynomial.legendre.leggauss(_scaled_count(count, degree))
    act_t.append((hi + lo) / 2 + (hi - lo) / 2 * x)
    act_w.append((hi - lo) / 2 * w)
  act_t, act_w = np.concatenate(act_t), np.concatenate(act_w)
  # Samples of phi: blocks of 14 equispaced points (13 intervals) sharing
  # their ends, one block per 24 (effective) degrees; each panel node is
  # interpolated from its block (degree 13: stable; one long equispaced
  # block is not).
  blocks = max(1, math.ceil(_effective_degree(degree)
                            / DEFAULT_QUADRATURE_DEGREE))
  per_block = max(2, min(_INNER_SAMPLES - 1,
                         _scaled_count(_INNER_SAMPLES - 1, degree)))
  n_samples = blocks * per_block + 1
  samples = np.linspace(0., 1., n_samples)
  interp = np.zeros((len(act_t), n_samples))
  block = np.minimum((act_t * blocks).astype(int), blocks - 1)
  for node, (t, b) in enumerate(zip(act_t, block)):
    idx = np.arange(b * per_block, (b + 1) * per_block + 1)
    for i in idx:
      others = samples[idx[idx != i]]
      interp[node, i] = np.prod((t - others) / (samples[i] - others))
  # Gap [z* + end, a]: one Gauss-Legendre node on a grid of step 1/128
  # (error ~ step^3 / 24 |(g phi)''| < 1e-8), more nodes on coarser grids
  # at higher degrees (fewer tabulated rules to compute).
  gap_nodes = _scaled_count(1, degree)
  step = {1: 1. / 128, 2: 1. / 32}.get(gap_nodes, 1. / 4)
  gap_t, gap_w = np.polynomial.legendre.leggauss(gap_nodes)
  grid, tail_nodes, tail_weights = _tail_rules(
      _scaled_count(_INNER_TAIL_NODES, degree), step)
  return {'outer_t': (outer_t + 1) / 2, 'outer_w': outer_w / 2,
          'tail_t': tail_t, 'tail_w': tail_w, 'act_t': act_t,
          'act_w': act_w, 'interp': interp, 'gap_t': (gap_t + 1) / 2,
          'gap_w': gap_w / 2, 'grid': grid, 'tail_nodes': tail_nodes,
          'tail_weights': tail_weights}


# Elementwise maps by their `structure` (`_features.Fn`: equal for maps
# that compute the same), most recently used last. The kernel maps build
# their maps anew on every kernel_fn call; `expect_2d`'s jitted stage takes
# g as a static argument, so it would compile again on every call unless
# equal maps are one object.
_CANONICAL = collections.OrderedDict()
_CANONICAL_KEPT = 256


def _canonical(fn: Callable) -> Callable:
  """The first-seen map with `fn`'s structure (`fn` itself if it has none,
  or one that cannot be hashed, e.g. with a traced scale)."""
  structure = getattr(fn, 'structure', None)
  if structure is None:
    return fn
  try:
    hash(structure)
  except TypeError:
    return fn
  if structure not in _CANONICAL:
    _CANONICAL[structure] = fn
    while len(_CANONICAL) > _CANONICAL_KEPT:
      _CANONICAL.popitem(last=False)
  _CANONICAL.move_to_end(structure)
  return _CANONICAL[structure]


def derivative(fn: Callable) -> Callable:
  """Elementwise derivative of an elementwise `fn` via one forward-mode pass.

  One function per map (cached, by `structure` where `fn` has one), so
  that `expect_2d`'s jitted stage, which takes it as a static argument,
  compiles once."""
  return _derivative(_canonical(fn))


@functools.lru_cache(maxsize=256)
def _derivative(fn: Callable) -> Callable:
  def d_fn(x):
    return jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]
  return d_fn


def _bucketed(arrays, dtype, fill):
  """Flatten same-shape arrays and pad them to a bucketed length (16, a
  power of 2, or a multiple of 4096), so that the jitted stages below
  compile once for many kernel shapes (each new shape cost ~1 s of XLA
  compiles); padding entries get the values `fill`."""
  size = math.prod(arrays[0].shape)
  padded = (max(16, 1 << (size - 1).bit_length()) if size <= 4096
            else -(-size // 4096) * 4096)
  return [jnp.pad(a.astype(dtype).reshape(-1), (0, padded - size),
                  constant_values=v) for a, v in zip(arrays, fill)]


def _phi(z):
  return jnp.exp(-z * z / 2) * (1. / _SQRT_2PI)


def _outer_rule(rate, h_rate, spread, abs_rho, tables):
  """Nodes x >= 0 and weights (phi included) for int_0^inf F(x) phi(x) dx.

  F(x) = f(rate x) H(x), entries on axis 0 (arrays of shape (E,)); H has
  activation features within _EXTENT / h_rate of 0 (h_rate = 0: none) and
  a smoothed kink of width spread / abs_rho. Six Gauss-Legendre panels:
  [0, wedge], [wedge, first / 2], [first / 2, first], then three graded
  ones from `first` (3 x the finest scale) to `end` (the widest extent,
  at most _CAP), and a half-range rule on [end, inf). Returns (E, N) each.
  """
  floor = _EXTENT / _CAP
  # H's features are resolved here only if narrower than a standard
  # deviation; wider ones (|rho| small: H nearly constant, or a smooth
  # step of width >~ 1) are left to the tail rule, which resolves them.
  h_scale = 1. / jnp.where(h_rate > 0, h_rate, 1.)
  h_extent = jnp.where((h_rate > 0) & (h_scale < 1.),
                       _EXTENT / jnp.maximum(h_rate, floor), 0.)
  end = jnp.maximum(_EXTENT / jnp.maximum(rate, floor), h_extent)
  first = 3. / jnp.maximum(jnp.maximum(rate, jnp.where(h_extent > 0, h_rate,
                                                       0.)),
                           _EXTENT / end)
  # The wedge: 6 x its width, at most first / 4 (0 at rho = +-1).
  wedge = first * 6. * spread / jnp.maximum(24. * spread, abs_rho * first)
  ratio = jnp.cbrt(end / first)
  breaks = jnp.stack([jnp.zeros_like(end), wedge, first / 2, first,
                      first * ratio, first * ratio * ratio, end], -1)
  lo, length = breaks[:, :-1, None], jnp.diff(breaks, axis=-1)[:, :, None]
  x = (lo + length * tables['outer_t']).reshape(
      end.shape + (-1,))
  w = (length * tables['outer_w']).reshape(
      end.shape + (-1,)) * _phi(x)
  # int_end^inf h(x) phi(x) dx = 1/2 sum_k w_k h(end + t_k) exp(-end t_k -
  # end^2/2) for the half-range rule (t_k, w_k) of weight exp(-t^2/2).
  t, tw = tables['tail_t'], tables['tail_w']
  end = end[:, None]
  return (jnp.concatenate([x, end + t], -1),
          jnp.concatenate([w, tw / 2 * jnp.exp(-end * t - end * end / 2)],
                          -1))


def _setup_2d(k12, k11, k22, tables):
  """The parts of `expect_2d` before f and g are called, entries flattened
  onto the last axis (XLA CPU vectorizes along it). Jitted, here and in
  the other stages: compiled once per shape and degree (run op by op, as
  kernel_fn runs, they were ~100 small XLA programs per new shape)."""
  rho, s1, s2, _, spread = (
      a.reshape(-1) for a in _correlation(k12, k11, k22))
  # rho within rounding of -1 has no spread, as `_correlation` takes rho
  # near +1 as 1: otherwise sqrt(1 - rho^2) ~ 1e-8 of rounding opens a
  # wedge (x2 = -x1: 3e-7 of E[erf(relu)'^2] at rho = -1).
  spread = jnp.where(rho < -1. + 4 * jnp.finfo(rho.dtype).eps, 0., spread)
  abs_rho = jnp.abs(rho)
  t_scale = s2 * spread                        # T: g's scale in z is 1/T
  # Outer rule, both signs of x; H's activation rate |rho| s2 / (1 + T / 4)
  # blends g's scale 1 / (|rho| s2) and the smoothing width spread / |rho|.
  x, wx = _outer_rule(s1, abs_rho * s2 / (1. + t_scale / 4), spread,
                      abs_rho, tables)
  x = jnp.concatenate([x, -x], -1).T                 # (N, E)
  # Normalized to mass 1: constants exact (the panels' Gauss-Legendre on
  # phi and the tail rule's exp(-end t) factor leave ~5e-11; chi1 at the
  # limit q -> 0, E[phi'(0)^2], is read off such constants).
  wx = wx / (2 * jnp.sum(wx, -1, keepdims=True))
  # Inner activation panels [z*, z* + end] on each side (right: +, left: -):
  # g at +-T d, d = end * act_t, independent of x.
  end = _EXTENT / jnp.maximum(t_scale, _EXTENT / _CAP)
  d = t_scale[:, None] * end[:, None] * tables['act_t']
  return {'x': x, 'wx': jnp.concatenate([wx, wx], -1).T, 'f_args': s1 * x,
          'g_args': jnp.stack([d, -d]), 'rho': rho, 'spread': spread,
          'shift': s2 * rho, 't_scale': t_scale, 'end': end}


def _horner_coefficients(g_values, end, tables):
  """coef (2, S, E) with sum_k w_k g_k phi(z* + d_k) = phi(z*) sum_i coef_i
  q^i, q = exp(-z* h): the panel nodes' Gaussian weights interpolated from
  equispaced samples z* + i h, h = end / (S - 1)."""
  dtype = g_values.dtype
  interp = tables['interp']                           # (K, S)
  n_samples = interp.shape[-1]
  act = g_values * (tables['act_w'] * end[:, None])
  spacing = end / (n_samples - 1)
  return jnp.einsum('sek,ki->sie', act, interp) * jnp.exp(
      -(jnp.arange(n_samples, dtype=dtype)[:, None] * spacing)**2 / 2)


def _kinks(xj, setup):
  """g's kink z* on the inner lines at outer nodes xj (C, E), for the
  right (+z*) and left (-z*) sides: (2, C, E), clipped at _FAR."""
  rho, spread = setup['rho'], setup['spread']
  positive = spread > 0
  zstar = jnp.where(positive, -rho * xj / jnp.where(positive, spread, 1.),
                    -jnp.sign(rho * xj) * _FAR)
  sides = jnp.asarray([1., -1.], xj.dtype)[:, None, None]
  return sides * jnp.clip(zstar, -_FAR, _FAR)


def _horner_part(kink, coef, end, unroll: bool):
  """The activation panels' part of H at the kinks (2, C, E): phi(z*)
  sum_i coef_i q^i, q = exp(-z* h), summed over the sides; Horner's rule
  unrolled or in a fori_loop (at high degrees)."""
  n_samples = coef.shape[1]
  q = jnp.exp(-kink * (end / (n_samples - 1)))

  def horner(i, acc):
    return acc * q + coef[:, n_samples - 2 - i, None]

  acc = jnp.broadcast_to(coef[:, -1, None], q.shape)
  if unroll:
    for i in range(n_samples - 1):
      acc = horner(i, acc)
  else:
    acc = jax.lax.fori_loop(0, n_samples - 1, horner, acc)
  return _phi(kink[0]) * (acc[0] + acc[1])


def _inner_nodes(xj, kink, setup, tables):
  """The gap [z* + end, a] and tail [a, inf) of the inner rule on each
  side, measured outwards from the kink (a: the tabulated point at or
  above z* + end), at outer nodes xj (C, E): functions of a node index
  giving g's arguments and the weights (2, C, E), and the node counts.
  H = horner part + sum over nodes and sides of weights g(arguments)."""
  grid = tables['grid']
  step = grid[1] - grid[0]
  start = kink + setup['end']
  row = jnp.clip(jnp.ceil((start + _TAIL_GRID_END) / step), 0,
                 grid.shape[0] - 1).astype(jnp.int32)
  gap = jnp.maximum(jnp.take(grid, row, mode='clip') - start, 0.)
  gap_t, gap_w = tables['gap_t'], tables['gap_w']
  tail_nodes, tail_weights = tables['tail_nodes'], tables['tail_weights']
  sides = jnp.asarray([1., -1.], xj.dtype)[:, None, None]
  slope = setup['t_scale'] * sides
  shift = setup['shift'] * xj

  def gap_node(i):
    z = start + gap * gap_t[i]
    return shift + slope * z, gap * gap_w[i] * _phi(z)

  def tail_node(i):
    # Gathers of scalars per node: gathering rows of the table was ~10x
    # slower on XLA CPU.
    z = jnp.take(tail_nodes[i], row, mode='clip')
    return shift + slope * z, jnp.take(tail_weights[i], row, mode='clip')

  return gap_node, tail_node, (len(gap_t), tail_nodes.shape[0])


def _small_stage_1(k12, k11, k22, tables):
  """Small kernels, before f and g: the setup, and all of g's arguments
  (activation panels, then every inner node at every outer node) flat."""
  setup = _setup_2d(k12, k11, k22, tables)
  kink = _kinks(setup['x'], setup)
  gap_node, tail_node, (n_gap, n_tail) = _inner_nodes(setup['x'], kink,
                                                      setup, tables)
  args, weights = jax.vmap(gap_node)(jnp.arange(n_gap))
  tail_args, tail_weights = jax.vmap(tail_node)(jnp.arange(n_tail))
  args = jnp.concatenate([args, tail_args])          # (K, 2, N, E)
  setup.update(kink=kink, weights=jnp.concatenate([weights, tail_weights]),
               g_all=jnp.concatenate([setup['g_args'].reshape(-1),
                                      args.reshape(-1)]))
  return setup


def _small_stage_2(setup, f_values, g_all, tables):
  """Small kernels, after f and g: E[f g] per entry."""
  n_act = setup['g_args'].size
  g_act = g_all[:n_act].reshape(setup['g_args'].shape)
  unroll = tables['interp'].shape[1] <= 16
  part = _horner_part(setup['kink'], _horner_coefficients(
      g_act, setup['end'], tables), setup['end'], unroll)
  mass = _horner_part(setup['kink'], _horner_coefficients(
      jnp.ones_like(g_act), setup['end'], tables), setup['end'], unroll)
  weights = setup['weights']
  inner = part + jnp.sum(weights * g_all[n_act:].reshape(weights.shape),
                         (0, 1))
  # H / (the inner rule's mass): exact for constant g (interpolating phi
  # leaves up to ~4e-9 in the mass at the default degree).
  mass = mass + jnp.sum(weights, (0, 1))
  return jnp.sum(setup['wx'] * f_values * inner / mass, 0)


def expect_2d(f: Callable, g: Callable, k12, k11, k22, degree: int):
  """E[f(u) g(v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]), entrywise.

  The rule above (kinks of f and g at 0 resolved at any variance): f at
  112 and g at ~2070 points per entry at the default degree 24. Entries
  are flattened and padded to a bucketed count (`_bucketed`). Small
  kernels evaluate g at all inner nodes at once, between two jitted
  stages (compiled once per bucket and degree); larger ones scan over
  chunks of outer nodes, bounding memory at ~_CHUNK_ELEMENTS.
  """
  k12 = jnp.asarray(k12)
  shape = k12.shape
  dtype = jnp.result_type(k12, float)
  k12, k11, k22 = _bucketed(
      [k12, jnp.broadcast_to(jnp.asarray(k11, dtype), shape),
       jnp.broadcast_to(jnp.asarray(k22, dtype), shape)], dtype, [0., 1., 1.])
  degree = int(degree)
  size = math.prod(shape)
  constants = _rule_constants(degree)
  tables = _tables(degree, np.dtype(dtype))
  n_outer = 2 * (len(constants['outer_t']) * _OUTER_PANELS
                 + len(constants['tail_t']))
  n_inner = 2 * (constants['tail_nodes'].shape[0] + len(constants['gap_t']))
  n_entries = k12.shape[0]
  g = _canonical(g)
  if n_outer * n_entries * n_inner <= _SMALL_ELEMENTS:
    setup = _jitted(_small_stage_1, True, k12, k11, k22, tables)
    total = _jitted(_small_stage_2, True, setup, f(setup['f_args']),
                    g(setup['g_all']), tables)
    return total[:size].reshape(shape)

  setup = _jitted(_setup_2d, False, k12, k11, k22, tables)
  x, wx, end = setup['x'], setup['wx'] * f(setup['f_args']), setup['end']
  g_act = g(setup['g_args'])
  coef = _jitted(_horner_coefficients, False, g_act, end, tables)
  coef_mass = _jitted(_horner_coefficients, False, jnp.ones_like(g_act), end,
                      tables)
  chunk = max(1, min(n_outer, _CHUNK_ELEMENTS // (n_entries * n_inner)))
  steps = -(-n_outer // chunk)
  pad = steps * chunk - n_outer
  if pad:  # zero-weight nodes at x = 0
    x = jnp.concatenate([x, jnp.zeros((pad, n_entries), dtype)])
    wx = jnp.concatenate([wx, jnp.zeros((pad, n_entries), dtype)])
  total = _chunked_inner(g, setup, coef, coef_mass,
                         x.reshape(steps, chunk, n_entries),
                         wx.reshape(steps, chunk, n_entries), tables)
  return total[:size].reshape(shape)


@functools.partial(jax.jit, static_argnums=0)
def _chunked_inner(g, setup, coef, coef_mass, x, wx, tables):
  """Large kernels: sum over outer nodes (x, wx: (steps, chunk, E), f's
  values in wx) of the inner integral of g, a scan over chunks of outer
  nodes. Jitted with g static: run eagerly, the scan over a fresh closure
  was traced and compiled again on every kernel_fn call (0.2-0.9 s)."""
  end = setup['end']

  def body(total, xw):
    xj, wj = xw
    kink = _kinks(xj, setup)
    part = _horner_part(kink, coef, end, False)
    mass = _horner_part(kink, coef_mass, end, False)
    gap_node, tail_node, (n_gap, n_tail) = _inner_nodes(xj, kink, setup,
                                                        tables)

    # One g call per node, in loops: stacked on an axis of their own, the
    # reduction over nodes was 1.5x slower on XLA CPU (all of g's values
    # materialized), unrolled 2.5x (XLA recomputed shared terms per node).
    def add(node):
      def step(i, acc):
        args, weights = node(i)
        return acc[0] + weights * g(args), acc[1] + weights
      return step

    zeros = jnp.zeros((2,) + xj.shape, xj.dtype)
    terms = jax.lax.fori_loop(0, n_gap, add(gap_node), (zeros, zeros))
    terms, weights = jax.lax.fori_loop(0, n_tail, add(tail_node), terms)
    inner = ((part + terms[0] + terms[1])
             / (mass + weights[0] + weights[1]))
    return total + jnp.sum(wj * inner, 0), None

  total, _ = jax.lax.scan(body, jnp.zeros(x.shape[2:], x.dtype), (x, wx))
  return total


def _setup_1d(s, tables):
  """f's arguments and the weights of `expect_1d`, (E, N) each."""
  zero = jnp.zeros_like(s)
  x, w = _outer_rule(s, zero, zero + 1., zero, tables)
  return s[:, None] * x, w / (2 * jnp.sum(w, -1, keepdims=True))


def _jitted(fun, quick: bool, *args):
  """fun(*args), jitted. quick: XLA's backend optimization level 0 (on
  CPU), for small kernels, where compiling the stages (once per shape and
  degree), not running them, is the cost: it halves the compile time.
  (Only outside other transformations: JAX takes compiler options on
  top-level jits only.)"""
  quick = (quick and jax.default_backend() == 'cpu' and not any(
      isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)))
  return _jit_cache(fun, quick)(*args)


@functools.cache
def _jit_cache(fun, quick: bool):
  return jax.jit(fun, compiler_options=(
      {'xla_backend_optimization_level': 0} if quick else None))


@functools.lru_cache(maxsize=64)
def _tables(degree: int, dtype: np.dtype) -> dict:
  """_rule_constants(degree) as arrays of `dtype`, passed to the jitted
  stages as arguments rather than embedded in them as constants (the tail
  rules are a 2 x 8 x 2305 table at the default degree). Concrete even
  when first asked for under a trace (they are cached)."""
  with jax.ensure_compile_time_eval():
    return {name: jnp.asarray(value, dtype)
            for name, value in _rule_constants(degree).items()}


def expect_1d(f: Callable, k, degree: int):
  """E[f(u)] for u ~ N(0, k), entrywise: the outer rule of `expect_2d` on
  each side of the kink point 0 (panels at f's scale 1/sqrt(k), then a
  half-range rule): f at 112 points per entry at degree 24."""
  k = jnp.asarray(k)
  (flat,) = _bucketed([k], jnp.result_type(k, float), [1.])
  tables = _tables(int(degree), np.dtype(flat.dtype))
  n_nodes = tables['outer_t'].shape[0] * _OUTER_PANELS + tables[
      'tail_t'].shape[0]
  sx, w = _jitted(_setup_1d, flat.shape[0] * n_nodes <= _SMALL_ELEMENTS,
                  safe_sqrt(flat), tables)
  total = jnp.sum(w * (f(sx) + f(-sx)), -1)
  return total[:math.prod(k.shape)].reshape(k.shape)
