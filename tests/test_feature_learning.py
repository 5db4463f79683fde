"""Feature-learning measures (ntkjax/feature_learning.py) against exact
values, and against the lazy-rich dial of Chizat et al. 2019."""

import jax
import numpy as np
import optax
import pytest

from ntkjax import stax, train
from ntkjax.feature_learning import (after_kernel, effective_rank,
                                     kernel_alignment, kernel_drift,
                                     plot_feature_learning)


def test_alignment_exact_values():
  rng = np.random.default_rng(0)
  y = rng.standard_normal((12, 2))
  # The targets' own Gram matrix is perfectly aligned, at any scale and
  # (centered) with any constant added.
  assert kernel_alignment(y @ y.T, y) == pytest.approx(1., abs=1e-12)
  assert kernel_alignment(3. * y @ y.T + 5., y) == pytest.approx(1., abs=1e-12)
  # The identity against centered scalar targets: H I H = H, H y y^T H =
  # y y^T, so A = tr(y y^T) / (||H||_F ||y||^2) = 1 / sqrt(N - 1).
  v = rng.standard_normal(12)
  v -= v.mean()
  assert kernel_alignment(np.eye(12), v) == pytest.approx(1 / np.sqrt(11),
                                                         rel=1e-12)
  # Uncentered (Cristianini et al.): <K, Y> / (||K|| ||Y||) directly.
  k = rng.standard_normal((12, 12))
  k = k @ k.T
  expected = np.sum(k * np.outer(v, v)) / (np.linalg.norm(k) * v @ v)
  assert kernel_alignment(k, v, centered=False) == pytest.approx(expected,
                                                                 rel=1e-12)


def test_effective_rank_and_drift_exact_values():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
  # k equal singular values: entropy log k, effective rank k.
  assert effective_rank(q[:, :5] * 3.) == pytest.approx(5., rel=1e-12)
  assert effective_rank(np.outer(q[:, 0], q[:, 1])) == pytest.approx(1.)
  s = np.array([3., 1.])
  p = s / s.sum()
  assert effective_rank(np.diag(s)) == pytest.approx(
      np.exp(-np.sum(p * np.log(p))), rel=1e-12)
  k0 = np.eye(4)
  assert kernel_drift(k0, 1.5 * k0) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize('call, match', [
    (lambda: kernel_alignment(np.ones((3, 4)), np.ones(3)), r'\(N, N\)'),
    (lambda: kernel_alignment(np.eye(3), np.ones(4)), 'y has 4 rows'),
    (lambda: kernel_alignment(np.eye(3), np.ones(3)), 'constant targets'),
    (lambda: kernel_drift(np.zeros((2, 2)), np.eye(2)), 'k0 is zero'),
    (lambda: kernel_drift(np.eye(2), np.eye(3)), 'shapes'),
    (lambda: kernel_drift(np.eye(2) * np.nan, np.eye(2)), 'NaN'),
    (lambda: effective_rank(np.zeros((3, 2))), 'all zero'),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_measures_follow_the_lazy_rich_dial():
  """A width-128 Erf network fits y = sign(x_0) (d = 10, 48 examples) with
  SGD at output scale alpha (train(..., output_scale=alpha)). Lazy side:
  the parameters move O(1/alpha), so the NTK drift falls like 1/alpha
  (fitted slope over alpha = 4, 16, 64: -1.00; 1.7e-2 at 4). Rich side
  (alpha = 0.1): the kernel moves O(1) (drift 1.24) towards the targets
  (centered alignment 0.23 -> 0.30), and kernel regression with the after-
  training NTK predicts the 200 test labels better than with the initial
  one (0.905 -> 0.965): features were learned."""
  rng = np.random.default_rng(0)
  x, x_test = rng.standard_normal((48, 10)), rng.standard_normal((200, 10))
  y, y_test = np.sign(x[:, :1]), np.sign(x_test[:, :1])
  init_fn, apply_fn, _ = stax.serial(stax.Dense(128, W_std=1.4, b_std=0.1),
                                     stax.Erf(), stax.Dense(1, W_std=1.4))
  _, params = init_fn(jax.random.PRNGKey(0), x.shape)
  opt = optax.sgd(0.5)
  measures = {}
  for alpha in (0.1, 4., 16., 64.):
    trained = train(apply_fn, params, x, y, opt, 400, output_scale=alpha)
    measures[alpha] = after_kernel(apply_fn, params, trained.params, x, y,
                                   x_test, y_test)
  lazy = (4., 16., 64.)
  slope = np.polyfit(np.log(lazy), np.log([measures[a].drift for a in lazy]),
                     1)[0]
  assert -1.1 < slope < -0.9, slope
  rich = measures[0.1]
  assert rich.drift > 0.5
  assert rich.alignment_after > rich.alignment_before + 0.05
  assert rich.accuracy_after > rich.accuracy_before + 0.03
  assert measures[64.].alignment_after == pytest.approx(
      measures[64.].alignment_before, abs=1e-3)
  matplotlib = pytest.importorskip('matplotlib')
  matplotlib.use('Agg')
  axes = plot_feature_learning(list(measures), list(measures.values()))
  assert len(axes[1].lines) == 2
