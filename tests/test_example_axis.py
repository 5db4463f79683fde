"""vmap_axes='auto': the example axis read off the jaxpr (ntkjax.example_axis).

Two properties, each with a test that fails if detection were always on or
always off:

* per-example functions (MLP, CNN, attention over the tokens of one example,
  an embedding lookup, a scan over layers, examples on output axis 1, a
  per-example mask keyword argument, Flax NNX and Equinox models) are
  detected, the default call takes the per-example path (XLA's flop count
  of the compiled call is a fraction of the vmap_axes=None call's: checked
  by counting, not timing), and its kernel equals the definition;
* functions that couple examples (batch statistics, attention across the
  batch, a mean over the batch, a Gram matrix of the batch, sorting,
  reversing, cumulative sums or scans along the batch, a random mask drawn
  for the whole batch) are not, and the default call equals the definition.

The definition is independent of ntkjax: the Jacobians of f with respect to
the raveled parameters (`jax.jacrev`), contracted with an explicit einsum.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import ntkjax
from ntkjax import example_axis, stax

RNG = np.random.default_rng(0)


def _normal(*shape):
  return jnp.asarray(RNG.standard_normal(shape))


def _reference(f, params, x1, x2, kwargs=None, out_axis=0):
  """J(x1) J(x2)^T with axes (N1, N2, O1, O2), from ravel_pytree + jacrev."""
  kwargs = kwargs or {}
  flat, unravel = ravel_pytree(params)
  jac = lambda x: jnp.moveaxis(
      jax.jacrev(lambda q: f(unravel(q), x, **kwargs))(flat), out_axis, 0)
  j1, j2 = jac(x1), jac(x2)
  j1 = j1.reshape(j1.shape[0], -1, flat.size)
  j2 = j2.reshape(j2.shape[0], -1, flat.size)
  return jnp.einsum('iaP,jbP->ijab', j1, j2)


def _flat(ntk):
  """(N1, N2, O1, O2) or (N1, N2) -> (N1, N2, O1 * O2)."""
  return ntk.reshape(ntk.shape[:2] + (-1,))


def _flops(f, x1, x2, params, vmap_axes):
  fn = ntkjax.empirical_ntk_fn(
      f, trace_axes=(), vmap_axes=vmap_axes,
      implementation=ntkjax.NtkImplementation.JACOBIAN_CONTRACTION)
  analysis = jax.jit(lambda a, b, p: fn(a, b, p)).lower(
      x1, x2, params).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis['flops'])


# ----------------------------------------------------------------------------
# Per-example functions.


def _mlp():
  params = {'w1': _normal(3, 8), 'b1': _normal(8), 'w2': _normal(8, 2)}
  f = lambda p, x: jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2']
  return f, params, _normal(5, 3), _normal(4, 3), {}


def _stax_cnn():
  init_fn, apply_fn, _ = stax.serial(
      stax.Conv(3, (2, 2), padding='SAME'), stax.Relu(),
      stax.AvgPool((2, 2)), stax.GlobalAvgPool(), stax.Dense(2))
  _, params = init_fn(jax.random.PRNGKey(1), (-1, 4, 4, 2))
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  return apply_fn, params, _normal(3, 4, 4, 2), _normal(2, 4, 4, 2), {}


def _token_attention():
  """Self-attention over the 4 tokens of each example, then a mean pool."""
  params = {'q': _normal(3, 3), 'k': _normal(3, 3), 'v': _normal(3, 2)}

  def f(p, x):                          # x: (N, tokens, 3)
    logits = jnp.einsum('ntd,nsd->nts', x @ p['q'], x @ p['k'])
    return jnp.mean(jax.nn.softmax(logits) @ (x @ p['v']), axis=1)
  return f, params, _normal(3, 4, 3), _normal(2, 4, 3), {}


def _embedding():
  """Token ids -> a parameter table (gather), then a dense readout."""
  params = {'table': _normal(7, 3), 'w': _normal(3, 2)}
  f = lambda p, x: jnp.sum(jnp.take(p['table'], x, axis=0), axis=1) @ p['w']
  ids = lambda n: jnp.asarray(RNG.integers(0, 7, (n, 5)))
  return f, params, ids(4), ids(3), {}


def _scan_layers():
  """Three tanh layers applied by `lax.scan` over stacked weights."""
  params = {'stack': 0.5 * _normal(3, 4, 4), 'out': _normal(4, 2)}

  def f(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p['stack'])
    return h @ p['out']
  return f, params, _normal(4, 4), _normal(3, 4), {}


def _output_axis_1():
  params = {'w': _normal(3, 2)}
  return (lambda p, x: jnp.tanh(x @ p['w']).T, params, _normal(4, 3),
          _normal(3, 3), {})


def _masked_kwarg():
  """A per-example mask keyword argument (shape (N, tokens))."""
  params = {'w': _normal(3, 2)}
  f = lambda p, x, mask: jnp.sum(jnp.tanh(x @ p['w']) * mask[..., None], 1)
  x = _normal(4, 5, 3)
  mask = jnp.asarray(RNG.integers(0, 2, (4, 5)), jnp.float64)
  return f, params, x, None, {'mask': mask}


class _NnxMlp(nnx.Module):

  def __init__(self, rngs):
    kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
    self.hidden = nnx.Linear(3, 6, **kw)
    self.norm = nnx.LayerNorm(6, **kw)
    self.out = nnx.Linear(6, 2, **kw)

  def __call__(self, x):
    return self.out(nnx.gelu(self.norm(self.hidden(x))))


def _nnx():
  graphdef, state = nnx.split(_NnxMlp(nnx.Rngs(0)))
  f = lambda p, x: nnx.merge(graphdef, p)(x)
  return f, state, _normal(4, 3), _normal(3, 3), {}


def _equinox():
  model = eqx.nn.MLP(3, 2, 5, 2, activation=jax.nn.softplus,
                     key=jax.random.PRNGKey(0))
  model = jax.tree.map(lambda a: a.astype(jnp.float64)
                       if eqx.is_inexact_array(a) else a, model)
  params, static = eqx.partition(model, eqx.is_inexact_array)
  f = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  return f, params, _normal(4, 3), _normal(3, 3), {}


PER_EXAMPLE = {
    'mlp': (_mlp, (0, 0, {})),
    'stax_cnn': (_stax_cnn, (0, 0, {})),
    'token_attention': (_token_attention, (0, 0, {})),
    'embedding': (_embedding, (0, 0, {})),
    'scan_layers': (_scan_layers, (0, 0, {})),
    'output_axis_1': (_output_axis_1, (0, 1, {})),
    'masked_kwarg': (_masked_kwarg, (0, 0, {'mask': 0})),
    'nnx': (_nnx, (0, 0, {})),
    'equinox': (_equinox, (0, 0, {})),
}


@pytest.mark.parametrize('name', sorted(PER_EXAMPLE))
def test_per_example_functions_are_detected(name):
  build, expected = PER_EXAMPLE[name]
  f, params, x1, x2, kwargs = build()
  assert example_axis.example_axes(f, params, x1, kwargs) == expected
  out_axis = expected[1]
  x2_ = x1 if x2 is None else x2
  reference = _flat(_reference(f, params, x1, x2_, kwargs, out_axis))
  ntk = ntkjax.empirical_ntk_fn(f, trace_axes=())(x1, x2, params, **kwargs)
  if out_axis == 1:                     # (O1, O2, N1, N2) -> (N1, N2, ...)
    ntk = jnp.moveaxis(ntk, (2, 3), (0, 1))
  np.testing.assert_allclose(_flat(ntk), reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('name', ['mlp', 'token_attention', 'scan_layers'])
def test_default_takes_the_per_example_path(name):
  """Fails if detection were always off: the default call's compiled flop
  count is that of vmap_axes=0, a fraction of vmap_axes=None's."""
  f, params, x1, x2, _ = PER_EXAMPLE[name][0]()
  # 16 examples a side. Jacobians: N x O reverse passes of one example
  # instead of the batch, a factor N; the contraction (N1 N2 O^2 P, the
  # same on both paths) is about as large here, so the total halves.
  x1, x2 = (jnp.concatenate([x] * 4) for x in (x1, x2))
  auto = _flops(f, x1, x2, params, 'auto')
  assert auto == _flops(f, x1, x2, params, 0)
  assert auto < 0.6 * _flops(f, x1, x2, params, None)


def test_batch_size_dependent_python_is_not_per_example():
  """`jnp.squeeze` drops the batch axis of one example: f on one example
  returns a different shape, so the per-example path is not taken."""
  params = {'w': _normal(3, 1)}
  f = lambda p, x: jnp.squeeze(x @ p['w'])[:, None]
  x = _normal(4, 3)
  assert example_axis.output_label(f, params, x, {}) == 0
  assert example_axis.example_axes(f, params, x, {}) is None


# ----------------------------------------------------------------------------
# Functions that couple examples.


def _dense(p, x):
  return x @ p['w1']


def _batch_norm(p, x):
  h = _dense(p, x)
  return jnp.tanh((h - h.mean(0)) / h.std(0)) @ p['w2']


def _batch_attention(p, x):
  h = _dense(p, x)
  return jax.nn.softmax(h @ h.T) @ h @ p['w2']


def _mean_over_batch(p, x):
  return jnp.tanh(_dense(p, x) - jnp.mean(x @ p['w1'], 0)) @ p['w2']


def _gram(p, x):
  h = jnp.tanh(_dense(p, x))
  return (h @ h.T) @ h @ p['w2']


def _sort_batch(p, x):
  return jnp.sort(jnp.tanh(_dense(p, x)), axis=0) @ p['w2']


def _reverse_batch(p, x):
  return (jnp.tanh(_dense(p, x)) + jnp.tanh(_dense(p, x))[::-1]) @ p['w2']


def _cumsum_batch(p, x):
  return jnp.cumsum(jnp.tanh(_dense(p, x)), axis=0) @ p['w2']


def _scan_over_batch(p, x):
  def step(carry, h):
    carry = jnp.tanh(carry + h)
    return carry, carry
  _, hs = jax.lax.scan(step, jnp.zeros(x.shape[1:]), x)
  return hs @ p['w1'] @ p['w2']


def _first_example(p, x):
  return jnp.tanh(_dense(p, x) - _dense(p, x)[0]) @ p['w2']


def _dropout_whole_batch(p, x):
  keep = jax.random.bernoulli(jax.random.key(0), 0.5, (x.shape[0], 4))
  return jnp.where(keep, jnp.tanh(_dense(p, x)), 0.) @ p['w2']


COUPLING = [_batch_norm, _batch_attention, _mean_over_batch, _gram,
            _sort_batch, _reverse_batch, _cumsum_batch, _scan_over_batch,
            _first_example, _dropout_whole_batch]


@pytest.mark.parametrize('f', COUPLING, ids=lambda f: f.__name__[1:])
def test_coupled_examples_are_detected(f):
  """Fails if detection were always on: per-example Jacobians of these
  functions differ from the definition."""
  params = {'w1': _normal(4, 4), 'w2': _normal(4, 2)}
  x1, x2 = _normal(5, 4), _normal(3, 4)
  assert example_axis.example_axes(f, params, x1, {}) is None
  ntk = ntkjax.empirical_ntk_fn(f, trace_axes=())(x1, x2, params)
  np.testing.assert_allclose(_flat(ntk), _flat(_reference(f, params, x1, x2)),
                             rtol=1e-10, atol=1e-10)


def test_per_example_path_would_be_wrong_for_coupled_functions():
  """The negative control behind the test above: forcing vmap_axes=0 on a
  batch-norm function gives a different kernel."""
  params = {'w1': _normal(4, 4), 'w2': _normal(4, 2)}
  x1, x2 = _normal(5, 4), _normal(3, 4)
  forced = ntkjax.empirical_ntk_fn(_mean_over_batch, trace_axes=(),
                                   vmap_axes=0)(x1, x2, params)
  reference = _reference(_mean_over_batch, params, x1, x2)
  assert float(jnp.max(jnp.abs(forced - reference))) > 1e-3 * float(
      jnp.max(jnp.abs(reference)))


def test_explicit_vmap_axes_wins_and_bad_values_raise():
  f, params, x1, x2, _ = _mlp()
  explicit = ntkjax.empirical_ntk_fn(f, trace_axes=(), vmap_axes=None)
  np.testing.assert_allclose(explicit(x1, x2, params),
                             _reference(f, params, x1, x2), rtol=1e-10)
  with pytest.raises(ValueError, match="vmap_axes='automatic'"):
    ntkjax.empirical_ntk_fn(f, vmap_axes='automatic')(x1, x2, params)
