"""The finite network converges to kernel_fn like 1/sqrt(width).

For one random initialization, the empirical NNGP/NTK of a network of width
n fluctuates around its infinite-width limit with standard deviation
O(n^-1/2) and has a bias O(n^-1) (Hanin & Nica 2020; Yaida 2020). Over widths
32..1024 the fluctuation dominates, so the log-log slope of the relative
Frobenius error against the width is -1/2; we accept [-0.65, -0.35] (the
slope's own sampling error with 8 seeds per width is ~0.05).
"""

import jax
import numpy as np
import pytest

from conftest import empirical_nngp, empirical_ntk
from ntkjax import stax

WIDTHS = [32, 64, 128, 256, 512, 1024]
SEEDS = 8


def _network(width, readout):
  # The example: two different nonlinearities.
  return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.05), stax.Relu(),
                     stax.Dense(width, W_std=1.5, b_std=0.05), stax.Erf(),
                     stax.Dense(readout, W_std=1.5, b_std=0.05))


def _slope(get, estimator, readout, inputs):
  x1, x2 = inputs
  errors = []
  for width in WIDTHS:
    init_fn, apply_fn, kernel_fn = _network(width, readout(width))
    exact = np.asarray(kernel_fn(x1, x2, get))
    estimate = jax.jit(lambda p: estimator(apply_fn, p, x1, x2))
    per_seed = []
    for key in jax.random.split(jax.random.PRNGKey(width), SEEDS):
      _, params = init_fn(key, (-1, x1.shape[-1]))
      error = np.linalg.norm(estimate(params) - exact) / np.linalg.norm(exact)
      per_seed.append(error)
    errors.append(np.mean(per_seed))
  slope = np.polyfit(np.log(WIDTHS), np.log(errors), 1)[0]
  return slope, errors


@pytest.mark.parametrize('get', ['nngp', 'ntk'])
def test_error_falls_like_inverse_sqrt_width(get, inputs):
  if get == 'nngp':
    slope, errors = _slope('nngp', empirical_nngp, lambda w: w, inputs)
  else:
    slope, errors = _slope('ntk', empirical_ntk, lambda w: 1, inputs)
  assert -0.65 <= slope <= -0.35, (slope, errors)
  assert errors[-1] < errors[0] / 3, errors
