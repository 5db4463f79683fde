"""Masking of variable-length inputs (`mask_constant`).

Checks, independent of the kernel code's own bookkeeping:

* with 'SAME' convolutions (stride 1), zero padding at the end of a
  sequence is exactly what masked (zeroed, excluded) positions are, so a
  padded-and-masked sequence must give the kernel and the finite network of
  the truncated sequence, entry by entry (global average pooling averages
  over the unmasked positions only);
* Monte Carlo of the wide finite network with masks, for pairs of
  sequences of different lengths (no truncation identity exists there);
* blocked / batch()ed kernels equal unblocked ones; a NaN mask constant;
  channels only partly equal to the constant are zeroed but not masked.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from conftest import assert_monte_carlo_close, empirical_nngp, empirical_ntk
from ntkjax import stax

PAD = -7.

_COMPILED = {}


def _kernel_fn(network):
  """network.kernel_fn under jit (one compilation per shape instead of
  op-by-op dispatch; these tests call it on many small shapes)."""
  key = ('kernel', id(network))
  if key not in _COMPILED:
    _COMPILED[key] = (network, jax.jit(network.kernel_fn,
                                       static_argnames='get'))
  return _COMPILED[key][1]


def _apply_fn(network):
  """network.apply_fn under jit."""
  key = ('apply', id(network))
  if key not in _COMPILED:
    _COMPILED[key] = (network, jax.jit(network.apply_fn))
  return _COMPILED[key][1]


# Blocked and unblocked runs compute the same entries in different XLA
# programs: equal up to float64 rounding through a few layers. (Before
# dual._correlation took rho within 4 eps of 1 as 1, a sample with itself
# differed by O(sqrt(eps)) ~ 1e-8 through the ReLU arc-cosine.)
RTOL_SAME_SAMPLE = 1e-11


def _sequences(lengths, size=8, channels=2, seed=0, pad=PAD):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((len(lengths), size, channels))
  padded = x.copy()
  for i, length in enumerate(lengths):
    padded[i, length:] = pad
  return x, jnp.asarray(padded)


def _conv_network(pool, width=16):
  return stax.serial(
      stax.Conv(width, (3,), padding='SAME', b_std=0.1), stax.Relu(),
      stax.Conv(width, (3,), padding='SAME', W_std=1.3, b_std=0.1),
      stax.Erf(), pool, stax.Dense(1, b_std=0.2))


@pytest.mark.parametrize('pool', [stax.GlobalAvgPool(), stax.GlobalSumPool()],
                         ids=['avg', 'sum'])
def test_masked_padding_equals_truncation(pool):
  lengths = [5, 8, 3, 5]
  x, padded = _sequences(lengths)
  network = _conv_network(pool)
  kernel = _kernel_fn(network)(padded, None, ('nngp', 'ntk'), mask_constant=PAD)
  _, params = network.init_fn(jax.random.PRNGKey(0), padded.shape)
  outputs = _apply_fn(network)(params, padded, mask_constant=PAD)
  for i, li in enumerate(lengths):
    own = _kernel_fn(network)(jnp.asarray(x[i:i + 1, :li]), None,
                            ('nngp', 'ntk'))
    np.testing.assert_allclose(kernel.nngp[i, i], own.nngp[0, 0], rtol=1e-12)
    np.testing.assert_allclose(kernel.ntk[i, i], own.ntk[0, 0], rtol=1e-12)
    np.testing.assert_allclose(
        outputs[i], _apply_fn(network)(params, jnp.asarray(x[i:i + 1, :li]))[0],
        rtol=1e-12)
    for j, lj in enumerate(lengths):
      if lj == li and j != i:  # same lengths: a two-batch kernel exists
        pair = _kernel_fn(network)(jnp.asarray(x[i:i + 1, :li]),
                                 jnp.asarray(x[j:j + 1, :lj]), 'ntk')
        np.testing.assert_allclose(kernel.ntk[i, j], pair[0, 0], rtol=1e-12)


def test_different_lengths_match_monte_carlo():
  width = 256
  _, x = _sequences([6, 3, 8], seed=1)
  network = _conv_network(stax.GlobalAvgPool(), width)
  readout = stax.serial(network, stax.Dense(width, W_std=1.1))
  init_fn, apply_fn, _ = readout
  exact = readout.kernel_fn(x, None, 'nngp', mask_constant=PAD)

  @jax.jit
  def one(key):
    _, params = init_fn(key, x.shape)
    f = lambda p, inputs: apply_fn(p, inputs, mask_constant=PAD)
    return empirical_nngp(f, params, x, x)

  values = np.stack([np.asarray(one(k)) for k in
                     jax.random.split(jax.random.PRNGKey(2), 24)])
  assert_monte_carlo_close((values.mean(0), values.std(0, ddof=1) / np.sqrt(24)),
                           exact, width, 'masked nngp')

  narrow = stax.serial(network, stax.Dense(2))
  exact_ntk = narrow.kernel_fn(x, None, 'ntk', mask_constant=PAD)

  @jax.jit
  def one_ntk(key):
    _, params = narrow.init_fn(key, x.shape)
    f = lambda p, inputs: narrow.apply_fn(p, inputs, mask_constant=PAD)
    return empirical_ntk(f, params, x, x)

  values = np.stack([np.asarray(one_ntk(k)) for k in
                     jax.random.split(jax.random.PRNGKey(3), 64)])
  assert_monte_carlo_close((values.mean(0), values.std(0, ddof=1) / np.sqrt(64)),
                           exact_ntk, width, 'masked ntk')


def test_masked_images_pooling_and_flatten_match_finite_network_structure():
  """2-d: masked rows of images; AvgPool/Conv masks follow window centres,
  Flatten counts masked positions as zeros. Monte Carlo of the NNGP."""
  width = 256
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 4, 4, 1))
  x[0, 3:] = PAD
  x[2, 2:] = PAD
  x = jnp.asarray(x)
  body = stax.serial(stax.Conv(width, (2, 2), padding='SAME', b_std=0.1),
                     stax.Relu(), stax.AvgPool((2, 2), padding='SAME'),
                     stax.Conv(width, (2, 2), padding='VALID'), stax.Relu())
  for head in (stax.GlobalAvgPool(), stax.Flatten()):
    network = stax.serial(body, head, stax.Dense(width))
    exact = _kernel_fn(network)(x, None, 'nngp', mask_constant=PAD)

    @jax.jit
    def one(key, network=network):
      _, params = network.init_fn(key, x.shape)
      f = lambda p, inputs: _apply_fn(network)(p, inputs, mask_constant=PAD)
      return empirical_nngp(f, params, x, x)

    values = np.stack([np.asarray(one(k)) for k in
                       jax.random.split(jax.random.PRNGKey(5), 24)])
    assert_monte_carlo_close(
        (values.mean(0), values.std(0, ddof=1) / np.sqrt(24)), exact, width,
        f'masked images {head.kernel_fn.name}')


def test_fully_masked_sample_gives_zero_rows():
  _, x = _sequences([4, 0, 6])
  network = _conv_network(stax.GlobalAvgPool())
  kernel = _kernel_fn(network)(x, None, ('nngp', 'ntk'), mask_constant=PAD)
  assert np.all(np.asarray(kernel.nngp)[1] == 0)
  assert np.all(np.asarray(kernel.ntk)[:, 1] == 0)
  assert np.all(np.isfinite(np.asarray(kernel.ntk)))
  _, params = network.init_fn(jax.random.PRNGKey(0), x.shape)
  assert np.all(np.asarray(_apply_fn(network)(params, x,
                                            mask_constant=PAD))[1] == 0)


def test_blocked_batched_and_nan_constant_agree():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((40, 6, 6, 1))
  for i in range(0, 40, 3):
    x[i, 4:] = PAD
  network = stax.serial(stax.Conv(4, (3, 3), padding='SAME', b_std=0.1),
                        stax.Relu(), stax.Conv(4, (3, 3), padding='SAME'),
                        stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
  whole = _kernel_fn(network)(jnp.asarray(x), mask_constant=PAD)
  expected = np.asarray(whole.spatial.public(whole.ntk, 2))
  kernel_fn = jax.jit(network.kernel_fn, static_argnames='get')
  blocked = kernel_fn(jnp.asarray(x), None, 'ntk', mask_constant=PAD)
  np.testing.assert_allclose(blocked, expected, rtol=RTOL_SAME_SAMPLE)
  batched = ntkjax.batch(network.kernel_fn, batch_size=16)(
      jnp.asarray(x), None, 'ntk', mask_constant=PAD)
  np.testing.assert_allclose(batched, expected, rtol=RTOL_SAME_SAMPLE)
  with_nan = np.where(x == PAD, np.nan, x)
  nan_kernel = kernel_fn(jnp.asarray(with_nan), None, 'ntk',
                         mask_constant=np.nan)
  np.testing.assert_allclose(nan_kernel, expected, rtol=RTOL_SAME_SAMPLE)
  unmasked = kernel_fn(jnp.asarray(x), None, 'ntk')
  assert not np.allclose(unmasked, expected)  # the mask changes the kernel


def test_partly_masked_positions_are_zeroed_not_masked():
  """Channels equal to the constant are zeroed, but a position is masked
  only when all its channels are (neural-tangents' convention)."""
  _, x = _sequences([8, 8], channels=3)
  x = np.asarray(x).copy()
  x[0, 2, 1] = PAD  # one channel of one position
  zeroed = x.copy()
  zeroed[0, 2, 1] = 0.
  network = _conv_network(stax.GlobalAvgPool())
  np.testing.assert_allclose(
      _kernel_fn(network)(jnp.asarray(x), None, 'ntk', mask_constant=PAD),
      _kernel_fn(network)(jnp.asarray(zeroed), None, 'ntk'), rtol=1e-12)


def test_masked_vertices_equal_deleted_vertices():
  """A graph network with the last vertex masked is the network on the
  graph without that vertex: masked vertices send zeros through Aggregate
  and global pooling averages over the others (kernel and finite net)."""
  from ntkjax.stax._graph import Aggregate
  rng = np.random.default_rng(7)
  n, vertices = 3, 5
  x = rng.standard_normal((n, vertices, 2))
  pattern = rng.uniform(size=(n, vertices, vertices)) * (
      rng.uniform(size=(n, vertices, vertices)) < 0.6)
  padded = x.copy()
  padded[:, -1] = PAD
  network = stax.serial(stax.Dense(8, b_std=0.1), Aggregate(), stax.Relu(),
                        stax.Dense(8), Aggregate(), stax.GlobalAvgPool(),
                        stax.Dense(1))
  masked = _kernel_fn(network)(jnp.asarray(padded), None, ('nngp', 'ntk'),
                             pattern=jnp.asarray(pattern), mask_constant=PAD)
  deleted = _kernel_fn(network)(jnp.asarray(x[:, :-1]), None, ('nngp', 'ntk'),
                              pattern=jnp.asarray(pattern[:, :-1, :-1]))
  np.testing.assert_allclose(masked.nngp, deleted.nngp, rtol=1e-12)
  np.testing.assert_allclose(masked.ntk, deleted.ntk, rtol=1e-12)
  _, params = network.init_fn(jax.random.PRNGKey(0), padded.shape)
  np.testing.assert_allclose(
      _apply_fn(network)(params, jnp.asarray(padded), mask_constant=PAD,
                       pattern=jnp.asarray(pattern)),
      _apply_fn(network)(params, jnp.asarray(x[:, :-1]),
                       pattern=jnp.asarray(pattern[:, :-1, :-1])), rtol=1e-12)


@pytest.mark.parametrize('first', ['transpose', 'local'])
def test_transposed_and_local_convolutions_equal_truncation(first):
  """ConvTranspose (VALID, stride 2): an output is masked when no unmasked
  input reaches it, so a masked tail transposes like the truncated input;
  ConvLocal ('SAME') reads zeros at masked positions like zero padding.
  Kernels (ConvLocal's finite weights depend on the length, so only the
  transposed network's outputs are compared too)."""
  from ntkjax.stax._conv_variants import ConvLocal, ConvTranspose
  lengths = [4, 6, 2]
  x, padded = _sequences(lengths, size=6, seed=8)
  layer = (ConvTranspose(8, (3,), strides=(2,), padding='VALID', b_std=0.1)
           if first == 'transpose' else
           ConvLocal(8, (3,), padding='SAME', b_std=0.1))
  network = stax.serial(layer, stax.Relu(),
                        stax.Conv(8, (3,), padding='SAME', b_std=0.1),
                        stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
  kernel = _kernel_fn(network)(padded, None, 'ntk', mask_constant=PAD)
  if first == 'transpose':
    _, params = network.init_fn(jax.random.PRNGKey(0), padded.shape)
    outputs = _apply_fn(network)(params, padded, mask_constant=PAD)
  for i, li in enumerate(lengths):
    own = _kernel_fn(network)(jnp.asarray(x[i:i + 1, :li]), None, 'ntk')
    np.testing.assert_allclose(kernel[i, i], own[0, 0], rtol=1e-12)
    if first == 'transpose':
      np.testing.assert_allclose(
          outputs[i],
          _apply_fn(network)(params, jnp.asarray(x[i:i + 1, :li]))[0],
          rtol=1e-12)


@pytest.mark.parametrize('mechanism, linear_scaling, pos_emb', [
    ('SOFTMAX', True, 'NONE'), ('SOFTMAX', True, 'SUM'),
    ('IDENTITY', False, 'NONE'), ('RELU', False, 'CONCAT')])
def test_attention_over_masked_keys_equals_truncation(mechanism,
                                                      linear_scaling, pos_emb):
  """Masked positions are no keys (softmax renormalized over the rest,
  elementwise mechanisms give them weight 0), so a masked tail attends like
  the truncated sequence (positional embeddings without decay are i.i.d.
  per position, so truncation keeps theirs)."""
  lengths = [3, 5, 2]
  x, padded = _sequences(lengths, size=5, seed=9)
  network = stax.serial(
      stax.Dense(8, b_std=0.1),
      stax.GlobalSelfAttention(8, 4, 4, 2, linear_scaling=linear_scaling,
                               attention_mechanism=mechanism,
                               pos_emb_type=pos_emb,
                               n_chan_pos_emb=3 if pos_emb == 'CONCAT' else None,
                               b_std=0.1),
      stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
  kernel = _kernel_fn(network)(padded, None, 'ntk', mask_constant=PAD)
  finite = pos_emb == 'NONE'  # embeddings' parameters depend on the length
  if finite:
    _, params = network.init_fn(jax.random.PRNGKey(0), padded.shape)
    outputs = _apply_fn(network)(params, padded, mask_constant=PAD)
  for i, li in enumerate(lengths):
    own = _kernel_fn(network)(jnp.asarray(x[i:i + 1, :li]), None, 'ntk')
    np.testing.assert_allclose(kernel[i, i], own[0, 0], rtol=1e-11)
    if finite:
      np.testing.assert_allclose(
          outputs[i],
          _apply_fn(network)(params, jnp.asarray(x[i:i + 1, :li]))[0],
          rtol=1e-10)
