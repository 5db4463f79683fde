"""Dual activations: Gaussian expectations of elementwise nonlinearities.

For a nonlinearity `phi` and a centred Gaussian pair

    (u, v) ~ N(0, [[k11, k12], [k12, k22]]),

the infinite-width kernel maps need (Neal 1996; Lee et al. 2018; Jacot et
al. 2018):

    nngp(k12, k11, k22)       = E[phi(u) phi(v)]
    ntk_factor(k12, k11, k22) = E[phi'(u) phi'(v)]   (= d nngp / d k12, Price)
    mean(k)                   = E[phi(u)],  u ~ N(0, k)

`Activation` bundles `phi` with whichever of these it has in closed form.
Anything missing is computed by quadrature (`quadrature.expect_2d`,
`quadrature.expect_1d`: Gauss rules split at the kinks and scaled to each
entry's variance), with `phi'` from `jax.jvp`. Argument order follows
neural-tangents' `nngp_fn(cov12, var1, var2)`.

All closed forms take the correlation through `_correlation`, which clips it
to [-1, 1] and keeps gradients finite on the diagonal (rho = 1), where the
textbook formulas differentiate `arccos` at its branch point. Products of
standard deviations are formed as `sqrt(k11) * sqrt(k22)`, never
`sqrt(k11 * k22)`, so deep networks whose variances grow like 2^depth do not
overflow float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Quadrature degree of activations without closed forms (the node counts of
# `quadrature.expect_2d` / `expect_1d` scale with it). At 24, E[phi phi] and
# E[phi' phi'] of tanh, sigmoid, softplus, silu, gelu (tanh), elu, selu,
# erf(relu(.)), relu(tanh(.)) are within 2.3e-7 of sqrt(E[phi(u)^2]
# E[phi(v)^2]) (1e-7 at equal variances) for pre-activation variances
# 1e-3 .. 1e4 and every correlation, the diagonal included (measured:
# tests/test_quadrature_accuracy.py; 7e-7 up to 1e8); 1e-11 at degree 48.
# Raise `deg` on the layer for more.
DEFAULT_QUADRATURE_DEGREE = 24
# Node counts grow like sqrt(degree) past 48, where every activation tested
# is at rounding error already; higher degrees only cost time.
MAX_QUADRATURE_DEGREE = 512


# ----------------------------------------------------------------------------
# Numerically safe building blocks.


def safe_sqrt(x):
  """sqrt(x) for x > 0, else 0; the gradient is 0 (not inf/NaN) at x <= 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.)), 0.)


def safe_divide(a, b):
  """a / b where b != 0, else 0 (with finite gradients)."""
  nonzero = b != 0
  return jnp.where(nonzero, a / jnp.where(nonzero, b, 1.), 0.)


# arccos(x) = sqrt(1 - x) * poly(x) + e, |e| <= 2e-8 on [0, 1] (Abramowitz &
# Stegun 4.4.46): below float32 resolution, and a few fused multiply-adds
# instead of XLA's scalar-ish atan2 (which alone cost ~the whole GEMM).
_ACOS_COEFFICIENTS = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046,
                      0.0308918810, -0.0170881256, 0.0066700901, -0.0012624911)


def _arccos(rho, sin_theta):
  """arccos(rho) for rho in [-1, 1]; finite gradient at rho = +-1."""
  if jnp.finfo(rho.dtype).bits > 32:
    return jnp.arctan2(sin_theta, rho)  # full double precision
  x = jnp.abs(rho)
  poly = _ACOS_COEFFICIENTS[-1]
  for c in _ACOS_COEFFICIENTS[-2::-1]:
    poly = poly * x + c
  theta = safe_sqrt(1. - x) * poly
  return jnp.where(rho < 0, jnp.pi - theta, theta)


# asin(x) = x + x^3 P(x^2) on |x| <= 1/2, and pi/2 - 2 asin(sqrt((1 - x)/2))
# above; P is the float32 minimax polynomial of Cephes' asinf (Moshier),
# ~2e-7 relative error, again instead of XLA CPU's slow atan2-based arcsin.
_ASIN_COEFFICIENTS = (4.2163199048e-2, 2.4181311049e-2, 4.5470025998e-2,
                      7.4953002686e-2, 1.6666752422e-1)


def _arcsin(x, one_minus_x2=None):
  """arcsin(x) for x in [-1, 1] (float32: polynomial; float64: jnp.arcsin).

  Args:
    x: the argument.
    one_minus_x2: 1 - x^2 computed without cancellation, if the caller has
      it. Near |x| = 1, arcsin(x) = pi/2 - sqrt(2 (1 - |x|)) + ..., so an
      absolute rounding error e in x becomes ~sqrt(e) in the result (float32:
      ~3e-4 for x within 1e-7 of 1); from 1 - x^2 the error stays relative.
  """
  if jnp.finfo(x.dtype).bits > 32:
    if one_minus_x2 is None:
      return jnp.arcsin(x)
    return jnp.arctan2(x, safe_sqrt(one_minus_x2))
  a = jnp.abs(x)
  large = a > 0.5
  one_minus_a = (1. - a if one_minus_x2 is None
                 else one_minus_x2 / (1. + a))
  z = jnp.where(large, 0.5 * one_minus_a, a * a)
  y = jnp.where(large, safe_sqrt(z), a)
  poly = _ASIN_COEFFICIENTS[0]
  for c in _ASIN_COEFFICIENTS[1:]:
    poly = poly * z + c
  small_result = y + y * z * poly
  result = jnp.where(large, jnp.pi / 2 - 2. * small_result, small_result)
  return jnp.where(x < 0, -result, result)


def _correlation(k12, k11, k22):
  """Correlation rho in [-1, 1], standard deviations, and the angle pieces.

  Returns:
    rho, sigma1, sigma2, theta = arccos(rho), sin(theta) = sqrt(1 - rho^2).
  """
  sigma1, sigma2 = safe_sqrt(k11), safe_sqrt(k22)
  # Reciprocals of the (per-sample, broadcast) deviations, then a product:
  # one multiply per kernel entry instead of a divide.
  inverse1, inverse2 = safe_divide(1., sigma1), safe_divide(1., sigma2)
  rho = jnp.clip(k12 * inverse1 * inverse2, -1., 1.)
  # A sample with itself has rho = 1, computed as 1 - O(eps), and arccos
  # turns that rounding into theta ~ sqrt(eps) (float32: 1e-4 relative in
  # the ReLU NTK's diagonal). Within a few rounding errors of 1, rho
  # cannot be resolved anyway, so it is taken as 1.
  near_one = 1. - 4 * jnp.finfo(rho.dtype).eps
  rho = jnp.where(rho > near_one, 1., rho)
  sin_theta = safe_sqrt(1. - rho**2)
  # atan2 with a safe sqrt has gradient 0 at rho = +-1 where arccos' is
  # infinite; every formula below has a finite limit there, which this gives.
  theta = _arccos(rho, sin_theta)
  return rho, sigma1, sigma2, theta, sin_theta


def _saturating_correlation(k12, k11, k22, scale: float):
  """r = scale k12 / sqrt((1 + scale k11)(1 + scale k22)) and 1 - r^2.

  The arcsin kernels (erf, GELU) need both. With p_i = scale k_ii,
  q_i = 1 / (1 + p_i), t_i = p_i q_i = 1 - q_i and rho = k12 / sqrt(k11 k22):
      r       = rho sqrt(t1 t2),
      1 - r^2 = q1 + t1 q2 + t1 t2 (1 - rho^2),
  a sum of non-negative terms, all in [0, 1]. The textbook
  (1 + p1)(1 + p2) - (scale k12)^2 cancels: at variance ~1e4 only ~1e-4 of
  its terms survive, so float32 kept ~3 digits (the erf NTK was 3.5% off),
  and it overflowed past variance ~1e19. Here nothing overflows and 1 - r^2
  keeps relative accuracy on the diagonal (rho = 1), where it is
  q1 + t1 q2 ~ 2 / p at large p.

  Returns:
    r, 1 - r^2, q1, q2.
  """
  rho = _correlation(k12, k11, k22)[0]
  q1, q2 = 1. / (1. + scale * k11), 1. / (1. + scale * k22)
  t1, t2 = scale * k11 * q1, scale * k22 * q2
  r = rho * safe_sqrt(t1) * safe_sqrt(t2)
  # (1 - rho)(1 + rho): 1 - rho is exact near rho = 1 (Sterbenz).
  one_minus_r2 = q1 + t1 * q2 + t1 * t2 * ((1. - rho) * (1. + rho))
  return r, one_minus_r2, q1, q2


# ----------------------------------------------------------------------------
# The Activation record.


@dataclasses.dataclass(frozen=True, eq=False)
class Activation:
  """An elementwise nonlinearity and its known Gaussian expectations.

  Attributes:
    name: layer name used in error messages.
    fn: the elementwise function `phi` (jnp, broadcasting).
    nngp: `(k12, k11, k22) -> E[phi(u) phi(v)]`, or None (use quadrature).
    ntk_factor: `(k12, k11, k22) -> E[phi'(u) phi'(v)]`, or None (derived from
      `nngp` by differentiating w.r.t. k12 if `nngp` is given, else quadrature).
    mean: `k -> E[phi(u)]`, or None (quadrature).
    degree: quadrature degree (`quadrature.expect_2d`) used when quadrature
      is needed.
  """
  name: str
  fn: Callable
  nngp: Optional[Callable] = None
  ntk_factor: Optional[Callable] = None
  mean: Optional[Callable] = None
  degree: int = DEFAULT_QUADRATURE_DEGREE

  has_fn: bool = True
  variance: Optional[Callable] = None

  def variance_or_derived(self) -> Callable:
    """k -> E[phi(u)^2], u ~ N(0, k): closed form, or the NNGP at rho = 1."""
    if self.variance is not None:
      return self.variance
    return lambda k: self.nngp(k, k, k)

  @property
  def has_closed_form(self) -> bool:
    return self.nngp is not None

  def ntk_factor_or_derived(self) -> Callable:
    """E[phi' phi'] in closed form, or by Price's theorem d nngp / d k12."""
    if self.ntk_factor is not None:
      return self.ntk_factor
    nngp = self.nngp

    def derived(k12, k11, k22):
      grad = jax.grad(lambda c, a, b: jnp.sum(nngp(c, a, b)))
      return grad(k12, k11, k22)
    return derived


# ----------------------------------------------------------------------------
# Closed forms. Each returns an Activation; the layer constructors in
# `_elementwise.py` wrap them.


def _is_zero(x) -> bool:
  """Whether x is a concrete number equal to 0 (traced values never are)."""
  return isinstance(x, (int, float, np.number)) and x == 0


def ab_relu(a: float, b: float) -> Activation:
  """phi(x) = a x (x < 0), b x (x >= 0).

  Arc-cosine kernel of degree 1 (Cho & Saul 2009), with theta = arccos(rho):
    E[phi(u) phi(v)] = (a - b)^2 / (2 pi) s1 s2 (sin theta + (pi - theta) rho)
                       + a b k12,
    E[phi' phi']     = (a - b)^2 (pi - theta) / (2 pi) + a b,
    E[phi(u)]        = (b - a) sqrt(k / (2 pi)).
  (Write phi = b relu(x) - a relu(-x) and use E[relu(u) relu(-v)] =
  s1 s2 (sin theta - theta cos theta) / (2 pi).)
  """
  # Terms with a zero coefficient (a = 0: ReLU) are left out in Python: XLA
  # keeps x * 0. (it is NaN for x = inf), an extra pass in large kernels.
  def plus_linear(arc, linear):
    """arc + a b linear, arc (>= 0 exactly) clamped at 0 by a select.

    Why a select last: XLA CPU's YNN fusion takes the arithmetic ops (mul,
    add, sub, max) that feed a reduction (global pooling) but not selects;
    a formula ending in arithmetic was split into ~4 loop fusions (at each
    select inside) whose outputs, plus broadcast constants, the YNN fusion
    then read back from memory. Ending in a select keeps each formula one
    loop fusion (benchmark CNN, 3 layers: 1.25x). NaN stays NaN.
    """
    if _is_zero(a * b):
      return jnp.where(arc < 0, 0., arc)
    linear = a * b * linear
    return jnp.where(arc < 0, linear, arc + linear)

  def nngp(k12, k11, k22):
    rho, s1, s2, theta, sin_theta = _correlation(k12, k11, k22)
    arc = s1 * s2 * (sin_theta + (jnp.pi - theta) * rho) * (
        (a - b)**2 / (2 * jnp.pi))
    return plus_linear(arc, k12)

  def ntk_factor(k12, k11, k22):
    _, _, _, theta, _ = _correlation(k12, k11, k22)
    return plus_linear((jnp.pi - theta) * ((a - b)**2 / (2 * jnp.pi)), 1.)

  def mean(k):
    return (b - a) * safe_sqrt(k / (2 * jnp.pi))

  return Activation(
      name=f'ABRelu(a={a}, b={b})',
      fn=lambda x: jnp.where(x < 0, a * x, b * x),
      nngp=nngp, ntk_factor=ntk_factor, mean=mean,
      variance=lambda k: (a * a + b * b) / 2 * k)


def erf(a: float, b: float, c: float) -> Activation:
  """phi(x) = a erf(b x) + c (Williams 1997).

    E[erf(b u) erf(b v)] = 2/pi arcsin(2 b^2 k12 / sqrt((1 + 2 b^2 k11)(1 + 2 b^2 k22)))
    E[phi' phi']         = a^2 4 b^2 / pi / sqrt(det(I + 2 b^2 K))
  and E[erf] = 0, so the constant c adds c^2 to the NNGP. Both are computed
  from r (the arcsin's argument) and 1 - r^2 = det(I + 2 b^2 K) /
  ((1 + 2 b^2 k11)(1 + 2 b^2 k22)) as `_saturating_correlation` forms them:
  finite and accurate in float32 at any variance.
  """
  scale = 2 * b * b

  def nngp(k12, k11, k22):
    r, one_minus_r2, _, _ = _saturating_correlation(k12, k11, k22, scale)
    return a**2 * (2 / jnp.pi) * _arcsin(r, one_minus_r2) + c**2

  def ntk_factor(k12, k11, k22):
    _, one_minus_r2, q1, q2 = _saturating_correlation(k12, k11, k22, scale)
    # 1 / sqrt(det) = sqrt(q1) sqrt(q2) / sqrt(1 - r^2).
    return (a**2 * 2 * scale / jnp.pi) * safe_sqrt(q1) * safe_sqrt(q2) * (
        jax.lax.rsqrt(one_minus_r2))

  return Activation(
      name=f'Erf(a={a}, b={b}, c={c})',
      fn=lambda x: a * jax.scipy.special.erf(b * x) + c,
      nngp=nngp, ntk_factor=ntk_factor,
      mean=lambda k: jnp.full(jnp.shape(k), c, jnp.result_type(k, float)))


def sin(a: float, b: float, c: float) -> Activation:
  """phi(x) = a sin(b x + c).

  With sin A sin B = (cos(A - B) - cos(A + B)) / 2 and
  E[cos(t w)] = exp(-t^2 Var(w) / 2) for centred Gaussian w:
    E[phi(u) phi(v)] = a^2 / 2 (exp(-b^2 (k11 + k22 - 2 k12) / 2)
                               - cos(2c) exp(-b^2 (k11 + k22 + 2 k12) / 2)),
    E[phi' phi']     = a^2 b^2 / 2 (exp(-b^2 (k11 + k22 - 2 k12) / 2)
                                   + cos(2c) exp(-b^2 (k11 + k22 + 2 k12) / 2)),
    E[phi(u)]        = a sin(c) exp(-b^2 k / 2).
  """
  b2 = b * b

  def pieces(k12, k11, k22):
    minus = jnp.exp(-b2 * (k11 + k22 - 2 * k12) / 2)
    plus = math.cos(2 * c) * jnp.exp(-b2 * (k11 + k22 + 2 * k12) / 2)
    return minus, plus

  def nngp(k12, k11, k22):
    minus, plus = pieces(k12, k11, k22)
    return a**2 / 2 * (minus - plus)

  def ntk_factor(k12, k11, k22):
    minus, plus = pieces(k12, k11, k22)
    return a**2 * b2 / 2 * (minus + plus)

  return Activation(
      name=f'Sin(a={a}, b={b}, c={c})',
      fn=lambda x: a * jnp.sin(b * x + c),
      nngp=nngp, ntk_factor=ntk_factor,
      mean=lambda k: a * math.sin(c) * jnp.exp(-b2 * k / 2))


def exp(a: float, b: float) -> Activation:
  """phi(x) = a exp(b x): the log-normal moments E[exp(b (u + v))].

    E[phi(u) phi(v)] = a^2 exp(b^2 (k11 + k22 + 2 k12) / 2)
    E[phi' phi']     = b^2 E[phi(u) phi(v)],   E[phi(u)] = a exp(b^2 k / 2).
  """
  def nngp(k12, k11, k22):
    return a**2 * jnp.exp(b * b * (k11 + k22 + 2 * k12) / 2)

  return Activation(
      name=f'Exp(a={a}, b={b})',
      fn=lambda x: a * jnp.exp(b * x),
      nngp=nngp, ntk_factor=lambda *k: b * b * nngp(*k),
      mean=lambda k: a * jnp.exp(b * b * k / 2))


def gaussian(a: float, b: float) -> Activation:
  """phi(x) = a exp(b x^2), finite for b < 1 / (2 max k).

  Completing the square, with D = det(I - 2 b K)
  = (1 - 2 b k11)(1 - 2 b k22) - 4 b^2 k12^2:
    E[phi(u) phi(v)] = a^2 / sqrt(D),
    E[phi' phi']     = 4 a^2 b^2 E[u v exp(b (u^2 + v^2))] = 4 a^2 b^2 k12 / D^(3/2),
    E[phi(u)]        = a / sqrt(1 - 2 b k).
  """
  def det(k12, k11, k22):
    return (1 - 2 * b * k11) * (1 - 2 * b * k22) - 4 * b * b * k12**2

  return Activation(
      name=f'Gaussian(a={a}, b={b})',
      fn=lambda x: a * jnp.exp(b * x**2),
      nngp=lambda *k: a**2 / jnp.sqrt(det(*k)),
      ntk_factor=lambda k12, k11, k22: (
          4 * a**2 * b**2 * k12 / det(k12, k11, k22)**1.5),
      mean=lambda k: a / jnp.sqrt(1 - 2 * b * k))


def sign() -> Activation:
  """phi(x) = sign(x).

    E[sign(u) sign(v)] = 2 / pi arcsin(rho)   (Grothendieck's identity).
  The NTK factor is 0: phi' = 0 almost everywhere, which is also what
  automatic differentiation gives a finite network, so the infinite-width NTK
  is the limit of the finite networks' empirical NTK.
  """
  def nngp(k12, k11, k22):
    theta = _correlation(k12, k11, k22)[3]
    return 1 - 2 / jnp.pi * theta  # = 2/pi arcsin(rho), finite gradient at |rho| = 1

  return Activation(
      name='Sign()', fn=jnp.sign, nngp=nngp,
      ntk_factor=lambda k12, k11, k22: jnp.zeros_like(k12 + k11 + k22),
      mean=lambda k: jnp.zeros_like(k))


# ---- Polynomials (Isserlis' theorem). ---------------------------------------


def _double_factorial_odd(m: int) -> int:
  """(m - 1)!! for even m >= 0 (the m-th moment of N(0, 1)); 0 for odd m."""
  if m % 2:
    return 0
  return math.prod(range(m - 1, 0, -2)) if m > 0 else 1


def _mixed_moment(i: int, j: int, k12, k11, k22):
  """E[u^i v^j] for a centred Gaussian pair (Isserlis' theorem).

  Pair `p` of the u's with `p` of the v's (C(i,p) C(j,p) p! ways, each
  k12^p), then the remaining u's among themselves ((i-p-1)!! ways, k11 each
  pair) and likewise the v's.
  """
  total = 0.
  for p in range(min(i, j) + 1):
    if (i - p) % 2 or (j - p) % 2:
      continue
    count = (math.comb(i, p) * math.comb(j, p) * math.factorial(p)
             * _double_factorial_odd(i - p) * _double_factorial_odd(j - p))
    total = total + count * k12**p * k11**((i - p) // 2) * k22**((j - p) // 2)
  return total


def _polynomial_expectation(coef_f, coef_g, k12, k11, k22):
  total = jnp.zeros_like(k12 + k11 + k22)
  for i, ci in enumerate(coef_f):
    for j, cj in enumerate(coef_g):
      if ci != 0 and cj != 0:
        total = total + ci * cj * _mixed_moment(i, j, k12, k11, k22)
  return total


def polynomial(coef: Sequence[float], name: Optional[str] = None) -> Activation:
  """phi(x) = sum_i coef[i] x^i, exact for any covariance (Isserlis).

    E[phi(u) phi(v)] = sum_ij c_i c_j E[u^i v^j],
    E[phi' phi']     = the same with the derivative's coefficients,
    E[phi(u)]        = sum_i c_i (i - 1)!! k^(i/2)   (even i).
  """
  coef = tuple(float(c) for c in coef)
  d_coef = tuple(i * c for i, c in enumerate(coef))[1:]

  def fn(x):
    return sum(c * x**i for i, c in enumerate(coef) if c != 0) + 0. * x

  def mean(k):
    return sum(c * _double_factorial_odd(i) * k**(i // 2)
               for i, c in enumerate(coef) if c != 0 and i % 2 == 0) + 0. * k

  return Activation(
      name=name or f'Polynomial(coef={list(coef)})', fn=fn,
      nngp=lambda *k: _polynomial_expectation(coef, coef, *k),
      ntk_factor=lambda *k: _polynomial_expectation(d_coef, d_coef, *k),
      mean=mean)


# ---- Rectified monomials (arc-cosine kernels of any degree). ----------------


def _arccos_polynomials(n: int):
  """Polynomials A_n, B_n with J_n(theta) = A_n(rho) (pi - theta) + B_n(rho) sin(theta).

  J_n is Cho & Saul's (2009) arc-cosine function, defined by
  E[relu(u)^n relu(v)^n] = (s1 s2)^n J_n(theta) / (2 pi). Since
  J_n = sin(theta)^(2n+1) (d/d rho)^n [(pi - theta) / sin(theta)], one
  differentiation gives the recurrence
    A_{n+1} = (1 - rho^2) A_n' + (2n + 1) rho A_n,
    B_{n+1} = A_n + (1 - rho^2) B_n' + 2 n rho B_n,
  from A_0 = 1, B_0 = 0 (J_0 = pi - theta, J_1 = sin + (pi - theta) cos).
  """
  poly = np.polynomial.Polynomial
  one_minus_rho2 = poly([1., 0., -1.])
  rho = poly([0., 1.])
  a, b = poly([1.]), poly([0.])
  for m in range(n):
    a, b = (one_minus_rho2 * a.deriv() + (2 * m + 1) * rho * a,
            a + one_minus_rho2 * b.deriv() + 2 * m * rho * b)
  return tuple(a.coef), tuple(b.coef)


def _arccos_kernel(n: int, k12, k11, k22):
  """E[relu(u)^n relu(v)^n] = (s1 s2)^n J_n(theta) / (2 pi)."""
  rho, s1, s2, theta, sin_theta = _correlation(k12, k11, k22)
  a, b = _arccos_polynomials(n)
  a_val = jnp.polyval(jnp.asarray(a[::-1], rho.dtype), rho)
  b_val = jnp.polyval(jnp.asarray(b[::-1], rho.dtype), rho)
  j_n = a_val * (jnp.pi - theta) + b_val * sin_theta
  return (s1 * s2)**n * j_n / (2 * jnp.pi)


def rectified_monomial(degree: int) -> Activation:
  """phi(x) = relu(x)^degree (degree 0 is the step function).

    E[phi(u) phi(v)] = (s1 s2)^n J_n(theta) / (2 pi)            (Cho & Saul)
    E[phi' phi']     = n^2 (s1 s2)^(n-1) J_{n-1}(theta) / (2 pi) (0 for n = 0)
    E[phi(u)]        = E|z|^n / 2 k^(n/2) = 2^(n/2 - 1) Gamma((n+1)/2) / sqrt(pi) k^(n/2)
  """
  n = int(degree)
  half_abs_moment = 2**(n / 2 - 1) * math.gamma((n + 1) / 2) / math.sqrt(math.pi)

  def ntk_factor(k12, k11, k22):
    if n == 0:
      return jnp.zeros_like(k12 + k11 + k22)
    return n**2 * _arccos_kernel(n - 1, k12, k11, k22)

  return Activation(
      name=f'RectifiedMonomial(degree={n})',
      fn=lambda x: jnp.where(x > 0, x, 0.)**n if n else (x > 0).astype(
          jnp.result_type(x, float)),
      nngp=lambda *k: _arccos_kernel(n, *k),
      ntk_factor=ntk_factor,
      mean=lambda k: half_abs_moment * safe_sqrt(k)**n)


# ---- Quadrature-only activations. -------------------------------------------


def numerical(fn: Callable, name: str, degree: int = DEFAULT_QUADRATURE_DEGREE,
              nngp: Optional[Callable] = None,
              ntk_factor: Optional[Callable] = None) -> Activation:
  """Any scalar `fn`; expectations by quadrature unless `nngp` is given."""
  if (isinstance(degree, bool) or not isinstance(degree, (int, np.integer))
      or not 1 <= degree <= MAX_QUADRATURE_DEGREE):
    raise ValueError(
        f'{name}: deg={degree!r} must be an int in [1, '
        f'{MAX_QUADRATURE_DEGREE}] (the default, '
        f'{DEFAULT_QUADRATURE_DEGREE}, is accurate to ~1e-7; 48 reaches '
        f'rounding error).')
  return Activation(name=name, fn=fn, nngp=nngp, ntk_factor=ntk_factor,
                    degree=int(degree))
