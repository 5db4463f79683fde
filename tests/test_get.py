"""`get` is one contract across the library (`ntkjax._get`): every kernel
function accepts None, a name or a sequence of names, returns the array
for a name and a named tuple in the order asked for a sequence (the same
type for the same names), and refuses an unknown name naming itself and
the names it knows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import predict, stax

X1 = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
X2 = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)))
Y = jnp.asarray(np.random.default_rng(2).standard_normal((4, 1)))
NET = stax.serial(stax.Dense(16), stax.Relu(), stax.Dense(1))
PARAMS = NET.init_fn(jax.random.PRNGKey(0), X1.shape)[1]


def _functions():
  """name -> (call(get), the names it knows, its name in messages)."""
  empirical = ntkjax.empirical_kernel_fn(NET.apply_fn)
  monte_carlo = ntkjax.monte_carlo_kernel_fn(
      NET.init_fn, NET.apply_fn, jax.random.PRNGKey(1), 2)
  batched = ntkjax.batch(NET.kernel_fn, batch_size=2, progress=False)
  gp = predict.gp_inference(NET.kernel_fn(X1, None, 'nngp'), Y)
  k_test = NET.kernel_fn(X2, X1, 'nngp')
  return {
      'stax': (lambda get: NET.kernel_fn(X1, X2, get),
               ('nngp', 'ntk', 'cov1', 'cov2'), 'kernel_fn'),
      'empirical': (lambda get: empirical(X1, X2, get, PARAMS),
                    ('nngp', 'ntk'), 'empirical kernel_fn'),
      'monte_carlo': (lambda get: monte_carlo(X1, X2, get),
                      ('nngp', 'ntk'), 'monte_carlo kernel_fn'),
      'batch': (lambda get: batched(X1, X2, get),
                ('nngp', 'ntk', 'cov1', 'cov2'), 'batch'),
      'gp_inference': (lambda get: gp(get, k_test),
                       ('nngp', 'ntk', 'ntkgp'), 'predict_fn'),
  }


@pytest.mark.parametrize('name', ['stax', 'empirical', 'monte_carlo',
                                  'batch', 'gp_inference'])
def test_get_forms_agree_everywhere(name):
  call, known, who = _functions()[name]
  # gp_inference's 'ntk' fields need an NTK; NNGP-only kernels give 'nngp'.
  first, second = (known[0], known[0]) if name == 'gp_inference' else (
      known[1], known[0])
  single = call(first)
  both = call((first, second) if first != second else (first,))
  assert both._fields == ((first, second) if first != second else (first,))
  again = call((first, second) if first != second else (first,))
  assert type(again) is type(both)          # one type per set of names
  np.testing.assert_array_equal(np.asarray(single),
                                np.asarray(getattr(both, first)))
  with pytest.raises(ValueError, match=f"{who}: unknown get='ntk2'; choose "
                                       r'from \(' + f"'{known[0]}'"):
    call('ntk2')
  with pytest.raises(TypeError, match=f'{who}: get=5 must be None'):
    call(5)
