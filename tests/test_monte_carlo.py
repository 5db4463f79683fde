"""monte_carlo_kernel_fn: averaging, batching, running estimates, and
convergence to the analytic kernel like 1/sqrt(width)."""

import jax
import numpy as np
import pytest

import ntkjax
from ntkjax import stax


def _network(width, readout=1):
  return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.05), stax.Relu(),
                     stax.Dense(width, W_std=1.5, b_std=0.05), stax.Erf(),
                     stax.Dense(readout, W_std=1.5, b_std=0.05))


def _inputs():
  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  return jax.random.normal(k1, (4, 6)), jax.random.normal(k2, (4, 6))


def test_average_of_empirical_kernels():
  """The estimate is the plain mean over fold_in(key, i) initializations."""
  init_fn, apply_fn, _ = _network(16, 2)
  x1, x2 = _inputs()
  key = jax.random.PRNGKey(0)
  mc = ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 3)(x1, x2)
  empirical = ntkjax.empirical_kernel_fn(apply_fn)
  manual = [empirical(x1, x2, None, init_fn(jax.random.fold_in(key, i),
                                            x1.shape)[1]) for i in range(3)]
  for field in ('nngp', 'ntk'):
    expected = np.mean([getattr(m, field) for m in manual], axis=0)
    np.testing.assert_allclose(getattr(mc, field), expected, rtol=1e-12)


def test_batching_and_running_estimates_agree():
  init_fn, apply_fn, _ = _network(16, 2)
  x1, x2 = _inputs()
  key = jax.random.PRNGKey(1)
  whole = ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 4)(x1, x2, 'ntk')
  batched = ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 4,
                                         batch_size=2)(x1, x2, 'ntk')
  np.testing.assert_allclose(batched, whole, rtol=1e-12)
  running = list(ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn, key, [2, 4])(
      x1, x2, 'ntk'))
  assert len(running) == 2
  np.testing.assert_allclose(running[-1], whole, rtol=1e-12)
  # Batch-diagonal kernels are batched along the diagonal only.
  diag = ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, batch_size=2,
                                      trace_axes=(), diagonal_axes=(0,))
  full = ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2,
                                      trace_axes=(), diagonal_axes=(0,))
  np.testing.assert_allclose(diag(x1, x2, 'ntk'), full(x1, x2, 'ntk'),
                             rtol=1e-12)


def test_bad_arguments():
  init_fn, apply_fn, _ = _network(8)
  x1, x2 = _inputs()
  with pytest.raises(ValueError, match='positive'):
    ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 0)
  with pytest.raises(ValueError, match='must divide'):
    ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 1,
                                 batch_size=3)(x1, x2)


@pytest.mark.parametrize('get', ['nngp', 'ntk'])
def test_converges_to_kernel_fn_like_inverse_sqrt_width(get):
  """Relative error of a 4-sample estimate over widths 32..512; fluctuations
  dominate (bias is O(1/width)), so the log-log slope is -1/2 (accepted
  [-0.75, -0.3]: 5 widths x 4 samples leave the slope a ~0.1 uncertainty).
  The NNGP is read off a readout as wide as the network (trace_axes=-1
  averages its channels); the NTK of a single output already concentrates."""
  x1, x2 = _inputs()
  widths = [32, 64, 128, 256, 512]
  errors = []
  for width in widths:
    init_fn, apply_fn, kernel_fn = _network(width, width if get == 'nngp' else 1)
    exact = np.asarray(kernel_fn(x1, x2, get))
    mc_fn = ntkjax.monte_carlo_kernel_fn(init_fn, apply_fn,
                                         jax.random.PRNGKey(width), 4)
    errors.append(np.linalg.norm(mc_fn(x1, x2, get) - exact)
                  / np.linalg.norm(exact))
  slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
  assert -0.75 <= slope <= -0.3, (slope, errors)
