"""Tests for ntkjax.spectrum: exact spectra, step-size limits, depth regimes."""

import math

import numpy as np
import pytest

from ntkjax import predict, signal, spectrum, stax

ERF = stax.Erf()
N, D = 6, 5


def _sphere_inputs(seed=0):
  # Equal norms (|x|^2 = d), so all inputs share one variance q at every
  # layer: then the chaotic NTK tends to a multiple of the identity.
  x = np.random.RandomState(seed).randn(N, D)
  return x / np.linalg.norm(x, axis=1, keepdims=True) * math.sqrt(D)


def _network(depth, w_std, b_std):
  return stax.serial(*[stax.Dense(64, w_std, b_std), ERF] * depth,
                     stax.Dense(1, w_std, b_std))


def test_spectrum_is_eigvalsh_of_the_kernels():
  x = np.random.RandomState(1).randn(N, D)
  kernel_fn = _network(3, 1.4, 0.2).kernel_fn
  for get in ('ntk', 'nngp'):
    s = spectrum.spectrum(kernel_fn, x, get)
    expected = np.linalg.eigvalsh(np.asarray(kernel_fn(x, None, get)))
    np.testing.assert_allclose(s.eigenvalues, expected, rtol=0,
                               atol=1e-13 * expected[-1])
    assert float(s.lambda_min) == float(s.eigenvalues[0])
    assert float(s.lambda_max) == float(s.eigenvalues[-1])
    np.testing.assert_allclose(s.condition_number, expected[-1] / expected[0],
                               rtol=1e-12)
    np.testing.assert_allclose(s.max_learning_rate, 2 / expected[-1],
                               rtol=1e-12)


def test_depth_sweep_equals_networks_built_at_each_depth():
  x = np.random.RandomState(2).randn(N, D)
  fast = spectrum.depth_sweep(x, 5, activation=ERF, W_std=1.4, b_std=0.2)
  slow = spectrum.depth_sweep(x, 5, network_fn=lambda L: _network(L, 1.4, 0.2))
  np.testing.assert_array_equal(fast.depths, np.arange(1, 6))
  for name in ('ntk', 'nngp'):
    np.testing.assert_allclose(getattr(fast, name).eigenvalues,
                               getattr(slow, name).eigenvalues, rtol=1e-12)
  theta = np.asarray(_network(4, 1.4, 0.2).kernel_fn(x, None, 'ntk'))
  np.testing.assert_allclose(fast.ntk.eigenvalues[3], np.linalg.eigvalsh(theta),
                             rtol=1e-12)
  assert np.all(fast.diagonal_error < 1e-12)


def test_max_learning_rate_is_the_stability_limit():
  # f <- f - eta Theta (f - y) multiplies the residual's component along the
  # top eigenvector by (1 - eta lambda_max): |.| = 0.96 at 0.98 eta_max
  # (converges), 1.04 at 1.02 eta_max (grows by 1.04^500 ~ 3e8).
  x = _sphere_inputs()
  theta = np.asarray(_network(2, 1.4, 0.2).kernel_fn(x, None, 'ntk'))
  eta_max = float(spectrum.kernel_spectrum(theta).max_learning_rate)
  y = np.random.RandomState(3).randn(N)
  for factor, grows in ((0.98, False), (1.02, True)):
    residual = -y
    for _ in range(500):
      residual = residual - factor * eta_max * theta @ residual
    assert (np.linalg.norm(residual) > 1e6 * np.linalg.norm(y)) == grows


def test_convergence_times_match_gradient_descent_dynamics():
  # predict.gradient_descent_mse uses the loss |f - y|^2 / (2 |y|), i.e. the
  # flow exp(-eta' t Theta / |y|); eta' = eta |y| is our eta. After
  # t_i = 1 / (eta lambda_i) steps the i-th residual component is e^-1 of
  # its start.
  x = _sphere_inputs()
  theta = np.asarray(_network(2, 1.4, 0.2).kernel_fn(x, None, 'ntk'))
  s = spectrum.kernel_spectrum(theta)
  eta = 0.5 * float(s.max_learning_rate)
  times = np.asarray(spectrum.convergence_times(s.eigenvalues, eta))
  np.testing.assert_allclose(times, 1 / (eta * np.asarray(s.eigenvalues)),
                             rtol=1e-14)
  y = np.random.RandomState(4).randn(N, 1)
  predict_fn = predict.gradient_descent_mse(theta, y, learning_rate=eta * N)
  _, vectors = np.linalg.eigh(theta)
  for i in (0, N - 1):
    f_t = np.asarray(predict_fn(t=times[i], fx_train_0=np.zeros_like(y)))
    ratio = (vectors[:, i] @ (f_t - y)) / (vectors[:, i] @ (-y))
    assert float(ratio.squeeze()) == pytest.approx(math.exp(-1), rel=1e-9)
  with pytest.raises(ValueError, match='learning_rate'):
    spectrum.convergence_times(s.eigenvalues, 0.)


def test_ordered_phase_condition_number_blows_up():
  # Erf, W^2 = 1, b^2 = 0.25: chi1 ~ 0.68 < 1 (ordered). All correlations
  # -> 1, so K and Theta tend to constant matrices; 1 - c_L ~ chi1^L, and
  # the NNGP's lambda_min (its non-constant part) shrinks by chi1 per layer,
  # up to corrections O(chi1^L) ~ 1e-5 at L = 31.
  sweep = spectrum.depth_sweep(_sphere_inputs(), 32, activation=ERF,
                               W_std=1., b_std=0.5)
  chi1 = float(signal.chi1(ERF, 1., 0.5))
  assert chi1 < 1
  for s in (sweep.ntk, sweep.nngp):
    assert np.all(np.diff(np.asarray(s.condition_number)) > 0)
  # The NTK's non-constant part is a sum over layers of such terms,
  # ~ L chi1^L, so cond(Theta) ~ chi1^-L / L: over the last 10 layers it
  # grows by chi1^-10 * 22 / 32 > chi1^-10 / 2 (~24).
  cond = np.asarray(sweep.ntk.condition_number)
  assert cond[-1] / cond[-11] > 0.5 * chi1**-10
  lam = np.asarray(sweep.nngp.lambda_min)
  assert abs(lam[-1] / lam[-2] - chi1) < 1e-4


def test_chaotic_phase_condition_number_tends_to_one():
  # Erf, W^2 = 9, b^2 = 0.25: chi1 ~ 2.1 > 1, chi_c ~ 0.75. Theta_ii grows
  # like chi1^L while Theta_ij (i != j) converges (rate chi_c), so
  # cond(Theta) - 1 ~ chi1^-L, with O(chi_c^L) corrections (Xiao et al.
  # 2020). The NNGP tends to q* ((1 - c*) I + c* 1 1^T), condition number
  # (1 + (N - 1) c*) / (1 - c*), again up to O(chi_c^L) ~ 1e-4 at L = 32.
  sweep = spectrum.depth_sweep(_sphere_inputs(), 32, activation=ERF,
                               W_std=3., b_std=0.5)
  m = signal.mean_field(ERF, 3., 0.5)
  chi1, chi_c, c_star = float(m.chi1), float(m.chi_c), float(m.c_star)
  assert sweep.diagonal_error.max() < 1e-9   # recursion still accurate
  cond = np.asarray(sweep.ntk.condition_number)
  assert np.all(np.diff(cond[:20]) < 0) and cond[19] - 1 < 1e-6
  L = 15
  rate = (cond[L] - 1) / (cond[L - 1] - 1)
  assert abs(rate * chi1 - 1) < 3 * chi_c**L   # chi_c^15 ~ 0.014
  nngp_limit = (1 + (N - 1) * c_star) / (1 - c_star)
  assert abs(float(sweep.nngp.condition_number[-1]) / nngp_limit - 1) < 1e-3


def test_critical_line_lies_between_the_phases():
  x = _sphere_inputs()
  w_c = signal.critical_W_std(ERF, 0.5)
  conds = [float(spectrum.depth_sweep(x, 20, activation=ERF, W_std=w,
                                      b_std=0.5).ntk.condition_number[-1])
           for w in (1., w_c, 3.)]
  # ordered >> critical (polynomial in L) >> chaotic (~1)
  assert conds[0] > 100 * conds[1] and conds[1] > 2 * conds[2]


def test_plot_depth_sweep():
  pytest.importorskip('matplotlib')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  x = _sphere_inputs()
  sweeps = [spectrum.depth_sweep(x, 4, activation=ERF, W_std=w, b_std=0.5)
            for w in (1., 3.)]
  axes = spectrum.plot_depth_sweep(sweeps)
  assert len(axes[0].lines) == 3   # two sweeps and the reference line at 1
  plt.close(axes[0].figure)


def test_bad_inputs():
  with pytest.raises(ValueError, match='square'):
    spectrum.kernel_spectrum(np.ones((3, 4)))
  with pytest.raises(ValueError, match='exactly one'):
    spectrum.depth_sweep(_sphere_inputs(), 3)
  with pytest.raises(ValueError, match='max_depth'):
    spectrum.depth_sweep(_sphere_inputs(), 0, activation=ERF)
  with pytest.raises(ValueError, match='get'):
    spectrum.spectrum(ERF.kernel_fn, _sphere_inputs(), 'cov1')


def test_chaotic_phase_kernel_matches_independent_recursion_at_depth_60():
  """Erf, W^2 = 9, b^2 = 0.25 (chi1 ~ 2.1): the 2-d formula's fixed point
  at correlation 1 is unstable, so without care the diagonal of the NNGP
  drifts from the variance by rounding x chi1^L (O(1) by L ~ 50). Compare
  with a NumPy recursion of the arcsine kernel (Williams 1997),
  K' = W^2 (2/pi) arcsin(2 K12 / sqrt((1 + 2 K11)(1 + 2 K22))) + b^2, whose
  diagonal uses the 1-d map K11' = W^2 (2/pi) arcsin(2 K11 / (1 + 2 K11))
  + b^2."""
  depth, w2, b2 = 60, 9., 0.25
  x = np.random.default_rng(1).standard_normal((6, 7))
  x /= np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(7)
  k = w2 * x @ x.T / x.shape[1] + b2
  for _ in range(depth):
    q = np.diag(k)
    off = np.arcsin(2 * k / np.sqrt(np.outer(1 + 2 * q, 1 + 2 * q)))
    k = w2 * (2 / np.pi) * off + b2
    np.fill_diagonal(k, w2 * (2 / np.pi) * np.arcsin(2 * q / (1 + 2 * q)) + b2)
  network = stax.serial(*[stax.Dense(1, 3., 0.5), stax.Erf()] * depth,
                        stax.Dense(1, 3., 0.5))
  nngp = network.kernel_fn(x, None, "nngp")
  np.testing.assert_allclose(nngp, k, rtol=1e-9)
