"""Empirical NTK/NNGP against a direct definition, for every axes option.

The reference (`conftest.direct_empirical_kernel`) flattens the parameters,
takes the full Jacobian with `jax.jacfwd` (forward mode; the implementations
under test use reverse mode, jvp-of-vjp or structured rules), forms
T[a, b] = sum_p J1[a, p] J2[b, p] over all output index pairs, and reduces it
with explicit Python loops following the documented conventions: traced axes
averaged, diagonal axes kept once, other axes interleaved (x1, x2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import direct_empirical_kernel

import ntkjax
from ntkjax import NtkImplementation, stax


def _stax_model():
  init_fn, apply_fn, _ = stax.serial(stax.Dense(7, W_std=1.5, b_std=0.1),
                                     stax.Erf(), stax.Dense(3, b_std=0.2))
  _, params = init_fn(jax.random.PRNGKey(0), (-1, 4))
  return apply_fn, params


def _plain_model():
  """Not stax: dict params, outputs of shape (N, 2, 3)."""
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  params = {'w1': jax.random.normal(keys[0], (4, 5)),
            'w2': jax.random.normal(keys[1], (5, 6))}
  f = lambda p, x: (jnp.tanh(x @ p['w1']) @ p['w2']).reshape(x.shape[0], 2, 3)
  return f, params


AXES = [((-1,), ()), ((), ()), ((), (-1,)), ((), (0,)), ((-1,), (0,)),
        ((0, -1), ())]


@pytest.mark.parametrize('model', ['stax', 'plain'])
@pytest.mark.parametrize('trace,diagonal', AXES)
@pytest.mark.parametrize('implementation', list(NtkImplementation))
@pytest.mark.parametrize('vmap_axes', [None, 0])
def test_ntk_matches_direct_definition(model, trace, diagonal, implementation,
                                       vmap_axes):
  f, params = _stax_model() if model == 'stax' else _plain_model()
  x1 = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
  x2 = jax.random.normal(jax.random.PRNGKey(3), (3, 4))
  ntk_fn = ntkjax.empirical_ntk_fn(f, trace, diagonal, vmap_axes, implementation)
  np.testing.assert_allclose(ntk_fn(x1, x2, params),
                             direct_empirical_kernel(f, params, x1, x2, trace, diagonal, 'ntk'),
                             rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('trace,diagonal', AXES)
def test_nngp_matches_direct_definition(trace, diagonal):
  f, params = _plain_model()
  x1 = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
  x2 = jax.random.normal(jax.random.PRNGKey(3), (3, 4))
  nngp_fn = ntkjax.empirical_nngp_fn(f, trace, diagonal)
  np.testing.assert_allclose(nngp_fn(x1, x2, params),
                             direct_empirical_kernel(f, params, x1, x2, trace, diagonal, 'nngp'),
                             rtol=1e-12)


def test_shapes_follow_the_conventions():
  f, params = _plain_model()
  x1, x2 = jnp.ones((3, 4)), jnp.ones((5, 4))
  shape = lambda t, d: ntkjax.empirical_ntk_fn(f, t, d)(x1, x2, params).shape
  assert shape((-1,), ()) == (3, 5, 2, 2)
  assert shape((), ()) == (3, 5, 2, 2, 3, 3)
  assert shape((), (-1,)) == (3, 5, 2, 2, 3)
  assert ntkjax.empirical_ntk_fn(f, (), (0,))(x1, None, params).shape == (
      3, 2, 2, 3, 3)


def test_kernel_fn_get_and_x2_none():
  f, params = _stax_model()
  x = jax.random.normal(jax.random.PRNGKey(4), (3, 4))
  kernel_fn = ntkjax.empirical_kernel_fn(f)
  both = kernel_fn(x, None, None, params)
  np.testing.assert_allclose(both.ntk, kernel_fn(x, x, 'ntk', params), rtol=1e-12)
  np.testing.assert_allclose(both.ntk, both.ntk.T, rtol=1e-12)
  assert both._fields == ('nngp', 'ntk')
  with pytest.raises(ValueError, match='unknown get'):
    kernel_fn(x, None, 'cov1', params)


def test_bad_input_errors():
  f, params = _plain_model()
  x = jnp.ones((3, 4))
  with pytest.raises(ValueError, match='out of range'):
    ntkjax.empirical_ntk_fn(f, trace_axes=(5,))(x, None, params)
  with pytest.raises(ValueError, match='both trace_axes and diagonal_axes'):
    ntkjax.empirical_ntk_fn(f, (-1,), (-1,))(x, None, params)
  with pytest.raises(ValueError, match='traced or diagonal'):
    ntkjax.empirical_ntk_fn(f, (), (0,))(x, jnp.ones((2, 4)), params)
  with pytest.raises(ValueError, match='same model'):
    ntkjax.empirical_ntk_fn(f)(jnp.ones((3, 7)), None, params)
  with pytest.raises(ValueError, match='vmap_axes'):
    ntkjax.empirical_ntk_fn(f, vmap_axes=(0, 0))(x, None, params)
  with pytest.raises(ValueError, match='in_axis=2 is out of range'):
    ntkjax.empirical_ntk_fn(f, vmap_axes=2)(x, None, params)
  with pytest.raises(ValueError, match='out_axis=3 is out of range'):
    ntkjax.empirical_ntk_fn(f, vmap_axes=(0, 3, {}))(x, None, params)
  with pytest.raises(ValueError, match='not passed'):
    ntkjax.empirical_ntk_fn(f, vmap_axes=(0, 0, {'mask': 0}))(x, None, params)
  with pytest.raises(ValueError, match='is not a valid NtkImplementation'):
    ntkjax.empirical_ntk_fn(f, implementation=7)


@pytest.mark.parametrize('implementation', list(NtkImplementation))
def test_vmap_axes_triple_with_batched_keyword_arguments(implementation):
  """Examples along axis 1 of x and axis 0 of f(x); a per-example `shift`
  keyword (axis 0) and a shared `temperature` keyword."""
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  params = {'w': jax.random.normal(keys[0], (4, 3))}

  def f(p, x, shift, temperature):
    return jnp.tanh((x.T @ p['w'] + shift[:, None]) / temperature)
  x1 = jax.random.normal(keys[1], (4, 3))
  x2 = jax.random.normal(keys[2], (4, 3))
  shift = jax.random.normal(keys[3], (3,))
  kwargs = {'shift': shift, 'temperature': 1.7}
  ntk_fn = ntkjax.empirical_ntk_fn(
      f, (), (), (1, 0, {'shift': 0, 'temperature': None}), implementation)
  bound = lambda p, x: f(p, x, **kwargs)
  np.testing.assert_allclose(
      ntk_fn(x1, x2, params, **kwargs),
      direct_empirical_kernel(bound, params, x1, x2, (), (), 'ntk'),
      rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('implementation', list(NtkImplementation))
def test_precision_reaches_every_matrix_product(implementation):
  """precision='highest' (the default) is the precision of every dot_general
  and convolution traced for the kernel (the contractions and f's own
  passes), so float32 kernels keep full accuracy where a default matmul
  would run in TF32 (GPUs); precision=None leaves JAX's default. Checked on
  the jaxpr: on a CPU both run at float32 accuracy."""
  init_fn, apply_fn, _ = stax.serial(stax.Conv(2, (2,), padding='SAME'),
                                     stax.Relu(), stax.Flatten(),
                                     stax.Dense(2))
  _, params = init_fn(jax.random.PRNGKey(0), (-1, 4, 1))
  x = jnp.ones((3, 4, 1))

  def counts(**kw):
    """(matrix products, products at HIGHEST) in the kernel's jaxpr."""
    fn = ntkjax.empirical_ntk_fn(apply_fn, implementation=implementation,
                                 **kw)
    text = str(jax.make_jaxpr(lambda a, p: fn(a, None, p))(x, params))
    products = text.count('dot_general[') + text.count(
        'conv_general_dilated[')
    # (HIGHEST, DEFAULT): image patches, a convolution with a 0/1 filter,
    # exact in any precision as long as the image operand is HIGHEST.
    return (products, text.count('precision=(Precision.HIGHEST, Precision.'),
            text.count('precision=(Precision.HIGHEST, Precision.HIGHEST)'))
  products, highest, both = counts()
  assert products > 0 and highest == products and both > 0
  products, _, both = counts(precision=None)
  assert products > 0 and both == 0
  with pytest.raises(ValueError, match='precision'):
    ntkjax.empirical_ntk_fn(apply_fn, precision='fast')


@pytest.mark.parametrize('implementation', [
    NtkImplementation.JACOBIAN_CONTRACTION,
    NtkImplementation.NTK_VECTOR_PRODUCTS])
@pytest.mark.parametrize('vmap_axes', [None, 0])
@pytest.mark.parametrize('trace_axes', [(), (-1,)])
@pytest.mark.parametrize('budget', ['JACOBIAN_BLOCK_BYTES',
                                    'WORKING_SET_BYTES'])
def test_memory_bounded_blocks_equal_the_definition(monkeypatch,
                                                   implementation, vmap_axes,
                                                   trace_axes, budget):
  """With a tiny budget for parameter tangents or for the intermediates of
  the passes, J(x1) is computed in blocks of examples, J(x2) in pieces and
  NTK-vector products map their columns in chunks, run in sequence: the
  kernel is still the definition's, for per-example functions (one with a
  convolution: its passes run as unrolled chunks, the others' in lax.map)
  and (with vmap_axes=None) one that couples examples through the batch
  mean."""
  from ntkjax import _passes
  monkeypatch.setattr(_passes, budget, 64)
  # Split work runs in lax.map or as chunks ordered by optimization
  # barriers: count both.
  splits = []
  barrier, lax_map = jax.lax.optimization_barrier, jax.lax.map
  monkeypatch.setattr(jax.lax, 'optimization_barrier', lambda x: (
      splits.append('barrier') or barrier(x)))
  monkeypatch.setattr(jax.lax, 'map', lambda *a, **k: (
      splits.append('map') or lax_map(*a, **k)))
  rng = np.random.default_rng(3)
  params = {'w1': jnp.asarray(rng.standard_normal((3, 5))),
            'w2': jnp.asarray(rng.standard_normal((5, 2)))}
  x1 = jnp.asarray(rng.standard_normal((6, 3)))
  x2 = jnp.asarray(rng.standard_normal((4, 3)))
  conv = lambda p, x: jax.lax.conv_general_dilated(
      x[:, :, None], p['w1'][:, None, :], (1,), 'SAME',
      dimension_numbers=('NWC', 'WIO', 'NWC'))
  functions = [lambda p, x: jnp.tanh(x @ p['w1']) @ p['w2'],
               lambda p, x: jnp.mean(jnp.tanh(conv(p, x)), 1) @ p['w2']]
  if vmap_axes is None:
    functions.append(lambda p, x: jnp.tanh(
        x @ p['w1'] - jnp.mean(x @ p['w1'], 0)) @ p['w2'])
  for f in functions:
    ntk = ntkjax.empirical_ntk_fn(f, trace_axes=trace_axes,
                                  vmap_axes=vmap_axes,
                                  implementation=implementation)
    np.testing.assert_allclose(
        jax.jit(ntk)(x1, x2, params),
        direct_empirical_kernel(f, params, x1, x2, trace_axes, (), 'ntk'),
        rtol=1e-11, atol=1e-11)
  # The budget did split the work (else this test would not test it).
  assert 'barrier' in splits, splits


def test_auto_choice_cache_is_bounded():
  """AUTO caches its choice per user function (and shapes): the cache keeps
  at most `_AUTO_CHOICES_KEPT` functions alive, the most recently used."""
  from ntkjax import empirical
  x = jnp.ones((2, 3))
  params = jnp.ones((3, 2))
  kept = empirical._AUTO_CHOICES_KEPT
  functions = [lambda p, x, i=i: x @ p * (i + 1.) for i in range(kept + 6)]
  for f in functions:
    ntk = ntkjax.empirical_ntk_fn(f, vmap_axes=None)(x, None, params)
    # f is linear in p with Jacobian (i + 1) x: the NTK is (i + 1)^2 x x^T.
  np.testing.assert_allclose(ntk, (kept + 6.)**2 * (x @ x.T))
  assert len(empirical._AUTO_CHOICES) == kept
  assert not any(key[0] is functions[0] for key in empirical._AUTO_CHOICES)
  assert any(key[0] is functions[-1] for key in empirical._AUTO_CHOICES)
