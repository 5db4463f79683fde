"""The layer contract: `Layer`, the outer `kernel_fn` wrapper, input checks.

Every layer constructor returns a `Layer` (init_fn, apply_fn, kernel_fn).
Inside, each layer has a *kernel map* `Kernel -> Kernel` (or a tuple of
kernels -> ... for branching layers). `KernelFn` is the only place that turns
raw inputs into the input `Kernel`, validates them, compiles the map with
`jax.jit` and selects `get`; combinators compose the maps they read off
`layer.kernel_fn.kernel_map`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax import _get
from ntkjax.kernel import KERNEL_FIELDS, Kernel, Spatial, fresh_field_ids
from ntkjax import _runtime_checks as runtime_checks
from ntkjax.stax import _features as features
from ntkjax.stax._features import KernelError

KernelMap = Callable[[Any], Any]
Get = _get.Get


class Layer(NamedTuple):
  """A layer: the finite network's init/apply and the infinite-width kernel.

  Attributes:
    init_fn: `(key, input_shape) -> (output_shape, params)`.
    apply_fn: `(params, x, *, key=None, **kwargs) -> y`.
    kernel_fn: `(x1, x2=None, get=None) -> Kernel | array | namedtuple`; a
      `KernelFn`, whose `kernel_map` combinators compose.
  """
  init_fn: Callable
  apply_fn: Callable
  kernel_fn: 'KernelFn'


# ----------------------------------------------------------------------------
# Checks shared by layers.


def is_concrete(x) -> bool:
  """Whether `x` has a value now (is not being traced by jit/grad/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def check_nonnegative(value, name: str, layer: str):
  """Raise if a concrete hyperparameter is negative or not finite."""
  if value is None or not is_concrete(value):
    return
  array = np.asarray(value)
  if not np.all(np.isfinite(array)) or np.any(array < 0):
    raise ValueError(f'{layer}: {name}={value!r} must be a finite number >= 0 '
                     '(it is a standard deviation).')


def single_kernel(k, layer: str) -> Kernel:
  """Return `k` if it is one Kernel; a clear error for several branches."""
  if isinstance(k, Kernel):
    return k
  raise KernelError(
      f'{layer} received {len(k)} branches; merge them first with FanInSum(), '
      'FanInProd() or FanInConcat().')


def branch_kernels(ks, layer: str) -> tuple:
  """Return the branches as a tuple; a clear error for a single Kernel."""
  if isinstance(ks, Kernel):
    raise KernelError(f'{layer} combines branches but received one; split '
                      'the input with FanOut(n) and parallel(...) first.')
  return tuple(ks)


def same_shapes(ks: Sequence[Kernel], layer: str, axis_free: Optional[int] = None):
  """Raise unless branches have equal feature shapes (except `axis_free`)."""
  def strip(shape):
    shape = list(shape)
    if axis_free is not None:
      del shape[axis_free]
    return tuple(shape)
  shapes = [strip(k.shape1) for k in ks]
  if len(set(shapes)) > 1:
    raise KernelError(f'{layer}: branches have different feature shapes '
                      f'{[k.shape1 for k in ks]}; they must agree'
                      + (' except on the concatenation axis.' if axis_free
                         is not None else '. Add Dense layers to match widths.'))


# ----------------------------------------------------------------------------
# Masks (variable-length inputs).


def mask_of(x, mask_constant):
  """Inputs with masked entries zeroed, and the per-position mask.

  An entry is masked where it equals `mask_constant` (any NaN when
  `mask_constant` is NaN), as in neural-tangents. Masked entries become 0; a
  position (all but the channel axis) is masked when all its channels are,
  and every layer that mixes positions then leaves it out.

  Args:
    x: inputs (N, ..., C).
    mask_constant: the padding value, or None (no masking).

  Returns:
    (x with masked entries zeroed, boolean mask of shape x.shape[:-1]), or
    (x, None) when mask_constant is None.
  """
  if mask_constant is None:
    return x, None
  constant = jnp.asarray(mask_constant, x.dtype)
  entries = jnp.where(jnp.isnan(constant), jnp.isnan(x), x == constant)
  return jnp.where(entries, jnp.zeros((), x.dtype), x), jnp.all(entries, -1)


def same_mask(mask):
  """The default mask map: the layer acts position by position."""
  return mask


def zero_masked_outputs(y, mask):
  """Finite-network outputs with masked positions zeroed (mask (N, S...))."""
  if mask is None:
    return y
  return jnp.where(mask[..., None], jnp.zeros((), y.dtype), y)


# ----------------------------------------------------------------------------
# Inputs -> Kernel.


def _canonical_inputs(x1, x2, mask_constant=None):
  """Validate raw inputs; return float arrays. With mask_constant=NaN, NaN
  entries are padding (masked), so only infinite entries are refused."""
  def any_bad(a):
    if mask_constant is None:
      return np.any(~np.isfinite(a)) if is_concrete(a) else jnp.any(
          ~jnp.isfinite(a))
    return jnp.any(jnp.where(jnp.isnan(mask_constant), jnp.isinf(a),
                             ~jnp.isfinite(a)))

  def as_float(x, name):
    if not hasattr(x, 'shape'):
      x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      x = jnp.asarray(x, jnp.result_type(float))
    if x.ndim < 2:
      raise ValueError(
          f'kernel_fn: {name} has shape {tuple(x.shape)}; inputs are '
          '(batch, features) for fully connected networks or (batch, '
          'spatial..., channels) for convolutional ones.')
    message = (f'kernel_fn: {name} contains NaN or infinite values; clean '
               'or impute the data first.')
    # numpy, not jnp: a concrete array captured by an outer jit is checked
    # here, while jnp.isfinite of it would be traced. Traced inputs are
    # checked when the compiled program runs.
    bad = any_bad(np.asarray(x) if is_concrete(x) else x)
    if is_concrete(bad):
      if bool(bad):
        raise ValueError(message)
    else:
      x = runtime_checks.fail_if(bad, ValueError, message, keep=x)
    return x

  x1 = as_float(x1, 'x1')
  if x2 is not None:
    x2 = as_float(x2, 'x2')
    if x1.shape[1:] != x2.shape[1:]:
      raise ValueError(
          f'kernel_fn: x1 samples have shape {tuple(x1.shape[1:])} but x2 '
          f'samples have {tuple(x2.shape[1:])}; both batches must have the '
          'same per-sample shape.')
    if x1.dtype != x2.dtype:
      dtype = jnp.promote_types(x1.dtype, x2.dtype)
      x1, x2 = x1.astype(dtype), x2.astype(dtype)
  return x1, x2


def _power_of_two_scaled(x):
  """(x / s, s) with s the power of two at or below max |x| where products
  of entries could overflow (else 1): dividing by a power of two is exact.

  s is max |x| with its mantissa bits cleared, two bit operations
  (jnp.frexp / ldexp added ~0.3 s to the compile time of a small network).
  """
  largest = jnp.max(jnp.abs(x))
  bits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[largest.dtype.itemsize]
  info = jnp.finfo(largest.dtype)
  exponent_mask = ((1 << info.nexp) - 1) << info.nmant
  scale = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(largest, bits) & exponent_mask,
      largest.dtype)
  # Only inputs whose products could overflow are scaled: other kernels keep
  # exactly the arithmetic they had (blocked and unblocked kernels agree to
  # the last bit, which a scale that differs per block would not keep).
  channels = x.shape[-1]
  needs_scale = largest > np.sqrt(info.max / channels) / 4
  scale = jnp.where(needs_scale & (scale > 0), scale,
                    jnp.ones((), largest.dtype))
  return x / scale, scale


def input_kernel(x1, x2=None, diagonal_spatial: bool = False,
                 sample_ids=None, pattern=(None, None),
                 masks=(None, None)) -> Kernel:
  """The Kernel of the raw inputs (DESIGN.md section 2).

  Inputs are (N, S_1, ..., S_s, C): the channel axis is last, s >= 0 spatial
  axes between. nngp_ij(p, p') = <x1_i(p), x2_j(p')> / C for every pair of
  positions (or only p = p' with `diagonal_spatial`), laid out as
  `ntkjax.kernel.Spatial` describes; the channel means are kept for the
  bookkeeping of sums of non-Gaussian branches.

  Args:
    x1, x2: input batches (x2 None: x2 = x1).
    diagonal_spatial: keep only same-position covariances.
    sample_ids: None, or `(ids1, ids2)` when x1 and x2 are blocks of one
      batch (`Kernel.same_sample`).
    pattern: `(pattern1, pattern2)` for `Aggregate` layers (None: none).
    masks: `(mask1, mask2)` per-position masks (`mask_of`; the inputs'
      masked entries must already be zero), or None.

  Returns:
    The input `Kernel`.
  """
  spatial = Spatial(x1.ndim - 2, bool(diagonal_spatial) and x1.ndim > 2)
  channels = x1.shape[-1]
  letters = 'abcdefgh'[:spatial.ndim]
  if spatial.full:
    upper = letters.upper()
    pairs = ''.join(a + b for a, b in zip(letters, upper))
    cross = f'n{letters}z,m{upper}z->{pairs}nm'
    own = f'n{letters}z,n{upper}z->{pairs}n'
  else:
    cross = f'n{letters}z,m{letters}z->{letters}nm'
    own = f'n{letters}z,n{letters}z->{letters}n'
  # Inputs divided by a power of two near their largest entry (exact), and
  # the averages scaled back at the end: products and sums of entries
  # beyond ~1e19 would overflow float32 although the kernel (their average
  # product) may be representable.
  scaled1, scale1 = _power_of_two_scaled(x1)
  scaled2, scale2 = (scaled1, scale1) if x2 is None else _power_of_two_scaled(x2)
  dot = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  second = x1 if x2 is None else x2
  nngp = dot(cross, scaled1, scaled2) / channels * scale1 * scale2
  if x2 is None:
    nngp = (nngp + spatial.swap(nngp)) / 2  # exactly symmetric
  cov1 = dot(own, scaled1, scaled1) / channels * scale1 * scale1
  cov2 = cov1 if x2 is None else (
      dot(own, scaled2, scaled2) / channels * scale2 * scale2)
  # Channel means, positions first: (S..., N).
  mean1 = jnp.moveaxis(jnp.mean(scaled1, -1) * scale1, 0, -1)
  mean2 = mean1 if x2 is None else jnp.moveaxis(
      jnp.mean(scaled2, -1) * scale2, 0, -1)
  source = features.new_source(nngp, jnp.zeros_like(nngp), cov1, cov2,
                               mean1=mean1, mean2=mean2, is_input=True,
                               spatial=spatial)
  ids1, ids2 = (None, None) if sample_ids is None else sample_ids
  pattern1, pattern2 = pattern
  like = Kernel(nngp, nngp, cov1, cov2, x1_is_x2=x2 is None, is_input=True,
                shape1=tuple(x1.shape), shape2=tuple(second.shape),
                spatial=spatial, sample_ids1=ids1, sample_ids2=ids2,
                pattern1=pattern1, pattern2=pattern2, mask1=masks[0],
                mask2=masks[1])
  return features.kernel_from_terms(
      [features.term_of(source, features.Linear(1.))], like, is_input=True)


def _canonical_pattern(pattern, x1, x2) -> tuple:
  """`(pattern1, pattern2)` from the `pattern` keyword (None, one array for
  x2 = None, or a pair); batch sizes checked against the inputs."""
  if pattern is None:
    return None, None
  if isinstance(pattern, (tuple, list)):
    if len(pattern) != 2:
      raise ValueError('kernel_fn: pattern must be one array or a pair '
                       '(pattern1, pattern2).')
    pattern1, pattern2 = pattern
  else:
    pattern1, pattern2 = pattern, None
  if pattern2 is None and x2 is None:
    pattern2 = pattern1
  elif (pattern1 is None) != (pattern2 is None):
    raise ValueError('kernel_fn: x2 is given, so pass pattern=(pattern1, '
                     'pattern2) with one pattern for each batch.')
  second = x1 if x2 is None else x2
  for name, p, x in (('pattern1', pattern1, x1), ('pattern2', pattern2, second)):
    if p is not None and (not hasattr(p, 'shape') or p.shape[:1] != x.shape[:1]):
      raise ValueError(f'kernel_fn: {name} must be an array with one entry '
                       f'per sample ({x.shape[0]}), got '
                       f'{getattr(p, "shape", type(p))}.')
  return pattern1, pattern2


# ----------------------------------------------------------------------------
# get.


def canonical_get(get: Get):
  """Validate `get` (`ntkjax._get`); return None (the whole Kernel), a field
  name, or a tuple of names."""
  if get is None:
    return None
  names = _get.requested(get, KERNEL_FIELDS, 'kernel_fn')
  return get if isinstance(get, str) else names


def _computed_together(tree):
  """The same pytree, with its (N1, N2) arrays computed in one XLA fusion.

  Under jit, XLA gives each output its own fusion and fuses the whole chain
  of elementwise layers into each, re-computing every layer once per output
  (and, through the layers' own fan-out, more): 5x slower at depth 6.
  Returning one stacked array makes XLA compute them in one pass. (XLA's
  CPU pipeline drops the optimization barrier itself; the stack is what
  matters, the barrier keeps the slicing from being folded back into it.)
  Eagerly this would only add a copy, so it is skipped.
  """
  leaves, treedef = jax.tree.flatten(tree)
  big = [i for i, leaf in enumerate(leaves)
         if not is_concrete(leaf) and leaf.ndim >= 2]
  if len(big) < 2:
    return tree
  shape, dtype = leaves[big[0]].shape, leaves[big[0]].dtype
  big = [i for i in big if leaves[i].shape == shape
         and leaves[i].dtype == dtype]
  unique = {id(leaves[i]): leaves[i] for i in big}
  stacked = jax.lax.optimization_barrier(jnp.stack(list(unique.values())))
  position = {key: n for n, key in enumerate(unique)}
  for i in big:
    leaves[i] = stacked[position[id(leaves[i])]]
  return jax.tree.unflatten(treedef, leaves)


def select(kernel, get):
  """Pick `get` out of a Kernel (or of each Kernel of a branching output).

  Fields picked by name come in neural-tangents' batch-first layout
  (`Spatial.public`); `get=None` returns the Kernel itself, whose spatial
  arrays keep the positions-first layout the kernel maps use.
  """
  if not isinstance(kernel, Kernel):
    return type(kernel)(select(k, get) for k in kernel)
  if kernel.x1_is_x2:
    # Quadrature is not exactly symmetric in (i, j); the kernel is.
    symmetrize = lambda a: (a + kernel.spatial.swap(a)) / 2
    kernel = kernel.replace(nngp=symmetrize(kernel.nngp),
                            ntk=symmetrize(kernel.ntk))
  if get is None:
    return _computed_together(kernel)
  spatial = kernel.spatial
  field = lambda name: spatial.public(getattr(kernel, name),
                                      2 if name in ('nngp', 'ntk') else 1)
  if isinstance(get, str):
    return field(get)
  return _computed_together(_get.pick(
      get, {name: field(name) for name in get}, 'AnalyticKernel'))


# ----------------------------------------------------------------------------
# The outer kernel_fn.


def keeps_layout(output_diagonal: bool) -> bool:
  """The default spatial requirement: a layer that acts position by
  position (Dense, activations, Conv) can run pixel-diagonal exactly when its
  output may be pixel-diagonal."""
  return output_diagonal


# Pairs per block are chosen so one kernel array of a block holds about this
# many entries (float32: 1 MB), a size that stays in a core's L2/L3 cache.
_BLOCK_ENTRIES = 2**18
# Inputs of x2 per block: the innermost (contiguous, vectorized) axis.
_BLOCK_COLUMNS = 64


def _pair_blocks(x1, x2, diagonal: bool) -> Optional[tuple]:
  """(rows, columns) per block of pairs for spatial kernels, or None."""
  if x1.ndim < 3:
    return None
  positions = int(np.prod(x1.shape[1:-1]))
  per_pair = positions if diagonal else positions**2
  n1 = x1.shape[0]
  n2 = n1 if x2 is None else x2.shape[0]
  # Anything larger than one block is blocked: the Flatten benchmark
  # network at 100 x 100 (640k pixel-diagonal entries) ran 1.8x faster in
  # blocks than in one pass through memory.
  if n1 * n2 * per_pair <= _BLOCK_ENTRIES:
    return None
  # As many blocks as the sizes above ask for, but of equal sizes: padding
  # rows and columns are computed and dropped (n2 = 100 in blocks of 64
  # computed 128 columns, 28% more work than 2 blocks of 50).
  def balanced(n, most):
    count = -(-n // max(1, min(n, most)))
    return -(-n // count)
  columns = balanced(n2, _BLOCK_COLUMNS)
  rows = balanced(n1, _BLOCK_ENTRIES // (columns * per_pair))
  return rows, columns


class KernelFn:
  """`kernel_fn(x1, x2=None, get=None)`: a layer's infinite-width kernels.

  Args (of a call):
    x1: `(N1, d)` or `(N1, S_1, ..., S_s, C)` inputs (channels last), or a
      `Kernel` (then `x2` must be None).
    x2: inputs like x1, or None for `x2 = x1` (a symmetric kernel).
    get: None for the whole `Kernel`, a field name ('nngp', 'ntk', 'cov1',
      'cov2'), or a tuple of names (returns a named tuple).
    diagonal_spatial: for a network whose *output* has spatial axes (e.g. it
      ends in a Conv): False (default) returns the covariances between all
      pairs of positions, True only same-position ones (cheaper). Inside the
      network the layout is decided from the architecture: layers before a
      `Flatten` keep only same-position covariances, layers before a pooling
      layer keep them all (`ntkjax.kernel.Spatial`).

  Returns:
    The requested kernel(s). Calls run op by op; for speed wrap them in
    `jax.jit(kernel_fn, static_argnames='get')` (as with neural-tangents).
    Not jitting by default keeps very deep networks cheap to call once: XLA's
    compile time grows faster than linearly with depth.

  Attributes (set once, at construction; a KernelFn is immutable):
    kernel_map: the layer's `Kernel -> Kernel` map (combinators compose it).
    name: the layer's name, used in error messages.
    input_diagonal: `output_may_be_diagonal -> input_may_be_diagonal`, the
      layer's spatial requirement (combinators compose it backwards).
    mask_fn: how the finite network maps per-position masks of its input
      to those of its output (combinators compose it forwards).
  """

  # __weakref__: jax.jit(kernel_fn) keeps a weak reference to it.
  __slots__ = ('kernel_map', 'name', 'input_diagonal', 'mask_fn',
               '__weakref__')

  def __init__(self, kernel_map: KernelMap, name: str,
               input_diagonal: Callable[[bool], bool] = keeps_layout,
               mask_fn: Callable = same_mask):
    # Frozen: layers are shared between networks (serial(block, block)), so
    # changing one after construction would change every network using it.
    for field, value in (('kernel_map', kernel_map), ('name', name),
                         ('input_diagonal', input_diagonal),
                         ('mask_fn', mask_fn)):
      object.__setattr__(self, field, value)

  def __setattr__(self, field, value):
    raise AttributeError(
        f'{self.name}.kernel_fn is immutable (cannot set {field!r}); build '
        'a new layer instead.')

  def __delattr__(self, field):
    self.__setattr__(field, None)

  def __reduce__(self):
    # Pickled (Dask ships kernel_fns to workers) by its constructor, as the
    # default slots protocol would restore the fields with __setattr__.
    return KernelFn, (self.kernel_map, self.name, self.input_diagonal,
                      self.mask_fn)

  def __call__(self, x1, x2=None, get: Get = None,
               diagonal_spatial: Optional[bool] = None, pattern=None,
               mask_constant=None, **kwargs):
    if kwargs:
      raise TypeError(f'{self.name}.kernel_fn got unexpected keyword arguments '
                      f'{sorted(kwargs)}.')
    # Fields created by this call are numbered from 0 (`fresh_field_ids`),
    # so a Kernel output has the same pytree structure on every call.
    with fresh_field_ids():
      return self._call(x1, x2, get, diagonal_spatial, pattern,
                        mask_constant)

  def _call(self, x1, x2, get, diagonal_spatial, pattern, mask_constant):
    get = canonical_get(get)
    if isinstance(x1, Kernel):
      if x2 is not None or pattern is not None or mask_constant is not None:
        raise ValueError('kernel_fn: pass x2=None and no pattern when x1 is a '
                         'Kernel (the Kernel carries its own).')
      return select(self.kernel_map(x1), get)
    if diagonal_spatial is not None and not isinstance(diagonal_spatial,
                                                       (bool, np.bool_)):
      # bool('no') is True: a string or number would silently mean True.
      raise TypeError(f'{self.name}.kernel_fn: diagonal_spatial must be True, '
                      f'False or None, got {diagonal_spatial!r}.')
    x1, x2 = _canonical_inputs(x1, x2, mask_constant)
    pattern = _canonical_pattern(pattern, x1, x2)
    diagonal = self.input_diagonal(bool(diagonal_spatial))
    if get is not None and _pair_blocks(x1, x2, diagonal) is not None:
      out = self._by_blocks(x1, x2, get, diagonal, bool(diagonal_spatial),
                            pattern, mask_constant)
    else:
      out = select(self._outputs(x1, x2, diagonal, bool(diagonal_spatial),
                                 pattern=pattern,
                                 mask_constant=mask_constant), get)
    return self._check_finite(out, x1.dtype)

  def _check_finite(self, out, dtype):
    """`out`, checked: finite inputs (checked before) must give a finite
    kernel; a NaN or infinite entry is an overflow (or a custom kernel
    function's NaN), and is reported instead of returned."""
    if isinstance(out, Kernel) or (isinstance(out, (tuple, list)) and out
                                   and isinstance(out[0], Kernel)):
      kernels = [out] if isinstance(out, Kernel) else list(out)
      arrays = [getattr(k, name) for k in kernels for name in KERNEL_FIELDS]
    else:
      arrays = [out] if hasattr(out, 'shape') else list(out)
    arrays = [a for a in arrays if hasattr(a, 'shape')]
    largest = float(jnp.finfo(dtype).max)
    return runtime_checks.fail_if(
        runtime_checks.any_not_finite(*arrays), FloatingPointError,
        f'{self.name}.kernel_fn: the kernel has NaN or infinite entries '
        f'although the inputs are finite. In {jnp.dtype(dtype).name} '
        f'(largest number {largest:.3g}) that is an overflow: kernels grow '
        'like |x|^2 and by W_std^2 per layer (ReLU-like networks exactly '
        'so). Rescale the inputs or W_std, or compute in float64 '
        "(jax.config.update('jax_enable_x64', True) before creating "
        'arrays). A custom Elementwise nngp_fn returning NaN also ends '
        'here.', keep=out)

  def _outputs(self, x1, x2, diagonal: bool, diagonal_output: bool,
               sample_ids=None, pattern=(None, None),
               mask_constant=None) -> Kernel:
    """The kernel map on the inputs' Kernel, pixel-diagonal at the output if
    asked (a pooling layer may have needed all pairs of positions before),
    with the covariances of masked output positions zeroed."""
    x1, mask1 = mask_of(x1, mask_constant)
    x2, mask2 = (None, mask1) if x2 is None else mask_of(x2, mask_constant)
    kernel = self.kernel_map(input_kernel(x1, x2, diagonal, sample_ids,
                                          pattern, (mask1, mask2)))
    if isinstance(kernel, Kernel) and kernel.mask1 is not None:
      kernel = features.zero_masked(kernel)
    if diagonal_output and isinstance(kernel, Kernel) and kernel.spatial.full:
      kernel = features.same_positions(kernel)
    return kernel

  def _by_blocks(self, x1, x2, get, diagonal: bool, diagonal_output: bool,
                 pattern=(None, None), mask_constant=None):
    """The kernels computed over blocks of pairs in `lax.map` loops.

    For spatial inputs every layer makes several passes over arrays of
    N1 N2 P^2 entries (P positions); at 100 x 100 8x8 images that is 160 MB
    per array, so unblocked the passes run at memory speed. Blocks of
    b1 x b2 pairs (~1 MB per array) stay in cache: an outer loop over blocks
    of x2, an inner one over blocks of x1. Everything computed from the x2
    block alone (its variances through the layers) is invariant in the
    inner loop, which XLA hoists out of it; the x1 block's own variances are
    recomputed per block, b1 P^2 entries against b1 b2 P^2 pair entries.
    Each pair's kernel depends only on the pair, so the blocks are exact;
    padding rows (repeats of the last one) are dropped. For x2 = None the
    blocks carry their rows' sample ids, so layers that correlate a sample
    only with itself (Dropout) still see which pairs are the same sample;
    per-sample `pattern`s are cut into blocks with their inputs.
    """
    names = (get,) if isinstance(get, str) else tuple(get)
    x2_given = x2
    x2 = x1 if x2 is None else x2
    b1, b2 = _pair_blocks(x1, x2, diagonal)
    n1, n2 = x1.shape[0], x2.shape[0]
    r1, r2 = -(-n1 // b1), -(-n2 // b2)

    def blocks(x, count, size):
      missing = count * size - x.shape[0]
      x = jnp.concatenate([x, jnp.repeat(x[-1:], missing, 0)]) if missing else x
      return x.reshape((count, size) + x.shape[1:])

    maybe_blocks = lambda a, count, size: (
        None if a is None else blocks(a, count, size))
    ids = jnp.arange(n1) if x2_given is None else None
    rows = (blocks(x1, r1, b1), maybe_blocks(ids, r1, b1),
            maybe_blocks(pattern[0], r1, b1))
    cols = (blocks(x2, r2, b2), maybe_blocks(ids, r2, b2),
            maybe_blocks(pattern[1], r2, b2))
    wanted = tuple(sorted(set(names) | {'nngp'}, key=KERNEL_FIELDS.index))

    def public(kernel, name):
      return kernel.spatial.public(getattr(kernel, name),
                                   2 if name in ('nngp', 'ntk') else 1)

    def block_kernel(row, col):
      (x_row, ids_row, pattern_row), (x_col, ids_col, pattern_col) = row, col
      sample_ids = None if ids_row is None else (ids_row, ids_col)
      return self._outputs(x_row, x_col, diagonal, diagonal_output,
                           sample_ids, (pattern_row, pattern_col),
                           mask_constant)

    def column(col):
      def row(row_block):
        kernel = block_kernel(row_block, col)
        return tuple(public(kernel, name) for name in wanted)
      return jax.lax.map(row, rows)

    out = dict(zip(wanted, jax.lax.map(column, cols)))
    first = lambda blocks_: jax.tree.map(lambda a: a[0], blocks_)
    spatial = jax.eval_shape(block_kernel, first(rows), first(cols)).spatial
    result = {}
    for name in names:
      a = out[name]          # (r2, r1, block's public layout...)
      if name in ('nngp', 'ntk'):
        rest = a.shape[4:]   # (r2, r1, b1, b2, rest) -> (r1 b1, r2 b2, rest)
        a = jnp.transpose(a, (1, 2, 0, 3) + tuple(range(4, a.ndim)))
        a = a.reshape((r1 * b1, r2 * b2) + rest)[:n1, :n2]
        if x2_given is None:
          a = (a + spatial.swap_public(a)) / 2
      elif name == 'cov1':
        a = a[0].reshape((r1 * b1,) + a.shape[3:])[:n1]
      else:
        a = a[:, 0].reshape((r2 * b2,) + a.shape[3:])[:n2]
      result[name] = a
    if x2_given is None and 'cov1' in result and 'cov2' in result:
      # One batch: its second variances are its first, bit for bit (the
      # row and column blocks compute them in differently fused programs).
      result['cov2'] = result['cov1']
    return _get.pick(get, result, 'AnalyticKernel')

  def __repr__(self):
    return f'<kernel_fn of {self.name}>'


def layer(name: str, init_fn: Callable, apply_fn: Callable,
          kernel_map: KernelMap,
          input_diagonal: Callable[[bool], bool] = keeps_layout,
          mask_fn: Optional[Callable] = None) -> Layer:
  """Assemble a `Layer` from its three parts (and its spatial requirement,
  see `KernelFn.input_diagonal`).

  Args:
    name, init_fn, apply_fn, kernel_map, input_diagonal: the layer.
    mask_fn: how the layer maps per-position masks (N, S...) of its input
      to those of its output (a list per branch for branching layers); None
      for layers that act position by position (the mask passes through).
      The kernel map is wrapped to set the output Kernel's masks.

  Returns:
    A `Layer`.
  """
  if mask_fn is None:
    return Layer(init_fn, apply_fn, KernelFn(kernel_map, name, input_diagonal))

  def masked_kernel_map(k):
    out = kernel_map(k)
    ks = [k] if isinstance(k, Kernel) else list(k)
    if all(kernel.mask1 is None for kernel in ks):
      return out
    single = isinstance(k, Kernel)
    masks = [mask_fn(k.mask1 if single else [kk.mask1 for kk in ks]),
             mask_fn(k.mask2 if single else [kk.mask2 for kk in ks])]
    if isinstance(out, Kernel):
      return out.replace(mask1=masks[0], mask2=masks[1])
    return type(out)(o.replace(mask1=m1, mask2=m2)
                     for o, m1, m2 in zip(out, masks[0], masks[1]))

  return Layer(init_fn, apply_fn,
               KernelFn(masked_kernel_map, name, input_diagonal, mask_fn))


def as_layer(a_layer, who: str, position: Optional[int] = None) -> Layer:
  """`a_layer` as a `Layer`, or a clear error naming the combinator.

  A plain tuple `(init_fn, apply_fn, kernel_fn)` of an ntkjax layer (e.g.
  one rebuilt by the user) is accepted; anything else is refused, because
  a combinator needs the kernel_fn's kernel map to compose the kernels.

  Args:
    a_layer: a `Layer` or a 3-tuple.
    who: the combinator, for the message.
    position: the argument's position, for the message.

  Returns:
    The `Layer`.
  """
  if isinstance(a_layer, Layer):
    return a_layer
  where = f'{who}: ' + ('' if position is None else f'argument {position} ')
  if not (isinstance(a_layer, (tuple, list)) and len(a_layer) == 3):
    raise TypeError(f'{where}is {type(a_layer).__name__}, not a layer '
                    '(init_fn, apply_fn, kernel_fn); build layers with '
                    'ntkjax.stax (did you pass a layer constructor without '
                    'calling it, e.g. stax.Relu instead of stax.Relu()?).')
  init_fn, apply_fn, kernel_fn = a_layer
  if not isinstance(kernel_fn, KernelFn):
    raise TypeError(f'{where}has kernel_fn {kernel_fn!r}, which is not an '
                    'ntkjax kernel_fn; build layers with ntkjax.stax.')
  return Layer(init_fn, apply_fn, kernel_fn)
