"""Combinators and the cases the reference library refuses: stacked
nonlinearities and sums/products of non-Gaussian branches, against Monte Carlo
of the finite networks built from the same definitions."""

import jax
import numpy as np
import pytest

from conftest import (assert_monte_carlo_close,
                      check_layers_against_monte_carlo, monte_carlo)
from ntkjax import stax

WIDTH = 512


def _dense(**kwargs):
  return stax.Dense(WIDTH, W_std=1.4, b_std=0.1, **kwargs)


ARCHITECTURES = {
    # The example: two different nonlinearities, each after a Dense.
    'relu_erf_mlp': lambda: stax.serial(_dense(), stax.Relu(), _dense(),
                                        stax.Erf()),
    # Stacked nonlinearities with no Dense between (reference: error).
    'relu_then_erf': lambda: stax.serial(_dense(), stax.Relu(), stax.Erf()),
    'tanh_then_sin_then_abs': lambda: stax.serial(
        _dense(), stax.Tanh(), stax.Sin(), stax.Abs()),
    # x + Relu(Dense(x)) with x = Relu(z) non-Gaussian (reference: error).
    'residual_non_gaussian': lambda: stax.serial(
        _dense(), stax.Relu(), stax.FanOut(2),
        stax.parallel(stax.Identity(), stax.serial(_dense(), stax.Relu())),
        stax.FanInSum()),
    # Pre-activation residual blocks (all-Gaussian sums) then a nonlinearity.
    'residual_gaussian': lambda: stax.serial(
        _dense(), stax.FanOut(2),
        stax.parallel(stax.Identity(),
                      stax.serial(stax.Relu(), _dense())),
        stax.FanInSum(), stax.Erf()),
    # Branches of one field combined: z + relu(z), then a nonlinearity.
    'same_field_sum': lambda: stax.serial(
        _dense(), stax.FanOut(2), stax.parallel(stax.Relu(), stax.Identity()),
        stax.FanInSum(), stax.Tanh()),
    # z * z and z * erf(z): products of one field.
    'same_field_product': lambda: stax.serial(
        _dense(), stax.FanOut(3),
        stax.parallel(stax.Identity(), stax.Identity(), stax.Erf()),
        stax.FanInProd()),
    # Product of independent branches.
    'independent_product': lambda: stax.serial(
        _dense(), stax.Relu(), stax.FanOut(2),
        stax.parallel(stax.serial(_dense(), stax.Erf()),
                      stax.serial(_dense(), stax.Sin())),
        stax.FanInProd()),
    # Concatenation with unequal widths.
    'concat': lambda: stax.serial(
        _dense(), stax.FanOut(2),
        stax.parallel(stax.serial(stax.Dense(WIDTH // 2, W_std=0.7),
                                  stax.Relu()),
                      stax.serial(stax.Dense(WIDTH, W_std=1.5), stax.Erf())),
        stax.FanInConcat()),
    'repeat': lambda: stax.serial(
        _dense(), stax.repeat(stax.serial(stax.Relu(), _dense()), 3)),
}


@pytest.mark.parametrize('name', sorted(ARCHITECTURES))
def test_architecture_matches_monte_carlo(name, inputs):
  check_layers_against_monte_carlo(ARCHITECTURES[name], inputs, name, WIDTH,
                                  key=len(name))


def test_residual_on_raw_inputs_matches_monte_carlo(inputs):
  """x + Relu(Dense(x)) on the raw inputs: the width is the input dimension
  (6), yet the kernel is exact in expectation over the weights, so Monte
  Carlo converges to it with enough seeds (no width limit involved)."""
  x1, x2 = inputs
  d = x1.shape[-1]
  body = lambda: stax.serial(
      stax.FanOut(2),
      stax.parallel(stax.Identity(),
                    stax.serial(stax.Dense(d, W_std=1.3, b_std=0.2),
                                stax.Relu())),
      stax.FanInSum())
  net = stax.serial(body(), stax.Dense(WIDTH, W_std=1.1))
  mc = monte_carlo(net, x1, x2, jax.random.PRNGKey(3), 400, ('nngp',))['nngp']
  # No finite-width bias here: pass a huge width to the tolerance helper.
  assert_monte_carlo_close(mc, net.kernel_fn(x1, x2, 'nngp'), 1e12,
                           'input residual nngp')


def test_fan_out_parallel_shapes_and_kernels_agree(inputs):
  x1, x2 = inputs
  net = stax.serial(stax.Dense(8), stax.FanOut(2),
                    stax.parallel(stax.Relu(), stax.Erf()))
  kernels = net.kernel_fn(x1, x2, 'nngp')
  assert len(kernels) == 2
  np.testing.assert_allclose(
      kernels[0], stax.serial(stax.Dense(8), stax.Relu()).kernel_fn(x1, x2, 'nngp'))
  out_shape, params = net.init_fn(jax.random.PRNGKey(0), (-1, 6))
  outputs = net.apply_fn(params, x1)
  assert out_shape == [(-1, 8), (-1, 8)] and len(outputs) == 2


def test_repeat_equals_serial(inputs):
  x1, x2 = inputs
  block = stax.serial(stax.Dense(16, W_std=1.5, b_std=0.1), stax.Relu())
  a = stax.serial(stax.Dense(16), stax.repeat(block, 4)).kernel_fn(x1, x2)
  b = stax.serial(stax.Dense(16), *([block] * 4)).kernel_fn(x1, x2)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-12)


def test_repeat_loops_only_over_fresh_gaussian_blocks(inputs):
  """A block ending in Dense is looped with lax.scan (same kernel as the
  unrolled chain, float64); a residual block, whose output still contains its
  input field, is unrolled so that independence bookkeeping stays exact."""
  x1, x2 = inputs
  residual = stax.serial(stax.FanOut(2), stax.parallel(
      stax.Identity(), stax.serial(stax.Relu(), stax.Dense(16, W_std=1.3))),
      stax.FanInSum())
  for block in (stax.serial(stax.Relu(), stax.Dense(16, W_std=1.3, b_std=0.1)),
                residual):
    looped = stax.serial(stax.Dense(16), stax.repeat(block, 5), stax.Erf())
    unrolled = stax.serial(stax.Dense(16), *([block] * 5), stax.Erf())
    for field in ('nngp', 'ntk'):
      np.testing.assert_allclose(looped.kernel_fn(x1, x2, field),
                                 unrolled.kernel_fn(x1, x2, field), rtol=1e-12)
  jaxpr = jax.make_jaxpr(lambda x: stax.serial(
      stax.Dense(16), stax.repeat(stax.serial(stax.Relu(), stax.Dense(16)), 5)
  ).kernel_fn(x, None, 'ntk'))(x1)
  assert 'scan' in str(jaxpr)


def test_repeat_requires_shape_preserving_layer():
  net = stax.repeat(stax.Dense(3), 2)
  with pytest.raises(ValueError, match='keeps the shape'):
    net.init_fn(jax.random.PRNGKey(0), (-1, 5))


# ---- Errors that name the layer and the fix. ---------------------------------


def test_nonlinearity_after_non_gaussian_sum_is_an_error(inputs):
  x1, x2 = inputs
  net = stax.serial(
      stax.Dense(8), stax.Relu(), stax.FanOut(2),
      stax.parallel(stax.Identity(), stax.serial(stax.Dense(8), stax.Relu())),
      stax.FanInSum(), stax.Relu())
  with pytest.raises(stax.KernelError, match=r'serial layer 5 \(Relu\(\)\).*Dense'):
    net.kernel_fn(x1, x2)


def test_branches_mixing_one_field_nonlinearly_is_an_error(inputs):
  """z + Tanh(z + Dense(z)): not a sum of independent terms."""
  x1, x2 = inputs
  inner = stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), stax.Dense(8)),
                      stax.FanInSum(), stax.Tanh())
  net = stax.serial(stax.Dense(8), stax.FanOut(2),
                    stax.parallel(stax.Identity(), inner), stax.FanInSum())
  with pytest.raises(stax.KernelError, match='same Gaussian field'):
    net.kernel_fn(x1, x2)


def test_single_input_layers_reject_branches(inputs):
  x1, x2 = inputs
  net = stax.serial(stax.Dense(8), stax.FanOut(2), stax.Relu())
  with pytest.raises(stax.KernelError, match='FanInSum'):
    net.kernel_fn(x1, x2)


def test_fan_in_rejects_mismatched_widths(inputs):
  x1, x2 = inputs
  net = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(4), stax.Dense(5)),
                    stax.FanInSum())
  with pytest.raises(stax.KernelError, match='different feature shapes'):
    net.kernel_fn(x1, x2)
  with pytest.raises(ValueError, match='differ'):
    net.init_fn(jax.random.PRNGKey(0), (-1, 6))


def test_parallel_counts_branches(inputs):
  x1, x2 = inputs
  net = stax.serial(stax.FanOut(3), stax.parallel(stax.Dense(4), stax.Dense(4)))
  with pytest.raises(stax.KernelError, match='FanOut'):
    net.kernel_fn(x1, x2)


def test_concat_along_batch_axis_is_an_error(inputs):
  x1, x2 = inputs
  net = stax.serial(stax.FanOut(2), stax.FanInConcat(axis=0))
  with pytest.raises(stax.KernelError, match='channel axis'):
    net.kernel_fn(x1, x2)
