"""Graph layers: `Aggregate` (message passing over a per-sample graph).

Finite network (neural-tangents' convention). Each sample n of the features
h (batch, X_1, ..., X_s, channels) comes with a graph on the positions of
the aggregated axes: `pattern[n, u, v]` is the weight of the directed edge
(arc) from the tail (sender) u to the head (receiver) v. Every vertex is
replaced by the weighted sum of its direct predecessors, channel by channel:

    y_n[v] = sum_u pattern[n, u, v] h_n[u],     i.e. y_n = A_n^T h_n

(positions flattened to vertices, A_n the adjacency matrix; self-loops
A[u, u] keep a vertex's own features). With several aggregated axes a
vertex is a tuple of positions and `pattern` has shape
(batch, X_i1, ..., X_iK, X_i1, ..., X_iK). Axes not aggregated are handled
independently, like the channels.

Kernel (Du et al. 2019, "Graph Neural Tangent Kernel", the aggregation
step). The layer is linear, has no parameters and uses no new randomness,
so for each pair of samples the covariances are those of a fixed linear map
of the features:

    nngp'_ij(v, v') = sum_{u, u'} A_i[u, v] A_j[u', v'] nngp_ij(u, u'),
    ntk'_ij  likewise (the parameters' gradients are mapped the same way),
    cov1'_i  = A_i^T cov1_i A_i,

which needs the covariances between ALL pairs of positions at the input
(the layer, like pooling, cannot act on a pixel-diagonal kernel) and gives
them for all pairs at the output. A Gaussian field stays a Gaussian field
of the same random weights; non-Gaussian features become one opaque term
(a mixture over positions: put a Dense before the next nonlinearity, as
graph networks do).

`implementation='SPARSE'` takes the graph as an edge list and computes the
same sums by gathers and segment sums: apply_fn costs O(V + E) per sample
and channel instead of O(V^2), and each side of the kernel
O(V E) per pair of samples instead of O(V^3) (V vertices, E edges).

The graph reaches the layer as `apply_fn(params, x, pattern=p)` (serial
passes keyword arguments to every layer) and as
`kernel_fn(x1, x2, pattern=(p1, p2))` (one array when x2 is None), where it
is carried on the Kernel (`Kernel.pattern1/2`) and cut into blocks with the
inputs (`KernelFn._by_blocks`, `ntkjax.batch`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax.stax import _features as features
from ntkjax.stax._features import KernelError
from ntkjax.stax._layer import (Layer, is_concrete, layer, single_kernel,
                               zero_masked_outputs)

_NAME = 'Aggregate'
_IMPLEMENTATIONS = ('DENSE', 'SPARSE')
_dot = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _needs_full(output_diagonal: bool) -> bool:
  del output_diagonal  # aggregation mixes positions, whatever follows
  return False


def _implementation(implementation) -> str:
  """'DENSE' or 'SPARSE' from a string or an enum member with `.value`."""
  value = getattr(implementation, 'value', implementation)
  if not isinstance(value, str) or value.upper() not in _IMPLEMENTATIONS:
    raise ValueError(f'{_NAME}: implementation must be "DENSE" or "SPARSE", '
                     f'got {implementation!r}.')
  return value.upper()


def _aggregate_dims(aggregate_axis, ndim: int) -> tuple:
  """The aggregated spatial axes as 0-based indices among the s = ndim - 2
  spatial axes (sorted, as neural-tangents canonicalizes them)."""
  spatial = ndim - 2
  if spatial < 1:
    raise KernelError(
        f'{_NAME} needs features with spatial axes (batch, vertices..., '
        f'channels), e.g. (N, S, C) for graphs of S vertices; got rank {ndim}.')
  if aggregate_axis is None:
    return tuple(range(spatial))
  axes = ((aggregate_axis,) if isinstance(aggregate_axis, (int, np.integer))
          else tuple(aggregate_axis))
  dims = set()
  for axis in axes:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
      raise ValueError(f'{_NAME}: aggregate_axis={aggregate_axis!r} has an '
                       f'axis out of range for features of rank {ndim}.')
    axis = int(axis) % ndim
    if axis in (0, ndim - 1):
      raise ValueError(
          f'{_NAME}: aggregate_axis={aggregate_axis!r} contains the batch '
          f'(0) or channel ({ndim - 1}) axis; only the spatial axes 1..'
          f'{ndim - 2} can be aggregated.')
    dims.add(axis - 1)
  if not dims:
    raise ValueError(f'{_NAME}: aggregate_axis={aggregate_axis!r} is empty.')
  return tuple(sorted(dims))


class _Graphs:
  """The graphs of one batch, as a map applied along one vertex axis.

  `apply(a, vertex_axis, batch_axis)` replaces, for every sample n along
  `batch_axis`, the vertex axis of `a` by A_n^T applied to it (the messages
  sent to each head), whatever the other axes of `a` are.
  """

  def __init__(self, pattern, batch: int, sizes: tuple, dtype,
               implementation: str, to_dense: Callable, name: str):
    self.vertices = math.prod(sizes)
    self.sparse = implementation == 'SPARSE'
    if self.sparse:
      self._edges(pattern, batch, sizes, dtype, name)
    else:
      self._dense(pattern, batch, sizes, dtype, to_dense, name)

  def _dense(self, pattern, batch, sizes, dtype, to_dense, name):
    dense = to_dense(pattern)
    if not hasattr(dense, 'shape'):
      dense = jnp.asarray(dense)
    expected = (batch,) + sizes + sizes
    if tuple(dense.shape) != expected:
      raise ValueError(
          f'{_NAME}: {name} has shape {tuple(dense.shape)} (after to_dense) '
          f'but the features ({batch} samples, aggregated axes of sizes '
          f'{sizes}) need a dense adjacency of shape {expected}: '
          f'{name}[n, tail..., head...] is the weight of the edge from tail '
          'to head. For an edge list use implementation="SPARSE".')
    if is_concrete(dense) and not np.all(np.isfinite(np.asarray(dense))):
      raise ValueError(f'{_NAME}: {name} contains NaN or infinite weights.')
    self.matrix = jnp.asarray(dense).reshape(
        batch, self.vertices, self.vertices).astype(dtype)

  def _edges(self, pattern, batch, sizes, dtype, name):
    k = len(sizes)
    if not hasattr(pattern, 'shape'):
      pattern = jnp.asarray(pattern)
    shape = tuple(pattern.shape)
    if k == 1 and len(shape) == 3:
      pattern = pattern[:, :, None, :]
      shape = tuple(pattern.shape)
    if (len(shape) != 4 or shape[0] != batch or shape[2] != k
        or shape[3] != 2):
      short = (' or (batch, n_edges, 2)' if k == 1 else '')
      raise ValueError(
          f'{_NAME}: {name} has shape {tuple(pattern.shape)}, but '
          'implementation="SPARSE" needs integer edges of shape (batch='
          f'{batch}, n_edges, K={k}, 2){short}: [..., 0] the tails '
          '(senders), [..., 1] the heads (receivers).')
    if not jnp.issubdtype(pattern.dtype, jnp.integer):
      raise ValueError(f'{_NAME}: {name} must hold integer vertex indices '
                       f'for implementation="SPARSE", got {pattern.dtype}.')
    limits = np.asarray(sizes).reshape(1, 1, k, 1)
    if is_concrete(pattern) and np.any(np.asarray(pattern) >= limits):
      raise ValueError(
          f'{_NAME}: {name} has vertex indices beyond the aggregated axes '
          f'(sizes {sizes}); negative indices mark padding edges.')
    # An edge with any negative coordinate (tail or head) is padding: it is
    # kept in the arrays with weight 0 (static shapes), pointing at vertex 0.
    valid = jnp.all(pattern >= 0, axis=(2, 3))
    clipped = jnp.where(pattern >= 0, pattern, 0)
    strides = np.array([math.prod(sizes[d + 1:]) for d in range(k)])
    flat = jnp.einsum('nekt,k->net', clipped, strides)
    self.tails, self.heads = flat[..., 0], flat[..., 1]
    self.weights = valid.astype(dtype)

  def apply(self, a, vertex_axis: int, batch_axis: int):
    """A_n^T along `vertex_axis` of `a`, per sample n along `batch_axis`."""
    if not self.sparse:
      moved = jnp.moveaxis(a, (vertex_axis, batch_axis), (0, -1))
      out = _dot('u...n,nuv->v...n', moved, self.matrix)
      return jnp.moveaxis(out, (0, -1), (vertex_axis, batch_axis))
    moved = jnp.moveaxis(a, (batch_axis, vertex_axis), (0, 1))

    def one_sample(features_n, tails, heads, weights):
      messages = features_n[tails]
      messages = messages * weights.reshape((-1,) + (1,) * (messages.ndim - 1))
      return jax.ops.segment_sum(messages, heads, self.vertices)

    out = jax.vmap(one_sample)(moved, self.tails, self.heads, self.weights)
    return jnp.moveaxis(out, (0, 1), (batch_axis, vertex_axis))


def _group(a, first: Sequence[int], rest: Sequence[int], sizes: tuple,
           tail: int):
  """Transpose the axes `first` (several groups, each flattened into one
  vertex axis) to the front, then `rest`, then the `tail` trailing axes.

  Returns:
    (grouped array, function undoing the grouping).
  """
  lead = [ax for group in first for ax in group]
  trailing = list(range(a.ndim - tail, a.ndim))
  perm = lead + list(rest) + trailing
  moved = a.transpose(perm)
  shape = moved.shape
  vertices = math.prod(sizes)
  grouped = moved.reshape((vertices,) * len(first) + shape[len(lead):])

  def undo(b):
    return b.reshape(shape).transpose(np.argsort(perm))
  return grouped, undo


def Aggregate(aggregate_axis: Union[None, int, Sequence[int]] = None,
              batch_axis: int = 0, channel_axis: int = -1,
              to_dense: Optional[Callable] = lambda p: p,
              implementation: str = 'DENSE') -> Layer:
  """Aggregation over a graph per sample (see the module docstring).

  Args:
    aggregate_axis: the spatial axes whose positions are the graph's
      vertices (None: all axes but batch and channel).
    batch_axis: only 0.
    channel_axis: only -1.
    to_dense: `implementation='DENSE'` only: a function turning the given
      `pattern` (batch first) into the dense adjacency
      (batch, X_i1, ..., X_iK, X_i1, ..., X_iK); identity by default.
    implementation: 'DENSE' (pattern is the weighted adjacency above) or
      'SPARSE' (pattern is an integer edge list (batch, n_edges, K, 2), or
      (batch, n_edges, 2) for K = 1, with [..., 0] the tails (senders) and
      [..., 1] the heads (receivers); repeated edges add up; an edge with a
      negative coordinate is padding and ignored, so negative indices do
      not count from the end).

  Returns:
    A `Layer`. `apply_fn(params, x, pattern=p)` and
    `kernel_fn(x1, x2, pattern=(p1, p2))` (or `pattern=p` with x2 None) need
    the graphs; unlike neural-tangents, a missing pattern is an error rather
    than the identity graph (pass an identity adjacency for that), so that a
    forgotten argument cannot silently drop the aggregation.
  """
  implementation = _implementation(implementation)
  name = f'{_NAME}(aggregate_axis={aggregate_axis!r})'
  if (batch_axis, channel_axis) != (0, -1):
    raise NotImplementedError(
        f'{name}: only batch_axis=0, channel_axis=-1 are supported; transpose '
        'your inputs to (batch, vertices..., channels).')
  if to_dense is None:
    to_dense = lambda p: p
  if not callable(to_dense):
    raise ValueError(f'{name}: to_dense must be a function, got {to_dense!r}.')
  if aggregate_axis is not None:
    # Ranges are checked against the inputs' rank when it is known.
    axes = ((aggregate_axis,) if isinstance(aggregate_axis, (int, np.integer))
            else tuple(aggregate_axis))
    if not axes or not all(isinstance(a, (int, np.integer)) for a in axes):
      raise ValueError(f'{name}: aggregate_axis must be None, an int or a '
                       f'non-empty sequence of ints, got {aggregate_axis!r}.')

  def init_fn(key, input_shape):
    _aggregate_dims(aggregate_axis, len(input_shape))
    return tuple(input_shape), ()

  def apply_fn(params, x, *, pattern=None, mask=None, **kwargs):
    del params
    if pattern is None:
      raise ValueError(
          f'{name}: apply_fn needs the graphs, apply_fn(params, x, '
          'pattern=...) (serial passes it to every layer).')
    x = zero_masked_outputs(x, mask)  # masked vertices send zeros
    dims = _aggregate_dims(aggregate_axis, x.ndim)
    rest = [1 + d for d in range(x.ndim - 2) if d not in dims]
    sizes = tuple(x.shape[1 + d] for d in dims)
    graphs = _Graphs(pattern, x.shape[0], sizes, x.dtype, implementation,
                     to_dense, 'pattern')
    # (N, vertices, other spatial axes..., C): batch first, vertices next.
    perm = [0] + [1 + d for d in dims] + rest + [x.ndim - 1]
    moved = x.transpose(perm)
    grouped = moved.reshape((x.shape[0], graphs.vertices)
                            + moved.shape[1 + len(dims):])
    out = graphs.apply(grouped, 1, 0)
    return out.reshape(moved.shape).transpose(np.argsort(perm))

  def kernel_map(k):
    k = single_kernel(k, name)
    dims = _aggregate_dims(aggregate_axis, len(k.shape1))
    if k.spatial.diagonal:
      raise KernelError(
          f'{name} needs the covariances between different positions, but '
          'the kernel it received keeps only same-position ones '
          '(diagonal_spatial=True). Call kernel_fn with '
          'diagonal_spatial=False (the default).')
    if k.pattern1 is None or k.pattern2 is None:
      raise KernelError(
          f'{name} needs the graphs of the inputs: pass pattern= to kernel_fn '
          '(one array for x2=None, else a pair (pattern1, pattern2)).')
    ndim = k.spatial.ndim
    sizes = tuple(k.shape1[1 + d] for d in dims)
    dtype = k.nngp.dtype
    graphs1 = _Graphs(k.pattern1, k.shape1[0], sizes, dtype, implementation,
                      to_dense, 'pattern1')
    graphs2 = (graphs1 if k.pattern2 is k.pattern1 else
               _Graphs(k.pattern2, k.shape2[0], sizes, dtype, implementation,
                       to_dense, 'pattern2'))
    # Full layout (S_1, S_1', ..., S_s, S_s', batch...): the first and the
    # second position of every aggregated axis, each group flattened to one
    # vertex axis; the other position axes follow.
    firsts = [2 * d for d in dims]
    seconds = [2 * d + 1 for d in dims]
    rest_pairs = [ax for d in range(ndim) if d not in dims
                  for ax in (2 * d, 2 * d + 1)]

    def pairwise(a, left, right, batch_axes):
      grouped, undo = _group(a, (firsts, seconds), rest_pairs, sizes,
                             batch_axes)
      right_batch = -1
      left_batch = -2 if batch_axes == 2 else -1
      grouped = left.apply(grouped, 0, left_batch)
      grouped = right.apply(grouped, 1, right_batch)
      return undo(grouped)

    def means(graphs):
      def map_means(m):
        rest = [d for d in range(ndim) if d not in dims]
        grouped, undo = _group(m, ([*dims],), rest, sizes, 1)
        return undo(graphs.apply(grouped, 0, -1))
      return map_means

    # Each batch has its own graphs, so x1's and x2's means get their own
    # maps.
    # Masked vertices (mask_constant) send zeros.
    nngp, ntk, cov1, cov2 = features.masked_arrays(k)
    return features.linear_map_kernel(
        k, pairwise(nngp, graphs1, graphs2, 2),
        pairwise(ntk, graphs1, graphs2, 2),
        pairwise(cov1, graphs1, graphs1, 1),
        pairwise(cov2, graphs2, graphs2, 1),
        (means(graphs1), means(graphs2)), k.spatial, k.shape1, k.shape2,
        zero_masked_means=True)

  return layer(name, init_fn, apply_fn, kernel_map, _needs_full)
