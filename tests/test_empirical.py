"""Empirical NTK/NNGP against a direct definition, for every axes option.

The reference flattens the parameters, takes the full Jacobian with
`jax.jacfwd` (forward mode, unlike both implementations under test), forms
T[a, b] = sum_p J1[a, p] J2[b, p] over all output index pairs, and reduces it
with explicit Python loops following the documented conventions: traced axes
averaged, diagonal axes kept once, other axes interleaved (x1, x2).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import ntkjax
from ntkjax import NtkImplementation, stax


def _reference(f, params, x1, x2, trace, diagonal, kind):
  if kind == 'ntk':
    flat, unravel = ravel_pytree(params)
    jac = lambda x: np.asarray(jax.jacfwd(lambda q: f(unravel(q), x))(flat))
    j1, j2 = jac(x1), jac(x2)
    full = np.tensordot(j1, j2, axes=([-1], [-1]))
  else:
    full = np.multiply.outer(np.asarray(f(params, x1)), np.asarray(f(params, x2)))
  ndim = full.ndim // 2
  shape1, shape2 = full.shape[:ndim], full.shape[ndim:]
  trace = {a % ndim for a in trace}
  diagonal = {a % ndim for a in diagonal}
  out_dims = []
  for axis in range(ndim):
    if axis in trace:
      continue
    out_dims += [shape1[axis]] if axis in diagonal else [shape1[axis], shape2[axis]]
  out = np.zeros(out_dims)
  size = np.prod([shape1[a] for a in trace]) if trace else 1
  for index in itertools.product(*(range(n) for n in out_dims)):
    pos, i1, i2 = 0, [], []
    free = []
    for axis in range(ndim):
      if axis in trace:
        i1.append(None)
        i2.append(None)
        free.append(axis)
      elif axis in diagonal:
        i1.append(index[pos])
        i2.append(index[pos])
        pos += 1
      else:
        i1.append(index[pos])
        i2.append(index[pos + 1])
        pos += 2
    total = 0.
    for t in itertools.product(*(range(shape1[a]) for a in free)):
      a1, a2 = list(i1), list(i2)
      for axis, value in zip(free, t):
        a1[axis] = a2[axis] = value
      total += full[tuple(a1) + tuple(a2)]
    out[index] = total / size
  return out


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
@pytest.mark.parametrize('implementation', [
    NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.NTK_VECTOR_PRODUCTS])
@pytest.mark.parametrize('vmap_axes', [None, 0])
def test_ntk_matches_direct_definition(model, trace, diagonal, implementation,
                                       vmap_axes):
  f, params = _stax_model() if model == 'stax' else _plain_model()
  x1 = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
  x2 = jax.random.normal(jax.random.PRNGKey(3), (3, 4))
  ntk_fn = ntkjax.empirical_ntk_fn(f, trace, diagonal, vmap_axes, implementation)
  np.testing.assert_allclose(ntk_fn(x1, x2, params),
                             _reference(f, params, x1, x2, trace, diagonal, 'ntk'),
                             rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('trace,diagonal', AXES)
def test_nngp_matches_direct_definition(trace, diagonal):
  f, params = _plain_model()
  x1 = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
  x2 = jax.random.normal(jax.random.PRNGKey(3), (3, 4))
  nngp_fn = ntkjax.empirical_nngp_fn(f, trace, diagonal)
  np.testing.assert_allclose(nngp_fn(x1, x2, params),
                             _reference(f, params, x1, x2, trace, diagonal, 'nngp'),
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
  with pytest.raises(NotImplementedError, match='STRUCTURED'):
    ntkjax.empirical_ntk_fn(f, implementation=3)
