"""GlobalSelfAttention: kernel and finite network.

Checks, each independent of the kernel code:

* an independent NumPy reference (`_Reference`) on Gram matrices over
  (sample, position) pairs of the joint batch [x1; x2]: Dense, ReLU
  (arc-cosine), global pooling, and attention written from the formulas of
  the module docstring (linear_scaling=True: deterministic attention of each
  sample's own covariance; False: Gaussian logits with explicit 2-d
  expectations); kernel_fn must equal it to float64 rounding;
* exact identities: one position with softmax is two Dense layers, zero
  logits give uniform attention (global pooling), attention on raw inputs is
  two Dense layers on the attended inputs, permutation equivariance, 2-d
  inputs equal flattened 1-d ones, only W_query_std W_key_std and W_out_std
  W_value_std matter, symmetry and PSD;
* Monte Carlo of wide finite networks for every mechanism and positional
  embedding type with both scalings, NNGP and NTK, with negative controls
  (uniform attention, and the d^-1/2 NTK without its query/key paths, are
  rejected);
* gradients against finite differences; the finite network against
  explicit loops; the key-mask semantics of the shared weights helper;
  clear errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_monte_carlo_close, relative_error

import ntkjax
from ntkjax import stax
from ntkjax.stax._attention import GlobalSelfAttention, attention_weights

MECHANISMS = ('SOFTMAX', 'IDENTITY', 'ABS', 'RELU')


def _decay(d):
  """A positive-definite decay of squared distances (Gaussian kernel)."""
  return jnp.exp(-d / 2)


def _sequences(sizes, channels=3, n1=3, n2=2, seed=0, shared=1.):
  """Two batches (N, *sizes, C). Each sample has a component shared by its
  positions (`shared`), so positions are correlated as in real sequences."""
  rng = np.random.default_rng(seed)
  def batch(n, scale):
    common = rng.standard_normal((n,) + (1,) * len(sizes) + (channels,))
    own = rng.standard_normal((n,) + tuple(sizes) + (channels,))
    return jnp.asarray(scale * (shared * common + own))
  return batch(n1, 1.), batch(n2, 0.7)


_JITTED = {}


def _jit(network):
  """kernel_fn under jit: one compilation per network and shapes instead of
  one per primitive. The kernels here are tiny, so XLA's backend
  optimizations would cost more compile time than they save (results are
  the same to rounding)."""
  kernel_fn = network.kernel_fn
  if id(kernel_fn) not in _JITTED:
    _JITTED[id(kernel_fn)] = (kernel_fn, jax.jit(
        kernel_fn, static_argnames=('get', 'diagonal_spatial'),
        compiler_options={'xla_backend_optimization_level': 0}))
  return _JITTED[id(kernel_fn)][1]




# ----------------------------------------------------------------------------
# An independent reference: Gram matrices K[n, p, m, q] over (sample,
# position) pairs of the joint batch, positions flattened row-major.


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _mechanism(name, a):
  return {'SOFTMAX': _softmax, 'IDENTITY': lambda a: a, 'ABS': np.abs,
          'RELU': lambda a: np.maximum(a, 0.)}[name](a)


def _gaussian_expectations(name, cov, var1, var2):
  """E[phi(u) phi(v)] and E[phi'(u) phi'(v)] for a centred Gaussian pair,
  from the textbook formulas (Cho & Saul 2009; arcsine law)."""
  if name == 'IDENTITY':
    return cov, np.ones_like(cov)
  norm = np.sqrt(var1 * var2)
  rho = np.clip(cov / np.where(norm > 0, norm, 1.), -1., 1.)
  theta = np.arccos(rho)
  if name == 'RELU':
    return (norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * rho),
            (np.pi - theta) / (2 * np.pi))
  # |u| |v|: 2/pi s1 s2 (sqrt(1 - rho^2) + rho arcsin(rho)); sign(u) sign(v).
  return (2 / np.pi * norm * (np.sqrt(1 - rho**2) + rho * np.arcsin(rho)),
          2 / np.pi * np.arcsin(rho))


def _positions_covariance(sizes, p_norm, decay):
  """R[p, p'] by explicit loops over row-major flattened positions."""
  positions = math.prod(sizes)
  r = np.zeros((positions, positions))
  for a in range(positions):
    for b in range(positions):
      if decay is None:
        r[a, b] = float(a == b)
      else:
        ca, cb = np.unravel_index(a, sizes), np.unravel_index(b, sizes)
        d = sum(abs(float(i) - float(j))**p_norm for i, j in zip(ca, cb))
        r[a, b] = float(decay(np.asarray(d)))
  return r


class _Reference:
  """NNGP K and NTK T on the joint batch, as (N, P, N, P) arrays."""

  def __init__(self, x1, x2):
    x = np.concatenate([np.asarray(x1), np.asarray(x2)])
    self.n1, self.sizes = x1.shape[0], tuple(x.shape[1:-1])
    self.channels = x.shape[-1]
    flat = x.reshape(x.shape[0], -1, self.channels)
    self.k = np.einsum('npc,mqc->npmq', flat, flat) / self.channels
    self.t = np.zeros_like(self.k)

  def dense(self, out, W_std=1., b_std=None):
    b2 = 0. if b_std is None else b_std**2
    self.k = W_std**2 * self.k + b2
    self.t = self.k + W_std**2 * self.t
    self.channels = out
    return self

  def relu(self):
    v = np.einsum('npnp->np', self.k)
    norm = np.sqrt(v[:, :, None, None] * v[None, None])
    theta = np.arccos(np.clip(self.k / norm, -1, 1))
    self.k = norm / (2 * np.pi) * (np.sin(theta)
                                   + (np.pi - theta) * np.cos(theta))
    self.t = self.t * (np.pi - theta) / (2 * np.pi)
    return self

  def global_pool(self):
    self.k = self.k.mean(axis=(1, 3))[:, None, :, None]
    self.t = self.t.mean(axis=(1, 3))[:, None, :, None]
    self.sizes = ()
    return self

  def attention(self, out, linear_scaling=True, mechanism='SOFTMAX', qk=1.,
                ov=1., b_std=None, pos_emb_type='NONE', W_pos_emb_std=1.,
                n_chan_pos_emb=None, val_pos_emb=False, p_norm=2,
                decay=None, qk_paths=True):
    """The attention formulas; `qk_paths=False` drops the query/key paths
    of the d^-1/2 NTK (a negative control)."""
    b2 = 0. if b_std is None else b_std**2
    k, t = self.k, self.t
    if pos_emb_type == 'NONE':
      kk, tk = k, t
    else:
      r = _positions_covariance(self.sizes, p_norm, decay)[None, :, None, :]
      w_in, w_pe = 1., W_pos_emb_std**2
      if pos_emb_type == 'CONCAT':
        n_pe = self.channels if n_chan_pos_emb is None else n_chan_pos_emb
        total = self.channels + n_pe
        w_in, w_pe = self.channels / total, w_pe * n_pe / total
      kk, tk = w_in * k + w_pe * r, w_in * t + w_pe * r
    kv, tv = (kk, tk) if val_pos_emb else (k, t)
    own = np.einsum('npnq->npq', kk)
    if linear_scaling:
      a = _mechanism(mechanism, qk * own)                 # (N, P, P)
      def weigh(m):
        return np.einsum('npq,mrs,nqms->npmr', a, a, m)
      self.k = ov**2 * weigh(kv) + b2
      self.t = ov**2 * weigh(2 * kv + tv) + b2
    else:
      # Logits G[n, p, q]: Cov = qk^2 kk[n,p,m,r] kk[n,q,m,s].
      cov = qk**2 * np.einsum('npmr,nqms->npqmrs', kk, kk)
      var = qk**2 * np.einsum('np,nq->npq', np.einsum('npnp->np', kk),
                              np.einsum('npnp->np', kk))
      e, e_prime = _gaussian_expectations(
          mechanism, cov, var[:, :, :, None, None, None],
          var[None, None, None])
      self.k = ov**2 * np.einsum('npqmrs,nqms->npmr', e, kv) + b2
      self.t = ov**2 * np.einsum('npqmrs,nqms->npmr', e, 2 * kv + tv) + b2
      if qk_paths:
        query = np.einsum('npqmrs,nqms->npmr', e_prime, kv * kk)
        key = np.einsum('npqmrs,nqms->npmr', e_prime, kv * (kk + tk))
        self.t = self.t + ov**2 * qk**2 * ((kk + tk) * query + kk * key)
    self.channels = out
    return self

  def public(self, name):
    """kernel_fn(x1, x2, name) in neural-tangents' layout."""
    n1, sizes = self.n1, self.sizes
    a = self.k if name in ('nngp', 'cov1', 'cov2') else self.t
    d = len(sizes)
    if name == 'cov1':
      a = np.einsum('npnq->npq', a[:n1, :, :n1])
    elif name == 'cov2':
      a = np.einsum('npnq->npq', a[n1:, :, n1:])
    else:
      a = a[:n1, :, n1:].transpose(0, 2, 1, 3)              # (N1, N2, P, P)
    lead = a.shape[:-2]
    if not d:
      return a.reshape(lead)
    a = a.reshape(lead + sizes + sizes)
    b = len(lead)
    return a.transpose(tuple(range(b)) + sum(
        ((b + i, b + d + i) for i in range(d)), ()))


def _build(spec, sizes):
  """A network and its reference from one list of steps: ('dense', out,
  W_std, b_std), ('att', kwargs of GlobalSelfAttention), ('relu',),
  ('pool',)."""
  layers, steps = [], []
  for step in spec:
    kind = step[0]
    if kind == 'dense':
      layers.append(stax.Dense(step[1], W_std=step[2], b_std=step[3]))
      steps.append(lambda r, s=step: r.dense(*s[1:]))
    elif kind == 'relu':
      layers.append(stax.Relu())
      steps.append(lambda r: r.relu())
    elif kind == 'pool':
      layers.append(stax.GlobalAvgPool())
      steps.append(lambda r: r.global_pool())
    else:
      kw = dict(step[1])
      layers.append(GlobalSelfAttention(4, 4, 3, 2, **kw))
      steps.append(lambda r, kw=kw: r.attention(
          4, kw.get('linear_scaling', True),
          kw.get('attention_mechanism', 'SOFTMAX').upper(),
          kw.get('W_key_std', 1.) * kw.get('W_query_std', 1.),
          kw.get('W_value_std', 1.) * kw.get('W_out_std', 1.),
          kw.get('b_std'), kw.get('pos_emb_type', 'NONE').upper(),
          kw.get('W_pos_emb_std', 1.), kw.get('n_chan_pos_emb'),
          kw.get('val_pos_emb', False), kw.get('pos_emb_p_norm', 2),
          kw.get('pos_emb_decay_fn')))

  def ref(x1, x2):
    r = _Reference(x1, x2)
    for step in steps:
      step(r)
    return r
  return stax.serial(*layers), ref


def _att(mechanism, linear=True, **kw):
  return ('att', dict(attention_mechanism=mechanism, linear_scaling=linear,
                      b_std=0.2, **kw))


# Every mechanism and positional embedding, both scalings, 1-3 spatial axes;
# attention reads Gaussian and (after ReLU) non-Gaussian features, and
# feeds attention, ReLU and pooling.
REFERENCE_NETWORKS = {
    '1d_linear': ((4,), [
        ('dense', 4, 1.3, 0.2),
        _att('SOFTMAX', W_key_std=1.4, W_query_std=0.9, W_value_std=1.2,
             W_out_std=0.8), ('relu',),
        _att('identity', W_key_std=0.3, pos_emb_type='SUM',
             pos_emb_decay_fn=_decay),
        _att('ABS', W_key_std=0.5, pos_emb_type='concat', val_pos_emb=True,
             n_chan_pos_emb=3, W_pos_emb_std=0.7), ('relu',),
        _att('RELU', pos_emb_type='SUM', val_pos_emb=True, W_pos_emb_std=0.6),
        ('pool',), ('dense', 2, 1.1, 0.3)]),
    '1d_sqrt': ((4,), [
        ('dense', 4, 1.3, 0.2),
        _att('IDENTITY', False, W_key_std=0.8, W_value_std=1.1), ('relu',),
        _att('RELU', False, W_key_std=1.3, pos_emb_type='CONCAT',
             n_chan_pos_emb=2),
        _att('ABS', False, pos_emb_type='SUM', val_pos_emb=True,
             W_pos_emb_std=0.6, pos_emb_decay_fn=_decay),
        ('pool',), ('dense', 2, 1.1, 0.3)]),
    '2d_linear': ((2, 3), [
        ('dense', 4, 1.3, 0.2),
        _att('SOFTMAX', W_key_std=1.5, pos_emb_type='CONCAT',
             pos_emb_p_norm=1, pos_emb_decay_fn=_decay), ('relu',),
        _att('RELU', pos_emb_type='SUM', val_pos_emb=True),
        ('pool',), ('dense', 2, 1.1, 0.3)]),
    '2d_sqrt': ((2, 2), [
        ('dense', 4, 1.3, 0.2),
        _att('ABS', False, pos_emb_type='CONCAT', pos_emb_p_norm=1,
             pos_emb_decay_fn=_decay), ('relu',),
        _att('IDENTITY', False, W_key_std=0.6, pos_emb_type='SUM',
             val_pos_emb=True),
        ('pool',), ('dense', 2, 1.1, 0.3)]),
    '3d_linear': ((2, 1, 2), [
        ('dense', 4, 1.3, 0.2),
        _att('IDENTITY', W_key_std=0.5, pos_emb_type='SUM',
             pos_emb_decay_fn=_decay), ('relu',),
        _att('SOFTMAX', W_key_std=2.),
        ('pool',), ('dense', 2, 1.1, 0.3)]),
}


@pytest.mark.parametrize('name', sorted(REFERENCE_NETWORKS))
def test_kernel_fn_matches_independent_reference(name):
  """nngp, ntk, cov1, cov2 (neural-tangents' layout) equal the Gram-matrix
  reference to 1e-12, through stacks of attention layers of every
  mechanism and positional embedding."""
  sizes, spec = REFERENCE_NETWORKS[name]
  net, ref = _build(spec, sizes)
  x1, x2 = _sequences(sizes)
  got = _jit(net)(x1, x2, ('nngp', 'ntk', 'cov1', 'cov2'))
  expected = ref(x1, x2)
  for field in got._fields:
    assert relative_error(getattr(got, field), expected.public(field)) < 1e-12, field


@pytest.mark.parametrize('name', ['1d_linear', '1d_sqrt'])
def test_symmetric_kernel_matches_reference(name):
  """x2=None: the reference of x1 against itself; nngp to 1e-12, the NTK
  to 1e-7: the ReLU's (and the d^-1/2 RELU/ABS attention's) E[phi' phi']
  is a function of theta = arccos(rho), and at rho = 1 (a sample and
  position with itself) theta ~ sqrt(2 (1 - rho)) turns a rounding of 1e-16
  in rho into 1e-8 in theta, whichever way rho is rounded."""
  sizes, spec = REFERENCE_NETWORKS[name]
  net, ref = _build(spec, sizes)
  x1, _ = _sequences(sizes)
  got = _jit(net)(x1, None, ("nngp", "ntk"))
  expected = ref(x1, x1)
  assert relative_error(got.nngp, expected.public('nngp')) < 1e-12
  assert relative_error(got.ntk, expected.public('ntk')) < 1e-7


def test_attention_output_layout_matches_reference():
  """A network ending in attention: the full (N1, N2, H, H', W, W') output
  kernel, and with diagonal_spatial=True its same-position entries."""
  sizes = (2, 3)
  net, ref = _build([('dense', 4, 1.2, 0.1),
                     _att('SOFTMAX', pos_emb_type='SUM',
                          pos_emb_decay_fn=_decay)], sizes)
  x1, x2 = _sequences(sizes)
  expected = ref(x1, x2)
  full = _jit(net)(x1, x2, ('nngp', 'ntk', 'cov1'))
  for field in full._fields:
    assert relative_error(getattr(full, field), expected.public(field)) < 1e-12, field
  diagonal = _jit(net)(x1, x2, 'ntk', diagonal_spatial=True)
  same = np.einsum('ijaAbB,aA,bB->ijab', expected.public('ntk'), np.eye(2),
                   np.eye(3))
  assert relative_error(diagonal, same) < 1e-12


# ----------------------------------------------------------------------------
# Exact identities.


def _sandwich():
  """A Dense layer before the layer under test: a Gaussian field with a
  non-zero NTK at its input."""
  return [stax.Dense(5, W_std=1.3, b_std=0.2)]


@pytest.mark.parametrize('pos_emb_type', ['NONE', 'SUM'])
def test_one_position_softmax_is_two_dense_layers(pos_emb_type):
  """With one position the softmax weight is 1, so the layer is
  x -> W_out (x W_value) + b: nngp' = OV^2 nngp + b^2 and (two weight
  matrices in series) ntk' = OV^2 (2 nngp + ntk) + b^2, i.e. Dense(W_value)
  then Dense(W_out, b); embeddings only change the logits."""
  x1, x2 = _sequences((1,), channels=4)
  attention = stax.serial(*_sandwich(), GlobalSelfAttention(
      4, 3, 3, 2, W_key_std=1.7, W_value_std=1.2, W_out_std=0.8, b_std=0.3,
      pos_emb_type=pos_emb_type))
  dense = stax.serial(*_sandwich(), stax.Dense(3, W_std=1.2),
                      stax.Dense(4, W_std=0.8, b_std=0.3))
  a = _jit(attention)(x1, x2, ('nngp', 'ntk', 'cov1'))
  b = _jit(dense)(x1[:, 0], x2[:, 0], ('nngp', 'ntk', 'cov1'))
  np.testing.assert_allclose(a.nngp[..., 0, 0], b.nngp, rtol=1e-13)
  np.testing.assert_allclose(a.ntk[..., 0, 0], b.ntk, rtol=1e-13)
  np.testing.assert_allclose(a.cov1[..., 0, 0], b.cov1, rtol=1e-13)


def test_zero_logits_softmax_is_global_average_pooling():
  """W_key_std = 0: all logits are 0, the softmax is uniform, and every
  position's output is W_out (mean_q x(q) W_value) + b: the kernel at every
  pair of positions is that of Dense(W_value) -> GlobalAvgPool ->
  Dense(W_out, b)."""
  x1, x2 = _sequences((4,))
  attention = stax.serial(*_sandwich(), GlobalSelfAttention(
      4, 3, 3, 2, W_key_std=0., W_value_std=1.2, W_out_std=0.8, b_std=0.3))
  pooled = stax.serial(*_sandwich(), stax.Dense(3, W_std=1.2),
                       stax.GlobalAvgPool(), stax.Dense(4, W_std=0.8,
                                                        b_std=0.3))
  a = _jit(attention)(x1, x2, ('nngp', 'ntk'))
  b = _jit(pooled)(x1, x2, ('nngp', 'ntk'))
  for field in a._fields:
    got, expected = getattr(a, field), getattr(b, field)
    np.testing.assert_allclose(
        got, np.broadcast_to(expected[..., None, None], got.shape), rtol=1e-13)


@pytest.mark.parametrize('linear_scaling', [True, False])
@pytest.mark.parametrize('mechanism', ['IDENTITY', 'RELU', 'ABS'])
def test_zero_logits_elementwise_give_the_bias(linear_scaling, mechanism):
  """W_key_std = 0: phi(0) = 0 for the elementwise mechanisms, so only the
  bias is left, nngp' = ntk' = b^2, and no NaN where the Gaussian logits
  (linear_scaling=False) have zero variance."""
  x1, x2 = _sequences((3,))
  net = stax.serial(*_sandwich(), GlobalSelfAttention(
      4, 3, 3, 2, linear_scaling, W_key_std=0., b_std=0.3,
      attention_mechanism=mechanism))
  got = _jit(net)(x1, x2, ('nngp', 'ntk'))
  np.testing.assert_allclose(got.nngp, 0.09, rtol=1e-14)
  np.testing.assert_allclose(got.ntk, 0.09, rtol=1e-14)


def _attended(x, mechanism, qk, pos_emb_type, w_pe, n_pe, decay):
  """y_i(p) = sum_q A_i(p, q) x_i(q), A_i = mechanism(qk k~_i), with k~_i
  sample i's covariance between positions (plus the embeddings')."""
  x = np.asarray(x)
  channels = x.shape[-1]
  own = np.einsum('npc,nqc->npq', x, x) / channels
  r = _positions_covariance(x.shape[1:-1], 2, decay)
  if pos_emb_type == 'SUM':
    own = own + w_pe**2 * r
  elif pos_emb_type == 'CONCAT':
    total = channels + n_pe
    own = (channels * own + n_pe * w_pe**2 * r) / total
  a = _mechanism(mechanism, qk * own)
  return np.einsum('npq,nqc->npc', a, x)


@pytest.mark.parametrize('mechanism', MECHANISMS)
def test_attention_on_raw_inputs_is_dense_on_attended_inputs(mechanism):
  """On raw inputs the logits converge to qk x_i(p).x_i(q)/C exactly, so
  the layer is Dense(W_value) -> Dense(W_out, b) applied to the attended
  inputs y_i = A_i x_i (values without embeddings): same nngp, ntk and cov1
  over all pairs of positions, for each positional embedding type."""
  x1, x2 = _sequences((4,), channels=3)
  for pos_emb_type, decay in (('NONE', None), ('SUM', _decay),
                              ('CONCAT', None)):
    attention = GlobalSelfAttention(
        4, 3, 3, 2, W_key_std=0.9, W_query_std=0.8, W_value_std=1.2,
        W_out_std=0.7, b_std=0.3, attention_mechanism=mechanism,
        pos_emb_type=pos_emb_type, W_pos_emb_std=0.6, n_chan_pos_emb=2,
        pos_emb_decay_fn=decay) if pos_emb_type != 'SUM' else (
            GlobalSelfAttention(
                4, 3, 3, 2, W_key_std=0.9, W_query_std=0.8, W_value_std=1.2,
                W_out_std=0.7, b_std=0.3, attention_mechanism=mechanism,
                pos_emb_type='SUM', W_pos_emb_std=0.6,
                pos_emb_decay_fn=decay))
    dense = stax.serial(stax.Dense(3, W_std=1.2),
                        stax.Dense(4, W_std=0.7, b_std=0.3))
    y1, y2 = (_attended(x, mechanism, 0.72, pos_emb_type, 0.6, 2, decay)
              for x in (x1, x2))
    a = attention.kernel_fn(x1, x2, ('nngp', 'ntk', 'cov1'))
    b = dense.kernel_fn(y1, y2, ('nngp', 'ntk', 'cov1'))
    for field in a._fields:
      assert relative_error(getattr(a, field), getattr(b, field)) < 1e-12, (
          pos_emb_type, field)


@pytest.mark.parametrize('linear_scaling,mechanism', [
    (True, 'SOFTMAX'), (False, 'RELU')])
def test_permutation_equivariance(linear_scaling, mechanism):
  """Without positional information attention treats positions as a set:
  permuting the input positions permutes both position axes of the kernel.
  Independent embeddings per position (decay None, R = identity) keep this;
  a decay over distances breaks it (negative control)."""
  x1, x2 = _sequences((5,))
  perm = np.array([3, 0, 4, 2, 1])

  def kernel(decay, pos_emb_type, a, b):
    net = stax.serial(*_sandwich(), GlobalSelfAttention(
        4, 3, 3, 2, linear_scaling, W_key_std=1.3, b_std=0.1,
        attention_mechanism=mechanism, pos_emb_type=pos_emb_type,
        pos_emb_decay_fn=decay))
    return _jit(net)(a, b, ('nngp', 'ntk'))

  for pos_emb_type, decay in (('NONE', None), ('SUM', None)):
    plain = kernel(decay, pos_emb_type, x1, x2)
    permuted = kernel(decay, pos_emb_type, x1[:, perm], x2[:, perm])
    for field in plain._fields:
      expected = np.asarray(getattr(plain, field))[:, :, perm][:, :, :, perm]
      assert relative_error(getattr(permuted, field), expected) < 1e-12, field
  plain = kernel(_decay, 'SUM', x1, x2)
  permuted = kernel(_decay, 'SUM', x1[:, perm], x2[:, perm])
  expected = np.asarray(plain.nngp)[:, :, perm][:, :, :, perm]
  assert relative_error(permuted.nngp, expected) > 1e-3


@pytest.mark.parametrize('linear_scaling', [True, False])
def test_2d_input_equals_flattened_sequence(linear_scaling):
  """Attention flattens the spatial axes: on (N, 2, 3, C) inputs the kernel
  equals that of the (N, 6, C) sequence, pairs of positions reshaped
  row-major (embeddings independent per position)."""
  x1, x2 = _sequences((2, 3))
  net = stax.serial(*_sandwich(), GlobalSelfAttention(
      4, 3, 3, 2, linear_scaling, W_key_std=1.3, b_std=0.1,
      attention_mechanism='SOFTMAX' if linear_scaling else 'ABS',
      pos_emb_type='CONCAT'))
  image = _jit(net)(x1, x2, ('nngp', 'ntk'))
  flat = _jit(net)(x1.reshape(3, 6, 3), x2.reshape(2, 6, 3),
                       ('nngp', 'ntk'))
  for field in image._fields:
    a = np.asarray(getattr(image, field))            # (N1, N2, H, H', W, W')
    a = a.transpose(0, 1, 2, 4, 3, 5).reshape(3, 2, 6, 6)
    assert relative_error(a, getattr(flat, field)) < 1e-13, field


@pytest.mark.parametrize('linear_scaling', [True, False])
def test_only_products_of_standard_deviations_matter(linear_scaling):
  """The logits scale with W_query_std W_key_std and the output with
  W_out_std W_value_std (neural-tangents' docstring): (2, 0.5, 0.25, 4)
  equals (1, 1, 1, 1); doubling W_key_std alone changes the kernel."""
  x1, x2 = _sequences((4,))
  mechanism = 'SOFTMAX' if linear_scaling else 'RELU'

  def kernel(key, query, value, out):
    net = stax.serial(*_sandwich(), GlobalSelfAttention(
        4, 3, 3, 2, linear_scaling, W_key_std=key, W_query_std=query,
        W_value_std=value, W_out_std=out, b_std=0.1,
        attention_mechanism=mechanism))
    return _jit(net)(x1, x2, 'ntk')

  base = kernel(1., 1., 1., 1.)
  assert relative_error(kernel(2., 0.5, 0.25, 4.), base) < 1e-13
  assert relative_error(kernel(2., 1., 1., 1.), base) > 1e-2


@pytest.mark.parametrize('linear_scaling,mechanism', [
    (True, 'SOFTMAX'), (True, 'IDENTITY'), (False, 'ABS')])
def test_kernel_is_symmetric_psd_and_blockwise(linear_scaling, mechanism):
  """kernel_fn(x, None) over all (sample, position) pairs is a symmetric PSD
  matrix (nngp and ntk), and kernels computed in blocks of samples
  (ntkjax.batch) equal the whole: each pair's kernel depends on that pair
  only (attention is within each sample)."""
  x1, x2 = _sequences((4,), n1=4)
  x = jnp.concatenate([x1, x2])
  net = stax.serial(*_sandwich(), GlobalSelfAttention(
      4, 3, 3, 2, linear_scaling, W_key_std=1.3, b_std=0.1,
      attention_mechanism=mechanism, pos_emb_type='SUM',
      pos_emb_decay_fn=_decay))
  whole = _jit(net)(x, None, ('nngp', 'ntk'))
  for field in whole._fields:
    a = np.asarray(getattr(whole, field)).transpose(0, 2, 1, 3)
    m = a.reshape(6 * 4, 6 * 4)
    np.testing.assert_allclose(m, m.T, rtol=0, atol=1e-13 * np.abs(m).max())
    assert np.linalg.eigvalsh(m).min() > -1e-12 * np.abs(m).max(), field
  blocks = ntkjax.batch(net.kernel_fn, batch_size=2)(x1, x2, 'ntk')
  assert relative_error(blocks, _jit(net)(x1, x2, 'ntk')) < 1e-13


# ----------------------------------------------------------------------------
# Monte Carlo of wide finite networks.


def _monte_carlo(body, x1, x2, n_seeds, seed, implementation=ntkjax
                 .NtkImplementation.STRUCTURED_DERIVATIVES):
  """Mean and standard error over `n_seeds` initializations of
  * the NNGP of `body`'s features over all pairs of positions,
    f1(p) . f2(p') / channels (N1, N2, P, P');
  * the NTK of body -> GlobalAvgPool -> Dense(1), all parameters, from
    autodiff (ntkjax.empirical_ntk_fn, by default with structured
    derivatives; checked against direct Jacobians in test_empirical).
  Parameters are standard normal (NTK parameterization), drawn with NumPy
  16 initializations at a time; the kernel_fn under test is not used.

  Returns:
    ({'nngp': (mean, stderr), 'ntk': (mean, stderr)}, the full network).
  """
  full = stax.serial(body, stax.GlobalAvgPool(),
                     stax.Dense(1, W_std=1.2, b_std=0.1))
  shapes = jax.eval_shape(lambda k: full.init_fn(k, x1.shape)[1],
                          jax.random.PRNGKey(0))
  ntk_fn = ntkjax.empirical_ntk_fn(full.apply_fn, vmap_axes=0,
                                   implementation=implementation)

  def kernels(params):
    f1, f2 = body.apply_fn(params[0], x1), body.apply_fn(params[0], x2)
    nngp = jnp.einsum('ipc,jqc->ijpq', f1, f2) / f1.shape[-1]
    return nngp, ntk_fn(x1, x2, params)

  # Compilation, not the draws, dominates: XLA's backend optimizations
  # would take 2-3x longer to compile than they save.
  batched = jax.jit(jax.vmap(kernels),
                    compiler_options={'xla_backend_optimization_level': 0})
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(n_seeds // 16):
    params = jax.tree.map(lambda a: rng.standard_normal((16,) + a.shape),
                          shapes)
    samples.append([np.asarray(v) for v in batched(params)])
  out = {}
  for name, values in zip(('nngp', 'ntk'), zip(*samples)):
    values = np.concatenate(values)
    out[name] = (values.mean(0),
                 values.std(0, ddof=1) / np.sqrt(len(values)))
  return out, full


# linear_scaling=True: width C = d_k = H d_v = 256 (the logits concentrate
# at rate 1/sqrt(C) + 1/sqrt(d_k)), ReLU after the attention (its output is
# Gaussian). linear_scaling=False: the logits are Gaussian per head, so the
# per-seed spread falls with the number of heads (16); width C = d_k = 128;
# no nonlinearity after it (Gaussian only as H -> infinity, a mixture over
# the heads' logits at finite H).
MC_CASES = {
    'linear_softmax': (True, dict(attention_mechanism='SOFTMAX')),
    'linear_identity_sum': (True, dict(
        attention_mechanism='IDENTITY', W_key_std=0.4, pos_emb_type='SUM',
        pos_emb_decay_fn=_decay)),
    'linear_relu_concat': (True, dict(
        attention_mechanism='RELU', pos_emb_type='CONCAT', val_pos_emb=True,
        n_chan_pos_emb=128, W_pos_emb_std=0.8)),
    'linear_abs_sum': (True, dict(
        attention_mechanism='ABS', W_key_std=0.7, pos_emb_type='SUM',
        val_pos_emb=True, W_pos_emb_std=0.8)),
    'sqrt_identity_concat': (False, dict(
        attention_mechanism='IDENTITY', W_key_std=0.8, pos_emb_type='CONCAT',
        val_pos_emb=True, n_chan_pos_emb=64)),
    'sqrt_relu': (False, dict(attention_mechanism='RELU')),
    'sqrt_abs_sum': (False, dict(
        attention_mechanism='ABS', pos_emb_type='SUM', W_pos_emb_std=0.7)),
}


def _mc_body(linear_scaling, width, **kw):
  heads, key, value = (4, width, width // 4) if linear_scaling else (
      16, width, 16)
  attention = GlobalSelfAttention(
      width, key, value, heads, linear_scaling, W_query_std=1.2,
      W_value_std=1.1, b_std=0.1, **{'W_key_std': 1.5, **kw})
  after = [stax.Relu()] if linear_scaling else []
  return stax.serial(stax.Dense(width, W_std=1.3, b_std=0.2), attention,
                     *after)


@pytest.mark.parametrize('name', sorted(MC_CASES))
def test_matches_monte_carlo(name):
  """NNGP over all pairs of positions and NTK of wide finite networks agree
  with kernel_fn within 5 standard errors + 8 / width
  (`assert_monte_carlo_close`), for every mechanism and positional
  embedding, both scalings. For linear_scaling=True this checks that the
  key/query and logit paths add nothing to the NTK at infinite width; for
  False, that they add the query and key path terms."""
  linear, kw = MC_CASES[name]
  width = 256 if linear else 128
  x1, x2 = _sequences((4,))
  body = _mc_body(linear, width, **kw)
  # Embeddings mixed by a decay are a constant matrix times a parameter,
  # which ntkjax's structured derivatives do not handle yet (KeyError in
  # structured.contract); the Jacobian contraction does.
  implementation = (ntkjax.NtkImplementation.JACOBIAN_CONTRACTION
                    if kw.get('pos_emb_decay_fn') else
                    ntkjax.NtkImplementation.STRUCTURED_DERIVATIVES)
  estimate, full = _monte_carlo(body, x1, x2, 96, len(name), implementation)
  exact = jax.jit(lambda a, b: (body.kernel_fn(a, b, 'nngp'),
                                full.kernel_fn(a, b, 'ntk')),
                  compiler_options={'xla_backend_optimization_level': 0})(
                      x1, x2)
  for field, value in zip(('nngp', 'ntk'), exact):
    assert_monte_carlo_close(estimate[field], value, width, f'{name} {field}')
  if name == 'linear_softmax':
    # Negative control: uniform attention (zero logits) is rejected.
    uniform = _mc_body(linear, width, **{**kw, 'W_key_std': 0.})
    with pytest.raises(AssertionError):
      assert_monte_carlo_close(estimate['nngp'],
                               _jit(uniform)(x1, x2, 'nngp'), width)
  if not linear and kw['attention_mechanism'] == 'IDENTITY':
    # Negative control: the NTK without the query/key paths (the
    # reference formula with them dropped) is rejected; with them it is
    # the kernel. (With RELU the paths are ~65% of the NTK's scale, just
    # above this estimate's resolution, so the control is left to IDENTITY,
    # where they are ~100%.)
    def reference(qk_paths):
      r = _Reference(x1, x2).dense(width, 1.3, 0.2)
      r.attention(width, False, kw['attention_mechanism'],
                  kw.get('W_key_std', 1.5) * 1.2, 1.1, 0.1,
                  kw.get('pos_emb_type', 'NONE'), kw.get('W_pos_emb_std', 1.),
                  kw.get('n_chan_pos_emb'), kw.get('val_pos_emb', False),
                  decay=kw.get('pos_emb_decay_fn'), qk_paths=qk_paths)
      return r.global_pool().dense(1, 1.2, 0.1).public('ntk')
    assert relative_error(reference(True), exact[1]) < 1e-12
    with pytest.raises(AssertionError):
      assert_monte_carlo_close(estimate['ntk'], reference(False), width)


def test_gradients_match_finite_differences():
  """d/dW_key_std, d/db_std and the directional derivative in the inputs of
  the NTK (softmax of a traced scale, embeddings, Gaussian-logit
  expectations) against central differences (h = 1e-6: truncation ~h^2,
  rounding ~eps / h, so 1e-6 relative)."""
  x1, x2 = _sequences((4,))

  def loss(key_std, b_std, x, y):
    net = stax.serial(
        stax.Dense(4, W_std=1.2, b_std=b_std),
        GlobalSelfAttention(4, 3, 3, 2, W_key_std=key_std, b_std=b_std,
                            pos_emb_type='SUM', pos_emb_decay_fn=_decay),
        stax.Relu(),
        GlobalSelfAttention(4, 3, 3, 2, False, W_key_std=key_std,
                            attention_mechanism='RELU'),
        stax.GlobalAvgPool(), stax.Dense(1))
    return jnp.sum(net.kernel_fn(x, y, 'ntk')**2)

  options = {'xla_backend_optimization_level': 0}
  value = jax.jit(loss, compiler_options=options)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=options)
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


# ----------------------------------------------------------------------------
# The finite network.


def _explicit_attention(params, x, linear_scaling, mechanism, qk, ov, b_std,
                        pos_emb_type, w_pe, val_pos_emb, decay):
  """The documented finite network by loops over heads and samples."""
  w_q, w_k, w_v, w_o, b, e = (None if a is None else np.asarray(a)
                              for a in params)
  x = np.asarray(x)
  n, sizes = x.shape[0], x.shape[1:-1]
  flat = x.reshape(n, -1, x.shape[-1])
  keys_in = values_in = flat
  if e is not None:
    e = e.reshape(-1, e.shape[-1])
    if decay is not None:
      eigenvalues, vectors = np.linalg.eigh(
          _positions_covariance(sizes, 2, decay))
      e = (vectors * np.sqrt(np.maximum(eigenvalues, 0))) @ vectors.T @ e
    e = w_pe * e
    if pos_emb_type == 'SUM':
      keys_in = flat + e
    else:
      keys_in = np.concatenate([flat, np.broadcast_to(e, (n,) + e.shape)],
                               -1)
    if val_pos_emb:
      values_in = keys_in
  heads, d_k = w_k.shape[0], w_k.shape[-1]
  d_v = w_v.shape[-1]
  out = np.zeros((n, flat.shape[1], d_v * heads))
  for i in range(n):
    for h in range(heads):
      keys = keys_in[i] @ w_k[h]
      queries = keys if linear_scaling else keys_in[i] @ w_q[h]
      scale = keys_in.shape[-1] * (d_k if linear_scaling else np.sqrt(d_k))
      a = _mechanism(mechanism, qk * queries @ keys.T / scale)
      out[i, :, h::heads] = a @ (values_in[i] @ w_v[h])  # channel v H + h
  y = out @ w_o * ov / np.sqrt(d_v * heads * values_in.shape[-1])
  y = y.reshape((n,) + sizes + (w_o.shape[-1],))
  return y if b is None else y + b_std * b


@pytest.mark.parametrize('linear_scaling,mechanism,kw', [
    (True, 'SOFTMAX', dict(pos_emb_type='SUM', pos_emb_decay_fn=_decay)),
    (True, 'IDENTITY', dict()),
    (False, 'RELU', dict(pos_emb_type='CONCAT', val_pos_emb=True,
                         n_chan_pos_emb=2)),
    (False, 'ABS', dict(pos_emb_type='SUM', val_pos_emb=True))],
    ids=['linear-softmax-sum', 'linear-identity', 'sqrt-relu-concat',
         'sqrt-abs-sum'])
def test_finite_network_is_the_documented_formula(linear_scaling, mechanism,
                                                  kw):
  """apply_fn equals explicit loops over heads and samples of the module
  docstring's formula (neural-tangents' parameter layout: tied queries
  are None), and init_fn's output shape is apply_fn's and the kernel's."""
  x, _ = _sequences((2, 3), channels=3, n1=2)
  layer = GlobalSelfAttention(5, 4, 3, 2, linear_scaling, W_key_std=1.3,
                              W_query_std=0.8, W_value_std=1.1, W_out_std=0.9,
                              b_std=0.2, attention_mechanism=mechanism,
                              W_pos_emb_std=0.7, **kw)
  # init_fn's shapes, with NumPy draws (eager random numbers compile per
  # shape; the draws are the Monte Carlo tests' business).
  box = {}

  def init(key):
    box['shape'], params = layer.init_fn(key, x.shape)
    return params
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  shape = box['shape']
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)),
                        shapes)
  assert (params[0] is None) == linear_scaling
  y = layer.apply_fn(params, x)
  assert y.shape == shape == (2, 2, 3, 5)
  expected = _explicit_attention(
      params, x, linear_scaling, mechanism, 1.3 * 0.8, 1.1 * 0.9, 0.2,
      kw.get('pos_emb_type', 'NONE'), 0.7, kw.get('val_pos_emb', False),
      kw.get('pos_emb_decay_fn'))
  np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
  assert jax.eval_shape(layer.kernel_fn, x).shape1 == shape


def test_attention_weights_with_key_mask():
  """The helper both sides use: without a mask, the mechanism of the
  logits; with one, masked keys get weight 0, the softmax renormalizes over
  the others (equal to the softmax of the unmasked logits), and a query
  with all keys masked gets zeros, not NaN. Masks broadcast over heads."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 3, 4, 4))              # (H, N, P, P)
  mask = np.zeros((3, 4), bool)
  mask[0, 1] = mask[1, [0, 3]] = mask[2] = True
  for mechanism in MECHANISMS:
    np.testing.assert_allclose(attention_weights(logits, mechanism),
                               _mechanism(mechanism, logits), rtol=1e-14)
    masked = np.asarray(attention_weights(logits, mechanism, jnp.asarray(mask)))
    assert np.all(masked[:, mask[:, None, :].repeat(4, 1)] == 0)
    keep = [0, 2, 3]
    expected = _mechanism(mechanism, logits[:, 0][..., keep])
    np.testing.assert_allclose(masked[:, 0][..., keep], expected, rtol=1e-14)
    assert np.all(np.isfinite(masked))
  softmax = np.asarray(attention_weights(logits, 'SOFTMAX', jnp.asarray(mask)))
  np.testing.assert_allclose(softmax[:, :2].sum(-1), 1., rtol=1e-14)
  assert np.all(softmax[:, 2] == 0)


@pytest.mark.parametrize('mechanism', ['IDENTITY', 'RELU', 'ABS'])
def test_gaussian_logit_sums_with_key_masks(mechanism):
  """The d^-1/2 kernel's helper: its sums over key pairs equal explicit
  sums of the textbook expectations over the unmasked keys of each side
  (a masked key has logit 0: no weight, no gradient), with and without
  masks."""
  from ntkjax.stax._attention import _gaussian_logit_sums
  rng = np.random.default_rng(1)
  h = rng.standard_normal((4, 4, 6))                     # (N, P, C)
  gram = np.einsum('npc,mqc->pqnm', h, h) / 6
  c, var = gram[:, :, :2, 2:], np.einsum('ppnn->pn', gram)
  var_a, var_b = var[:, :2, None], var[:, None, 2:]
  k_v = np.einsum('npc,mqc->pqnm', h**2, h)[:, :, :2, 2:] / 6
  t_v, t_k = 0.5 * c + 0.3, 0.8 * c**2
  mask_a = np.array([[0, 1], [0, 0], [1, 0], [0, 0]], bool)[:, :, None]
  mask_b = np.array([[0, 0], [0, 1], [0, 0], [1, 0]], bool)[:, None, :]
  qk2 = 1.7
  cov = qk2 * np.einsum('abij,cdij->abcdij', c, c)
  var1 = qk2 * var_a[:, None, None, None] * var_a[None, None, :, None]
  var2 = qk2 * var_b[None, :, None, None] * var_b[None, None, None, :]
  e, e_prime = _gaussian_expectations(mechanism, cov, var1, var2)
  for masks in ((None, None), (mask_a, mask_b)):
    keep = np.ones((4, 4, 2, 2))
    if masks[0] is not None:
      keep = keep * ~mask_a[:, None] * ~mask_b[None]
    sums = lambda a, w: np.einsum('abcdij,cdij->abij', a, keep * w)
    s_expected = sums(e, k_v)
    t_expected = sums(e, 2 * k_v + t_v) + qk2 * (
        (c + t_k) * sums(e_prime, k_v * c) + c * sums(e_prime, k_v * (c + t_k)))
    s, t = _gaussian_logit_sums(
        mechanism, qk2, jnp.asarray(c), jnp.asarray(var_a), jnp.asarray(var_b),
        jnp.asarray(k_v), (jnp.asarray(t_v), jnp.asarray(t_k)),
        *(None if m is None else jnp.asarray(m) for m in masks))
    assert relative_error(s, s_expected) < 1e-12
    assert relative_error(t, t_expected) < 1e-12


# ----------------------------------------------------------------------------
# Bad input: clear errors.


def test_pixel_diagonal_input_kernel_is_rejected():
  """Attention mixes positions: a kernel that kept only same-position
  covariances cannot be its input."""
  x, _ = _sequences((4,))
  kernel = stax.Dense(4).kernel_fn(x, None, diagonal_spatial=True)
  assert kernel.spatial.diagonal
  with pytest.raises(stax.KernelError, match='all pairs of positions'):
    GlobalSelfAttention(4, 3, 3, 2).kernel_fn(kernel)
  # Inside a network the layers before it keep all pairs, even when the
  # output is asked pixel-diagonal.
  net = stax.serial(stax.Dense(4), GlobalSelfAttention(4, 3, 3, 2))
  assert jax.eval_shape(lambda: net.kernel_fn(
      x, None, diagonal_spatial=True)).spatial.diagonal


def test_input_rank_errors():
  layer = GlobalSelfAttention(4, 3, 3, 2)
  for shape in ((3, 5), (2, 2, 2, 2, 2, 3)):
    with pytest.raises(stax.KernelError, match='1 to 3 spatial axes'):
      jax.eval_shape(layer.kernel_fn, jnp.ones(shape))
    with pytest.raises(ValueError, match='1 to 3 spatial axes'):
      layer.init_fn(jax.random.PRNGKey(0), shape)


def test_square_root_scaling_softmax_has_no_kernel():
  """linear_scaling=False with SOFTMAX: the finite network runs, kernel_fn
  raises NotImplementedError saying what to use instead."""
  layer = GlobalSelfAttention(4, 3, 3, 2, linear_scaling=False)
  x, _ = _sequences((4,))
  _, params = layer.init_fn(jax.random.PRNGKey(0), x.shape)
  assert layer.apply_fn(params, x).shape == (3, 4, 4)
  with pytest.raises(NotImplementedError, match='linear_scaling=True'):
    jax.eval_shape(layer.kernel_fn, x)


def test_bad_arguments():
  x, _ = _sequences((3,))
  with pytest.raises(ValueError, match='attention_mechanism'):
    GlobalSelfAttention(4, 3, 3, 2, attention_mechanism='TANH')
  with pytest.raises(ValueError, match='pos_emb_type'):
    GlobalSelfAttention(4, 3, 3, 2, pos_emb_type='ROTARY')
  with pytest.raises(ValueError, match='n_heads'):
    GlobalSelfAttention(4, 3, 3, 0)
  with pytest.raises(ValueError, match='W_key_std'):
    GlobalSelfAttention(4, 3, 3, 2, W_key_std=-1.)
  with pytest.raises(ValueError, match='pos_emb_p_norm'):
    GlobalSelfAttention(4, 3, 3, 2, pos_emb_p_norm=0)
  with pytest.raises(ValueError, match='pos_emb_decay_fn'):
    GlobalSelfAttention(4, 3, 3, 2, pos_emb_decay_fn=2.)
  with pytest.raises(NotImplementedError, match='batch_axis'):
    GlobalSelfAttention(4, 3, 3, 2, batch_axis=1)
  summed = GlobalSelfAttention(4, 3, 3, 2, pos_emb_type='SUM',
                               n_chan_pos_emb=5)
  with pytest.raises(ValueError, match='n_chan_pos_emb'):
    summed.init_fn(jax.random.PRNGKey(0), x.shape)
  with pytest.raises(stax.KernelError, match='n_chan_pos_emb'):
    jax.eval_shape(summed.kernel_fn, x)
  # 1 - d of squared distances 0, 1, 4 has eigenvalues 1, 1 + 3, 1 - 3.
  bad_decay = GlobalSelfAttention(4, 3, 3, 2, pos_emb_type='SUM',
                                  pos_emb_decay_fn=lambda d: 1 - d)
  with pytest.raises(ValueError, match='positive semi-definite'):
    jax.eval_shape(bad_decay.kernel_fn, x)
  with pytest.raises(ValueError, match='positive semi-definite'):
    bad_decay.init_fn(jax.random.PRNGKey(0), x.shape)
  layer = GlobalSelfAttention(4, 3, 3, 2)
  _, params = layer.init_fn(jax.random.PRNGKey(0), x.shape)
  with pytest.raises(ValueError, match='init_fn'):
    layer.apply_fn(params, jnp.ones((2, 3, 5)))
