"""Elementwise nonlinearities, with their NNGP and NTK.

Each layer applies `phi` in the finite network; its kernel map is
`features.apply_elementwise`, which uses the closed forms of `_dual.py` when
`phi` acts directly on a Gaussian field, and quadrature (`_quadrature.py`:
split at the kinks, scaled to each variance) of the composed map otherwise (e.g. `Relu` followed by `Erf`).

| layer                    | phi(x)                               | kernel       |
|--------------------------|--------------------------------------|--------------|
| Relu, LeakyRelu, ABRelu, Abs | piecewise linear                 | arc-cosine   |
| Erf(a, b, c)             | a erf(b x) + c                       | arcsin       |
| Sigmoid_like()           | erf(x / 2.40205635...) / 2 + 1/2     | arcsin       |
| Gelu(approximate=False)  | x Phi(x)                             | closed form  |
| Sin(a, b, c), Cos        | a sin(b x + c)                       | closed form  |
| Rbf(gamma)               | sqrt(2) sin(sqrt(2 gamma) x + pi/4)  | exp(-gamma |x-y|^2) |
| Exp(a, b)                | a exp(b x)                           | closed form  |
| Gaussian(a, b)           | a exp(b x^2)                         | closed form  |
| Sign()                   | sign(x)                              | arcsin       |
| Monomial(n), Polynomial, Hermite(n) | polynomials               | Isserlis     |
| RectifiedMonomial(n)     | relu(x)^n                            | arc-cosine n |
| Tanh, Sigmoid, Softplus, Silu, Elu, Selu | jax.nn functions     | quadrature   |
| Elementwise(fn, nngp_fn) | fn                                   | given / quadrature |
| ElementwiseNumerical(fn, deg) | fn                              | quadrature   |
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax.stax import _dual as dual, _features as features
from ntkjax.stax._layer import Layer, layer, single_kernel


def _finite(layer_name: str, **values) -> list:
  """The values as floats; a clear error if one is not a finite number
  (a NaN or infinite parameter would give a NaN kernel much later)."""
  out = []
  for name, value in values.items():
    try:
      number = float(value)
    except (TypeError, ValueError):
      number = math.nan
    if not math.isfinite(number):
      raise ValueError(f'{layer_name}: {name}={value!r} must be a finite '
                       'number.')
    out.append(number)
  return out


def _activation_layer(act: dual.Activation) -> Layer:
  """A parameter-free layer applying `act` to every entry."""
  def kernel_map(k):
    return features.apply_elementwise(single_kernel(k, act.name), act, act.name)

  return layer(act.name, lambda key, shape: (shape, ()),
               lambda params, x, **kwargs: act.fn(x), kernel_map)


# ---- The ReLU family. -------------------------------------------------------


def ABRelu(a: float, b: float, do_stabilize: bool = False) -> Layer:
  """phi(x) = a x for x < 0 and b x for x >= 0 (arc-cosine kernel).

  `do_stabilize` is accepted for compatibility and not needed: the kernel is
  computed from correlations and standard deviations, finite at any depth.
  """
  del do_stabilize
  return _activation_layer(dual.ab_relu(*_finite('ABRelu', a=a, b=b)))


def Relu(do_stabilize: bool = False) -> Layer:
  """phi(x) = max(x, 0)."""
  return _activation_layer(_named(dual.ab_relu(0., 1.), 'Relu()'))


def LeakyRelu(alpha: float, do_stabilize: bool = False) -> Layer:
  """phi(x) = alpha x for x < 0, x for x >= 0."""
  (alpha,) = _finite('LeakyRelu', alpha=alpha)
  return _activation_layer(
      _named(dual.ab_relu(alpha, 1.), f'LeakyRelu({alpha})'))


def Abs(do_stabilize: bool = False) -> Layer:
  """phi(x) = |x|."""
  return _activation_layer(_named(dual.ab_relu(-1., 1.), 'Abs()'))


def _named(act: dual.Activation, name: str) -> dual.Activation:
  return dataclasses.replace(act, name=name)


# ---- Sigmoidal. -------------------------------------------------------------


def Erf(a: float = 1., b: float = 1., c: float = 0.) -> Layer:
  """phi(x) = a erf(b x) + c (Williams 1997 arcsin kernel)."""
  return _activation_layer(dual.erf(*_finite('Erf', a=a, b=b, c=c)))


# Sigmoid_like matches the logistic sigmoid's slope at 0 with an erf.
_SIGMOID_LIKE_SCALE = 2.4020563531719796


def Sigmoid_like() -> Layer:
  """phi(x) = erf(x / 2.40205635...) / 2 + 1/2, a sigmoid with an exact kernel."""
  return _activation_layer(
      _named(dual.erf(0.5, 1 / _SIGMOID_LIKE_SCALE, 0.5), 'Sigmoid_like()'))


def Gelu(approximate: bool = False) -> Layer:
  """phi(x) = x Phi(x) (Phi the standard normal CDF).

  With P = (1 + k11)(1 + k22), D = sqrt(P - k12^2), t = arcsin(k12 / sqrt(P)):
    E[phi(u) phi(v)] = k12 / 4 + (k12^2 + k11 k22 D^2) / (2 pi P D) + k12 t / (2 pi),
    E[phi(u)]        = k / sqrt(2 pi (1 + k))   (Stein's lemma);
  the NTK factor is d/dk12 of the NNGP (Price's theorem), differentiated
  by hand below and checked against autodiff of the formula in the tests.
  These follow from writing Phi(u) = P(g <= u) for an independent g ~ N(0, 1)
  and using Gaussian orthant moments; they are checked against quadrature in
  the tests. With `approximate=True` the finite network uses the tanh
  approximation, and so does the kernel (by quadrature), so the two agree.
  """
  if approximate:
    return _activation_layer(dual.numerical(
        lambda x: jax.nn.gelu(x, approximate=True), 'Gelu(approximate=True)'))
  return _activation_layer(gelu_activation())


def gelu_activation() -> dual.Activation:
  """The exact GELU's `dual.Activation` (formulas in `Gelu`)."""
  # In the variables of `dual._saturating_correlation` (scale 1):
  # q_i = 1 / (1 + k_ii), r = k12 / sqrt(P), w = sqrt(1 - r^2) = D / sqrt(P),
  # the formula above reads
  #   k12 / 4 + k12 t / (2 pi)
  #     + (r^2 sqrt(q1 q2) / w + k11 sqrt(q1) k22 sqrt(q2) w) / (2 pi),
  # and its k12-derivative (by hand, using dD/dk12 = -k12 / D) is
  #   1/4 + t / (2 pi) + (2 r q1 q2 / w + r^3 q1 q2 / w^3
  #                       + r (1 - t1 t2) / w) / (2 pi),   t_i = k_ii q_i.
  # No product of variances is formed and nothing cancels, so float32 stays
  # finite and accurate at any variance (P - k12^2 lost every digit at
  # variance 1e4 and overflowed past ~1e19).
  def pieces(k12, k11, k22):
    r, one_minus_r2, q1, q2 = dual._saturating_correlation(k12, k11, k22, 1.)
    return r, one_minus_r2, q1, q2, dual._arcsin(r, one_minus_r2)

  def nngp(k12, k11, k22):
    r, one_minus_r2, q1, q2, t = pieces(k12, k11, k22)
    w = dual.safe_sqrt(one_minus_r2)
    root1, root2 = dual.safe_sqrt(q1), dual.safe_sqrt(q2)
    return (k12 / 4 + k12 * t / (2 * jnp.pi)
            + (r * r * root1 * root2 / w
               + (k11 * root1) * (k22 * root2) * w) / (2 * jnp.pi))

  def ntk_factor(k12, k11, k22):
    r, one_minus_r2, q1, q2, t = pieces(k12, k11, k22)
    inverse_w = jax.lax.rsqrt(one_minus_r2)
    q12 = q1 * q2
    one_minus_t12 = q1 + k11 * q1 * q2
    return (0.25 + t / (2 * jnp.pi)
            + r * inverse_w * (2 * q12 + r * r * q12 * inverse_w**2
                               + one_minus_t12) / (2 * jnp.pi))

  return dual.Activation(
      'Gelu()', lambda x: jax.nn.gelu(x, approximate=False), nngp=nngp,
      ntk_factor=ntk_factor,
      mean=lambda k: k / jnp.sqrt(2 * jnp.pi * (1 + k)))


# ---- Periodic and exponential. ----------------------------------------------


def Sin(a: float = 1., b: float = 1., c: float = 0.) -> Layer:
  """phi(x) = a sin(b x + c)."""
  return _activation_layer(dual.sin(*_finite('Sin', a=a, b=b, c=c)))


def Cos(a: float = 1., b: float = 1., c: float = 0.) -> Layer:
  """phi(x) = a cos(b x + c) = a sin(b x + c + pi/2)."""
  a, b, c = _finite('Cos', a=a, b=b, c=c)
  return _activation_layer(_named(
      dual.sin(a, b, c + math.pi / 2),
      f'Cos(a={a}, b={b}, c={c})'))


def Rbf(gamma: float = 1.) -> Layer:
  """phi(x) = sqrt(2) sin(sqrt(2 gamma) x + pi/4).

  Random Fourier features: the NNGP is exp(-gamma (k11 + k22 - 2 k12)), the
  RBF kernel exp(-gamma |x - y|^2 / d) right after a Dense(W_std=1) layer.
  """
  (gamma,) = _finite('Rbf', gamma=gamma)
  if gamma < 0:
    raise ValueError(f'Rbf: gamma={gamma} must be >= 0.')
  return _activation_layer(_named(
      dual.sin(math.sqrt(2), math.sqrt(2 * gamma), math.pi / 4),
      f'Rbf(gamma={gamma})'))


def Exp(a: float = 1., b: float = 1.) -> Layer:
  """phi(x) = a exp(b x)."""
  return _activation_layer(dual.exp(*_finite('Exp', a=a, b=b)))


def Gaussian(a: float = 1., b: float = -1.) -> Layer:
  """phi(x) = a exp(b x^2); needs 1 - 2 b k > 0 (always true for b <= 0)."""
  return _activation_layer(dual.gaussian(*_finite('Gaussian', a=a, b=b)))


def Sign() -> Layer:
  """phi(x) = sign(x). NTK factor 0 (phi' = 0 almost everywhere)."""
  return _activation_layer(dual.sign())


# ---- Polynomials. -----------------------------------------------------------


def _check_degree(degree, name):
  if not isinstance(degree, (int, np.integer)) or degree < 0:
    raise ValueError(f'{name}: degree must be an int >= 0, got {degree!r}.')


def Monomial(degree: int) -> Layer:
  """phi(x) = x^degree (exact for any variance, any degree)."""
  _check_degree(degree, 'Monomial')
  return _activation_layer(dual.polynomial(
      [0.] * degree + [1.], name=f'Monomial(degree={degree})'))


def Polynomial(coef: Sequence[float]) -> Layer:
  """phi(x) = sum_i coef[i] x^i."""
  coef = list(coef)
  if not coef:
    raise ValueError('Polynomial: coef must be a non-empty sequence.')
  coef = _finite('Polynomial', **{f'coef[{i}]': c for i, c in enumerate(coef)})
  return _activation_layer(dual.polynomial(coef))


def Hermite(degree: int) -> Layer:
  """phi(x) = He_n(x) / sqrt(n!), the normalized probabilists' Hermite polynomial.

  Unlike the reference library (exact only for unit-variance inputs), the
  kernel is exact for any variance: He_n is expanded into monomials.
  """
  _check_degree(degree, 'Hermite')
  coef = np.polynomial.hermite_e.herme2poly([0.] * degree + [1.])
  coef = coef / math.sqrt(math.factorial(degree))
  return _activation_layer(dual.polynomial(coef, name=f'Hermite({degree})'))


def RectifiedMonomial(degree: int) -> Layer:
  """phi(x) = max(x, 0)^degree (Cho & Saul arc-cosine kernel of that degree)."""
  _check_degree(degree, 'RectifiedMonomial')
  return _activation_layer(dual.rectified_monomial(degree))


# ---- By quadrature. ---------------------------------------------------------


def _with_derivative(fn: Callable, df: Optional[Callable]) -> Callable:
  """`fn` whose forward-mode derivative is `df` (if given)."""
  if df is None:
    return fn
  wrapped = jax.custom_jvp(fn)
  wrapped.defjvp(lambda primals, tangents: (
      fn(primals[0]), df(primals[0]) * tangents[0]))
  return wrapped


def ElementwiseNumerical(fn: Callable, deg: int = dual.DEFAULT_QUADRATURE_DEGREE,
                         df: Optional[Callable] = None) -> Layer:
  """Any elementwise `fn`, kernels by quadrature of degree `deg`.

  Args:
    fn: elementwise function (jnp).
    deg: quadrature degree (`quadrature.expect_2d`). At the default 24,
      fn at ~112 and its pair at ~2070 points per kernel entry; node counts
      grow in proportion up to 48 (~1e-11), like sqrt(deg) beyond. The
      rule is split where the arguments cross 0 and scaled to each entry's
      variance, so functions smooth away from 0 (including kinks at 0,
      like ReLU) converge spectrally at any variance.
    df: its derivative; default `jax.jvp` of `fn`.
  """
  if not isinstance(deg, (int, np.integer)) or deg < 1:
    raise ValueError(f'ElementwiseNumerical: deg must be a positive int, '
                     f'got {deg!r}.')
  return _activation_layer(dual.numerical(
      _with_derivative(fn, df), f'ElementwiseNumerical({_fn_name(fn)})', deg))


def Elementwise(fn: Optional[Callable] = None,
                nngp_fn: Optional[Callable] = None,
                d_nngp_fn: Optional[Callable] = None,
                deg: int = dual.DEFAULT_QUADRATURE_DEGREE) -> Layer:
  """An elementwise `fn` with an optional closed-form dual.

  Args:
    fn: the elementwise function (needed by apply_fn, and by quadrature).
    nngp_fn: `(cov12, var1, var2) -> E[fn(u) fn(v)]`; None uses quadrature.
    d_nngp_fn: `(cov12, var1, var2) -> E[fn'(u) fn'(v)]`; None takes
      d nngp_fn / d cov12 (Price's theorem) by autodiff.
    deg: quadrature degree when `nngp_fn` is None or `fn` follows another
      nonlinearity.
  """
  if fn is None and nngp_fn is None:
    raise ValueError('Elementwise: give fn, nngp_fn, or both.')
  name = f'Elementwise({_fn_name(fn)})'

  def missing_fn(x):
    raise NotImplementedError(f'{name}: no fn was given, so the finite network '
                              'cannot be applied; pass fn=...')
  return _activation_layer(dual.Activation(
      name, fn or missing_fn, nngp=nngp_fn, ntk_factor=d_nngp_fn,
      degree=int(deg), has_fn=fn is not None))


def _fn_name(fn) -> str:
  return getattr(fn, '__name__', type(fn).__name__)


def _quadrature_layer(name: str, fn: Callable, deg: int) -> Layer:
  return _activation_layer(dual.numerical(fn, name, deg))


def Tanh(deg: int = dual.DEFAULT_QUADRATURE_DEGREE) -> Layer:
  """phi = tanh (kernel by quadrature)."""
  return _quadrature_layer('Tanh()', jnp.tanh, deg)


def Sigmoid(deg: int = dual.DEFAULT_QUADRATURE_DEGREE) -> Layer:
  """phi = the logistic sigmoid (kernel by quadrature)."""
  return _quadrature_layer('Sigmoid()', jax.nn.sigmoid, deg)


def Softplus(deg: int = dual.DEFAULT_QUADRATURE_DEGREE) -> Layer:
  """phi(x) = log(1 + exp(x)) (kernel by quadrature)."""
  return _quadrature_layer('Softplus()', jax.nn.softplus, deg)


def Silu(deg: int = dual.DEFAULT_QUADRATURE_DEGREE) -> Layer:
  """phi(x) = x sigmoid(x), a.k.a. swish (kernel by quadrature)."""
  return _quadrature_layer('Silu()', jax.nn.silu, deg)


def Elu(alpha: float = 1., deg: int = dual.DEFAULT_QUADRATURE_DEGREE) -> Layer:
  """phi(x) = x (x > 0), alpha (exp(x) - 1) (x <= 0) (kernel by quadrature)."""
  (alpha,) = _finite('Elu', alpha=alpha)
  return _quadrature_layer(f'Elu(alpha={alpha})',
                           lambda x: jax.nn.elu(x, alpha), deg)


def Selu(deg: int = dual.DEFAULT_QUADRATURE_DEGREE) -> Layer:
  """phi = jax.nn.selu (kernel by quadrature)."""
  return _quadrature_layer('Selu()', jax.nn.selu, deg)
