"""ConvTranspose and ConvLocal: kernels, finite networks, errors.

Independent checks, as in test_conv.py:

* the Gram-matrix reference of test_conv.py (`_Reference`: one index per
  (sample, position) pair), extended by two layers whose 0/1 selection
  matrices come from the finite networks' definitions, not from ntkjax:
  a transposed convolution's T_k (output x input positions, one per filter
  entry k) is read off `lax.conv_transpose` of one-hot images with a
  one-hot filter (CIRCULAR: the VALID result folded onto n s positions,
  neural-tangents' definition), so K' = W^2 / F sum_k T_k K T_k^T + b^2; a
  locally connected layer is Conv's formula times the identity over
  positions (independent weights per position). `kernel_fn` must equal it
  to float64 rounding;
* identities (a 1x1 transposed convolution is a 1x1 convolution; ConvLocal
  is Conv on the pixel diagonal and 0 off it; without pooling an LCN has
  the CNN's kernel, Novak et al. 2019);
* the finite layers against explicit loops (and ConvLocal against
  `lax.conv_general_dilated_local`, whose parameter layout neural-tangents
  uses), and Monte Carlo of wide finite networks.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ntkjax
from conftest import (assert_monte_carlo_close, monte_carlo_structured,
                      relative_error)
from ntkjax import stax
from ntkjax.stax._conv_variants import ConvLocal, ConvTranspose
from test_conv import (_Reference, _images, _init, _jit, _same_position,
                       _selections)

_DIMS = {1: ('NHC', 'HIO', 'NHC'), 2: ('NHWC', 'HWIO', 'NHWC'),
         3: ('NDHWC', 'DHWIO', 'NDHWC')}


# ----------------------------------------------------------------------------
# The reference, extended.


def _fold(length, out):
  """neural-tangents' CIRCULAR transposed convolution: output j sums the
  VALID outputs m = j + (length - out) // 2 (mod out), an (out x length)
  0/1 matrix."""
  crop = (length - out) // 2
  m = np.arange(length)[None, :]
  j = np.arange(out)[:, None]
  return ((m - crop - j) % out == 0).astype(float)


def _transpose_selections(sizes, window, strides, padding):
  """The 0/1 matrices T_k (P_out x P_in), one per filter entry k, of the
  finite transposed convolution: column i of the one-axis T_k is
  `lax.conv_transpose` of the one-hot image e_i with the one-hot filter e_k;
  CIRCULAR folds the VALID result (`_fold`). Multi-dimensional entries are
  Kronecker products, positions row-major."""
  per_axis, outs = [], []
  for n, f, s in zip(sizes, window, strides):
    lax_padding = 'VALID' if padding == 'CIRCULAR' else padding
    matrices = []
    for k in range(f):
      w = np.zeros((f, 1, 1))
      w[k] = 1.
      columns = lax.conv_transpose(np.eye(n)[:, :, None], w, (s,),
                                   lax_padding, dimension_numbers=_DIMS[1])
      m = np.asarray(columns[:, :, 0]).T
      if padding == 'CIRCULAR':
        m = _fold(m.shape[0], n * s) @ m
      matrices.append(m)
    per_axis.append(matrices)
    outs.append(matrices[0].shape[0])
  return ([functools.reduce(np.kron, combo)
           for combo in itertools.product(*per_axis)], tuple(outs))


class _VariantReference(_Reference):
  """test_conv's reference with a transposed and a locally connected layer."""

  def _affine(self, selections, outs, out, W_std, b_std, parameterization,
              s0, local):
    f = len(selections)
    k_in = sum(self._sandwich(m, self.k) for m in selections) / f
    t_in = sum(self._sandwich(m, self.t) for m in selections) / f
    b2 = 0. if b_std is None else b_std**2
    self.k = W_std**2 * k_in + b2
    if parameterization == 'ntk':
      self.t = self.k + W_std**2 * t_in
    else:
      self.t = (f * self.channels / s0 * k_in + W_std**2 * t_in
                + (0. if b_std is None else 1.))
    if local:  # independent weights and biases at different positions
      same = np.eye(self.k.shape[1])[None, :, None, :]
      self.k, self.t = self.k * same, self.t * same
    self.sizes, self.channels = outs, out
    return self

  def conv_transpose(self, out, window, strides=None, padding='VALID',
                     W_std=1., b_std=None, parameterization='ntk', s0=1.):
    strides = strides or (1,) * len(window)
    selections, outs = _transpose_selections(self.sizes, window, strides,
                                             padding)
    return self._affine(selections, outs, out, W_std, b_std,
                        parameterization, s0, False)

  def conv_local(self, out, window, strides=None, padding='VALID', W_std=1.,
                 b_std=None, parameterization='ntk', s0=1.):
    strides = strides or (1,) * len(window)
    selections, outs = _selections(self.sizes, window, strides, padding)
    return self._affine(selections, outs, out, W_std, b_std,
                        parameterization, s0, True)


def _arch_transpose_2d_output():
  """Strided transposed convolutions with each padding, ending in one."""
  net = stax.serial(
      ConvTranspose(6, (3, 2), strides=(2, 1), padding='SAME', W_std=1.5,
                    b_std=0.1), stax.Relu(),
      ConvTranspose(6, (2, 3), strides=(1, 2), padding='CIRCULAR', W_std=1.3,
                    b_std=0.2), stax.Erf(),
      ConvTranspose(3, (2, 2), strides=(2, 2), W_std=1.1, b_std=0.3))
  ref = lambda r: (r.conv_transpose(6, (3, 2), (2, 1), 'SAME', 1.5, 0.1).relu()
                   .conv_transpose(6, (2, 3), (1, 2), 'CIRCULAR', 1.3, 0.2)
                   .erf().conv_transpose(3, (2, 2), (2, 2), 'VALID', 1.1, 0.3))
  return net, ref


def _arch_transpose_global_pool():
  net = stax.serial(
      stax.Conv(6, (3, 3), strides=(2, 1), padding='SAME', W_std=1.5,
                b_std=0.1), stax.Relu(),
      ConvTranspose(6, (3, 3), strides=(2, 2), padding='VALID', W_std=1.4,
                    b_std=0.2), stax.Relu(),
      stax.GlobalAvgPool(), stax.Dense(1, W_std=1.2, b_std=0.1))
  ref = lambda r: (r.conv(6, (3, 3), (2, 1), 'SAME', 1.5, 0.1).relu()
                   .conv_transpose(6, (3, 3), (2, 2), 'VALID', 1.4, 0.2)
                   .relu().global_pool().dense(1, 1.2, 0.1))
  return net, ref


def _arch_transpose_flatten_standard():
  kw = dict(parameterization='standard')
  net = stax.serial(
      ConvTranspose(5, (3, 3), strides=(1, 2), padding='CIRCULAR', W_std=1.5,
                    b_std=0.1, **kw), stax.Relu(),
      ConvTranspose(4, (2, 3), padding='SAME', W_std=1.3, b_std=0.2, s=(2, 1),
                    **kw),
      stax.Flatten(), stax.Dense(1, W_std=1.2, b_std=0.1, **kw))
  ref = lambda r: (r.conv_transpose(5, (3, 3), (1, 2), 'CIRCULAR', 1.5, 0.1,
                                    'standard').relu()
                   .conv_transpose(4, (2, 3), None, 'SAME', 1.3, 0.2,
                                   'standard', 2.)
                   .flatten().dense(1, 1.2, 0.1, 'standard'))
  return net, ref


def _arch_transpose_1d():
  """Filters larger than twice the stride (CIRCULAR wraps more than once)."""
  net = stax.serial(
      ConvTranspose(6, (5,), strides=(2,), padding='CIRCULAR', W_std=1.5,
                    b_std=0.1), stax.Relu(),
      ConvTranspose(6, (4,), strides=(3,), padding='SAME', W_std=1.2),
      stax.Erf(), ConvTranspose(2, (1,), strides=(2,), W_std=1.1, b_std=0.2))
  ref = lambda r: (r.conv_transpose(6, (5,), (2,), 'CIRCULAR', 1.5, 0.1).relu()
                   .conv_transpose(6, (4,), (3,), 'SAME', 1.2).erf()
                   .conv_transpose(2, (1,), (2,), 'VALID', 1.1, 0.2))
  return net, ref


def _arch_transpose_3d():
  net = stax.serial(
      ConvTranspose(4, (2, 3, 2), strides=(1, 2, 2), padding='SAME',
                    W_std=1.5, b_std=0.1), stax.Relu(),
      ConvTranspose(4, (2, 1, 3), padding='CIRCULAR', W_std=1.3),
      stax.GlobalSumPool(), stax.Dense(1))
  ref = lambda r: (r.conv_transpose(4, (2, 3, 2), (1, 2, 2), 'SAME', 1.5, 0.1)
                   .relu().conv_transpose(4, (2, 1, 3), None, 'CIRCULAR', 1.3)
                   .global_pool(average=False).dense(1))
  return net, ref


def _arch_local_flatten():
  net = stax.serial(
      stax.Conv(6, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Relu(),
      ConvLocal(6, (2, 3), strides=(2, 1), padding='CIRCULAR', W_std=1.3,
                b_std=0.2), stax.Erf(),
      ConvLocal(4, (2, 2), W_std=1.2, b_std=0.3),
      stax.Flatten(), stax.Dense(1, W_std=1.2, b_std=0.1))
  ref = lambda r: (r.conv(6, (3, 3), None, 'SAME', 1.5, 0.1).relu()
                   .conv_local(6, (2, 3), (2, 1), 'CIRCULAR', 1.3, 0.2).erf()
                   .conv_local(4, (2, 2), None, 'VALID', 1.2, 0.3)
                   .flatten().dense(1, 1.2, 0.1))
  return net, ref


def _arch_local_pool():
  """Pooling after ConvLocal: the zeros between positions, then a ReLU
  (whose kernel between independent positions is the product of means),
  are pooled."""
  net = stax.serial(
      ConvLocal(6, (3, 3), strides=(1, 2), padding='SAME', W_std=1.5,
                b_std=0.1), stax.Relu(),
      ConvLocal(6, (2, 2), padding='CIRCULAR', W_std=1.3, b_std=0.2),
      stax.Relu(), stax.AvgPool((2, 2), padding='SAME'),
      stax.GlobalAvgPool(), stax.Dense(1, W_std=1.2, b_std=0.1))
  ref = lambda r: (r.conv_local(6, (3, 3), (1, 2), 'SAME', 1.5, 0.1).relu()
                   .conv_local(6, (2, 2), None, 'CIRCULAR', 1.3, 0.2).relu()
                   .pool((2, 2), None, 'SAME').global_pool()
                   .dense(1, 1.2, 0.1))
  return net, ref


def _arch_local_standard_1d():
  kw = dict(parameterization='standard')
  net = stax.serial(
      ConvLocal(5, (3,), strides=(2,), padding='SAME', W_std=1.5, b_std=0.1,
                **kw), stax.Relu(),
      ConvLocal(4, (2,), padding='VALID', W_std=1.3, b_std=0.2, s=(2, 1), **kw))
  ref = lambda r: (r.conv_local(5, (3,), (2,), 'SAME', 1.5, 0.1, 'standard')
                   .relu().conv_local(4, (2,), None, 'VALID', 1.3, 0.2,
                                      'standard', 2.))
  return net, ref


def _arch_local_3d():
  net = stax.serial(
      ConvLocal(4, (2, 2, 2), padding='CIRCULAR', W_std=1.5, b_std=0.1),
      stax.Erf(), ConvLocal(3, (1, 2, 2), strides=(1, 2, 1), padding='SAME'))
  ref = lambda r: (r.conv_local(4, (2, 2, 2), None, 'CIRCULAR', 1.5, 0.1)
                   .erf().conv_local(3, (1, 2, 2), (1, 2, 1), 'SAME'))
  return net, ref


ARCHITECTURES = {
    'transpose_2d_output': (_arch_transpose_2d_output, (3, 2)),
    'transpose_global_pool': (_arch_transpose_global_pool, (4, 3)),
    'transpose_flatten_standard': (_arch_transpose_flatten_standard, (3, 2)),
    'transpose_1d': (_arch_transpose_1d, (3,)),
    'transpose_3d': (_arch_transpose_3d, (2, 2, 1)),
    'local_flatten': (_arch_local_flatten, (5, 4)),
    'local_pool': (_arch_local_pool, (4, 4)),
    'local_standard_1d': (_arch_local_standard_1d, (7,)),
    'local_3d': (_arch_local_3d, (3, 2, 2)),
}


@pytest.mark.parametrize('name', sorted(ARCHITECTURES))
def test_kernel_fn_matches_independent_reference(name):
  """nngp, ntk, cov1, cov2 (batch-first layout) equal the Gram-matrix
  reference, and for networks with a spatial output so do the pixel-diagonal
  results (diagonal_spatial=True)."""
  make, sizes = ARCHITECTURES[name]
  net, build = make()
  x1, x2 = _images(sizes)
  ref = build(_VariantReference(x1, x2))
  got = _jit(net)(x1, x2, ('nngp', 'ntk', 'cov1', 'cov2'))
  for field in got._fields:
    assert relative_error(getattr(got, field), ref.public(field)) < 1e-12, field
  if ref.sizes:
    diagonal = _jit(net)(x1, x2, ('nngp', 'ntk', 'cov1'),
                         diagonal_spatial=True)
    for field in diagonal._fields:
      assert relative_error(getattr(diagonal, field),
                  ref.public(field, diagonal=True)) < 1e-12, field


def test_transpose_output_sizes():
  """Output sizes are lax.conv_transpose's: VALID n s + max(f - s, 0),
  SAME n s; CIRCULAR n s."""
  x = jnp.ones((2, 5, 1))
  for f, s in ((1, 2), (3, 1), (3, 2), (2, 3), (5, 2)):
    for padding, out in (('VALID', 5 * s + max(f - s, 0)), ('SAME', 5 * s),
                         ('CIRCULAR', 5 * s)):
      layer = ConvTranspose(2, (f,), (s,), padding)
      shape, params = _init(layer, x.shape)
      assert shape == (2, out, 2), (f, s, padding)
      assert layer.apply_fn(params, x).shape == shape
      assert jax.eval_shape(layer.kernel_fn, x).shape1 == shape


# ----------------------------------------------------------------------------
# Identities.


@pytest.mark.parametrize('padding,parameterization', [
    ('VALID', 'ntk'), ('SAME', 'standard'), ('CIRCULAR', 'ntk')])
def test_1x1_transpose_is_1x1_conv(padding, parameterization):
  """With a 1x1 filter and stride 1 a transposed convolution reads x(o)
  through one weight matrix, as a 1x1 convolution does: equal kernels
  through nonlinearities, in both layouts."""
  kw = dict(padding=padding, parameterization=parameterization)

  def net(conv):
    return stax.serial(conv(5, (1, 1), W_std=1.5, b_std=0.1, **kw),
                       stax.Relu(), conv(3, (1, 1), W_std=1.2, **kw))
  x1, x2 = _images((4, 3))
  for diagonal in (False, True):
    a = _jit(net(ConvTranspose))(x1, x2, ('nngp', 'ntk', 'cov1'),
                                 diagonal_spatial=diagonal)
    b = _jit(net(stax.Conv))(x1, x2, ('nngp', 'ntk', 'cov1'),
                             diagonal_spatial=diagonal)
    for field in a._fields:
      assert relative_error(getattr(a, field), getattr(b, field)) < 1e-12, field


@pytest.mark.parametrize('padding,strides', [('VALID', (1, 1)),
                                             ('SAME', (2, 1)),
                                             ('CIRCULAR', (1, 2))])
def test_local_is_conv_on_the_pixel_diagonal(padding, strides):
  """Full layout: ConvLocal's kernel equals Conv's on the pixel diagonal and
  is exactly 0 between different positions (nngp, ntk, cov1)."""
  def net(conv):
    return stax.serial(stax.Conv(5, (3, 3), padding='SAME', W_std=1.5,
                                 b_std=0.1), stax.Relu(),
                       conv(4, (2, 3), strides, padding, W_std=1.3, b_std=0.2))
  x1, x2 = _images((5, 4))
  local = _jit(net(ConvLocal))(x1, x2, ('nngp', 'ntk', 'cov1'))
  conv = _jit(net(stax.Conv))(x1, x2, ('nngp', 'ntk', 'cov1'))
  for field in ('nngp', 'ntk'):
    a, b = np.asarray(getattr(local, field)), np.asarray(getattr(conv, field))
    assert relative_error(_same_position(a), _same_position(b)) < 1e-12
    h, w = a.shape[2], a.shape[4]
    off = 1 - np.einsum('ab,cd->abcd', np.eye(h), np.eye(w))
    assert np.all(a * off == 0), field
    assert np.any(b * off != 0)  # Conv's are not (negative control)
  own_local = np.einsum('iaabb->iab', np.asarray(local.cov1))
  own_conv = np.einsum('iaabb->iab', np.asarray(conv.cov1))
  assert relative_error(own_local, own_conv) < 1e-12
  assert np.count_nonzero(local.cov1) == own_local.size


def test_local_then_flatten_runs_pixel_diagonal():
  """A network ending in ConvLocal -> Flatten asks for a pixel-diagonal
  input (so every layer runs with N^2 P entries), and its kernel equals the
  one computed from the full layout."""
  body = stax.serial(stax.Conv(5, (3, 3), padding='SAME', W_std=1.5,
                               b_std=0.1), stax.Relu(),
                     ConvLocal(4, (2, 2), padding='CIRCULAR', W_std=1.3,
                               b_std=0.2), stax.Relu())
  net = stax.serial(body, stax.Flatten(), stax.Dense(1))
  assert net.kernel_fn.input_diagonal(False) is True
  assert body.kernel_fn.input_diagonal(True) is True
  x1, x2 = _images((4, 3))
  get = ('nngp', 'ntk', 'cov1', 'cov2')
  diagonal = _jit(net)(x1, x2, get)
  full = stax.serial(stax.Flatten(), stax.Dense(1)).kernel_fn(
      _jit(body)(x1, x2), get=get)
  assert not _jit(body)(x1, x2).spatial.diagonal
  for field in get:
    assert relative_error(getattr(diagonal, field), getattr(full, field)) < 1e-12


def test_lcn_without_pooling_has_the_cnn_kernel():
  """Novak et al. 2019: without pooling (Flatten readout) a locally
  connected network has the same NNGP and NTK as the CNN with the same
  filters, since only same-position covariances reach the readout."""
  def net(conv):
    return stax.serial(
        conv(5, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Relu(),
        conv(5, (2, 2), strides=(2, 1), padding='CIRCULAR', W_std=1.3),
        stax.Erf(), stax.Flatten(), stax.Dense(1, W_std=1.2, b_std=0.1))
  x1, x2 = _images((5, 4))
  a = _jit(net(ConvLocal))(x1, x2, ('nngp', 'ntk'))
  b = _jit(net(stax.Conv))(x1, x2, ('nngp', 'ntk'))
  for field in a._fields:
    assert relative_error(getattr(a, field), getattr(b, field)) < 1e-12


def test_transpose_needs_what_its_output_needs():
  """ConvTranspose reads the same input position for o = o': its
  requirement passes through (pixel-diagonal before a Flatten, all pairs
  before a pooling layer)."""
  layer = ConvTranspose(4, (3, 3), strides=(2, 2))
  assert layer.kernel_fn.input_diagonal(True) is True
  assert layer.kernel_fn.input_diagonal(False) is False
  pooled = stax.serial(layer, stax.Relu(), stax.GlobalAvgPool())
  assert pooled.kernel_fn.input_diagonal(True) is False


# ----------------------------------------------------------------------------
# The finite layers.


def _transpose_pad_lo(f, s, padding):
  """lax.conv_transpose's low padding of the dilated input (its
  documentation / `_conv_transpose_padding`): VALID f - 1; SAME f - 1 if
  s > f - 1, else ceil((f + s - 2) / 2)."""
  if padding == 'VALID' or s > f - 1:
    return f - 1
  return -(-(f + s - 2) // 2)


def _explicit_conv_transpose(x, w, strides, padding):
  """y[o] = sum_k x[i] @ w[k] over i s = o + k - lo, by loops; CIRCULAR is
  the VALID result with outputs m summed into (m - (L - n s) // 2) mod n s
  (neural-tangents' definition)."""
  x, w = np.asarray(x), np.asarray(w)
  sizes, window = x.shape[1:-1], w.shape[:-2]
  mode = 'VALID' if padding == 'CIRCULAR' else padding
  los = [_transpose_pad_lo(f, s, mode) for f, s in zip(window, strides)]
  outs = [n * s + (max(f - s, 0) if mode == 'VALID' else 0)
          for n, f, s in zip(sizes, window, strides)]
  y = np.zeros((x.shape[0],) + tuple(outs) + (w.shape[-1],))
  for o in itertools.product(*map(range, outs)):
    for k in itertools.product(*map(range, window)):
      t = [oi + ki - lo for oi, ki, lo in zip(o, k, los)]
      if any(ti % s or not 0 <= ti // s < n
             for ti, s, n in zip(t, strides, sizes)):
        continue
      i = tuple(ti // s for ti, s in zip(t, strides))
      y[(slice(None),) + o] += x[(slice(None),) + i] @ w[k]
  if padding != 'CIRCULAR':
    return y
  final = [n * s for n, s in zip(sizes, strides)]
  folded = np.zeros((x.shape[0],) + tuple(final) + (w.shape[-1],))
  for m in itertools.product(*map(range, outs)):
    j = tuple((mi - (length - n) // 2) % n
              for mi, length, n in zip(m, outs, final))
    folded[(slice(None),) + j] += y[(slice(None),) + m]
  return folded


FINITE_CASES = [((4,), (5,), (2,)), ((3, 4), (3, 2), (2, 1)),
                ((2, 3, 2), (2, 3, 2), (1, 2, 2))]


@pytest.mark.parametrize('padding', ['VALID', 'SAME', 'CIRCULAR'])
@pytest.mark.parametrize('sizes,window,strides', FINITE_CASES,
                         ids=['1d', '2d', '3d'])
def test_finite_conv_transpose_is_the_documented_sum(sizes, window, strides,
                                                     padding):
  """apply_fn is W_std / sqrt(F C) sum_k x(i) W[k] + b_std b over
  i s = o + k - lo (explicit loops; CIRCULAR folded as neural-tangents
  does), in the NTK and standard parameterizations; shapes agree with
  init_fn and the kernel's shape1."""
  channels = 3
  x, _ = _images(sizes, channels=channels, n1=2)
  fan_in = np.prod(window) * channels
  for parameterization in ('ntk', 'standard'):
    layer = ConvTranspose(4, window, strides, padding, W_std=1.3, b_std=0.2,
                          parameterization=parameterization, s=(2, 1))
    shape, (w, b) = _init(layer, x.shape)
    y = layer.apply_fn((w, b), x)
    assert y.shape == shape
    loops = _explicit_conv_transpose(x, w, strides, padding)
    if parameterization == 'ntk':
      expected = loops * 1.3 / np.sqrt(fan_in) + 0.2 * np.asarray(b)
    else:
      expected = loops / np.sqrt(2.) + np.asarray(b)
    np.testing.assert_allclose(y, expected, atol=1e-12)
    assert jax.eval_shape(layer.kernel_fn, x).shape1 == shape


def test_finite_conv_transpose_is_lax_with_dimension_numbers():
  """VALID/SAME are lax.conv_transpose, with explicit channels-last
  dimension numbers too."""
  x, _ = _images((4, 3), channels=3, n1=2)
  for padding in ('VALID', 'SAME'):
    layer = ConvTranspose(4, (3, 2), (2, 3), padding, W_std=1.3,
                          dimension_numbers=_DIMS[2])
    _, (w, b) = _init(layer, x.shape)
    expected = lax.conv_transpose(x, w, (2, 3), padding,
                                  dimension_numbers=_DIMS[2])
    expected = expected * 1.3 / np.sqrt(3 * 2 * 3)   # W_std / sqrt(F C)
    np.testing.assert_allclose(layer.apply_fn((w, b), x), expected,
                               atol=1e-12)


def _explicit_conv_local(x, w, strides, padding, window):
  """y[o] = sum_{c, a} x[o s + a - lo, c] w[o, c F + a] by loops (lax's
  SAME/VALID padding, wrapped positions for CIRCULAR)."""
  x, w = np.asarray(x), np.asarray(w)
  sizes, channels = x.shape[1:-1], x.shape[-1]
  pads = lax.padtype_to_pads(sizes, window, strides,
                             'VALID' if padding == 'VALID' else 'SAME')
  outs = w.shape[:-2]
  offsets = list(itertools.product(*map(range, window)))
  y = np.zeros((x.shape[0],) + tuple(outs) + (w.shape[-1],))
  for o in itertools.product(*map(range, outs)):
    for a_index, a in enumerate(offsets):
      index = [i * s + j - lo for i, s, j, (lo, _) in zip(o, strides, a, pads)]
      if padding == 'CIRCULAR':
        index = [i % n for i, n in zip(index, sizes)]
      elif any(i < 0 or i >= n for i, n in zip(index, sizes)):
        continue
      for c in range(channels):
        y[(slice(None),) + o] += np.outer(
            x[(slice(None),) + tuple(index) + (c,)],
            w[o + (c * len(offsets) + a_index,)])
  return y


@pytest.mark.parametrize('padding', ['VALID', 'SAME', 'CIRCULAR'])
@pytest.mark.parametrize('sizes,window,strides', [
    ((7,), (3,), (2,)), ((5, 4), (3, 2), (2, 1)),
    ((4, 3, 3), (2, 3, 2), (1, 2, 2))], ids=['1d', '2d', '3d'])
def test_finite_conv_local_is_the_documented_sum(sizes, window, strides,
                                                 padding):
  """apply_fn is W_std / sqrt(F C) sum_{a, c} x(o s + a - lo, c)
  W[o, c F + a] + b_std b[o] (explicit loops), and its parameters have
  lax.conv_general_dilated_local's layout (out sizes..., C F, out_chan)
  (the one neural-tangents uses), with per-position biases."""
  channels = 2
  x, _ = _images(sizes, channels=channels, n1=2)
  fan_in = np.prod(window) * channels
  layer = ConvLocal(3, window, strides, padding, W_std=1.3, b_std=0.2)
  shape, (w, b) = _init(layer, x.shape)
  assert w.shape == shape[1:-1] + (fan_in, 3)
  assert b.shape == shape[1:]
  y = layer.apply_fn((w, b), x)
  assert y.shape == shape
  expected = (_explicit_conv_local(x, w, strides, padding, window) * 1.3
              / np.sqrt(fan_in) + 0.2 * np.asarray(b))
  np.testing.assert_allclose(y, expected, atol=1e-12)
  if padding != 'CIRCULAR':
    local = lax.conv_general_dilated_local(
        x, w, strides, padding, window, dimension_numbers=_DIMS[len(sizes)],
        precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(y, local * 1.3 / np.sqrt(fan_in)
                               + 0.2 * np.asarray(b), atol=1e-12)
  assert jax.eval_shape(layer.kernel_fn, x).shape1 == shape


# ----------------------------------------------------------------------------
# Monte Carlo of the finite networks.


MC_WIDTH = 256
MC_SAMPLES = 24


def test_transpose_network_matches_monte_carlo():
  """Conv -> Relu -> strided SAME ConvTranspose -> Relu -> GlobalAvgPool ->
  Dense: NNGP read off a wide readout, NTK off one output, each within 5
  standard errors + 8 / width of kernel_fn (`assert_monte_carlo_close`)."""
  x1, x2 = _images((3, 2))

  def net(readout):
    return stax.serial(
        stax.Conv(MC_WIDTH, (2, 2), padding='SAME', W_std=1.5, b_std=0.1),
        stax.Relu(),
        ConvTranspose(MC_WIDTH, (3, 2), strides=(2, 2), padding='SAME',
                      W_std=1.5, b_std=0.1), stax.Relu(),
        stax.GlobalAvgPool(), stax.Dense(readout, W_std=1.2, b_std=0.1))

  wide, narrow = net(MC_WIDTH), net(1)
  nngp = monte_carlo_structured(wide, x1, x2, MC_SAMPLES, 11, 'nngp')
  assert_monte_carlo_close(nngp, _jit(wide)(x1, x2, 'nngp'), MC_WIDTH, 'nngp')
  ntk = monte_carlo_structured(narrow, x1, x2, MC_SAMPLES, 12, 'ntk')
  assert_monte_carlo_close(ntk, _jit(narrow)(x1, x2, 'ntk'), MC_WIDTH, 'ntk')


def test_local_network_matches_monte_carlo():
  """Conv -> Relu -> ConvLocal (CIRCULAR) -> Relu -> Flatten -> Dense: NNGP
  and NTK as above. Negative control: the kernel of the same network with
  SAME instead of CIRCULAR padding in ConvLocal is rejected."""
  x1, x2 = _images((3, 3))

  def net(readout, padding='CIRCULAR'):
    return stax.serial(
        stax.Conv(MC_WIDTH, (2, 2), padding='SAME', W_std=1.5, b_std=0.1),
        stax.Relu(),
        ConvLocal(MC_WIDTH, (2, 2), padding=padding, W_std=1.5, b_std=0.1),
        stax.Relu(), stax.Flatten(), stax.Dense(readout, W_std=1.2, b_std=0.1))

  wide, narrow = net(MC_WIDTH), net(1)
  nngp = monte_carlo_structured(wide, x1, x2, MC_SAMPLES, 13, 'nngp')
  assert_monte_carlo_close(nngp, _jit(wide)(x1, x2, 'nngp'), MC_WIDTH, 'nngp')
  ntk = monte_carlo_structured(narrow, x1, x2, MC_SAMPLES, 14, 'ntk')
  assert_monte_carlo_close(ntk, _jit(narrow)(x1, x2, 'ntk'), MC_WIDTH, 'ntk')
  wrong = _jit(net(1, 'SAME'))(x1, x2, 'ntk')
  with pytest.raises(AssertionError):
    assert_monte_carlo_close(ntk, wrong, MC_WIDTH, 'SAME')


# ----------------------------------------------------------------------------
# Bad input: clear errors.


@pytest.mark.parametrize('layer_type', [ConvTranspose, ConvLocal])
def test_bad_arguments(layer_type):
  name = layer_type.__name__
  with pytest.raises(ValueError, match=f'{name}.*filter_shape'):
    layer_type(4, 3)
  with pytest.raises(ValueError, match='1, 2 or 3'):
    layer_type(4, (3, 3, 3, 3))
  with pytest.raises(ValueError, match='filter sizes'):
    layer_type(4, (3, 0))
  with pytest.raises(ValueError, match='out_chan'):
    layer_type(0, (3, 3))
  with pytest.raises(ValueError, match='strides'):
    layer_type(4, (3, 3), strides=(2,))
  with pytest.raises(ValueError, match='strides'):
    layer_type(4, (3, 3), strides=(0, 1))
  with pytest.raises(ValueError, match='padding must be one of'):
    layer_type(4, (3, 3), padding='FULL')
  with pytest.raises(NotImplementedError, match='channels-last'):
    layer_type(4, (3, 3), dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  with pytest.raises(ValueError, match='parameterization'):
    layer_type(4, (3, 3), parameterization='mup')
  with pytest.raises(ValueError, match='must be a finite number >= 0'):
    layer_type(4, (3, 3), b_std=-1.)


@pytest.mark.parametrize('layer_type', [ConvTranspose, ConvLocal])
def test_wrong_rank(layer_type):
  name = layer_type.__name__
  layer = layer_type(4, (2, 2))
  with pytest.raises(ntkjax.KernelError, match=f'{name}.*rank 4'):
    layer.kernel_fn(jnp.ones((3, 12)))
  with pytest.raises(ntkjax.KernelError, match='rank 3'):
    layer_type(4, (2,)).kernel_fn(jnp.ones((2, 4, 3, 2)))
  with pytest.raises(ValueError, match='rank 4'):
    layer.init_fn(jax.random.PRNGKey(0), (3, 12))
  x = jnp.ones((2, 4, 3, 2))
  _, params = _init(layer, x.shape)
  with pytest.raises(ValueError, match=name):
    layer.apply_fn(params, jnp.ones((2, 4, 3, 5)))


def test_local_parameters_for_another_input_size():
  """ConvLocal's weights are per output position: applying them to images of
  another size is an error, not a broadcast."""
  layer = ConvLocal(4, (2, 2))
  _, params = _init(layer, (2, 4, 3, 2))
  with pytest.raises(ValueError, match='output positions'):
    layer.apply_fn(params, jnp.ones((2, 5, 3, 2)))


def test_local_valid_window_larger_than_input():
  with pytest.raises(ntkjax.KernelError, match='VALID'):
    ConvLocal(4, (5, 2)).kernel_fn(jnp.ones((2, 4, 3, 2)))
