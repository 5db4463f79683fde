"""Convolutional kernels: Conv (1-3 d), AvgPool/SumPool, GlobalAvgPool/
GlobalSumPool and Flatten.

Three independent checks:

* an independent reference (`_Reference`) that treats every (sample,
  position) pair as one index of a Gram matrix K[(n, p), (m, q)], so each
  layer is a few lines of linear algebra (a convolution is
  K' = W^2 / F sum_a S_a K S_a^T + b^2 with S_a the 0/1 matrix picking input
  position o s + a - pad of output o, from `lax.padtype_to_pads`; pooling is
  A K A^T; ReLU/erf are the closed-form arc-cosine/arcsine kernels);
  `kernel_fn` must equal it to float64 rounding;
* exact identities (1x1 filters / 1x1 images are Dense, Flatten and global
  pooling are means of the full kernel, translation invariance, symmetry
  and PSD, pooling of raw inputs = kernel of the pooled inputs);
* Monte Carlo of the finite networks built from the same definitions.
"""

import copy
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


def _images(sizes, channels=2, n1=3, n2=2, seed=0):
  """Two batches of images (N, *sizes, channels) with different scales."""
  rng = np.random.default_rng(seed)
  x1 = rng.standard_normal((n1,) + tuple(sizes) + (channels,))
  x2 = 0.7 * rng.standard_normal((n2,) + tuple(sizes) + (channels,))
  return jnp.asarray(x1), jnp.asarray(x2)


_JITTED = {}


def _jit(network):
  """The network's kernel_fn under jit, as users run it: one compilation
  instead of one per primitive and shape op by op (~10x faster here);
  cached so repeated calls with the same shapes compile once."""
  kernel_fn = network.kernel_fn
  if id(kernel_fn) not in _JITTED:
    _JITTED[id(kernel_fn)] = (kernel_fn, jax.jit(
        kernel_fn, static_argnames=('get', 'diagonal_spatial')))
  return _JITTED[id(kernel_fn)][1]




def _same_position(a):
  """The pixel diagonal (N1, N2, S1, ..., Ss) of a public full-layout array
  (N1, N2, S1, S1', ..., Ss, Ss')."""
  ndim = (a.ndim - 2) // 2
  axes = [0, 1] + [2 + d for d in range(ndim) for _ in (0, 1)]
  return np.einsum(np.asarray(a), axes, [0, 1] + [2 + d for d in range(ndim)])


# ----------------------------------------------------------------------------
# An independent reference: Gram matrices over (sample, position) pairs.


def _selections(sizes, window, strides, padding):
  """The 0/1 matrices S_a (P_out x P_in), one per filter offset a.

  Row o of S_a picks input position o s + a - lo (lax's SAME/VALID padding,
  `lax.padtype_to_pads`): nothing if it falls into zero padding, the
  wrapped-around position for CIRCULAR. Positions are flattened row-major,
  so the matrix of a multi-dimensional offset is the Kronecker product of
  the per-axis ones.
  """
  pads = lax.padtype_to_pads(sizes, window, strides,
                             'VALID' if padding == 'VALID' else 'SAME')
  per_axis, outs = [], []
  for n, f, s, (lo, hi) in zip(sizes, window, strides, pads):
    out = (n + lo + hi - f) // s + 1
    outs.append(out)
    matrices = []
    for a in range(f):
      m = np.zeros((out, n))
      for o in range(out):
        i = o * s + a - lo
        if padding == 'CIRCULAR':
          m[o, i % n] = 1
        elif 0 <= i < n:
          m[o, i] = 1
      matrices.append(m)
    per_axis.append(matrices)
  return ([functools.reduce(np.kron, combo)
           for combo in itertools.product(*per_axis)], tuple(outs))


class _Reference:
  """NNGP K and NTK T of a network on the joint batch x = [x1; x2], as
  (N, P, N, P) arrays over all (sample, position) pairs."""

  def __init__(self, x1, x2):
    x = np.concatenate([np.asarray(x1), np.asarray(x2)])
    self.n1 = x1.shape[0]
    self.sizes = x.shape[1:-1]
    self.channels = x.shape[-1]
    flat = x.reshape(x.shape[0], -1, self.channels)
    self.k = np.einsum('npc,mqc->npmq', flat, flat) / self.channels
    self.t = np.zeros_like(self.k)

  def copy(self):
    return copy.deepcopy(self)

  @staticmethod
  def _sandwich(a, k):
    k = np.einsum('op,npmq->nomq', a, k)
    return np.einsum('nomq,rq->nomr', k, a)

  def conv(self, out, window, strides=None, padding='VALID', W_std=1.,
           b_std=None, parameterization='ntk', s0=1.):
    strides = strides or (1,) * len(window)
    selections, outs = _selections(self.sizes, window, strides, padding)
    f = len(selections)
    k_in = sum(self._sandwich(m, self.k) for m in selections) / f
    t_in = sum(self._sandwich(m, self.t) for m in selections) / f
    self.k = W_std**2 * k_in + (0. if b_std is None else b_std**2)
    if parameterization == 'ntk':
      self.t = self.k + W_std**2 * t_in
    else:  # d z / d W = x / sqrt(s0) for F C weights per output channel
      self.t = (f * self.channels / s0 * k_in + W_std**2 * t_in
                + (0. if b_std is None else 1.))
    self.sizes, self.channels = outs, out
    return self

  def dense(self, out, W_std=1., b_std=None, parameterization='ntk'):
    k_in = self.k
    self.k = W_std**2 * k_in + (0. if b_std is None else b_std**2)
    if parameterization == 'ntk':
      self.t = self.k + W_std**2 * self.t
    else:
      self.t = (self.channels * k_in + W_std**2 * self.t
                + (0. if b_std is None else 1.))
    self.channels = out
    return self

  def _variances(self):
    v = np.einsum('npnp->np', self.k)
    return v[:, :, None, None], v[None, None, :, :]

  def relu(self):
    v1, v2 = self._variances()
    norm = np.sqrt(v1 * v2)
    cos = np.clip(self.k / norm, -1, 1)
    theta = np.arccos(cos)
    self.k = norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos)
    self.t = self.t * (np.pi - theta) / (2 * np.pi)
    return self

  def erf(self):
    v1, v2 = self._variances()
    both = (1 + 2 * v1) * (1 + 2 * v2)
    derivative = 4 / np.pi / np.sqrt(both - 4 * self.k**2)
    self.k = 2 / np.pi * np.arcsin(2 * self.k / np.sqrt(both))
    self.t = self.t * derivative
    return self

  def _linear(self, a, sizes):
    self.k, self.t = self._sandwich(a, self.k), self._sandwich(a, self.t)
    self.sizes = sizes
    return self

  def pool(self, window, strides=None, padding='VALID', average=True,
           normalize_edges=False):
    strides = strides or (1,) * len(window)
    selections, outs = _selections(self.sizes, window, strides, padding)
    a = sum(selections)
    if average:
      a = a / (a.sum(1, keepdims=True) if normalize_edges else len(selections))
    return self._linear(a, outs)

  def global_pool(self, average=True):
    p = self.k.shape[1]
    return self._linear(np.ones((1, p)) / (p if average else 1), ())

  def flatten(self):
    p = self.k.shape[1]
    self.k = np.einsum('npmp->nm', self.k)[:, None, :, None] / p
    self.t = np.einsum('npmp->nm', self.t)[:, None, :, None] / p
    self.channels *= p
    self.sizes = ()
    return self

  def add(self, other):
    """Sum of independent branches: kernels add."""
    self.k, self.t = self.k + other.k, self.t + other.t
    return self

  def concat(self, other):
    """Channel concatenation: channel-weighted mean of the kernels."""
    c1, c2 = self.channels, other.channels
    self.k = (c1 * self.k + c2 * other.k) / (c1 + c2)
    self.t = (c1 * self.t + c2 * other.t) / (c1 + c2)
    self.channels = c1 + c2
    return self

  def public(self, name, diagonal=False):
    """`kernel_fn(x1, x2, name)` in neural-tangents' layout."""
    n1, sizes, d = self.n1, self.sizes, len(self.sizes)
    a = self.k if name in ('nngp', 'cov1', 'cov2') else self.t
    if name == 'cov1':
      a = np.einsum('npnq->npq', a[:n1, :, :n1, :])
    elif name == 'cov2':
      a = np.einsum('npnq->npq', a[n1:, :, n1:, :])
    else:
      a = a[:n1, :, n1:, :]
    batch = 1 if name.startswith('cov') else 2
    a = a.reshape(a.shape[:batch] + sizes + sizes if batch == 1 else
                  (n1,) + sizes + (a.shape[2],) + sizes)
    if batch == 1:
      first, second = list(range(1, 1 + d)), list(range(1 + d, 1 + 2 * d))
      lead = [0]
    else:
      first = list(range(1, 1 + d))
      second = list(range(2 + d, 2 + 2 * d))
      lead = [0, 1 + d]
    if diagonal:
      subscripts = ([0] + first + [1 + d] + first if batch == 2 else
                    [0] + first + first)
      return np.einsum(a, subscripts, lead + first)
    return a.transpose(lead + [ax for pair in zip(first, second)
                               for ax in pair])


# Networks and their references. Widths are irrelevant to NTK-parameterized
# kernels; standard-parameterized ones use them.
def _arch_2d_conv_output():
  net = stax.serial(
      stax.Conv(8, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Relu(),
      stax.Conv(8, (2, 3), strides=(2, 1), padding='CIRCULAR', W_std=1.3,
                b_std=0.2), stax.Erf(),
      stax.Conv(8, (2, 2), padding='VALID', W_std=1.1, b_std=0.3))
  ref = lambda r: (r.conv(8, (3, 3), None, 'SAME', 1.5, 0.1).relu()
                   .conv(8, (2, 3), (2, 1), 'CIRCULAR', 1.3, 0.2).erf()
                   .conv(8, (2, 2), None, 'VALID', 1.1, 0.3))
  return net, ref


def _arch_2d_pools():
  net = stax.serial(
      stax.Conv(8, (3, 3), padding='SAME', W_std=1.5, b_std=0.1),
      stax.AvgPool((2, 2), strides=(1, 2), padding='SAME',
                   normalize_edges=True), stax.Erf(),
      stax.Conv(8, (1, 2), W_std=1.2), stax.Relu(),
      stax.SumPool((3, 2), padding='CIRCULAR'),
      stax.AvgPool((2, 1), strides=(2, 1)),
      stax.Flatten(), stax.Dense(3, W_std=1.2, b_std=0.2))
  ref = lambda r: (r.conv(8, (3, 3), None, 'SAME', 1.5, 0.1)
                   .pool((2, 2), (1, 2), 'SAME', normalize_edges=True).erf()
                   .conv(8, (1, 2), None, 'VALID', 1.2).relu()
                   .pool((3, 2), None, 'CIRCULAR', average=False)
                   .pool((2, 1), (2, 1), 'VALID')
                   .flatten().dense(3, 1.2, 0.2))
  return net, ref


def _arch_2d_global_pool():
  net = stax.serial(
      stax.Conv(8, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Relu(),
      stax.Conv(8, (2, 2), strides=(2, 2), padding='CIRCULAR', W_std=1.3,
                b_std=0.2), stax.Erf(),
      stax.AvgPool((2, 2), padding='SAME'), stax.GlobalAvgPool(),
      stax.Dense(1, W_std=1.2, b_std=0.1))
  ref = lambda r: (r.conv(8, (3, 3), None, 'SAME', 1.5, 0.1).relu()
                   .conv(8, (2, 2), (2, 2), 'CIRCULAR', 1.3, 0.2).erf()
                   .pool((2, 2), None, 'SAME').global_pool().dense(1, 1.2, 0.1))
  return net, ref


def _arch_2d_global_pool_then_relu():
  """A pooled Gaussian field is Gaussian: a nonlinearity may follow."""
  net = stax.serial(
      stax.Conv(8, (3, 3), padding='SAME', W_std=1.5, b_std=0.1),
      stax.GlobalSumPool(), stax.Relu(), stax.Dense(1, W_std=0.9))
  ref = lambda r: (r.conv(8, (3, 3), None, 'SAME', 1.5, 0.1)
                   .global_pool(average=False).relu().dense(1, 0.9))
  return net, ref


def _arch_2d_standard():
  net = stax.serial(
      stax.Conv(6, (3, 3), padding='SAME', W_std=1.5, b_std=0.1,
                parameterization='standard'), stax.Relu(),
      stax.Conv(5, (2, 2), W_std=1.3, b_std=0.2, parameterization='standard',
                s=(2, 1)),
      stax.Flatten(), stax.Dense(1, W_std=1.2, b_std=0.1,
                                 parameterization='standard'))
  ref = lambda r: (r.conv(6, (3, 3), None, 'SAME', 1.5, 0.1, 'standard')
                   .relu().conv(5, (2, 2), None, 'VALID', 1.3, 0.2,
                                'standard', 2.)
                   .flatten().dense(1, 1.2, 0.1, 'standard'))
  return net, ref


def _arch_2d_residual():
  """Pre-activation residual block: z + Conv(Relu(z)), a sum of independent
  Gaussian fields."""
  net = stax.serial(
      stax.Conv(8, (3, 3), padding='SAME', W_std=1.5, b_std=0.1),
      stax.FanOut(2),
      stax.parallel(stax.Identity(),
                    stax.serial(stax.Relu(),
                                stax.Conv(8, (3, 3), padding='CIRCULAR',
                                          W_std=1.3, b_std=0.2))),
      stax.FanInSum(), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))

  def ref(r):
    r.conv(8, (3, 3), None, 'SAME', 1.5, 0.1)
    branch = r.copy().relu().conv(8, (3, 3), None, 'CIRCULAR', 1.3, 0.2)
    return r.add(branch).relu().global_pool().dense(1)
  return net, ref


def _arch_2d_flatten_and_global_branches():
  """Flatten (pixel diagonal) and GlobalAvgPool (all pairs) on one field:
  the shared layers must run with the full layout."""
  net = stax.serial(
      stax.Conv(8, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Relu(),
      stax.FanOut(2),
      stax.parallel(
          stax.serial(stax.Flatten(), stax.Dense(4, W_std=1.2, b_std=0.3)),
          stax.serial(stax.GlobalAvgPool(), stax.Dense(4, W_std=0.8))),
      stax.FanInSum())

  def ref(r):
    r.conv(8, (3, 3), None, 'SAME', 1.5, 0.1).relu()
    other = r.copy().global_pool().dense(4, 0.8)
    return r.flatten().dense(4, 1.2, 0.3).add(other)
  return net, ref


def _arch_2d_concat():
  net = stax.serial(
      stax.FanOut(2),
      stax.parallel(stax.Conv(3, (3, 3), padding='SAME', W_std=1.5),
                    stax.Conv(5, (2, 2), padding='CIRCULAR', W_std=0.7,
                              b_std=0.2)),
      stax.FanInConcat(), stax.Conv(4, (2, 2), W_std=1.1), stax.Relu(),
      stax.GlobalAvgPool(), stax.Dense(1))

  def ref(r):
    other = r.copy().conv(5, (2, 2), None, 'CIRCULAR', 0.7, 0.2)
    r.conv(3, (3, 3), None, 'SAME', 1.5).concat(other)
    return r.conv(4, (2, 2), None, 'VALID', 1.1).relu().global_pool().dense(1)
  return net, ref


def _arch_2d_repeat():
  block = stax.serial(stax.Conv(6, (3, 3), padding='SAME', W_std=1.5,
                                b_std=0.1), stax.Relu())
  net = stax.serial(stax.repeat(block, 2), stax.Conv(2, (2, 2)))

  def ref(r):
    for _ in range(2):
      r.conv(6, (3, 3), None, 'SAME', 1.5, 0.1).relu()
    return r.conv(2, (2, 2))
  return net, ref


def _arch_1d():
  net = stax.serial(
      stax.Conv(8, (3,), strides=(2,), padding='SAME', W_std=1.5, b_std=0.1),
      stax.Relu(), stax.Conv(8, (2,), padding='CIRCULAR', W_std=1.2),
      stax.SumPool((2,), padding='CIRCULAR'),
      stax.Conv(4, (2,), W_std=1.2, b_std=0.2))
  ref = lambda r: (r.conv(8, (3,), (2,), 'SAME', 1.5, 0.1).relu()
                   .conv(8, (2,), None, 'CIRCULAR', 1.2)
                   .pool((2,), None, 'CIRCULAR', average=False)
                   .conv(4, (2,), None, 'VALID', 1.2, 0.2))
  return net, ref


def _arch_3d():
  net = stax.serial(
      stax.Conv(8, (2, 3, 2), padding='CIRCULAR', W_std=1.5, b_std=0.1),
      stax.Erf(),
      stax.Conv(8, (2, 2, 2), strides=(2, 1, 2), padding='SAME', W_std=1.3),
      stax.Relu(), stax.Conv(3, (1, 2, 1)))
  ref = lambda r: (r.conv(8, (2, 3, 2), None, 'CIRCULAR', 1.5, 0.1).erf()
                   .conv(8, (2, 2, 2), (2, 1, 2), 'SAME', 1.3).relu()
                   .conv(3, (1, 2, 1)))
  return net, ref


ARCHITECTURES = {
    '2d_conv_output': (_arch_2d_conv_output, (5, 4)),
    '2d_pools_flatten': (_arch_2d_pools, (5, 4)),
    '2d_global_pool': (_arch_2d_global_pool, (5, 4)),
    '2d_global_pool_then_relu': (_arch_2d_global_pool_then_relu, (5, 4)),
    '2d_standard': (_arch_2d_standard, (5, 4)),
    '2d_residual': (_arch_2d_residual, (5, 4)),
    '2d_flatten_and_global_branches': (_arch_2d_flatten_and_global_branches,
                                       (5, 4)),
    '2d_concat': (_arch_2d_concat, (5, 4)),
    '2d_repeat': (_arch_2d_repeat, (4, 3)),
    '1d': (_arch_1d, (7,)),
    '3d': (_arch_3d, (4, 3, 3)),
}


@pytest.mark.parametrize('name', sorted(ARCHITECTURES))
def test_kernel_fn_matches_independent_reference(name):
  """nngp, ntk, cov1, cov2 (neural-tangents' batch-first layout) equal the
  Gram-matrix reference: every layer's formula, padding, stride and axis
  layout, through nonlinearities that read per-position variances."""
  make, sizes = ARCHITECTURES[name]
  net, build = make()
  x1, x2 = _images(sizes)
  ref = build(_Reference(x1, x2))
  got = _jit(net)(x1, x2, ('nngp', 'ntk', 'cov1', 'cov2'))
  for field in got._fields:
    assert relative_error(getattr(got, field), ref.public(field)) < 1e-12, field


@pytest.mark.parametrize('name', ['2d_conv_output', '1d', '3d'])
def test_diagonal_spatial_matches_reference_diagonal(name):
  """For a network ending in a Conv, diagonal_spatial=True returns the
  same-position entries K[(i, p), (j, p)] (N1, N2, S1, ..., Ss) of the
  reference and of the full result; also when a pooling layer inside
  ('1d') needs all pairs of positions before it."""
  make, sizes = ARCHITECTURES[name]
  net, build = make()
  x1, x2 = _images(sizes)
  ref = build(_Reference(x1, x2))
  full = _jit(net)(x1, x2, ('nngp', 'ntk'))
  diagonal = _jit(net)(x1, x2, ('nngp', 'ntk', 'cov1'),
                       diagonal_spatial=True)
  for field in ('nngp', 'ntk'):
    expected = ref.public(field, diagonal=True)
    assert relative_error(getattr(diagonal, field), expected) < 1e-12, field
    assert relative_error(_same_position(getattr(full, field)), expected) < 1e-12
  assert relative_error(diagonal.cov1, ref.public('cov1', diagonal=True)) < 1e-12


def test_3d_input_kernel():
  """The input kernel of 3-d images is <x1(p), x2(p')> / C for every pair of
  positions, also when the last spatial size equals the channel count (an
  einsum letter shared by both took a diagonal instead, before f4e86ca)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 3, 2, 2)))
  got = stax.Identity().kernel_fn(x, None, 'nngp')
  expected = np.einsum('nabcz,mABCz->nmaAbBcC', x, x) / 2
  np.testing.assert_allclose(got, expected, rtol=1e-12)


# ----------------------------------------------------------------------------
# Exact identities.


@pytest.mark.parametrize('sizes,parameterization', [
    ((6,), 'standard'), ((4, 3), 'ntk')])
def test_1x1_filter_is_dense_per_position(sizes, parameterization):
  """A 1x1 convolution mixes channels only, with the same fan-in as Dense:
  through nonlinearities its kernel equals the Dense network's applied per
  position, for every pair of positions (full layout) and pixel-diagonal."""
  ones = (1,) * len(sizes)
  kw = dict(parameterization=parameterization)
  conv = stax.serial(
      stax.Conv(5, ones, W_std=1.5, b_std=0.1, **kw), stax.Relu(),
      stax.Conv(5, ones, W_std=1.2, b_std=0.3, **kw), stax.Erf(),
      stax.Conv(2, ones, W_std=0.9, **kw))
  dense = stax.serial(stax.Dense(5, W_std=1.5, b_std=0.1, **kw), stax.Relu(),
                      stax.Dense(5, W_std=1.2, b_std=0.3, **kw), stax.Erf(),
                      stax.Dense(2, W_std=0.9, **kw))
  x1, x2 = _images(sizes)
  for diagonal in (False, True):
    a = _jit(conv)(x1, x2, ('nngp', 'ntk', 'cov1'), diagonal_spatial=diagonal)
    b = _jit(dense)(x1, x2, ('nngp', 'ntk', 'cov1'), diagonal_spatial=diagonal)
    for field in a._fields:
      assert relative_error(getattr(a, field), getattr(b, field)) < 1e-12, field


@pytest.mark.parametrize('padding,parameterization', [
    ('CIRCULAR', 'ntk'), ('SAME', 'ntk'), ('SAME', 'standard')])
def test_conv_on_1x1_images_is_dense(padding, parameterization):
  """On 1x1 images a CIRCULAR 3x3 filter sees the one pixel at all 9 offsets
  (Dense with the same W_std); SAME sees it at the centre only, the other
  offsets hitting zero padding, so it is Dense with W_std / sqrt(9) (in both
  parameterizations: the centre weight's variance is W_std^2 s0 / (9 C))."""
  scale = 1. if padding == 'CIRCULAR' else 1 / 3
  kw = dict(parameterization=parameterization)
  conv = stax.serial(
      stax.Conv(6, (3, 3), padding=padding, W_std=1.5, b_std=0.1, **kw),
      stax.Relu(),
      stax.Conv(6, (3, 3), padding=padding, W_std=1.3, b_std=0.2, **kw),
      stax.Erf(), stax.Flatten(), stax.Dense(1, W_std=1.1, **kw))
  dense = stax.serial(
      stax.Dense(6, W_std=1.5 * scale, b_std=0.1, **kw), stax.Relu(),
      stax.Dense(6, W_std=1.3 * scale, b_std=0.2, **kw), stax.Erf(),
      stax.Dense(1, W_std=1.1, **kw))
  x1, x2 = _images((1, 1), channels=4)
  a = _jit(conv)(x1, x2, ('nngp', 'ntk'))
  b = _jit(dense)(x1[:, 0, 0], x2[:, 0, 0], ('nngp', 'ntk'))
  for field in a._fields:
    assert relative_error(getattr(a, field), getattr(b, field)) < 1e-12, field


def test_flatten_and_global_pooling_are_means_of_the_full_kernel():
  """Flatten: the channel mean of (N, P C) features is the mean over
  positions of the same-position covariance, (1/P) sum_p K(p, p).
  GlobalAvgPool: the mean over all pairs (p, p') of K(p, p'); GlobalSumPool:
  the sum. Neither has parameters, so the same holds for the NTK. Flatten
  must not depend on the layout it receives (full, pixel-diagonal, or chosen
  inside the network)."""
  body = stax.serial(stax.Conv(4, (3, 3), padding='SAME', W_std=1.4,
                               b_std=0.2), stax.Relu(),
                     stax.Conv(4, (2, 2), strides=(1, 2), padding='CIRCULAR'))
  x1, x2 = _images((5, 4))
  get = ('nngp', 'ntk', 'cov1')
  kernel = _jit(body)(x1, x2)                      # full layout
  diagonal = _jit(body)(x1, x2, diagonal_spatial=True)
  assert not kernel.spatial.diagonal and diagonal.spatial.diagonal
  full = stax.Identity().kernel_fn(kernel, get=get)   # public layout
  # Inside the network the layers before Flatten run pixel-diagonal.
  flat = _jit(stax.serial(body, stax.Flatten()))(x1, x2, get)
  avg = stax.GlobalAvgPool().kernel_fn(kernel, get=get)
  total = stax.GlobalSumPool().kernel_fn(kernel, get=get)
  for field in ('nngp', 'ntk'):
    k = np.asarray(getattr(full, field))
    assert relative_error(getattr(flat, field),
                _same_position(k).mean(axis=(2, 3))) < 1e-12
    assert relative_error(getattr(avg, field), k.mean(axis=(2, 3, 4, 5))) < 1e-12
    assert relative_error(getattr(total, field), k.sum(axis=(2, 3, 4, 5))) < 1e-12
  own = np.einsum('iaabb->iab', np.asarray(full.cov1))
  assert relative_error(flat.cov1, own.mean(axis=(1, 2))) < 1e-12
  # Flatten of a Kernel in either layout equals Flatten inside the network.
  for k in (kernel, diagonal):
    again = stax.Flatten().kernel_fn(k, get=get)
    for field in get:
      assert relative_error(getattr(again, field), getattr(flat, field)) < 1e-12


# ----------------------------------------------------------------------------
# Invariances.


def _circular_network(strides):
  return stax.serial(
      stax.Conv(4, (3, 3), padding='CIRCULAR', W_std=1.5, b_std=0.1),
      stax.Relu(),
      stax.Conv(4, (2, 3), strides=strides, padding='CIRCULAR', W_std=1.3),
      stax.Erf(), stax.AvgPool((2, 2), padding='CIRCULAR'),
      stax.GlobalAvgPool(), stax.Dense(1))


def test_circular_network_with_global_pool_is_translation_invariant():
  """With circular padding every layer commutes with cyclic shifts (strided
  ones with shifts by multiples of the stride, the sizes being multiples of
  it), and global pooling forgets the position: f(roll(x)) = f(x) for every
  draw of the weights, so K(roll(x1), x2) = K(x1, x2). Zero (SAME) padding
  breaks this (negative control)."""
  x1, x2 = _images((6, 4))
  shifted = jnp.roll(x1, (2, 2), axis=(1, 2))
  net = _jit(_circular_network((2, 2)))
  a, b = net(x1, x2, ('nngp', 'ntk')), net(shifted, x2, ('nngp', 'ntk'))
  for field in a._fields:
    assert relative_error(getattr(b, field), getattr(a, field)) < 1e-12, field
  same = _jit(stax.serial(stax.Conv(4, (3, 3), padding='SAME'), stax.Relu(),
                          stax.GlobalAvgPool()))
  assert relative_error(same(shifted, x2, 'nngp'), same(x1, x2, 'nngp')) > 1e-3


def test_circular_conv_output_is_translation_equivariant():
  """Without pooling, circular convolutions are equivariant: shifting both
  images shifts the kernel, K(roll x1, roll x2)(p, p') = K(x1, x2)(p - t,
  p' - t) on every pair of positions."""
  x1, x2 = _images((5, 4))
  net = stax.serial(
      stax.Conv(4, (3, 2), padding='CIRCULAR', W_std=1.5, b_std=0.1),
      stax.Relu(), stax.Conv(4, (2, 3), padding='CIRCULAR'))
  shift = (2, 1)
  roll = lambda x: jnp.roll(x, shift, axis=(1, 2))
  a = _jit(net)(x1, x2, ('nngp', 'ntk'))
  b = _jit(net)(roll(x1), roll(x2), ('nngp', 'ntk'))
  for field in a._fields:
    expected = jnp.roll(getattr(a, field),
                        (shift[0], shift[0], shift[1], shift[1]),
                        axis=(2, 3, 4, 5))
    assert relative_error(getattr(b, field), expected) < 1e-12, field


def test_kernel_is_invariant_to_permuting_input_channels():
  """The input kernel sums over channels, and the weights' distribution is
  the same for every channel: permuting the channels of both inputs leaves
  every kernel unchanged."""
  x1, x2 = _images((5, 4), channels=5)
  permutation = np.array([3, 0, 4, 1, 2])
  net, _ = _arch_2d_conv_output()
  a = _jit(net)(x1, x2, ('nngp', 'ntk'))
  b = _jit(net)(x1[..., permutation], x2[..., permutation], ('nngp', 'ntk'))
  for field in a._fields:
    assert relative_error(getattr(b, field), getattr(a, field)) < 1e-12


# ----------------------------------------------------------------------------
# The finite network.


def _explicit_conv(x, w, strides, padding):
  """y[n, o, :] = sum_a x[n, o s + a - lo, :] @ w[a] by loops, with lax's
  SAME/VALID padding amounts (wrapped positions for CIRCULAR)."""
  x, w = np.asarray(x), np.asarray(w)
  sizes, window = x.shape[1:-1], w.shape[:-2]
  pads = lax.padtype_to_pads(sizes, window, strides,
                             'VALID' if padding == 'VALID' else 'SAME')
  outs = [(n + lo + hi - f) // s + 1
          for n, f, s, (lo, hi) in zip(sizes, window, strides, pads)]
  y = np.zeros((x.shape[0],) + tuple(outs) + (w.shape[-1],))
  for o in itertools.product(*map(range, outs)):
    for a in itertools.product(*map(range, window)):
      index = [i * s + j - lo for i, s, j, (lo, _) in zip(o, strides, a, pads)]
      if padding == 'CIRCULAR':
        index = [i % n for i, n in zip(index, sizes)]
      elif any(i < 0 or i >= n for i, n in zip(index, sizes)):
        continue
      y[(slice(None),) + o] += x[(slice(None),) + tuple(index)] @ w[a]
  return y


def _init(layer, input_shape):
  """init_fn's output shape, and standard normal parameters of the shapes it
  returns (traced with eval_shape: the draws themselves are the Monte Carlo
  tests' business, and eager random numbers compile per shape)."""
  box = {}

  def init(key):
    box['shape'], params = layer.init_fn(key, input_shape)
    return params
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)),
                        abstract)
  return box['shape'], params


FINITE_CASES = [((7,), (3,), (2,)), ((5, 4), (3, 2), (2, 1)),
                ((4, 3, 5), (2, 3, 2), (1, 2, 2))]


@pytest.mark.parametrize('padding', ['VALID', 'SAME', 'CIRCULAR'])
@pytest.mark.parametrize('sizes,window,strides', FINITE_CASES,
                         ids=['1d', '2d', '3d'])
def test_finite_conv_is_the_documented_convolution(sizes, window, strides,
                                                   padding):
  """apply_fn computes W_std / sqrt(F C) sum_a x(o s + a - lo) W[a] +
  b_std b (checked by explicit loops), its output shape is init_fn's, and
  the kernel's finite shape (Kernel.shape1) is the same."""
  channels = 3
  x, _ = _images(sizes, channels=channels, n1=2)
  layer = stax.Conv(4, window, strides, padding, W_std=1.3, b_std=0.2)
  shape, (w, b) = _init(layer, x.shape)
  y = layer.apply_fn((w, b), x)
  assert y.shape == shape
  expected = (_explicit_conv(x, w, strides, padding)
              * 1.3 / np.sqrt(np.prod(window) * channels) + 0.2 * np.asarray(b))
  np.testing.assert_allclose(y, expected, atol=1e-12)
  assert jax.eval_shape(layer.kernel_fn, x).shape1 == shape


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
def test_finite_conv_padding_matches_lax(padding):
  """SAME/VALID mean what they mean for `lax.conv_general_dilated`, and
  explicit channels-last dimension numbers equal the default."""
  x, _ = _images((6, 5), channels=3, n1=2)
  dims = ('NHWC', 'HWIO', 'NHWC')
  layer = stax.Conv(4, (3, 2), (2, 2), padding, W_std=1.3, b_std=0.2)
  explicit = stax.Conv(4, (3, 2), (2, 2), padding, W_std=1.3, b_std=0.2,
                       dimension_numbers=dims)
  _, (w, b) = _init(layer, x.shape)
  expected = lax.conv_general_dilated(x, w, (2, 2), padding,
                                      dimension_numbers=dims)
  expected = expected * 1.3 / np.sqrt(6 * 3) + 0.2 * b
  np.testing.assert_allclose(layer.apply_fn((w, b), x), expected, atol=1e-12)
  np.testing.assert_allclose(explicit.apply_fn((w, b), x), expected,
                             atol=1e-12)


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
def test_finite_pooling_matches_reduce_window(padding):
  """AvgPool / SumPool: a window sum with lax's padding, divided by the
  window size (or, with normalize_edges, by the number of real entries)."""
  x, _ = _images((6, 5), channels=3, n1=2)
  window, strides = (1, 3, 2, 1), (1, 2, 1, 1)
  total = lax.reduce_window(x, 0., lax.add, window, strides, padding)
  count = lax.reduce_window(jnp.ones_like(x), 0., lax.add, window, strides,
                            padding)
  cases = [(stax.SumPool((3, 2), (2, 1), padding), total),
           (stax.AvgPool((3, 2), (2, 1), padding), total / 6),
           (stax.AvgPool((3, 2), (2, 1), padding, normalize_edges=True),
            total / count)]
  for layer, expected in cases:
    shape, params = _init(layer, x.shape)
    y = layer.apply_fn(params, x)
    assert y.shape == shape == expected.shape
    np.testing.assert_allclose(y, expected, atol=1e-12)


# ----------------------------------------------------------------------------
# Monte Carlo of the finite networks.




MC_WIDTH = 256
MC_SAMPLES = 32


def test_global_pool_cnn_matches_monte_carlo():
  """SAME conv, ReLU, strided CIRCULAR conv, erf, SAME AvgPool,
  GlobalAvgPool, Dense: the NTK of the finite network (one output) agrees
  with kernel_fn within 5 standard errors + 8 / width
  (`assert_monte_carlo_close`). The NTK contains every layer's NNGP, so
  this checks both."""
  x1, x2 = _images((5, 4))
  net = stax.serial(
      stax.Conv(MC_WIDTH, (3, 3), padding='SAME', W_std=1.5, b_std=0.1),
      stax.Relu(),
      stax.Conv(MC_WIDTH, (2, 2), strides=(2, 2), padding='CIRCULAR',
                W_std=1.5, b_std=0.1), stax.Erf(),
      stax.AvgPool((2, 2), padding='SAME'), stax.GlobalAvgPool(),
      stax.Dense(1, W_std=1.5, b_std=0.1))
  estimate = monte_carlo_structured(net, x1, x2, MC_SAMPLES, 2, 'ntk')
  assert_monte_carlo_close(estimate, _jit(net)(x1, x2, 'ntk'), MC_WIDTH,
                           'ntk')


def test_spatial_output_matches_monte_carlo():
  """A network ending in a (VALID, strided) Conv. NNGP, read off an output
  as wide as the network (channels averaged): the finite network's
  covariance between every pair of output positions, in the empirical
  kernel's batch-first layout (N1, N2, H, H', W, W'), matches kernel_fn's
  full layout, and its same-position entries the diagonal_spatial=True
  result. Negative control: the kernel of the same network with CIRCULAR
  instead of SAME padding is rejected (the estimate resolves the padding).
  NTK: one output channel."""
  x1, x2 = _images((5, 4))

  def net(padding, readout):
    return stax.serial(
        stax.Conv(MC_WIDTH, (3, 3), padding=padding, W_std=1.5, b_std=0.1),
        stax.Relu(),
        stax.Conv(readout, (2, 3), strides=(2, 1), W_std=1.3, b_std=0.2))

  wide = net('SAME', MC_WIDTH)
  mean, stderr = monte_carlo_structured(wide, x1, x2, MC_SAMPLES, 3, 'nngp')
  exact = _jit(wide)(x1, x2, 'nngp')
  assert mean.shape == exact.shape == (3, 2, 2, 2, 2, 2)
  assert_monte_carlo_close((mean, stderr), exact, MC_WIDTH, 'nngp')
  np.testing.assert_allclose(
      _jit(wide)(x1, x2, 'nngp', diagonal_spatial=True), _same_position(exact),
      rtol=1e-12)
  wrong = _jit(net('CIRCULAR', MC_WIDTH))(x1, x2, 'nngp')
  with pytest.raises(AssertionError):
    assert_monte_carlo_close((mean, stderr), wrong, MC_WIDTH, 'circular')
  narrow = net('SAME', 1)
  estimate = monte_carlo_structured(narrow, x1, x2, MC_SAMPLES, 4, 'ntk')
  assert_monte_carlo_close(estimate, _jit(narrow)(x1, x2, 'ntk'), MC_WIDTH,
                           'ntk')


def test_standard_parameterization_matches_monte_carlo():
  """Conv, ReLU, Conv, Flatten, Dense in the standard parameterization: the
  NTK grows with the fan-ins F C of the layers and the kernel reads the
  finite widths, so the same finite network must agree."""
  x1, x2 = _images((5, 4))
  kw = dict(parameterization='standard')
  net = stax.serial(
      stax.Conv(MC_WIDTH, (3, 3), padding='SAME', W_std=1.5, b_std=0.1, **kw),
      stax.Relu(),
      stax.Conv(MC_WIDTH, (2, 2), padding='CIRCULAR', W_std=1.3, b_std=0.2,
                **kw),
      stax.Erf(), stax.Flatten(), stax.Dense(1, W_std=1.2, b_std=0.1, **kw))
  estimate = monte_carlo_structured(net, x1, x2, MC_SAMPLES, 5, 'ntk')
  assert_monte_carlo_close(estimate, _jit(net)(x1, x2, 'ntk'), MC_WIDTH,
                           'standard')


def test_3d_matches_monte_carlo():
  """3-d: CIRCULAR conv, erf, strided SAME conv, global pooling (width 128,
  64 samples: the 3-d structured derivatives cost 4x more per sample). 1-d
  and 3-d kernels are also checked exactly against the reference, and the
  finite convolutions against explicit loops."""
  width = 128
  x1, x2 = _images((3, 2, 3))
  net = stax.serial(
      stax.Conv(width, (2, 2, 2), padding='CIRCULAR', W_std=1.5, b_std=0.1),
      stax.Erf(),
      stax.Conv(width, (2, 1, 2), strides=(2, 1, 1), padding='SAME'),
      stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
  exact = _jit(net)(x1, x2, 'ntk')
  estimate = monte_carlo_structured(net, x1, x2, 64, 7, 'ntk')
  assert_monte_carlo_close(estimate, exact, width, '3d')


# ----------------------------------------------------------------------------
# Differentiation and jit.


def test_gradients_match_finite_differences():
  """d/dW_std, d/db_std and the directional derivative in the inputs of a
  CNN's NTK (zero padding, pooling: pads and slices transpose correctly)
  against central differences (h = 1e-6: truncation ~h^2, rounding
  ~eps / h, so 1e-6 relative)."""
  x1, x2 = _images((5, 4))

  def loss(w_std, b_std, x, y):
    net = stax.serial(
        stax.Conv(4, (3, 3), padding='SAME', W_std=w_std, b_std=b_std),
        stax.Erf(), stax.AvgPool((2, 2), padding='SAME'),
        stax.Conv(4, (2, 2), W_std=w_std), stax.Relu(), stax.GlobalAvgPool(),
        stax.Dense(1, W_std=w_std, b_std=b_std))
    return jnp.sum(net.kernel_fn(x, y, 'ntk')**2)

  value = jax.jit(loss)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  w, b, h = jnp.array(1.3), jnp.array(0.2), 1e-6
  direction = jnp.asarray(np.random.default_rng(3).standard_normal(x1.shape))
  grad_w, grad_b, grad_x = grads(w, b, x1, x2)
  np.testing.assert_allclose(
      grad_w, (value(w + h, b, x1, x2) - value(w - h, b, x1, x2)) / (2 * h),
      rtol=1e-6)
  np.testing.assert_allclose(
      grad_b, (value(w, b + h, x1, x2) - value(w, b - h, x1, x2)) / (2 * h),
      rtol=1e-6)
  np.testing.assert_allclose(
      jnp.vdot(grad_x, direction),
      (value(w, b, x1 + h * direction, x2)
       - value(w, b, x1 - h * direction, x2)) / (2 * h), rtol=1e-6)


# Not strict: whether XLA's fusion passes produce the miscompiled program
# depends on the exact HLO, which unrelated library changes alter (adding the
# masking plumbing made it pass again); the test reports XFAIL or XPASS.
@pytest.mark.xfail(strict=False, reason=(
    'XLA CPU (jax/jaxlib 0.10.2) miscompiled this float64 program: the '
    'jaxpr evaluated op by op is right, jit was 7% off; '
    'XLA_FLAGS=--xla_disable_hlo_passes=fusion (or algsimp) fixes it'))
def test_jit_with_traced_bias_std_equals_constant_bias_std():
  """kernel_fn under jit with b_std a traced argument (as when
  differentiating or optimizing hyperparameters) equals the result with
  b_std a Python float (which is also what the op-by-op evaluation gives).
  Minimal case: SAME conv with a bias, ReLU, CIRCULAR conv, cov1 of one
  3x3 image."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 3, 1)))

  def cov1(b_std, x):
    net = stax.serial(stax.Conv(4, (3, 3), padding='SAME', b_std=b_std),
                      stax.Relu(), stax.Conv(4, (2, 2), padding='CIRCULAR'))
    return net.kernel_fn(x, None, 'cov1')

  static = jax.jit(lambda x: cov1(0.2, x))(x)      # b_std a constant
  np.testing.assert_allclose(jax.jit(cov1)(jnp.array(0.2), x), static,
                             rtol=1e-12)


def test_kernel_fn_in_jit_with_captured_inputs():
  """A jitted function that closes over the training inputs (x_train a
  global, the usual way to write a predictor) computes the same kernel as
  the eager call."""
  x_train, x_test = _images((4, 3))
  kernel_fn = stax.serial(stax.Conv(2, (2, 2), padding='SAME'), stax.Relu(),
                          stax.GlobalAvgPool(), stax.Dense(1)).kernel_fn
  predict = jax.jit(lambda x: kernel_fn(x, x_train, 'nngp'))
  np.testing.assert_allclose(predict(x_test),
                             kernel_fn(x_test, x_train, 'nngp'), rtol=1e-12)


# ----------------------------------------------------------------------------
# Bad input: clear errors.


def test_conv_on_rank_2_inputs():
  x = jnp.ones((3, 12))
  with pytest.raises(ntkjax.KernelError, match='rank 4'):
    stax.Conv(4, (3, 3)).kernel_fn(x)
  with pytest.raises(ValueError, match='rank 4'):
    stax.Conv(4, (3, 3)).init_fn(jax.random.PRNGKey(0), x.shape)
  with pytest.raises(ntkjax.KernelError, match='rank 3'):
    stax.Conv(4, (3,)).kernel_fn(jnp.ones((3, 4, 3, 2)))


def test_valid_window_larger_than_input():
  x = jnp.ones((2, 4, 3, 2))
  for layer in (stax.Conv(4, (5, 3)), stax.AvgPool((2, 4))):
    with pytest.raises(ntkjax.KernelError, match='VALID'):
      layer.kernel_fn(x)
    with pytest.raises(ntkjax.KernelError, match='VALID'):
      layer.init_fn(jax.random.PRNGKey(0), x.shape)


def test_pooling_a_pixel_diagonal_kernel():
  """Pooling mixes different positions; a kernel that kept only
  same-position covariances cannot be pooled."""
  x = jnp.ones((2, 4, 3, 2))
  kernel = stax.Conv(4, (3, 3), padding='SAME').kernel_fn(
      x, None, diagonal_spatial=True)
  assert kernel.spatial.diagonal
  for layer in (stax.AvgPool((2, 2)), stax.SumPool((2, 2)),
                stax.GlobalAvgPool(), stax.GlobalSumPool()):
    with pytest.raises(ntkjax.KernelError, match='different positions'):
      layer.kernel_fn(kernel)


@pytest.mark.parametrize('network', [
    lambda: stax.serial(stax.Conv(4, (2, 2)), stax.Relu(), stax.Flatten(),
                        stax.Relu()),
    lambda: stax.serial(stax.Conv(4, (2, 2)), stax.Relu(),
                        stax.GlobalAvgPool(), stax.Erf()),
    lambda: stax.serial(stax.Conv(4, (2, 2)), stax.Relu(),
                        stax.AvgPool((2, 2)), stax.Relu()),
], ids=['flatten', 'global_pool', 'avg_pool'])
def test_nonlinearity_of_pooled_non_gaussian_features(network):
  """Pooled or flattened ReLU features are mixtures over positions, not an
  elementwise function of one Gaussian field: no exact kernel, a clear
  error naming the fix."""
  with pytest.raises(ntkjax.KernelError, match='Put a Dense'):
    jax.eval_shape(network().kernel_fn, jnp.ones((2, 4, 3, 2)))


def test_bad_conv_and_pool_arguments():
  with pytest.raises(NotImplementedError, match='channels-last'):
    stax.Conv(4, (3, 3), dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  for padding in ('FULL', 3):
    with pytest.raises(ValueError, match='padding must be one of'):
      stax.Conv(4, (3, 3), padding=padding)
  with pytest.raises(ValueError, match='padding must be one of'):
    stax.AvgPool((2, 2), padding='REFLECT')
  with pytest.raises(ValueError, match='strides'):
    stax.Conv(4, (3, 3), strides=(0, 1))
  with pytest.raises(ValueError, match='strides'):
    stax.AvgPool((2, 2), strides=(1,))
  with pytest.raises(ValueError, match='1, 2 or 3'):
    stax.Conv(4, (3, 3, 3, 3))
  with pytest.raises(ValueError, match='must be a finite number >= 0'):
    stax.Conv(4, (3, 3), W_std=-1.)
  with pytest.raises(ValueError, match='parameterization'):
    stax.Conv(4, (3, 3), parameterization='mup')
  with pytest.raises(NotImplementedError, match='batch_axis'):
    stax.AvgPool((2, 2), batch_axis=1)
  with pytest.raises(ntkjax.KernelError, match='spatial'):
    stax.GlobalAvgPool().kernel_fn(jnp.ones((2, 6)))
