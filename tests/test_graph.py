"""Aggregate (graph layers): kernels against an independent NumPy reference
and Monte Carlo of wide finite graph networks, exact identities, blocked =
unblocked, the finite layer against explicit loops, and clear errors.

Convention (neural-tangents'): pattern[n, u, v] is the weight of the edge
from tail u to head v, and the layer sends y_n[v] = sum_u pattern[n, u, v]
h_n[u]; SPARSE edge lists hold (tail, head) pairs.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_monte_carlo_close, relative_error

import ntkjax
from ntkjax import stax
from ntkjax.stax import _layer as layer_module
from ntkjax.stax._graph import Aggregate

S, C = 4, 3          # vertices per graph, input channels
FIELDS = ('nngp', 'ntk', 'cov1', 'cov2')


def _nodes(n1=3, n2=2, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((n1, S, C))),
          jnp.asarray(0.8 * rng.standard_normal((n2, S, C))))


def _graphs(n, seed, vertices=S):
  """Directed weighted graphs, different per sample, with weighted
  self-loops (so A != A^T and in/out degrees differ)."""
  rng = np.random.default_rng(seed)
  edges = rng.random((n, vertices, vertices)) < 0.5
  a = edges * rng.uniform(0.3, 1.2, (n, vertices, vertices))
  idx = np.arange(vertices)
  a[:, idx, idx] += rng.uniform(0.5, 1., (n, vertices))
  return jnp.asarray(a)


def _edge_lists(n, seed, n_edges=7):
  """Integer (tail, head) lists with repeated edges and padding edges (a
  negative tail or head)."""
  rng = np.random.default_rng(seed)
  e = rng.integers(0, S, (n, n_edges, 2))
  e[:, 1] = e[:, 0]            # a repeated edge: weight 2
  e[:, -1, 1] = -1             # padding: negative head
  e[:, -2, 0] = -3             # padding: negative tail
  return jnp.asarray(e)


def _dense_of_edges(e):
  """The adjacency counts of edge lists, by an explicit loop."""
  e = np.asarray(e)
  a = np.zeros((e.shape[0], S, S))
  for n in range(e.shape[0]):
    for tail, head in e[n]:
      if tail >= 0 and head >= 0:
        a[n, tail, head] += 1
  return jnp.asarray(a)


def _jit(network):
  """The network's kernel_fn under jit, as users run it (one compilation
  instead of one dispatch per primitive; the pattern is a traced argument)."""
  return jax.jit(network.kernel_fn, static_argnames=('get',))




# ----------------------------------------------------------------------------
# An independent reference: Gram matrices over (sample, vertex) pairs.


class _Reference:
  """NNGP K and NTK T of a graph network on the joint batch [x1; x2], as
  (N, S, N, S) arrays over all (sample, vertex) pairs (every layer a few
  lines; the aggregation by explicit loops)."""

  def __init__(self, x1, x2, a1, a2):
    x = np.concatenate([np.asarray(x1), np.asarray(x2)])
    self.n1 = x1.shape[0]
    self.a = np.concatenate([np.asarray(a1), np.asarray(a2)])
    self.k = np.einsum('npc,mqc->npmq', x, x) / x.shape[-1]
    self.t = np.zeros_like(self.k)

  def dense(self, w_std, b_std):
    self.k = w_std**2 * self.k + b_std**2
    self.t = self.k + w_std**2 * self.t
    return self

  def aggregate(self):
    """K'[n, v, m, w] = sum_{u, u'} A_n[u, v] A_m[u', w] K[n, u, m, u']."""
    n, s = self.k.shape[:2]
    new_k, new_t = np.zeros_like(self.k), np.zeros_like(self.t)
    for i, v, j, w in itertools.product(range(n), range(s), range(n),
                                        range(s)):
      # the sum over (u, u') as A_i[:, v]^T K[i, :, j, :] A_j[:, w]
      new_k[i, v, j, w] = self.a[i, :, v] @ self.k[i, :, j, :] @ self.a[j, :, w]
      new_t[i, v, j, w] = self.a[i, :, v] @ self.t[i, :, j, :] @ self.a[j, :, w]
    self.k, self.t = new_k, new_t
    return self

  def relu(self):
    v = np.einsum('npnp->np', self.k)
    norm = np.sqrt(v[:, :, None, None] * v[None, None, :, :])
    # A vertex without incoming edges has zero features (norm 0): any
    # angle gives k = 0 and t = 0 there.
    cos = np.clip(self.k / np.where(norm > 0, norm, 1), -1, 1)
    theta = np.arccos(cos)
    self.k = norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos)
    self.t = self.t * (np.pi - theta) / (2 * np.pi)
    return self

  def global_sum_pool(self):
    self.k = self.k.sum((1, 3))[:, None, :, None]
    self.t = self.t.sum((1, 3))[:, None, :, None]
    return self

  def public(self, name, spatial):
    """`kernel_fn(x1, x2, name)` in neural-tangents' layout."""
    n1 = self.n1
    a = self.k if name != 'ntk' else self.t
    if name == 'cov1':
      a = np.einsum('npnq->npq', a[:n1, :, :n1])
    elif name == 'cov2':
      a = np.einsum('npnq->npq', a[n1:, :, n1:])
    else:
      a = a[:n1, :, n1:].transpose(0, 2, 1, 3)
    return a if spatial else a.reshape(a.shape[:-2])


def _gnn(implementation='DENSE', readout=1, width=8, act=stax.Relu):
  """Dense -> Aggregate -> Relu -> Dense -> Aggregate -> GlobalSumPool ->
  Dense."""
  return stax.serial(
      stax.Dense(width, W_std=1.4, b_std=0.2),
      Aggregate(implementation=implementation), act(),
      stax.Dense(width, W_std=1.3, b_std=0.1),
      Aggregate(implementation=implementation), stax.GlobalSumPool(),
      stax.Dense(readout, W_std=1.1, b_std=0.3))


def _gnn_reference(r):
  return (r.dense(1.4, 0.2).aggregate().relu().dense(1.3, 0.1).aggregate()
          .global_sum_pool().dense(1.1, 0.3))


def _spatial_gnn(implementation='DENSE'):
  """Ends in Aggregate: the kernel between every pair of vertices."""
  return stax.serial(
      stax.Dense(8, W_std=1.4, b_std=0.2),
      Aggregate(implementation=implementation), stax.Relu(),
      stax.Dense(8, W_std=1.3, b_std=0.1),
      Aggregate(implementation=implementation))


def _spatial_reference(r):
  return r.dense(1.4, 0.2).aggregate().relu().dense(1.3, 0.1).aggregate()


@pytest.mark.parametrize('implementation', ['DENSE', 'SPARSE'])
@pytest.mark.parametrize('spatial', [False, True], ids=['pooled', 'vertices'])
def test_kernel_matches_numpy_reference(implementation, spatial):
  """nngp, ntk, cov1, cov2 of a GNN (pooled readout, or the vertices' full
  (N1, N2, S, S') layout) equal the explicit-loop reference, with x1 and x2
  on different graphs; SPARSE edge lists (repeated and padding edges) equal
  their adjacency counts."""
  x1, x2 = _nodes()
  if implementation == 'DENSE':
    p1, p2 = _graphs(3, 1), _graphs(2, 2)
    a1, a2 = p1, p2
  else:
    p1, p2 = _edge_lists(3, 1), _edge_lists(2, 2)
    a1, a2 = _dense_of_edges(p1), _dense_of_edges(p2)
  net = (_spatial_gnn if spatial else _gnn)(implementation)
  ref = (_spatial_reference if spatial else _gnn_reference)(
      _Reference(x1, x2, a1, a2))
  got = _jit(net)(x1, x2, FIELDS, pattern=(p1, p2))
  for field in FIELDS:
    assert relative_error(getattr(got, field), ref.public(field, spatial)) < 1e-12, field


# ----------------------------------------------------------------------------
# Monte Carlo of wide finite graph networks.


MC_WIDTH = 256
MC_SAMPLES = 32


def _monte_carlo(network, x, pattern, n, seed, get):
  """Mean and standard error of `n` empirical kernels of the finite network
  on one batch x with its graphs (`monte_carlo_kernel_fn`, structured
  derivatives, the pattern vmapped with its samples)."""
  kernel_fn = ntkjax.monte_carlo_kernel_fn(
      network.init_fn, network.apply_fn, jax.random.PRNGKey(seed),
      range(1, n + 1), vmap_axes=(0, 0, {'pattern': 0}),
      implementation=ntkjax.NtkImplementation.STRUCTURED_DERIVATIVES)
  means = [np.asarray(m) for m in kernel_fn(x, None, get, pattern=pattern)]
  samples = np.stack([means[0]] + [(k + 1) * means[k] - k * means[k - 1]
                                   for k in range(1, n)])
  return means[-1], samples.std(0, ddof=1) / np.sqrt(n)


def _check_monte_carlo(net, get, seed):
  """The finite network on the joint batch [x1; x2] with graphs [A1; A2]:
  its whole (N, N) kernel against kernel_fn(x, None, pattern=A), and its
  x1-x2 block against kernel_fn(x1, x2, pattern=(A1, A2)). Negative
  control: the kernel with every graph reversed (A^T: heads and tails
  swapped) is rejected, so the estimate resolves the edge direction."""
  x1, x2 = _nodes()
  a1, a2 = _graphs(3, 1), _graphs(2, 2)
  x, a = jnp.concatenate([x1, x2]), jnp.concatenate([a1, a2])
  mean, stderr = _monte_carlo(net, x, a, MC_SAMPLES, seed, get)
  exact = net.kernel_fn(x, None, get, pattern=a)
  assert_monte_carlo_close((mean, stderr), exact, MC_WIDTH, get)
  cross = net.kernel_fn(x1, x2, get, pattern=(a1, a2))
  np.testing.assert_allclose(cross, np.asarray(exact)[:3, 3:], rtol=1e-12)
  reversed_ = net.kernel_fn(x, None, get, pattern=a.transpose(0, 2, 1))
  with pytest.raises(AssertionError):
    assert_monte_carlo_close((mean, stderr), reversed_, MC_WIDTH, 'A^T')


def test_vertex_nngp_matches_monte_carlo():
  """NNGP between every pair of vertices, (N, N, S, S'), of a GNN ending in
  Aggregate (width 256, output channels averaged)."""
  net = stax.serial(
      stax.Dense(MC_WIDTH, W_std=1.4, b_std=0.2), Aggregate(), stax.Relu(),
      stax.Dense(MC_WIDTH, W_std=1.3, b_std=0.1), Aggregate())
  _check_monte_carlo(net, 'nngp', 1)


def test_pooled_ntk_matches_monte_carlo():
  """NTK of the GNN with a global sum pooling and one output; the NTK
  contains every layer's NNGP, so this checks both."""
  _check_monte_carlo(_gnn(readout=1, width=MC_WIDTH), 'ntk', 2)


# ----------------------------------------------------------------------------
# Exact identities.


def _body():
  return stax.serial(stax.Dense(6, W_std=1.4, b_std=0.2), stax.Erf(),
                     stax.Dense(6, W_std=1.2, b_std=0.1))


@pytest.mark.parametrize('implementation', ['DENSE', 'SPARSE'])
def test_identity_graph_is_no_aggregation(implementation):
  """A graph of self-loops only (identity adjacency; edges (u, u)) leaves
  the features, hence all kernels, unchanged, also through a nonlinearity
  after it (the aggregated Gaussian field stays a Gaussian field)."""
  x1, x2 = _nodes()
  if implementation == 'DENSE':
    eye = lambda n: jnp.broadcast_to(jnp.eye(S), (n, S, S))
  else:
    eye = lambda n: jnp.broadcast_to(
        jnp.stack([jnp.arange(S)] * 2, -1), (n, S, 2))
  tail = lambda: stax.serial(stax.Relu(), stax.Dense(5, W_std=1.1),
                             stax.GlobalAvgPool())
  plain = stax.serial(_body(), tail())
  aggregated = stax.serial(_body(), Aggregate(implementation=implementation),
                           tail())
  got = _jit(aggregated)(x1, x2, FIELDS, pattern=(eye(3), eye(2)))
  expected = _jit(plain)(x1, x2, FIELDS)
  for field in FIELDS:
    assert relative_error(getattr(got, field), getattr(expected, field)) < 1e-12, field


def test_all_ones_graph_is_global_sum_pool():
  """The complete graph with self-loops (all-ones adjacency) sends every
  vertex the sum of all: y[v] = GlobalSumPool(h) for every v. So the kernel
  between any two vertices is GlobalSumPool's, also after a nonlinearity and
  a Dense (which then see the same features at every vertex)."""
  x1, x2 = _nodes()
  ones = lambda n: jnp.ones((n, S, S))
  aggregated = stax.serial(_body(), Aggregate()).kernel_fn(
      x1, x2, FIELDS, pattern=(ones(3), ones(2)))
  pooled = stax.serial(_body(), stax.GlobalSumPool()).kernel_fn(x1, x2,
                                                                FIELDS)
  for field in ('nngp', 'ntk'):
    expected = np.asarray(getattr(pooled, field))[:, :, None, None]
    assert relative_error(getattr(aggregated, field),
                np.broadcast_to(expected, expected.shape[:2] + (S, S))) < 1e-12
  assert relative_error(aggregated.cov1, np.broadcast_to(
      np.asarray(pooled.cov1)[:, None, None], (3, S, S))) < 1e-12
  head = lambda: stax.serial(stax.Relu(), stax.Dense(4, W_std=1.2, b_std=0.3))
  deep = stax.serial(_body(), Aggregate(), head(), stax.GlobalAvgPool())
  reference = stax.serial(_body(), stax.GlobalSumPool(), head())
  got = deep.kernel_fn(x1, x2, FIELDS, pattern=(ones(3), ones(2)))
  expected = reference.kernel_fn(x1, x2, FIELDS)
  for field in FIELDS:
    assert relative_error(getattr(got, field), getattr(expected, field)) < 1e-12, field


def test_sparse_equals_dense_on_the_same_graph():
  """SPARSE edge lists (repeated edges, padding edges with a negative tail
  or head) and DENSE adjacency counts give the same finite layer and the
  same kernels (to_dense applied to a flattened adjacency too)."""
  x1, x2 = _nodes()
  e1, e2 = _edge_lists(3, 3), _edge_lists(2, 4)
  a1, a2 = _dense_of_edges(e1), _dense_of_edges(e2)
  sparse = _jit(_gnn('SPARSE'))(x1, x2, FIELDS, pattern=(e1, e2))
  dense = _jit(_gnn('DENSE'))(x1, x2, FIELDS, pattern=(a1, a2))
  unflatten = stax.serial(
      stax.Dense(8, W_std=1.4, b_std=0.2),
      Aggregate(to_dense=lambda p: p.reshape(-1, S, S)), stax.Relu(),
      stax.Dense(8, W_std=1.3, b_std=0.1),
      Aggregate(to_dense=lambda p: p.reshape(-1, S, S)), stax.GlobalSumPool(),
      stax.Dense(1, W_std=1.1, b_std=0.3))
  flat = _jit(unflatten)(x1, x2, FIELDS, pattern=(a1.reshape(3, -1),
                                                   a2.reshape(2, -1)))
  for field in FIELDS:
    assert relative_error(getattr(sparse, field), getattr(dense, field)) < 1e-12
    assert relative_error(getattr(flat, field), getattr(dense, field)) < 1e-12
  _, apply_sparse, _ = Aggregate(implementation='SPARSE')
  _, apply_dense, _ = Aggregate()
  np.testing.assert_allclose(apply_sparse((), x1, pattern=e1),
                             apply_dense((), x1, pattern=a1), atol=1e-14)
  # K = 1 edges may also be given as (batch, n_edges, 1, 2).
  np.testing.assert_allclose(apply_sparse((), x1, pattern=e1[:, :, None]),
                             apply_dense((), x1, pattern=a1), atol=1e-14)


def test_aggregating_one_of_two_axes_is_a_kronecker_graph():
  """On (N, H, W, C) features, aggregating over W with graphs B (N, W, W)
  is aggregating over (H, W) with the graphs I_H (x) B on vertices (h, w),
  for the finite layer and the kernels; an image network with the axis
  given as 2 and as -2 agrees."""
  rng = np.random.default_rng(5)
  x1 = jnp.asarray(rng.standard_normal((3, 3, 4, 2)))
  x2 = jnp.asarray(rng.standard_normal((2, 3, 4, 2)))
  b1, b2 = _graphs(3, 6, vertices=4), _graphs(2, 7, vertices=4)
  kron = lambda b: jnp.einsum('hg,nwv->nhwgv', jnp.eye(3), b)

  def net(**kw):
    return stax.serial(
        stax.Conv(6, (2, 3), padding='SAME', W_std=1.3, b_std=0.2),
        Aggregate(**kw), stax.Erf(), stax.Conv(4, (2, 1), W_std=1.2))
  one = _jit(net(aggregate_axis=2))(x1, x2, FIELDS, pattern=(b1, b2))
  negative = _jit(net(aggregate_axis=(-2,)))(x1, x2, FIELDS,
                                             pattern=(b1, b2))
  both = _jit(net(aggregate_axis=(1, 2)))(
      x1, x2, FIELDS, pattern=(kron(b1), kron(b2)))
  for field in FIELDS:
    assert relative_error(getattr(one, field), getattr(both, field)) < 1e-12, field
    np.testing.assert_array_equal(getattr(one, field),
                                  getattr(negative, field))
  _, apply_one, _ = Aggregate(aggregate_axis=2)
  _, apply_both, _ = Aggregate(aggregate_axis=(1, 2))
  np.testing.assert_allclose(apply_one((), x1, pattern=b1),
                             apply_both((), x1, pattern=kron(b1)), atol=1e-14)


# ----------------------------------------------------------------------------
# Blocks and batches.


def _batch_inputs(n1, n2):
  rng = np.random.default_rng(8)
  x1 = jnp.asarray(rng.standard_normal((n1, S, C)))
  x2 = jnp.asarray(rng.standard_normal((n2, S, C)))
  return x1, x2, _graphs(n1, 9), _graphs(n2, 10), _gnn(act=stax.Erf)


def test_batch_cuts_the_graphs_with_their_inputs():
  """`ntkjax.batch` with blocks of 2 inputs (padded): the graphs are cut
  with their inputs; two batches and x2=None (symmetric assembly) both
  equal the unblocked kernels."""
  x1, x2, a1, a2, net = _batch_inputs(5, 3)
  batched = ntkjax.batch(net.kernel_fn, batch_size=2)
  plain = _jit(net)(x1, x2, FIELDS, pattern=(a1, a2))
  got = batched(x1, x2, FIELDS, pattern=(a1, a2))
  for field in FIELDS:
    assert relative_error(getattr(got, field), getattr(plain, field)) < 1e-12, field
  assert relative_error(batched(x1, None, 'ntk', pattern=a1),
              _jit(net)(x1, None, 'ntk', pattern=a1)) < 1e-12


def test_kernel_fn_blocks_cut_the_graphs(monkeypatch):
  """kernel_fn's own blocking over pairs (2 rows x 3 columns, padded) cuts
  the graphs with their inputs: equal to the unblocked kernels."""
  x1, x2, a1, a2, net = _batch_inputs(7, 5)
  plain12 = _jit(net)(x1, x2, FIELDS, pattern=(a1, a2))
  plain = _jit(net)(x1, None, FIELDS, pattern=a1)
  monkeypatch.setattr(layer_module, '_BLOCK_COLUMNS', 3)
  monkeypatch.setattr(layer_module, '_BLOCK_ENTRIES', 6 * S**2 + 1)
  assert layer_module._pair_blocks(x1, x2, False) == (2, 3)
  for x, pattern, expected in ((x2, (a1, a2), plain12), (None, a1, plain)):
    blocked = net.kernel_fn(x1, x, FIELDS, pattern=pattern)
    for field in FIELDS:
      assert relative_error(getattr(blocked, field), getattr(expected, field)) < 1e-12


# ----------------------------------------------------------------------------
# The finite layer.


def test_finite_aggregate_is_the_documented_sum():
  """apply_fn: y[n, v, c] = sum_u pattern[n, u, v] x[n, u, c] (explicit
  loops), for DENSE and SPARSE; the shapes are kept."""
  x, _ = _nodes()
  a = _graphs(3, 11)
  e = _edge_lists(3, 12)
  init_fn, apply_fn, _ = Aggregate()
  assert init_fn(None, x.shape) == (x.shape, ())
  expected = np.zeros(x.shape)
  for n, u, v in itertools.product(range(3), range(S), range(S)):
    expected[n, v] += np.asarray(a)[n, u, v] * np.asarray(x)[n, u]
  np.testing.assert_allclose(apply_fn((), x, pattern=a), expected, atol=1e-14)
  expected = np.zeros(x.shape)
  for n in range(3):
    for tail, head in np.asarray(e)[n]:
      if tail >= 0 and head >= 0:
        expected[n, head] += np.asarray(x)[n, tail]
  _, apply_sparse, _ = Aggregate(implementation='SPARSE')
  np.testing.assert_allclose(apply_sparse((), x, pattern=e), expected,
                             atol=1e-14)


# ----------------------------------------------------------------------------
# Bad input: clear errors.


def test_errors():
  x1, x2 = _nodes()
  net = _gnn()
  with pytest.raises(ntkjax.KernelError, match='pass pattern= to kernel_fn'):
    net.kernel_fn(x1, x2, 'nngp')
  with pytest.raises(ValueError, match='pattern='):
    Aggregate().apply_fn((), x1)
  with pytest.raises(ValueError, match='pattern1 has shape'):
    net.kernel_fn(x1, x2, 'nngp', pattern=(_graphs(3, 1, vertices=3),
                                           _graphs(2, 1)))
  with pytest.raises(ValueError, match='pattern2 has shape'):
    net.kernel_fn(x1, x2, 'nngp', pattern=(_graphs(3, 1),
                                           _graphs(2, 1)[:, :, :3]))
  with pytest.raises(ValueError, match='pattern has shape'):
    Aggregate().apply_fn((), x1, pattern=_graphs(3, 1)[:, :2])
  sparse = Aggregate(implementation='SPARSE')
  with pytest.raises(ValueError, match='n_edges'):
    sparse.apply_fn((), x1, pattern=_edge_lists(3, 1)[..., :1])
  with pytest.raises(ValueError, match='integer'):
    sparse.apply_fn((), x1, pattern=_edge_lists(3, 1) * 1.)
  with pytest.raises(ValueError, match='beyond'):
    sparse.apply_fn((), x1, pattern=_edge_lists(3, 1) + S)
  with pytest.raises(ValueError, match='NaN'):
    Aggregate().apply_fn((), x1, pattern=_graphs(3, 1) * np.nan)
  with pytest.raises(ValueError, match='DENSE'):
    Aggregate(implementation='COO')
  with pytest.raises(ValueError, match='channel'):
    Aggregate(aggregate_axis=-1).apply_fn((), x1, pattern=_graphs(3, 1))
  with pytest.raises(NotImplementedError, match='batch_axis'):
    Aggregate(batch_axis=1)
  with pytest.raises(ntkjax.KernelError, match='spatial axes'):
    Aggregate().kernel_fn(x1[:, 0], None, pattern=_graphs(3, 1))
  diagonal = stax.Dense(4).kernel_fn(x1, None, diagonal_spatial=True)
  with pytest.raises(ntkjax.KernelError, match='different positions'):
    Aggregate().kernel_fn(diagonal)
  with pytest.raises(ntkjax.KernelError, match='Put a Dense'):
    stax.serial(stax.Dense(4), stax.Relu(), Aggregate(),
                stax.Relu()).kernel_fn(x1, None, pattern=_graphs(3, 1))
