"""STRUCTURED_DERIVATIVES on the primitives it exploits and the ones it falls
back on, against the direct definition (`conftest.direct_empirical_kernel`:
forward-mode Jacobians of the flattened parameters and explicit loops).

Each model also states which parameter leaves must be handled by a
structured rule (not by the per-leaf Jacobian fallback), so a silent
fallback everywhere, which would still be correct, fails the test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import direct_empirical_kernel
from jax import lax

import ntkjax
from ntkjax import NtkImplementation, stax
from ntkjax import _structured as structured

STRUCTURED = NtkImplementation.STRUCTURED_DERIVATIVES
# Tiny programs compiled once each: XLA's cheapest settings halve the
# compile time, which dominates this file's run time.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _conv(dims, strides, padding, lhs_dilation=None, rhs_dilation=None):
  """A one-layer conv net + mean readout; returns (f, params, x shape)."""
  lhs, rhs, out = dims
  n_spatial = len(lhs) - 2
  spatial = (5, 4, 3)[:n_spatial]
  x_shape = [0] * (n_spatial + 2)
  x_shape[lhs.index('N')], x_shape[lhs.index('C')] = 1, 2
  for d, size in zip([i for i, c in enumerate(lhs) if c not in 'NC'], spatial):
    x_shape[d] = size
  w_shape = [0] * (n_spatial + 2)
  w_shape[rhs.index('O')], w_shape[rhs.index('I')] = 3, 2
  for d, size in zip([i for i, c in enumerate(rhs) if c not in 'OI'],
                     (3, 2, 2)[:n_spatial]):
    w_shape[d] = size
  params = {'w': _normal(1, w_shape), 'v': _normal(2, (3, 2))}

  def f(p, x):
    y = lax.conv_general_dilated(x, p['w'], strides, padding, lhs_dilation,
                                 rhs_dilation, dims)
    y = jnp.tanh(y)
    spatial_axes = tuple(i for i, c in enumerate(out) if c not in 'NC')
    return jnp.moveaxis(y.mean(spatial_axes), out.index('C') - sum(
        1 for a in spatial_axes if a < out.index('C')), -1) @ p['v']
  return f, params, tuple(x_shape)


CONVS = {
    'nchw_valid': (('NCHW', 'OIHW', 'NCHW'), (1, 1), 'VALID'),
    'nhwc_same_strided': (('NHWC', 'HWIO', 'NHWC'), (2, 1), 'SAME'),
    'dilated_padded': (('NCHW', 'OIHW', 'NHWC'), (1, 2), ((1, 2), (0, 1)),
                       None, (2, 1)),
    'transposed': (('NHWC', 'HWIO', 'NHWC'), (1, 1), ((1, 1), (1, 0)), (2, 2)),
    'conv1d': (('NWC', 'WIO', 'NWC'), (1,), 'SAME'),
    'conv3d': (('NCDHW', 'OIDHW', 'NCDHW'), (1, 1, 1), 'VALID'),
}


def _check(f, params, x_shape, structured_leaves, vmap_axes=(None, 0),
           trace_axes=((), (-1,))):
  """STRUCTURED equals the direct definition; the named leaves are structured.

  Args:
    f, params: the model.
    x_shape: shape of one batch of inputs (axis 0 = examples).
    structured_leaves: indices (in `jax.tree.leaves(params)` order) that must
      be handled by a structured rule.
    vmap_axes, trace_axes: the options to try.
  """
  x1 = _normal(11, (3,) + tuple(x_shape[1:]))
  x2 = _normal(12, (2,) + tuple(x_shape[1:]))
  prepared, _ = structured.prepare(f, params, x1, {}, None)
  got = {use.leaf for use in prepared.analysis.uses}
  assert got == set(structured_leaves), (got, prepared.analysis)
  for trace in trace_axes:
    expected = direct_empirical_kernel(f, params, x1, x2, trace, (), 'ntk')
    for vmap in vmap_axes:
      ntk_fn = jax.jit(ntkjax.empirical_ntk_fn(f, trace, (), vmap, STRUCTURED),
                       compiler_options=FAST_COMPILE)
      np.testing.assert_allclose(ntk_fn(x1, x2, params), expected, rtol=1e-10,
                                 atol=1e-12, err_msg=f'trace={trace} vmap={vmap}')
    same = jax.jit(ntkjax.empirical_ntk_fn(f, trace, (), None, STRUCTURED),
                   compiler_options=FAST_COMPILE)(x1, None, params)
    np.testing.assert_allclose(
        same, direct_empirical_kernel(f, params, x1, x1, trace, (), 'ntk'),
        rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', sorted(CONVS))
def test_convolutions(name):
  f, params, x_shape = _conv(*CONVS[name])
  _check(f, params, x_shape, structured_leaves=[0, 1],   # 'v', 'w'
         trace_axes=((),))


def test_dense_layers_of_stax_both_parameterizations():
  init_fn, apply_fn, _ = stax.serial(
      stax.Dense(5, W_std=1.3, b_std=0.2), stax.Relu(),
      stax.Dense(4, W_std=0.9, b_std=0.1, parameterization='standard'),
      stax.Gelu(), stax.Dense(2))
  _, params = init_fn(jax.random.PRNGKey(0), (-1, 3))
  # leaves: (W1, b1), (), (W2, b2), (), (W3,): weights and biases are
  # structured (dot_general and add rules).
  _check(apply_fn, params, (1, 3), structured_leaves=[0, 1, 2, 3, 4])


def test_batched_contraction_and_parameter_as_left_operand():
  """Attention-like einsums (dot_general with batch dimensions), weights on
  the left (as in Equinox), and weights seen through transpose, reshape,
  a dtype round trip, negation and scalar multiplication/division."""
  params = {'heads': _normal(1, (2, 3, 4)),      # (head, in, out)
            'left': _normal(2, (5, 8)),          # applied as left @ h
            'flat': _normal(3, (6, 5))}

  def f(p, x):                                     # x: (N, 2, 3)
    h = jnp.einsum('nhi,hio->nho', x, p['heads'])  # batch dim h
    h = jnp.sin(h).reshape(x.shape[0], 8)
    w = -(p['left'].astype(jnp.float32).astype(jnp.float64) * 0.7) / 1.9
    h = jnp.tanh(h @ w.T)                          # (N, 5)
    v = p['flat'].reshape(3, 2, 5).transpose(2, 0, 1).reshape(5, 6)
    return 2.0 * (h @ v)
  _check(f, params, (1, 2, 3), structured_leaves=[0, 1, 2])


def test_fallback_leaves_are_exact():
  """Shared weights, nonlinear use of a parameter, a parameter returned as
  an output, an unused parameter, a grouped convolution, a custom_jvp
  function and a scan over the parameters: all handled by the per-leaf
  Jacobian fallback; the plain dense weight and the two biases (added once
  each: the `add` rule) stay structured."""
  params = {'a_shared': _normal(1, (3, 3)), 'b_bias': _normal(2, (3,)),
            'c_nonlinear': _normal(3, (3,)), 'd_returned': _normal(4, (1,)),
            'e_unused': _normal(5, (2,)), 'f_grouped': _normal(6, (2, 1, 2)),
            'g_scan': _normal(7, (2, 3)), 'h_dense': _normal(8, (3, 3))}

  def f(p, x):                                     # x: (N, 3)
    h = x @ p['h_dense']
    h = h @ p['a_shared'] @ p['a_shared'].T + p['b_bias']
    h = jax.nn.relu(h) + jnp.exp(p['c_nonlinear'])
    img = h[:, None, :2] * jnp.ones((1, 2, 1))     # (N, C=2, W=2)
    img = lax.conv_general_dilated(img, p['f_grouped'], (1,), 'SAME',
                                   feature_group_count=2)
    h = h + img.sum((1, 2))[:, None]
    h, _ = lax.scan(lambda c, w: (jnp.tanh(c * w), None), h, p['g_scan'])
    return jnp.concatenate([h, h[:, :1] * 0 + p['d_returned']], axis=-1)
  _check(f, params, (1, 3), structured_leaves=[1, 3, 7])


def test_nested_jit_is_inlined():
  params = {'w1': _normal(1, (3, 4)), 'w2': _normal(2, (4, 2))}
  layer = jax.jit(lambda w, h: jnp.tanh(h @ w))

  def f(p, x):
    return layer(p['w2'], layer(p['w1'], x))
  _check(f, params, (1, 3), structured_leaves=[0, 1])


def test_parameter_times_closed_over_constants():
  """A parameter multiplied by arrays closed over by f (jaxpr constants, not
  literals): a constant matrix (positional-embedding mixing in attention)
  and a constant scalar array. Both structured, exact."""
  mixing = np.array([[1., 0.5, 0.], [0.5, 1., 0.2], [0., 0.2, 1.]])
  scale = np.array(0.7)

  def f(p, x):
    e = jnp.asarray(mixing) @ p['e']
    return jnp.tanh(x @ (e * jnp.asarray(scale))) @ p['w']
  params = {'e': _normal(1, (3, 4)), 'w': _normal(2, (4, 2))}
  _check(f, params, (1, 3), structured_leaves=[0, 1])


def test_shape_dependent_program_falls_back_to_jacobian_contraction():
  """f branches on the batch size, so x1 and x2 trace to different programs;
  the kernel is still exact."""
  params = {'w': _normal(1, (3, 2)), 'u': _normal(2, (3, 2))}

  def f(p, x):
    w = p['w'] if x.shape[0] == 3 else p['u']
    return jnp.tanh(x @ w)
  x1, x2 = _normal(3, (3, 3)), _normal(4, (2, 3))
  np.testing.assert_allclose(
      ntkjax.empirical_ntk_fn(f, (), (), None, STRUCTURED)(x1, x2, params),
      direct_empirical_kernel(f, params, x1, x2, (), (), 'ntk'),
      rtol=1e-10, atol=1e-12)


def test_auto_picks_the_cheapest_estimate_and_structured_for_a_wide_mlp():
  init_fn, apply_fn, _ = stax.serial(stax.Dense(256), stax.Relu(),
                                     stax.Dense(256), stax.Relu(),
                                     stax.Dense(3))
  _, params = init_fn(jax.random.PRNGKey(0), (-1, 32))
  x = _normal(1, (16, 32))
  costs = ntkjax.ntk_implementation_costs(apply_fn, x, None, params,
                                          trace_axes=(), vmap_axes=0)
  assert set(costs) == {NtkImplementation.JACOBIAN_CONTRACTION,
                        NtkImplementation.NTK_VECTOR_PRODUCTS, STRUCTURED}
  # A dense layer's NTK costs N^2 (n_in + O^2 n_out) structured against
  # N^2 O^2 n_in n_out contracted: orders of magnitude apart here.
  assert costs[STRUCTURED] * 10 < min(
      cost for name, cost in costs.items() if name != STRUCTURED)
  auto = ntkjax.empirical_ntk_fn(apply_fn, (), (), 0, NtkImplementation.AUTO)
  np.testing.assert_allclose(
      auto(x, None, params),
      ntkjax.empirical_ntk_fn(apply_fn, (), (), 0, STRUCTURED)(x, None, params),
      rtol=1e-12)
