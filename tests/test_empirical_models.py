"""empirical_ntk_fn on larger library models: a Flax NNX residual CNN on
32x32x3 images and an Equinox Transformer block.

* ResNet (NNX): a 3x3 stem conv, two residual blocks (conv-LayerNorm-relu-
  conv + skip; the second downsamples with stride 2 and a 1x1 projection on
  the skip), global average pooling and a Dense head with 3 outputs.
* Transformer (Equinox): a Dense token embedding of (L=5, d=6) inputs,
  pre-LayerNorm 2-head self-attention over the tokens of each example, a
  pre-LayerNorm MLP, both residual, mean pool over tokens, Dense head to 3.
* ResNet with BatchNorm in train mode (batch statistics couple examples):
  only `vmap_axes=None` is valid; every implementation must still be exact.

Every `NtkImplementation`, under `jax.jit`, must give the NTK of the model's
pure function `f(params, x)` (x1: 3 examples, x2: 2) for both trace_axes
conventions and with and without `vmap_axes=0` (where valid; for the ResNet
the traced NTK with vmap_axes=0 only, to keep the compilations few). AUTO's
choice must be the cheapest by `ntk_implementation_costs` (it picks a
different implementation for different models and settings here), and
`ntkjax.batch` over samples (blocks of 2) must give the unbatched kernel.
Parameters are float64 normal draws: the checks are exact identities, true
for any parameter values. Nothing is timed here (see benchmarks/).

The reference is independent of ntkjax: the params are flattened with
`ravel_pytree`, the Jacobian of f(x) with respect to that vector comes from
`jax.jacrev`, and the NTK from one `tensordot` and an explicit einsum.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from conftest import ntk_from_jacobians

import ntkjax
from ntkjax import NtkImplementation
from ntkjax import empirical

# Small programs, each compiled once: compile time dominates this file's run
# time, and XLA's cheapest settings cut it 3-4x (without the CPU fusion
# emitters most of all: ~0.4 s instead of ~1.8 s per NTK program here).
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True,
                'xla_cpu_use_fusion_emitters': False}
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def _materialize(tree, seed=0):
  """Abstract leaves (from eval_shape) -> float64 normal draws (cheap: no
  library initializer is compiled)."""
  rng = np.random.default_rng(seed)
  fill = lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape))
  return jax.tree.map(
      lambda s: fill(s) if isinstance(s, jax.ShapeDtypeStruct) else s, tree)


# ----------------------------------------------------------------------------
# Models.


class _Block(nnx.Module):
  """conv-norm-relu-conv plus a skip (a strided 1x1 projection when the
  shape changes), then relu."""

  def __init__(self, c_in, c_out, stride, norm, rngs):
    kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
    self.conv1 = nnx.Conv(c_in, c_out, (3, 3), strides=stride, **kw)
    self.norm = norm(c_out, **kw)
    self.conv2 = nnx.Conv(c_out, c_out, (3, 3), **kw)
    self.project = stride != 1 or c_in != c_out
    if self.project:
      self.skip = nnx.Conv(c_in, c_out, (1, 1), strides=stride, **kw)

  def __call__(self, x):
    h = self.conv2(nnx.relu(self.norm(self.conv1(x))))
    return nnx.relu(h + (self.skip(x) if self.project else x))


class _ResNet(nnx.Module):
  """(N, 32, 32, 3) -> (N, 3)."""

  def __init__(self, norm, rngs):
    kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
    self.stem = nnx.Conv(3, 4, (3, 3), **kw)
    self.block1 = _Block(4, 4, 1, norm, rngs)
    self.block2 = _Block(4, 8, 2, norm, rngs)
    self.head = nnx.Linear(8, 3, **kw)

  def __call__(self, x):
    h = self.block2(self.block1(nnx.relu(self.stem(x))))
    return self.head(h.mean(axis=(1, 2)))


def _layer_norm(features, **kw):
  return nnx.LayerNorm(features, **kw)


def _batch_norm(features, **kw):
  """Batch statistics (train mode): couples the examples of a batch."""
  return nnx.BatchNorm(features, use_running_average=False, **kw)


class _TransformerBlock(eqx.Module):
  """One example (L, d) -> (3,)."""
  embed: eqx.nn.Linear
  norm1: eqx.nn.LayerNorm
  attention: eqx.nn.MultiheadAttention
  norm2: eqx.nn.LayerNorm
  mlp: eqx.nn.MLP
  head: eqx.nn.Linear

  def __init__(self, d_in, width, key):
    keys = jax.random.split(key, 4)
    self.embed = eqx.nn.Linear(d_in, width, key=keys[0])
    self.norm1 = eqx.nn.LayerNorm(width)
    self.attention = eqx.nn.MultiheadAttention(
        num_heads=2, query_size=width, use_query_bias=True,
        use_key_bias=True, use_value_bias=True, use_output_bias=True,
        key=keys[1])
    self.norm2 = eqx.nn.LayerNorm(width)
    self.mlp = eqx.nn.MLP(width, width, width_size=2 * width, depth=1,
                          activation=jax.nn.gelu, key=keys[2])
    self.head = eqx.nn.Linear(width, 3, key=keys[3])

  def __call__(self, x):                       # x: (L, d_in)
    h = jax.vmap(self.embed)(x)
    n = jax.vmap(self.norm1)(h)
    h = h + self.attention(n, n, n)
    h = h + jax.vmap(self.mlp)(jax.vmap(self.norm2)(h))
    return self.head(h.mean(axis=0))


def _from_flax(make):
  """f(params, x) and params: the Params vary, other state is closed over
  (BatchNorm's running statistics, which train mode never reads). merge
  with copy=True: train mode writes the statistics to the merged module,
  and nnx refuses to mutate the closed-over Variables from inside a trace
  (TraceContextError)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  params, rest = _materialize((params, rest))
  return (lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)), params


def _from_equinox(make, *args, **kwargs):
  """f(params, x) and params: the Equinox module acts on one example."""
  model = _materialize(eqx.filter_eval_shape(make, *args, **kwargs))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params


MODELS = {   # name: (builds (f, params), shape of one example)
    'resnet': (lambda: _from_flax(lambda: _ResNet(_layer_norm, nnx.Rngs(0))),
               (32, 32, 3)),
    'transformer': (lambda: _from_equinox(_TransformerBlock, 6, 8,
                                          jax.random.PRNGKey(0)), (5, 6)),
    'resnet_batchnorm': (
        lambda: _from_flax(lambda: _ResNet(_batch_norm, nnx.Rngs(0))),
        (32, 32, 3)),
}
PER_EXAMPLE = ['resnet', 'transformer']


@functools.lru_cache(maxsize=None)
def _model(name):
  make, shape = MODELS[name]
  f, params = make()
  return f, params, shape


def _inputs(name, n1, n2, seed=1):
  _, _, shape = _model(name)
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((n1, *shape))),
          jnp.asarray(rng.standard_normal((n2, *shape))))


@functools.lru_cache(maxsize=None)
def _case(name):
  """f, params, x1 (3 examples), x2 (2) and the flat Jacobians J(x1), J(x2)
  of shape (N, O, P). For the per-example models one Jacobian of x1 and x2
  stacked gives both (one compilation instead of two)."""
  f, params, _ = _model(name)
  x1, x2 = _inputs(name, 3, 2)
  flat, unravel = ravel_pytree(params)
  jac = jax.jit(jax.jacrev(lambda q, x: f(unravel(q), x)),
                compiler_options=FAST_COMPILE)
  if name in PER_EXAMPLE:
    j = np.asarray(jac(flat, jnp.concatenate([x1, x2])))
    return f, params, x1, x2, j[:len(x1)], j[len(x1):]
  return f, params, x1, x2, np.asarray(jac(flat, x1)), np.asarray(jac(flat, x2))


_reference = ntk_from_jacobians


def _ntk(name, trace_axes, vmap_axes, implementation):
  f, params, x1, x2, _, _ = _case(name)
  ntk_fn = jax.jit(ntkjax.empirical_ntk_fn(f, trace_axes=trace_axes,
                                           vmap_axes=vmap_axes,
                                           implementation=implementation),
                   compiler_options=FAST_COMPILE)
  ntk = np.asarray(ntk_fn(x1, x2, params))
  assert ntk.dtype == np.float64
  return ntk


# ----------------------------------------------------------------------------
# Tests.


def test_batchnorm_model_couples_examples():
  """The BatchNorm model's output for an example depends on the others in
  its batch (else its test would not test coupled examples)."""
  f, params, x1, _, _, _ = _case('resnet_batchnorm')
  forward = jax.jit(f, compiler_options=FAST_COMPILE)
  together, alone = np.asarray(forward(params, x1)), np.asarray(
      forward(params, x1[:2]))
  assert together.shape == (3, 3) and together.dtype == np.float64
  assert np.max(np.abs(alone - together[:2])) > 1e-3


# The ResNet's compilations cost most: its traced NTK (trace_axes=(-1,)) is
# checked with vmap_axes=0 only (no vmap: the untraced NTK only).
@pytest.mark.parametrize('implementation', [
    NtkImplementation.JACOBIAN_CONTRACTION,
    NtkImplementation.NTK_VECTOR_PRODUCTS,
    NtkImplementation.STRUCTURED_DERIVATIVES], ids=lambda i: i.name)
@pytest.mark.parametrize('name, trace_axes, vmap_axes', [
    ('resnet', (), None), ('resnet', (), 0), ('resnet', (-1,), 0),
    ('transformer', (), None), ('transformer', (), 0),
    ('transformer', (-1,), None), ('transformer', (-1,), 0)], ids=[
        'resnet-no_trace-no_vmap', 'resnet-no_trace-vmap0',
        'resnet-trace-vmap0', 'transformer-no_trace-no_vmap',
        'transformer-no_trace-vmap0', 'transformer-trace-no_vmap',
        'transformer-trace-vmap0'])
def test_ntk_equals_reference(name, trace_axes, vmap_axes, implementation):
  _, _, _, _, j1, j2 = _case(name)
  np.testing.assert_allclose(_ntk(name, trace_axes, vmap_axes, implementation),
                             _reference(j1, j2, trace_axes), **TOLERANCE)


@pytest.mark.parametrize('implementation, trace_axes', [
    (NtkImplementation.JACOBIAN_CONTRACTION, ()),
    (NtkImplementation.JACOBIAN_CONTRACTION, (-1,)),
    (NtkImplementation.NTK_VECTOR_PRODUCTS, ()),
    (NtkImplementation.NTK_VECTOR_PRODUCTS, (-1,)),
    (NtkImplementation.STRUCTURED_DERIVATIVES, ()),
    (NtkImplementation.STRUCTURED_DERIVATIVES, (-1,)),
    (NtkImplementation.AUTO, ())],
    ids=lambda v: v.name if isinstance(v, NtkImplementation)
    else ('trace' if v else 'no_trace'))
def test_coupled_examples_without_vmap_equal_reference(implementation,
                                                       trace_axes):
  """BatchNorm with batch statistics: f is not per-example, vmap_axes=None;
  every implementation is still the NTK of f."""
  _, _, _, _, j1, j2 = _case('resnet_batchnorm')
  np.testing.assert_allclose(
      _ntk('resnet_batchnorm', trace_axes, None, implementation),
      _reference(j1, j2, trace_axes), **TOLERANCE)


@pytest.mark.parametrize('vmap_axes, trace_axes', [(None, ()), (0, (-1,))],
                         ids=['no_vmap-no_trace', 'vmap0-trace'])
@pytest.mark.parametrize('name', PER_EXAMPLE)
def test_auto_choice_is_the_cheapest(name, vmap_axes, trace_axes):
  """AUTO runs the implementation that `ntk_implementation_costs` rates
  cheapest, near-ties settled by `_TIE_ORDER` (a real one, never AUTO),
  and its result is the reference."""
  f, params, x1, x2, j1, j2 = _case(name)
  wrapped = lambda p, x: f(p, x)   # a fresh function: its own cache entries
  costs = empirical.ntk_implementation_costs(
      wrapped, x1, x2, params, trace_axes=trace_axes, vmap_axes=vmap_axes)
  assert set(costs) == {NtkImplementation.JACOBIAN_CONTRACTION,
                        NtkImplementation.NTK_VECTOR_PRODUCTS,
                        NtkImplementation.STRUCTURED_DERIVATIVES}
  assert all(np.isfinite(c) and c > 0 for c in costs.values()), costs
  ntk_fn = jax.jit(ntkjax.empirical_ntk_fn(
      wrapped, trace_axes=trace_axes, vmap_axes=vmap_axes,
      implementation=NtkImplementation.AUTO), compiler_options=FAST_COMPILE)
  np.testing.assert_allclose(np.asarray(ntk_fn(x1, x2, params)),
                             _reference(j1, j2, trace_axes), **TOLERANCE)
  chosen = [choice for key, choice in empirical._AUTO_CHOICES.items()
            if any(part is wrapped for part in key)]
  assert len(chosen) == 1, chosen
  assert chosen[0] in costs
  # The cheapest, or a near-tie settled by the documented order.
  cheapest = min(costs.values())
  tied = [c for c in empirical._TIE_ORDER
          if costs[c] <= cheapest * (1 + empirical._COST_TIE)]
  assert chosen[0] == tied[0] == empirical.auto_choice(costs), (chosen[0],
                                                                 costs)


def _close(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.max(np.abs(b)))


def test_batch_over_samples_equals_unbatched():
  """ntkjax.batch(ntk_fn, 2) over the samples of the ResNet's NTK, called
  as (x1, x2, params) with x1 of 6 examples and x2 of 4 (blocks of 2 x 2),
  equals the unbatched NTK (N1, N2, O, O)."""
  f, params, _ = _model('resnet')
  x1, x2 = _inputs('resnet', 6, 4, seed=2)
  ntk_fn = ntkjax.empirical_ntk_fn(
      f, trace_axes=(), vmap_axes=0,
      implementation=NtkImplementation.STRUCTURED_DERIVATIVES)
  whole = jax.jit(ntk_fn, compiler_options=FAST_COMPILE)(x1, x2, params)
  assert whole.shape == (6, 4, 3, 3)
  _close(ntkjax.batch(ntk_fn, batch_size=2, progress=False)(x1, x2, params),
         whole)


def test_batch_symmetric_kernel_fn_equals_unbatched():
  """ntkjax.batch(kernel_fn, 2) of the ResNet's empirical_kernel_fn, called
  as (x1, None, ('nngp', 'ntk'), params) with 6 examples: the blocks below
  the diagonal are transposes (of (N1, N2, O1, O2) blocks), and both
  kernels equal the unbatched ones."""
  f, params, _ = _model('resnet')
  x1, _ = _inputs('resnet', 6, 4, seed=2)
  kernel_fn = ntkjax.empirical_kernel_fn(
      f, trace_axes=(), vmap_axes=0,
      implementation=NtkImplementation.NTK_VECTOR_PRODUCTS)
  get = ('nngp', 'ntk')
  whole = jax.jit(kernel_fn, static_argnums=2, compiler_options=FAST_COMPILE)(
      x1, None, get, params)
  blocked = ntkjax.batch(kernel_fn, batch_size=2, progress=False)(
      x1, None, get, params)
  assert blocked._fields == get
  for field in get:
    value = np.asarray(getattr(blocked, field))
    assert value.shape == (6, 6, 3, 3)
    _close(value, getattr(whole, field))
    # Mirrored blocks are exact transposes; diagonal blocks are computed
    # (symmetric to rounding).
    np.testing.assert_array_equal(value[2:, :2], value[:2, 2:].transpose(
        1, 0, 3, 2))
    np.testing.assert_array_equal(value[4:, 2:4], value[2:4, 4:].transpose(
        1, 0, 3, 2))
    np.testing.assert_allclose(value, value.transpose(1, 0, 3, 2),
                               rtol=1e-12, atol=1e-12 * np.max(np.abs(value)))
