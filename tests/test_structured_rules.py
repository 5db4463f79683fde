"""STRUCTURED_DERIVATIVES' rule table on biases and elementwise scalings.

Each model is checked against the mathematical definition of the NTK,
computed without ntkjax: the Jacobian of f with respect to the raveled
parameters (`ravel_pytree`, `jax.jacrev`), contracted with an explicit
einsum. Each model also names the parameter leaves that must stay on the
per-leaf Jacobian fallback, so that a bias or scale silently falling back
(correct, but not what the rules are for) fails the test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

import ntkjax
from ntkjax import _structured as structured

jax.config.update('jax_enable_x64', True)

STRUCTURED = ntkjax.NtkImplementation.STRUCTURED_DERIVATIVES
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def jacobian(f, params, x):
  """df(params, x)/dq of f -> (N, O) at the raveled parameters q: (N, O, P)."""
  flat, unravel = ravel_pytree(params)
  jac = jax.jit(jax.jacrev(lambda q, x: f(unravel(q), x)),
                compiler_options=FAST_COMPILE)
  return jac(flat, x)


def reference_ntk(j1, j2, trace_axes):
  """J1 J2^T from the Jacobians (N, O, P) of `jacobian`.

  Returns (N1, N2, O, O) for trace_axes=() and the mean over the logits,
  (N1, N2), for trace_axes=(-1,).
  """
  if trace_axes == ():
    return jnp.einsum('iap,jbp->ijab', j1, j2)
  return jnp.einsum('iap,jap->ij', j1, j2) / j1.shape[1]


def fallback_leaves(f, params, x, vmap_axes):
  """Indices (in `jax.tree.leaves(params)` order) of the leaves handled by
  the Jacobian fallback when f is traced on x (one example of it when
  `vmap_axes` is an int)."""
  axes = None if vmap_axes is None else (vmap_axes, vmap_axes, {})
  prepared, _ = structured.prepare(f, params, x, {}, axes)
  structural = {use.leaf for use in prepared.analysis.uses}
  fallback = set(prepared.analysis.fallback_leaves)
  assert structural | fallback == set(range(len(jax.tree.leaves(params))))
  return fallback


def _check(f, params, d_in, fallback=(), vmaps=(None, 0)):
  """The NTK of f equals `reference_ntk` for trace_axes () and (-1,), with
  and without vmap_axes, with x2 given (all four) and x2 = None (two of
  them, to keep compilations few); exactly the leaves in `fallback` are
  handled by the fallback, for every vmap setting."""
  x1, x2 = _normal(11, (3,) + d_in), _normal(12, (2,) + d_in)
  for vmap in vmaps:
    assert fallback_leaves(f, params, x1, vmap) == set(fallback), vmap
  j1, j2 = jacobian(f, params, x1), jacobian(f, params, x2)
  for t, trace in enumerate(((), (-1,))):
    for v, vmap in enumerate(vmaps):
      ntk_fn = jax.jit(ntkjax.empirical_ntk_fn(f, trace, (), vmap, STRUCTURED),
                       compiler_options=FAST_COMPILE)
      cases = [('x2', x2, j2)] + ([('none', None, j1)] if t == v else [])
      for name, second, j in cases:
        np.testing.assert_allclose(
            ntk_fn(x1, second, params), reference_ntk(j1, j, trace),
            rtol=1e-10, atol=1e-12,
            err_msg=f'trace={trace} vmap={vmap} x2={name}')


def _mlp_params(sizes, seed=0):
  return [{'W': _normal(seed + 2 * i, (a, b)) / np.sqrt(a),
           'b': _normal(seed + 2 * i + 1, (b,))}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]


def mlp(p, x):
  for i, layer in enumerate(p):
    x = x @ layer['W'] + layer['b']
    if i < len(p) - 1:
      x = jnp.tanh(x)
  return x


def test_mlp_with_biases():
  # Leaves: (W, b) per layer, sorted by key: b, W, b, W, b, W.
  _check(mlp, _mlp_params((4, 5, 3, 2)), (4,))


def test_bias_added_without_a_batch_axis_and_broadcast_to_the_batch():
  """Per example without a batch axis, `x @ W + b` is a plain `add` of two
  (n,) arrays; `jnp.broadcast_to(c, (3, N, n))` grows the size
  (`broadcast_in_dim` rule)."""
  params = {'W': _normal(1, (3, 4)), 'b': _normal(2, (4,)),
            'c': _normal(3, (2,)), 'V': _normal(4, (4, 2))}

  def one(p, xi):                            # one example: (3,)
    return jnp.tanh(xi @ p['W'] + p['b']) @ p['V']

  def f(p, x):
    h = jnp.stack([one(p, xi) for xi in x])  # plain `add` per example
    # A broadcast that grows the size even for one example (3 copies).
    return h + jnp.broadcast_to(p['c'], (3,) + h.shape).mean(0)
  x = _normal(5, (1, 3))
  prepared, _ = structured.prepare(f, params, x, {}, None)
  kinds = {use.leaf: use.kind for use in prepared.analysis.uses}
  # Leaves sorted by key: V, W, b, c.
  assert kinds == {0: 'dot_general', 1: 'dot_general', 2: 'add',
                   3: 'broadcast_in_dim'}, kinds
  # The Python loop uses V, W, b once per example without vmap_axes.
  assert fallback_leaves(f, params, _normal(6, (3, 3)), None) == {0, 1, 2}
  _check(f, params, (3,), fallback=(), vmaps=(0,))


def test_cnn_with_conv_bias_nhwc():
  params = {'K': _normal(1, (3, 3, 2, 4)) / 3, 'bias': _normal(2, (4,)),
            'V': _normal(3, (4, 2)), 'c': _normal(4, (2,))}

  def f(p, x):                               # x: (N, H, W, C)
    y = lax.conv_general_dilated(x, p['K'], (1, 1), 'SAME',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = jnp.tanh(y + p['bias'])              # bias broadcast over N, H, W
    return y.mean((1, 2)) @ p['V'] + p['c']
  _check(f, params, (4, 3, 2))


def test_layer_norm_scale_and_bias_and_signs():
  """`(h - mean) / std * scale + bias`, then `h - shift` (the parameter on
  the right of a sub: sign -1) and `num / d` with a parameter-dependent
  denominator d (div rule)."""
  params = {'W': _normal(1, (3, 5)), 'scale': _normal(2, (5,)),
            'bias': _normal(3, (5,)), 'shift': _normal(4, (1, 5)),
            'num': _normal(5, (5,)), 'V': _normal(6, (5, 2))}

  def f(p, x):
    h = x @ p['W']
    h = (h - h.mean(-1, keepdims=True)) / h.std(-1, keepdims=True)
    h = jnp.tanh(h * p['scale'] + p['bias'])
    h = jnp.cos(h - p['shift'])
    return (p['num'] / (1 + h ** 2)) @ p['V']
  _check(f, params, (3,))


def test_scalar_scale_and_elementwise_weight():
  """x * s with s of shape () (not a view: x is not a scalar) and an
  elementwise weight of the hidden layer's full per-example shape."""
  params = {'s': jnp.asarray(0.7), 'W': _normal(1, (3, 4)),
            'E': _normal(2, (1, 4)), 'V': _normal(3, (4, 2))}

  def f(p, x):
    h = jnp.tanh((x * p['s']) @ p['W'])
    return jnp.sin(h * p['E']) @ p['V']
  # Leaves sorted by key: E, V, W, s.
  _check(f, params, (3,))


def test_shared_bias_and_two_parameters_in_one_equation_fall_back():
  """A bias used twice, a product of two parameters (W1 @ W2) and a bias
  plus a bias: all on the fallback, exact; the rest structured."""
  params = {'a': _normal(1, (3, 3)), 'b': _normal(2, (3,)),
            'c': _normal(3, (3,)), 'd': _normal(4, (3,)),
            'e': _normal(5, (3, 2)), 'f': _normal(6, (3, 4)),
            'g': _normal(7, (4, 3))}

  def f(p, x):
    h = jnp.tanh(x @ p['a'] + p['b'])
    h = jnp.tanh(h @ (p['f'] @ p['g']) + p['b'])
    return (h + (p['c'] + p['d'])) @ p['e']
  # Leaves: a, b, c, d, e, f, g.
  _check(f, params, (3,), fallback=(1, 2, 3, 5, 6))


def test_a_wrong_bias_rule_is_caught(monkeypatch):
  """Negative control: an `add` rule that forgets to sum the broadcast
  (batch) axis on each side, pairing the examples instead, is structural
  but gives a different kernel; the correct rule gives the reference."""
  params = _mlp_params((3, 4, 2))
  x = _normal(1, (3, 3))
  j = jacobian(mlp, params, x)
  expected = reference_ntk(j, j, ())
  ntk_fn = ntkjax.empirical_ntk_fn(mlp, (), (), None, STRUCTURED)
  np.testing.assert_allclose(ntk_fn(x, None, params), expected, rtol=1e-10)

  def no_broadcast_sum(step, position, avals, shared, fresh):
    ndim = len(avals[step.outputs[0]].shape)
    return ''.join(shared(('y', d)) for d in range(ndim)), ()
  rule = structured.RULES['add']
  monkeypatch.setitem(structured.RULES, 'add',
                      rule._replace(subscripts=no_broadcast_sum))
  assert fallback_leaves(mlp, params, x, None) == set()
  wrong = ntk_fn(x, None, params)
  assert np.max(np.abs(wrong - expected)) > 1e-3 * np.max(np.abs(expected))


@pytest.mark.parametrize('primitive', ['add', 'sub', 'mul', 'div',
                                       'broadcast_in_dim'])
def test_rules_are_table_entries(primitive):
  rule = structured.RULES[primitive]
  assert callable(rule.applies) and callable(rule.record)
  assert callable(rule.subscripts)
