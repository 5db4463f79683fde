"""empirical_ntk_fn on models written with Flax NNX and Equinox.

Each library model (an MLP and a small CNN from each library) is turned into
a pure `f(params, x)` whose params are the library's own pytree (an
`nnx.State` of `Param`s, or an Equinox module with its non-array fields
removed). Every `NtkImplementation`, under `jax.jit`, must give the NTK of
that function for both trace_axes conventions, with and without `vmap_axes`
(AUTO, which runs one of the others, in one setting), and for x2 = None
(then the kernel must also be symmetric).
Parameter values are float64 normal draws, not the libraries' initializers:
the checks are exact identities, true for any parameters.

The reference is independent of ntkjax and of the library's pytree
structure: it flattens the params into one vector with `ravel_pytree`, takes
the full Jacobian of f(x) with respect to that vector, contracts the
parameter axis with one `tensordot` and reduces the result with an explicit
einsum (mean over the logits for trace_axes=(-1,); axes (N1, N2, O1, O2)
for trace_axes=()).
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


def _materialize(tree):
  """Abstract leaves (from eval_shape) -> float64 normal draws.

  Models are built with `nnx.eval_shape` / `eqx.filter_eval_shape` and filled
  with numpy draws: eager initialization compiles every op on first use,
  which would dominate the run time of this file.
  """
  rng = np.random.default_rng(0)
  fill = lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape))
  return jax.tree.map(
      lambda s: fill(s) if isinstance(s, jax.ShapeDtypeStruct) else s, tree)


class _FlaxMlp(nnx.Module):

  def __init__(self, rngs):
    kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
    self.hidden = nnx.Linear(5, 8, **kw)
    self.out = nnx.Linear(8, 3, **kw)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


class _FlaxCnn(nnx.Module):

  def __init__(self, rngs):
    kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
    self.conv = nnx.Conv(2, 3, kernel_size=(3, 3), **kw)
    self.out = nnx.Linear(3, 2, **kw)

  def __call__(self, x):                       # x: (N, H, W, C)
    return self.out(nnx.gelu(self.conv(x)).mean(axis=(1, 2)))


class _EqxCnn(eqx.Module):
  conv: eqx.nn.Conv2d
  out: eqx.nn.Linear

  def __init__(self, key):
    key1, key2 = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(2, 3, kernel_size=(3, 3), key=key1)
    self.out = eqx.nn.Linear(3, 2, key=key2)

  def __call__(self, x):                       # one example: (C, H, W)
    return self.out(jnp.tanh(self.conv(x)).mean(axis=(1, 2)))


def _from_flax(make):
  """f(params, x) and params: the Params vary, other state is closed over."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  params, rest = _materialize((params, rest))
  return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params


def _from_equinox(make, *args, **kwargs):
  """f(params, x) and params: Equinox modules act on one example; vmap."""
  model = _materialize(eqx.filter_eval_shape(make, *args, **kwargs))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params


MODELS = {   # name: (builds (f, params), shape of one example)
    'flax_mlp': (lambda: _from_flax(lambda: _FlaxMlp(nnx.Rngs(0))), (5,)),
    'flax_cnn': (lambda: _from_flax(lambda: _FlaxCnn(nnx.Rngs(0))),
                 (5, 5, 2)),
    'equinox_mlp': (lambda: _from_equinox(
        eqx.nn.MLP, 5, 3, width_size=8, depth=2, activation=jnp.tanh,
        key=jax.random.PRNGKey(0)), (5,)),
    'equinox_cnn': (lambda: _from_equinox(_EqxCnn, jax.random.PRNGKey(0)),
                    (2, 5, 5)),
}
# The programs are tiny and each is compiled once: XLA's cheapest settings
# halve the compile time, which dominates this file's run time.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}
IMPLEMENTATIONS = pytest.mark.parametrize(
    'implementation', list(NtkImplementation), ids=lambda i: i.name)


@functools.lru_cache(maxsize=None)
def _case(name):
  """f, params, x1 (3 examples), x2 (4) and the flat Jacobians J(x1), J(x2)."""
  make, shape = MODELS[name]
  f, params = make()
  rng = np.random.default_rng(1)
  x1 = jnp.asarray(rng.standard_normal((3, *shape)))
  x2 = jnp.asarray(rng.standard_normal((4, *shape)))
  flat, unravel = ravel_pytree(params)
  jac = jax.jit(jax.jacrev(lambda q, x: f(unravel(q), x)))
  return f, params, x1, x2, np.asarray(jac(flat, x1)), np.asarray(jac(flat, x2))


_reference = ntk_from_jacobians


def _ntk(name, trace_axes, vmap_axes, implementation, same=False):
  f, params, x1, x2, _, _ = _case(name)
  ntk_fn = jax.jit(ntkjax.empirical_ntk_fn(f, trace_axes=trace_axes,
                                           vmap_axes=vmap_axes,
                                           implementation=implementation),
                   compiler_options=FAST_COMPILE)
  ntk = np.asarray(ntk_fn(x1, None if same else x2, params))
  assert ntk.dtype == np.float64
  return ntk


@pytest.mark.parametrize('implementation', [
    NtkImplementation.JACOBIAN_CONTRACTION,
    NtkImplementation.NTK_VECTOR_PRODUCTS,
    NtkImplementation.STRUCTURED_DERIVATIVES], ids=lambda i: i.name)
@pytest.mark.parametrize('vmap_axes', [None, 0], ids=['no_vmap', 'vmap0'])
@pytest.mark.parametrize('trace_axes', [(-1,), ()], ids=['trace', 'no_trace'])
@pytest.mark.parametrize('name', MODELS)
def test_ntk_equals_reference(name, trace_axes, vmap_axes, implementation):
  _, _, _, _, j1, j2 = _case(name)
  np.testing.assert_allclose(_ntk(name, trace_axes, vmap_axes, implementation),
                             _reference(j1, j2, trace_axes), rtol=1e-10,
                             atol=1e-12)


@pytest.mark.parametrize('name', MODELS)
def test_auto_and_x2_none(name):
  """AUTO (whatever it picks) on x1, x2; STRUCTURED on x2 = None, which must
  give the symmetric NTK of x1 with itself."""
  _, _, _, _, j1, j2 = _case(name)
  np.testing.assert_allclose(
      _ntk(name, (), 0, NtkImplementation.AUTO), _reference(j1, j2, ()),
      rtol=1e-10, atol=1e-12)
  same = _ntk(name, (), None, NtkImplementation.STRUCTURED_DERIVATIVES,
              same=True)
  np.testing.assert_allclose(same, _reference(j1, j1, ()), rtol=1e-10,
                             atol=1e-12)
  np.testing.assert_allclose(same, same.transpose(1, 0, 3, 2), rtol=1e-12)


@IMPLEMENTATIONS
@pytest.mark.parametrize('name', ['flax_mlp', 'equinox_mlp'])
def test_input_that_does_not_fit_the_params_raises(name, implementation):
  f, params, _, _, _, _ = _case(name)
  x = jnp.ones((3, 4))                         # 4 features; the model wants 5
  ntk_fn = ntkjax.empirical_ntk_fn(f, implementation=implementation)
  with pytest.raises(ValueError, match='same model'):
    ntk_fn(x, x, params)
