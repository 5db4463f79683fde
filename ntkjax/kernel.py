"""`Kernel`: the state that flows through the infinite-width kernel maps.

A `Kernel` describes the features of one layer of an infinitely wide network,
evaluated on two batches of inputs `x1` (N1 samples) and `x2` (N2 samples):

* `nngp[i, j]` — the channel-averaged second moment E[h(x1_i) h(x2_j)];
* `ntk[i, j]`  — the neural tangent kernel of those features;
* `cov1[i]`, `cov2[j]` — the diagonal second moments of each batch.

At infinite width the channels of a layer are i.i.d., but they are Gaussian
only right after an affine layer. To stay exact after a chain of
nonlinearities, or after summing branches that are not Gaussian, the kernel
also keeps `terms`: the features are a sum of independent `Term`s, each an
elementwise function of one Gaussian field (its `Source`). The moments of a
nonlinearity applied to such features are then expectations over that one
Gaussian field (see `ntkjax.stax._features`).

This module imports nothing else from ntkjax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from typing import Any, Optional

import jax

Array = jax.Array


def _interleave(first, second):
  return sum(((f, s) for f, s in zip(first, second)), ())


@dataclasses.dataclass(frozen=True)
class Spatial:
  """How a kernel's arrays are laid out over the features' spatial axes.

  Features of shape (batch, S_1, ..., S_s, channels) (images: s = 2) have
  covariances between every pair of positions. Inside kernel maps the
  arrays put positions first and the batch axes last,

      diagonal=False:  nngp, ntk (S_1, S_1', ..., S_s, S_s', N1, N2),
                       cov1 (S_1, S_1', ..., S_s, S_s', N1);
      diagonal=True:   nngp, ntk (S_1, ..., S_s, N1, N2), cov1 (S_1, ..., N1)

  (pixel-diagonal: same-position covariances only, enough for a network
  that ends in `Flatten`, cost ~ N^2 P instead of N^2 P^2). Positions first
  make every shift of a convolution a contiguous block and the innermost
  loop run over pairs of inputs, which XLA vectorizes; with the batch axes
  first the innermost axis would be a spatial one of size ~8. Per-position
  arrays (variances, channel means) are (S_1, ..., S_s, N). Fully connected
  features are `Spatial(0)`: nngp (N1, N2), cov1 (N1,).

  What users get from `kernel_fn(..., get=name)` is neural-tangents' layout,
  batch axes first: (N1, N2, S_1, S_1', ...) or (N1, N2, S_1, ...)
  (`public`).

  Attributes:
    ndim: number of spatial axes s.
    diagonal: whether only same-position covariances are kept.
  """
  ndim: int = 0
  diagonal: bool = False

  @property
  def full(self) -> bool:
    """Whether covariances between different positions are kept."""
    return self.ndim > 0 and not self.diagonal

  def variances(self, cov):
    """Per-position variances (S..., N) from a cov1/cov2 array."""
    return self.same_positions(cov, 1)

  def same_positions(self, a, batch_axes: int):
    """Same-position entries (S..., batch...) of an nngp (batch_axes = 2) or
    cov (1) array in this layout: the diagonal of each pair of position axes
    if the layout is full, the array itself otherwise."""
    if not self.full:
      return a
    letters = 'abcdefgh'[:self.ndim]
    batch = 'nm'[:batch_axes]
    pairs = ''.join(c + c for c in letters)
    return jax.numpy.einsum(f'{pairs}{batch}->{letters}{batch}', a)

  def pair(self, a1, a2):
    """Per-position arrays (S..., N1) and (S..., N2), broadcastable against
    an nngp array as its x1 and x2 factors."""
    if not self.full:
      return a1[..., :, None], a2[..., None, :]
    sizes = a1.shape[:-1]
    ones = (1,) * self.ndim
    return (a1.reshape(_interleave(sizes, ones) + (a1.shape[-1], 1)),
            a2.reshape(_interleave(ones, sizes) + (1, a2.shape[-1])))

  def self_pair(self, a):
    """A per-position array (S..., N), broadcastable against a full cov1
    array at the first and at the second position of each pair."""
    sizes, n = a.shape[:-1], a.shape[-1]
    ones = (1,) * self.ndim
    return (a.reshape(_interleave(sizes, ones) + (n,)),
            a.reshape(_interleave(ones, sizes) + (n,)))

  def outer(self, m1, m2):
    """m1_i(p) m2_j(p') laid out like nngp."""
    a1, a2 = self.pair(m1, m2)
    return a1 * a2

  def self_outer(self, m):
    """m_i(p) m_i(p') laid out like cov1."""
    if not self.full:
      return m * m
    first, second = self.self_pair(m)
    return first * second

  def swap(self, a):
    """nngp(x2, x1) laid out for (x1, x2): swaps the batch axes and each
    pair of position axes."""
    perm = []
    for d in range(self.ndim):
      perm += [2 * d + 1, 2 * d] if self.full else [d]
    return a.transpose(perm + [a.ndim - 1, a.ndim - 2])

  def public(self, a, batch_axes: int):
    """An array in neural-tangents' layout: the `batch_axes` (2 for nngp,
    1 for cov1) trailing batch axes moved to the front."""
    if self.ndim == 0:
      return a
    rest = a.ndim - batch_axes
    return a.transpose(tuple(range(rest, a.ndim)) + tuple(range(rest)))

  def swap_public_axes(self) -> tuple:
    """The axis permutation of `swap_public`."""
    perm = [1, 0]
    for d in range(self.ndim):
      perm += [3 + 2 * d, 2 + 2 * d] if self.full else [2 + d]
    return tuple(perm)

  def swap_public(self, a):
    """`swap` for an nngp array in the public layout."""
    return a.transpose(self.swap_public_axes())


@dataclasses.dataclass(frozen=True)
class FieldId:
  """Identifies one Gaussian field (the output of one affine layer).

  Attributes:
    call: which `kernel_fn` call created the field (`fresh_field_ids`).
    index: the field's place in the order that call created its fields.
  """
  call: int
  index: int


_calls = itertools.count(1)
_numbering = threading.local()  # dask runs kernel_fn calls in threads


def _numbering_state():
  if not hasattr(_numbering, 'call'):
    _numbering.call, _numbering.indices = next(_calls), itertools.count()
  return _numbering


@contextlib.contextmanager
def fresh_field_ids():
  """Number the fields created inside as a new call: (call, 0), (call, 1)...

  The same network called twice numbers its fields alike, so its Kernels
  have the same pytree structure (`Kernel` compares field ids without their
  `call`) and a jitted function taking a Kernel traces once per shape;
  fields of different calls keep different ids, so the kernel maps still
  tell them apart (independent random weights).
  """
  state = _numbering_state()
  saved = state.call, state.indices
  state.call, state.indices = next(_calls), itertools.count()
  try:
    yield
  finally:
    state.call, state.indices = saved


def new_source_id() -> FieldId:
  """A fresh identifier for a Gaussian field created by an affine layer."""
  state = _numbering_state()
  return FieldId(state.call, next(state.indices))


class _Static:
  """Pytree metadata of Source, Term and Kernel, compared by structure.

  Two Kernels of one network on inputs of equal shapes differ only in their
  field ids' `call` and in the identity of elementwise maps built per call;
  jit compares pytree structures with `==`, so those would retrace on every
  call. Here field ids compare by `index` and elementwise maps by their
  `structure` (`ntkjax.stax._features.Fn`). The values themselves are kept
  whole for the kernel maps. A value that is not hashable (a traced scale
  inside a map) compares by identity.
  """
  __slots__ = ('values', '_key')

  def __init__(self, values: tuple):
    self.values = values
    self._key = _structural(values)

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key == other._key

  def __hash__(self):
    return hash(self._key)

  def __repr__(self):
    return repr(self.values)


def _structural(value):
  """A hashable key of `value` for `_Static`."""
  if isinstance(value, FieldId):
    return ('field', value.index)
  if isinstance(value, frozenset):
    return frozenset(_structural(v) for v in value)
  if isinstance(value, tuple):
    return tuple(_structural(v) for v in value)
  structure = getattr(value, 'structure', None)
  if structure is not None:
    return _structural(structure)
  try:
    hash(value)
  except TypeError:
    return ('object', id(value))
  return value


def _register(cls, data_fields: list, meta_fields: list):
  """Register a dataclass as a pytree whose metadata is a `_Static`."""
  keys = [jax.tree_util.GetAttrKey(f) for f in data_fields]

  def static_of(obj):
    return _Static(tuple(getattr(obj, f) for f in meta_fields))

  def flatten(obj):
    return [getattr(obj, f) for f in data_fields], static_of(obj)

  def flatten_with_keys(obj):
    # Named keys, as register_dataclass gives: paths read `.ntk` etc.
    return ([(key, getattr(obj, f)) for key, f in zip(keys, data_fields)],
            static_of(obj))

  def unflatten(static, children):
    return cls(**dict(zip(data_fields, children)),
               **dict(zip(meta_fields, static.values)))

  jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten,
                                          flatten)


@dataclasses.dataclass(frozen=True)
class Source:
  """A Gaussian field (pre-activations) or the raw inputs.

  Attributes:
    nngp, ntk, cov1, cov2: second moments and NTK of the field.
    mean1, mean2: channel means for the raw inputs; `None` for a zero-mean
      Gaussian field.
    source_id: identifies the field: branches built from the same field (after
      `FanOut`) are functions of the same random variables, branches built from
      different fields are independent.
    is_input: whether this is the raw input (deterministic, not Gaussian).
    components: ids of the independent Gaussian fields this one is the sum
      of (just `{source_id}` for an affine layer's output). Two sources are
      independent exactly when their components are disjoint.
    spatial: the layout of the arrays over spatial axes (`Spatial`).
    root, scale1, scale2: for a field that is another Gaussian field `root`
      scaled per sample (and position), z_i(p) = scale_i(p) root_i(p), as
      LayerNorm makes of a Gaussian field: the root and the (S..., N1),
      (S..., N2) scales; None otherwise. Branches that rescale one root
      differently can then be summed exactly (x + LayerNorm(x)).
  """
  nngp: Array
  ntk: Array
  cov1: Array
  cov2: Array
  mean1: Optional[Array] = None
  mean2: Optional[Array] = None
  root: Optional['Source'] = None
  scale1: Optional[Array] = None
  scale2: Optional[Array] = None
  source_id: Optional[FieldId] = None
  is_input: bool = False
  components: frozenset = frozenset()
  spatial: Spatial = Spatial()


_register(
    Source,
    data_fields=['nngp', 'ntk', 'cov1', 'cov2', 'mean1', 'mean2', 'root',
                 'scale1', 'scale2'],
    meta_fields=['source_id', 'is_input', 'components', 'spatial'])


@dataclasses.dataclass(frozen=True)
class Term:
  """One of the independent summands that make up a layer's features.

  Attributes:
    nngp, ntk, cov1, cov2: moments of this summand.
    mean1, mean2: its channel means, per sample of x1 / x2 (needed for the
      cross terms when independent summands are added); None until needed
      for a term with a source (computed from `source` and `fn`).
    source: the field this summand is an elementwise function of; `None` when
      the summand is no longer such a function (a product of independent
      branches, a concatenation), so no further nonlinearity can be applied.
    fn: the elementwise map (an `ntkjax.stax._features.Fn`) from the source to
      this summand.
    components: ids of the Gaussian fields this summand depends on; summands
      with disjoint components are independent.
    spatial: the layout of the arrays over spatial axes (`Spatial`).
  """
  nngp: Array
  ntk: Array
  cov1: Array
  cov2: Array
  mean1: Optional[Array]
  mean2: Optional[Array]
  source: Optional[Source] = None
  fn: Any = None
  components: frozenset = frozenset()
  spatial: Spatial = Spatial()


_register(
    Term,
    data_fields=['nngp', 'ntk', 'cov1', 'cov2', 'mean1', 'mean2', 'source'],
    meta_fields=['fn', 'components', 'spatial'])


@dataclasses.dataclass(frozen=True)
class Kernel:
  """Infinite-width kernels of one layer's features on inputs `x1`, `x2`.

  Attributes:
    nngp: `(N1, N2)` NNGP kernel (channel-averaged second moment); with
      spatial axes `(S1, S1', ..., N1, N2)` or `(S1, ..., N1, N2)`, see
      `Spatial` (`kernel_fn(..., get='nngp')` returns the batch-first
      layout of neural-tangents).
    ntk: the neural tangent kernel, laid out like `nngp`.
    cov1: `(N1,)` diagonal of the NNGP kernel of `x1` with itself (batch
      diagonal; spatial covariances as `Spatial` says).
    cov2: `(N2,)` the same for `x2`.
    terms: the independent summands of the features (see module docstring).
    x1_is_x2: whether `x2` was `None` (the kernel is symmetric).
    is_gaussian: whether the features are a Gaussian field (pre-activations).
    is_input: whether the features are the raw inputs.
    shape1, shape2: shapes of the finite network's features on x1, x2; the
      last axis is the channel axis, whose size is the layer's width.
    spatial: the layout of the arrays over spatial axes (`Spatial`).
    sample_ids1, sample_ids2: `(N1,)`, `(N2,)` integer ids of the samples
      when x1 and x2 are (blocks of) one batch, so that equal ids are the same
      sample (the same draw of a dropout mask); None otherwise (see
      `same_sample`).
    pattern1, pattern2: the `pattern` keyword of `kernel_fn` for x1 and x2
      (graph adjacency, for `Aggregate`), batch-first as given; None if not
      given.
    mask1, mask2: boolean `(N1, S...)`, `(N2, S...)` (batch first, one entry
      per position; `(N,)` for features without spatial axes): True where a
      position is masked (`kernel_fn(..., mask_constant=c)`); None without
      masking. Layers that mix positions exclude masked ones.
  """
  nngp: Array
  ntk: Array
  cov1: Array
  cov2: Array
  terms: tuple = ()
  sample_ids1: Optional[Array] = None
  sample_ids2: Optional[Array] = None
  pattern1: Optional[Array] = None
  pattern2: Optional[Array] = None
  mask1: Optional[Array] = None
  mask2: Optional[Array] = None
  x1_is_x2: bool = False
  is_gaussian: bool = False
  is_input: bool = False
  shape1: tuple = ()
  shape2: tuple = ()
  spatial: Spatial = Spatial()

  @property
  def channels(self) -> int:
    """Width (number of channels) of the finite layer."""
    return self.shape1[-1]

  def replace(self, **changes) -> 'Kernel':
    """A copy with the given fields replaced."""
    return dataclasses.replace(self, **changes)

  def same_sample(self) -> Optional[Array]:
    """`(N1, N2)` boolean: whether x1_i and x2_j are the same sample (one
    batch, the same row), or None if x1 and x2 are different batches.

    Layers whose randomness is drawn per sample (dropout masks) correlate a
    sample with itself only; kernels computed in blocks of one batch carry
    the rows' ids so the blocks on the diagonal still know it.
    """
    if self.sample_ids1 is not None:
      return self.sample_ids1[:, None] == self.sample_ids2[None, :]
    if self.x1_is_x2:
      n = self.shape1[0]
      return jax.numpy.eye(n, dtype=bool)
    return None


_register(
    Kernel,
    data_fields=['nngp', 'ntk', 'cov1', 'cov2', 'terms', 'sample_ids1',
                 'sample_ids2', 'pattern1', 'pattern2', 'mask1', 'mask2'],
    meta_fields=['x1_is_x2', 'is_gaussian', 'is_input', 'shape1', 'shape2',
                 'spatial'])


# Names a user may pass as `get`.
KERNEL_FIELDS = ('nngp', 'ntk', 'cov1', 'cov2')
