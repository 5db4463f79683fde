"""Tests for ntkjax.signal: critical points, fixed points, slopes, depth scales.

Reference values are derived in the comments; the tanh edge of chaos is
checked against an independent numpy Gauss-Hermite computation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax import signal, stax

# One instance of each layer, so compiled functions are reused across tests.
RELU, ERF, TANH = stax.Relu(), stax.Erf(), stax.Tanh()


# ---- Critical points. ------------------------------------------------------


def test_he_critical_point():
  # E[relu'(u)^2] = P(u > 0) = 1/2 at every variance, so chi1 = W^2 / 2
  # whatever q* (and b_std) is: W_c^2 = 2 (He et al. 2015).
  w_c = signal.critical_W_std(RELU, np.array([0., 0.3, 1.]))
  np.testing.assert_allclose(w_c**2, 2., rtol=0, atol=1e-10)


def test_glorot_critical_point():
  # tanh, b = 0: Q(q) = W^2 (q - 2 q^2 + ...) so q* = 0 for W <= 1, where
  # chi1 = W^2 tanh'(0)^2 = W^2 < 1; for W > 1, q* = (1 - W^-2) / 2 + ...
  # and chi1 = 1 + 4/3 q*^2 + ... > 1 (Taylor expansion of E[tanh^2] and
  # E[sech^4]). The transition is at W_c = 1 (Glorot & Bengio 2010).
  assert abs(signal.critical_W_std(TANH, 0.) - 1.) < 1e-6
  assert float(signal.q_star(TANH, 0.9, 0.)) == 0.


def test_erf_critical_point():
  # erf'(0) = 2 / sqrt(pi); as for tanh, q* = 0 below W_c at b = 0, so
  # chi1 = W^2 * 4 / pi and W_c^2 = pi / 4. Above W_c, chi1 - 1 grows only
  # like (W - W_c)^2, so float64 resolves W_c to ~sqrt(1e-16) = 1e-8.
  assert abs(signal.critical_W_std(ERF, 0.)**2 - math.pi / 4) < 1e-7
  # With a bias the crossing is transversal and the root is exact to
  # rounding: chi1(W_c) = 1.
  w_c = signal.critical_W_std(ERF, 0.3)
  assert abs(float(signal.chi1(ERF, w_c, 0.3)) - 1) < 1e-13


def test_critical_point_at_zero_bias_is_exact_in_float32_too():
  # At b = 0 with phi(0) = 0, q* = 0 below W_c and chi1 = W^2 phi'(0)^2
  # there, so W_c = 1 / |phi'(0)|: tanh 1 (Glorot & Bengio 2010), erf
  # sqrt(pi) / 2, ReLU sqrt(2) (its E[phi'^2] = 1/2 at every variance), sin
  # 1 (a callable: quadrature). Bisecting chi1 - 1, which is of second order
  # in W - W_c, was 2e-4 off in float32.
  expected = [(TANH, 1.), (ERF, math.sqrt(math.pi) / 2),
              (RELU, math.sqrt(2)), (jnp.sin, 1.)]
  for activation, w_c in expected:
    assert abs(signal.critical_W_std(activation, 0.) - w_c) < 1e-12
  with jax.enable_x64(False):     # closed-form activations: quick compiles
    for activation, w_c in expected[:3]:
      assert abs(signal.critical_W_std(activation, 0.) - w_c) < 1e-6
  # phi(0) != 0: q = 0 is no fixed point, the crossing is transversal and
  # the bisection's root is where chi1 = 1.
  shifted = lambda x: jnp.tanh(x) + 0.5
  w_c = signal.critical_W_std(shifted, 0.)
  assert abs(w_c - 1.) > 1e-3
  assert abs(float(signal.chi1(shifted, w_c, 0.)) - 1) < 1e-10


def _tanh_critical_gauss_hermite(b_std):
  """Independent reference: 200-node Gauss-Hermite and plain bisections."""
  z, w = np.polynomial.hermite_e.hermegauss(200)
  w = w / w.sum()
  expect = lambda f, q: np.sum(w * f(np.sqrt(q) * z))

  def bisect(f, lo, hi):
    for _ in range(100):
      mid = (lo + hi) / 2
      lo, hi = (lo, mid) if f(lo) * f(mid) <= 0 else (mid, hi)
    return (lo + hi) / 2

  def chi1(w_std):
    q = bisect(lambda q: w_std**2 * expect(lambda u: np.tanh(u)**2, q)
               + b_std**2 - q, 1e-12, 100.)
    return w_std**2 * expect(lambda u: np.cosh(u)**-4, q)

  w_c = bisect(lambda v: chi1(v) - 1, 1., 3.)
  slope = (chi1(w_c * 1.001) - chi1(w_c / 1.001)) / (w_c * 1.001 - w_c / 1.001)
  return w_c, slope


def test_tanh_edge_of_chaos_curve():
  b_std = math.sqrt(0.05)
  w_c = signal.critical_W_std(TANH, b_std)
  # Schoenholz et al. 2017 / Pennington et al. 2017: W^2 ~ 1.76 at b^2 = 0.05.
  assert round(w_c**2, 2) == 1.76
  reference, slope = _tanh_critical_gauss_hermite(b_std)
  # stax.Tanh's kernels are degree-24 quadratures, accurate to ~1e-6
  # (DESIGN.md), so chi1 may be off by 1e-6 and W_c by 1e-6 / (dchi1/dW).
  assert abs(w_c - reference) < 1e-6 / slope
  # The root itself is found to working precision: chi1(W_c) = 1.
  assert abs(float(signal.chi1(TANH, w_c, b_std)) - 1.) < 1e-10


def test_critical_line_rises_with_bias():
  # A bias adds variance, which pushes tanh into saturation (smaller
  # E[phi'^2]); a larger W_std is needed to reach chi1 = 1.
  w_c = signal.critical_W_std(TANH, np.array([0., 0.1, 0.3, 0.6]))
  assert np.all(np.diff(w_c) > 0)


def test_no_critical_point_raises():
  # sign' = 0 almost everywhere, so chi1 = 0 for every W_std.
  with pytest.raises(ValueError, match='does not cross 1'):
    signal.critical_W_std(stax.Sign(), 0.1)


# ---- Fixed points and slopes, checked against the maps themselves. -----------


@pytest.mark.parametrize('act, w_std, b_std', [(ERF, 2., 0.2), (TANH, 1.5, 0.3),
                                               (RELU, 1.2, 0.3)])
def test_q_star_is_the_limit_of_the_q_map(act, w_std, b_std):
  fixed = signal.mean_field(act, w_std, b_std)
  q = 1.
  # Contraction rate Q'(q*) <= 0.72 (ReLU: W^2 / 2) in all three cases:
  # 150 steps leave 0.72^150 ~ 1e-21.
  for _ in range(150):
    q = float(signal.q_map(act, q, w_std, b_std))
  assert abs(q - float(fixed.q_star)) < 1e-10 * q
  # The autodiff slope Q'(q*) against a central difference (error h^2 Q'''/6).
  h = 1e-4 * q
  slope = (signal.q_map(act, q + h, w_std, b_std)
           - signal.q_map(act, q - h, w_std, b_std)) / (2 * h)
  assert abs(float(slope) - float(fixed.q_slope)) < 1e-7


def test_relu_closed_forms():
  # Q(q) = W^2 q / 2 + b^2: q* = b^2 / (1 - W^2 / 2) for W^2 < 2, 0 for
  # b = 0, none (inf) for W^2 > 2; chi1 = Q'(q) = W^2 / 2 everywhere.
  m = signal.mean_field(RELU, np.array([1.2, 1.2, 1.6]),
                        np.array([0.3, 0., 0.3]))
  np.testing.assert_allclose(m.q_star[:2], [0.09 / (1 - 0.72), 0.], atol=1e-12)
  assert np.isinf(m.q_star[2])
  # chi1 comes from the layer's arc-cosine NTK factor (pi - theta) / (2 pi)
  # at c = 1, where rho = k12 / (sqrt(k11) sqrt(k22)) is 1 only to rounding
  # and theta = arccos(rho) ~ sqrt(2 * 1e-16) ~ 1.5e-8: a relative error
  # up to theta / pi ~ 5e-9. Q'(q*) (autodiff of the variance W^2 q / 2)
  # has no such loss.
  np.testing.assert_allclose(m.chi1, [0.72, 0.72, 1.28], rtol=1e-8)
  np.testing.assert_allclose(m.q_slope, [0.72, 0.72, 1.28], rtol=1e-14)
  np.testing.assert_allclose(m.xi_grad, -1 / np.log(np.asarray(m.chi1)),
                             rtol=1e-12)
  assert np.all(np.asarray(m.c_star) == 1.)  # no chaotic fixed point: see docs


def test_c_star_is_the_limit_of_the_correlation_map():
  # Chaotic (chi1 ~ 1.52 > 1): c* < 1 attracts every start in (-1, 1); the
  # contraction rate is chi_c ~ 0.83, so 200 steps leave < 1e-14.
  fixed = signal.mean_field(ERF, 2., 0.2)
  assert float(fixed.chi1) > 1 and float(fixed.c_star) < 1
  c = np.array([-0.5, 0.3, 0.99])
  for _ in range(200):
    c = np.asarray(signal.correlation_map(ERF, c, 2., 0.2))
  np.testing.assert_allclose(c, float(fixed.c_star), atol=1e-10)
  # Ordered (chi1 ~ 0.68): every correlation converges to c* = 1.
  ordered = signal.mean_field(ERF, 1., 0.5)
  assert float(ordered.chi1) < 1 and float(ordered.c_star) == 1.
  c = np.array([0.3, 0.9])
  for _ in range(100):  # 1 - c shrinks by ~chi1 per step: 0.68^100 ~ 1e-17
    c = np.asarray(signal.correlation_map(ERF, c, 1., 0.5))
  np.testing.assert_allclose(c, 1., atol=1e-10)


def _one_sided_slope_at_one(act, w_std, b_std, h=1e-5):
  # Second-order one-sided difference: error h^2 |C'''| / 3 and roundoff
  # ~1e-16 / h. For erf, C(c) = (2 W^2 / pi) arcsin(a c) / q* + ... with
  # a = 2 q* / (1 + 2 q*) < 1, and |C'''| <= 200 for the cases below
  # (a^3 (1 + 2 a^2) / (1 - a^2)^(5/2) times 2 W^2 / pi): error < 1e-8.
  c = signal.correlation_map(act, np.array([1., 1 - h, 1 - 2 * h]), w_std,
                             b_std)
  return float((3 * c[0] - 4 * c[1] + c[2]) / (2 * h))


@pytest.mark.parametrize('w_std, b_std', [(1.5, 0.3), (2.5, 0.1)])
def test_chi1_is_the_slope_of_the_correlation_map_at_one(w_std, b_std):
  # Price's theorem: dC/dc = W^2 E[phi'(u) phi'(v)] q* / Q(q*), = chi1 at
  # c = 1. Erf has separate closed forms for E[phi phi] (arcsin) and
  # E[phi' phi'] (1 / sqrt(det)), so this checks one against the other.
  # (Not done for quadrature layers: the rule's panels move with c, as
  # they scale with sqrt(1 - c^2), so its error is not smooth at c = 1 and
  # differences of C there do not converge to the rule's E[phi'^2].)
  chi1 = float(signal.chi1(ERF, w_std, b_std))
  assert abs(_one_sided_slope_at_one(ERF, w_std, b_std) - chi1) < 1e-7


def test_tanh_chi1_against_gauss_hermite():
  # q* and chi1 of stax.Tanh() (degree-24 quadrature, ~1e-6, DESIGN.md)
  # against 200-node Gauss-Hermite (exact to ~1e-14 for this smooth phi).
  z, w = np.polynomial.hermite_e.hermegauss(200)
  w = w / w.sum()
  m = signal.mean_field(TANH, 1.3, 0.2)
  q = float(m.q_star)
  residual = 1.3**2 * np.sum(w * np.tanh(np.sqrt(q) * z)**2) + 0.2**2 - q
  assert abs(residual) < 1e-10
  chi1 = 1.3**2 * np.sum(w * np.cosh(np.sqrt(q) * z)**-4)
  assert abs(float(m.chi1) - chi1) < 1e-6


def test_chi_c_is_the_slope_at_c_star_and_depth_scales():
  m = signal.mean_field(ERF, 2.5, 0.1)
  c_star = float(m.c_star)
  h = 1e-5
  c = signal.correlation_map(ERF, np.array([c_star - h, c_star + h]), 2.5, 0.1)
  slope = float((c[1] - c[0]) / (2 * h))   # error h^2 C''' / 6 ~ 1e-10
  assert abs(slope - float(m.chi_c)) < 1e-8
  # Schoenholz et al. 2017: xi^-1 = -log(rate); chaotic: gradients explode.
  np.testing.assert_allclose(m.xi_c, -1 / np.log(float(m.chi_c)), rtol=1e-12)
  np.testing.assert_allclose(m.xi_q, -1 / np.log(float(m.q_slope)), rtol=1e-12)
  assert float(m.xi_grad) < 0 < float(m.xi_c)
  scales = signal.depth_scales(ERF, 2.5, 0.1)
  assert float(scales.xi_c) == float(m.xi_c)


def test_depth_scales_diverge_at_criticality():
  w_c = signal.critical_W_std(ERF, 0.3)
  near = signal.depth_scales(ERF, w_c * np.array([0.9, 0.99, 0.999]), 0.3)
  # Ordered side: chi_c = chi1 -> 1, so xi_c = xi_grad grows without bound.
  assert np.all(np.diff(near.xi_c) > 0) and float(near.xi_c[-1]) > 100
  np.testing.assert_allclose(near.xi_c, near.xi_grad, rtol=1e-12)


def test_vectorised_matches_pointwise():
  grid = signal.chi1(ERF, np.array([[0.8, 1.6], [2.4, 3.2]]), 0.2)
  point = signal.chi1(ERF, 2.4, 0.2)
  assert grid.shape == (2, 2) and float(grid[1, 0]) == pytest.approx(
      float(point), abs=1e-14)


def test_callable_uses_the_same_quadrature_as_the_layer():
  # jnp.tanh is wrapped as ElementwiseNumerical(jnp.tanh), the same rule
  # (degree 24) as stax.Tanh(), so the numbers agree to rounding.
  a = signal.mean_field(jnp.tanh, 1.3, 0.2)
  b = signal.mean_field(TANH, 1.3, 0.2)
  np.testing.assert_allclose(a.chi1, b.chi1, rtol=1e-12)
  np.testing.assert_allclose(a.q_star, b.q_star, rtol=1e-12)


# ---- Whole networks. -------------------------------------------------------


def test_layer_statistics_converge_to_mean_field():
  # Ordered Erf network: after L blocks q -> q* (rate Q' ~ 0.2), c -> 1 and
  # the NTK gain of a (Dense, Erf) pair -> chi1 on and off the diagonal
  # (1 - c shrinks like chi1^L = 0.68^60 ~ 1e-10).
  w_std, b_std, depth = 1., 0.5, 60
  x = np.random.RandomState(0).randn(3, 5)
  dense = stax.Dense(1, w_std, b_std)
  layers = [dense, ERF] * depth + [dense]
  stats = signal.layer_statistics(layers, x)
  m = signal.mean_field(ERF, w_std, b_std)
  np.testing.assert_allclose(stats.q1[-1], float(m.q_star), rtol=1e-10)
  np.testing.assert_allclose(stats.c[-1], 1., atol=1e-8)
  pair_gain = np.asarray(stats.chi[-2] * stats.chi[-1])  # Erf, then Dense
  np.testing.assert_allclose(pair_gain, float(m.chi1), rtol=1e-7)
  # A Dense layer multiplies the incoming NTK by W_std^2 exactly.
  np.testing.assert_allclose(stats.chi[-1], w_std**2, rtol=1e-14)


def test_layer_statistics_chaotic_blocks():
  # Blocks serial(Dense, Erf) in the chaotic phase: each block's NTK gain on
  # the diagonal is chi1 at the block's variance, which converges to q*
  # fast (Q' ~ 0.25), while the off-diagonal gain is below it (chi_c < chi1).
  w_std, b_std = 2., 0.2
  x = np.random.RandomState(1).randn(3, 5)
  block = stax.serial(stax.Dense(1, w_std, b_std), ERF)
  stats = signal.layer_statistics([block] * 20, x)
  m = signal.mean_field(ERF, w_std, b_std)
  np.testing.assert_allclose(np.diagonal(stats.chi[-1]), float(m.chi1),
                             rtol=1e-10)
  off = stats.chi[-1][~np.eye(3, dtype=bool)]
  assert np.all(off < float(m.chi1))


# ---- Phase diagram, plots, errors. -----------------------------------------


def test_phase_diagram_regions_match_critical_line():
  w = np.linspace(0.5, 3., 6)
  b = np.array([0., 0.5, 1.])
  diagram = signal.phase_diagram(ERF, w, b)
  assert diagram.mean_field.chi1.shape == (3, 6)
  np.testing.assert_allclose(diagram.critical_W_std,
                             signal.critical_W_std(ERF, b), rtol=1e-12)
  chaotic = diagram.mean_field.chi1 > 1
  np.testing.assert_array_equal(
      chaotic, w[None, :] > diagram.critical_W_std[:, None])


def test_plot_phase_diagram():
  pytest.importorskip('matplotlib')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  diagram = signal.phase_diagram(ERF, np.linspace(0.5, 3., 5),
                                 np.array([0., 0.5]))
  for quantity in ('chi1', 'xi_c'):
    ax = signal.plot_phase_diagram(diagram, quantity=quantity)
    assert ax.get_xlabel() == 'W_std^2'
    plt.close(ax.figure)


@pytest.mark.parametrize('call, name', [
    (lambda: signal.chi1(ERF, -1., 0.), 'W_std'),
    (lambda: signal.q_star(ERF, 1., np.nan), 'b_std'),
    (lambda: signal.chi1('relu', 1., 0.), 'activation'),
    (lambda: signal.chi1(stax.Dense(3), 1., 0.), 'activation'),
    (lambda: signal.correlation_map(ERF, 1.5, 1., 0.), 'c='),
])
def test_bad_inputs(call, name):
  with pytest.raises(ValueError, match=name):
    call()
