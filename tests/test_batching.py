"""Kernels computed over blocks of input pairs equal the unblocked kernels:
`kernel_fn`'s own blocking (`KernelFn._by_blocks`, used for spatial inputs
with many pairs) and `ntkjax.batching.batch`.

Every entry of a kernel depends only on its own pair of inputs (and on each
input's own variances), so assembling blocks is exact up to the rounding of
a differently shaped computation. Batch sizes that do not divide N1, N2
exercise the padding rows that must be dropped; x2=None exercises the
symmetric assembly (transposed blocks, cov2 = cov1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from ntkjax import batching, stax
from ntkjax.stax import _layer as layer_module

FIELDS = ('nngp', 'ntk', 'cov1', 'cov2')


def _images(n1, n2, sizes=(4, 3), channels=2, seed=0):
  rng = np.random.default_rng(seed)
  x1 = rng.standard_normal((n1,) + sizes + (channels,))
  x2 = 0.7 * rng.standard_normal((n2,) + sizes + (channels,))
  return jnp.asarray(x1), jnp.asarray(x2)


def _conv_output():
  """Full spatial output layout (N1, N2, H, H', W, W')."""
  return stax.serial(
      stax.Conv(4, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Erf(),
      stax.Conv(4, (2, 2), strides=(2, 1), padding='CIRCULAR', W_std=1.2))


def _flatten():
  """Pixel-diagonal layout inside, (N1, N2) output."""
  return stax.serial(
      stax.Conv(4, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Erf(),
      stax.Conv(4, (2, 2), padding='CIRCULAR'), stax.Flatten(),
      stax.Dense(1, W_std=1.1, b_std=0.2))


def _global_pool():
  """Full layout inside, (N1, N2) output."""
  return stax.serial(
      stax.Conv(4, (3, 2), padding='SAME', W_std=1.5, b_std=0.1), stax.Erf(),
      stax.AvgPool((2, 2), padding='SAME'), stax.GlobalAvgPool(),
      stax.Dense(1))


def _pooled():
  """Full layout before the pool; pixel-diagonal output if asked."""
  return stax.serial(
      stax.Conv(4, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Erf(),
      stax.AvgPool((2, 1), padding='SAME'),
      stax.Conv(4, (2, 2), padding='CIRCULAR', W_std=1.2))


def _relu():
  return stax.serial(
      stax.Conv(4, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Relu(),
      stax.Conv(4, (2, 2), padding='CIRCULAR'), stax.Relu(),
      stax.GlobalAvgPool(), stax.Dense(1))


# name -> (network, diagonal_spatial)
NETWORKS = {
    'conv_output': (_conv_output, False),
    'conv_output_diagonal': (_conv_output, True),
    'flatten': (_flatten, False),
    'global_pool': (_global_pool, False),
    'pooled_diagonal': (_pooled, True),
}




def _unblocked(kernel_fn, x1, x2, get, diagonal):
  """The kernels in one piece (jit: one compilation; these inputs are below
  the blocking threshold with the default block sizes)."""
  assert layer_module._pair_blocks(
      x1, x2, kernel_fn.input_diagonal(diagonal)) is None
  jitted = jax.jit(kernel_fn, static_argnames=('get', 'diagonal_spatial'))
  return jitted(x1, x2, get, diagonal_spatial=diagonal)


def _force_blocks(monkeypatch, kernel_fn, x1, x2, diagonal):
  """Shrink the block sizes so that blocks of 2 rows x 3 columns of pairs
  are used, and count the calls of `_by_blocks`."""
  positions = int(np.prod(x1.shape[1:-1]))
  per_pair = positions if kernel_fn.input_diagonal(diagonal) else positions**2
  monkeypatch.setattr(layer_module, '_BLOCK_COLUMNS', 3)
  monkeypatch.setattr(layer_module, '_BLOCK_ENTRIES', 6 * per_pair + 1)
  assert layer_module._pair_blocks(
      x1, x2, kernel_fn.input_diagonal(diagonal)) == (2, 3)
  calls = []
  original = layer_module.KernelFn._by_blocks

  def spy(self, *args):
    calls.append(args)
    return original(self, *args)
  monkeypatch.setattr(layer_module.KernelFn, '_by_blocks', spy)
  return calls


@pytest.mark.parametrize('symmetric', [False, True], ids=['x2', 'x2_none'])
@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_kernel_fn_blocks_equal_unblocked(name, symmetric, monkeypatch):
  """kernel_fn's blocking over pairs (N1 = 7, N2 = 5 in blocks of 2 x 3:
  padded rows and columns) gives the unblocked nngp, ntk, cov1, cov2 to
  float64 rounding, in the same layout, for a tuple of names and for one
  name; x2=None stays exactly symmetric."""
  make, diagonal = NETWORKS[name]
  kernel_fn = make().kernel_fn
  x1, x2 = _images(7, 5)
  x2 = None if symmetric else x2
  plain = _unblocked(kernel_fn, x1, x2, FIELDS, diagonal)
  calls = _force_blocks(monkeypatch, kernel_fn, x1, x2, diagonal)
  blocked = kernel_fn(x1, x2, FIELDS, diagonal_spatial=diagonal)
  single = kernel_fn(x1, x2, 'ntk', diagonal_spatial=diagonal)
  assert len(calls) == 2
  assert blocked._fields == FIELDS
  for field in FIELDS:
    assert relative_error(getattr(blocked, field), getattr(plain, field)) < 1e-12, field
  np.testing.assert_array_equal(single, blocked.ntk)
  if symmetric:
    spatial = jax.eval_shape(
        lambda x: kernel_fn(x, None, diagonal_spatial=diagonal), x1).spatial
    for field in ('nngp', 'ntk'):
      k = getattr(blocked, field)
      np.testing.assert_array_equal(k, spatial.swap_public(k))
    np.testing.assert_array_equal(blocked.cov2, blocked.cov1)


def test_kernel_fn_blocks_relu_symmetric(monkeypatch):
  """ReLU networks with x2=None: the NTK of an input with itself at one
  position has correlation exactly 1, where the derivative kernel
  (pi - arccos c) / (2 pi) has infinite slope: a rounding difference
  delta ~ 1e-15 of c between differently shaped computations moves it by
  sqrt(2 delta) / (2 pi) ~ 1e-8 (blocked or not, jit or not). So the NTK is
  compared to 1e-7 relative; the NNGP (slope 0 there) and the variances to
  1e-12."""
  kernel_fn = _relu().kernel_fn
  x1, _ = _images(7, 5)
  plain = _unblocked(kernel_fn, x1, None, FIELDS, False)
  calls = _force_blocks(monkeypatch, kernel_fn, x1, None, False)
  blocked = kernel_fn(x1, None, FIELDS)
  assert len(calls) == 1
  for field in FIELDS:
    tolerance = 1e-7 if field == 'ntk' else 1e-12
    assert relative_error(getattr(blocked, field), getattr(plain, field)) < tolerance


@pytest.mark.parametrize('symmetric', [False, True], ids=['x2', 'x2_none'])
@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_batch_equals_kernel_fn(name, symmetric):
  """batching.batch(kernel_fn, 2) on N1 = 5, N2 = 3 (padded last blocks;
  for x2=None the blocks below the diagonal are transposes) equals
  kernel_fn, for get=None (all four), a name, and a tuple, passing
  diagonal_spatial through."""
  make, diagonal = NETWORKS[name]
  kernel_fn = make().kernel_fn
  x1, x2 = _images(5, 3)
  x2 = None if symmetric else x2
  plain = _unblocked(kernel_fn, x1, x2, FIELDS, diagonal)
  batched = batching.batch(kernel_fn, 2)
  everything = batched(x1, x2, None, diagonal_spatial=diagonal)
  assert everything._fields == FIELDS
  for field in FIELDS:
    assert relative_error(getattr(everything, field), getattr(plain, field)) < 1e-12
  one = batched(x1, x2, 'nngp', diagonal_spatial=diagonal)
  assert relative_error(one, plain.nngp) < 1e-12
  pair = batched(x1, x2, ('cov2', 'ntk'), diagonal_spatial=diagonal)
  assert pair._fields == ('cov2', 'ntk')
  assert relative_error(pair.cov2, plain.cov2) < 1e-12
  assert relative_error(pair.ntk, plain.ntk) < 1e-12


def test_batch_on_host_and_trivial_batch_sizes():
  """store_on_device=False gathers NumPy arrays; batch_size 0 or >= N is a
  single jit-compiled call."""
  kernel_fn = _conv_output().kernel_fn
  x1, x2 = _images(5, 3)
  plain = _unblocked(kernel_fn, x1, x2, FIELDS, False)
  on_host = batching.batch(kernel_fn, 2, store_on_device=False)(x1, x2)
  for field in FIELDS:
    value = getattr(on_host, field)
    assert isinstance(value, np.ndarray)
    assert relative_error(value, getattr(plain, field)) < 1e-12
  for size in (0, 5):
    whole = batching.batch(kernel_fn, size)(x1, x2, 'ntk')
    assert relative_error(whole, plain.ntk) < 1e-12


def test_batch_bad_arguments():
  kernel_fn = _conv_output().kernel_fn
  for size in (-1, 1.5):
    with pytest.raises(ValueError, match='batch_size'):
      batching.batch(kernel_fn, size)
  x1, x2 = _images(3, 2)
  with pytest.raises(ValueError, match="unknown get='ntk2'"):
    batching.batch(kernel_fn, 2)(x1, x2, 'ntk2')
