"""The layer contract: `Layer`, the outer `kernel_fn` wrapper, input checks.

Every layer constructor returns a `Layer` (init_fn, apply_fn, kernel_fn).
Inside, each layer has a *kernel map* `Kernel -> Kernel` (or a tuple of
kernels -> ... for branching layers). `KernelFn` is the only place that turns
raw inputs into the input `Kernel`, validates them, compiles the map with
`jax.jit` and selects `get`; combinators compose the maps they read off
`layer.kernel_fn.kernel_map`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax.kernel import KERNEL_FIELDS, Kernel
from ntkjax.stax import features
from ntkjax.stax.features import KernelError

KernelMap = Callable[[Any], Any]
Get = Union[None, str, Sequence[str]]


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
# Inputs -> Kernel.


def _canonical_inputs(x1, x2):
  """Validate raw inputs; return float arrays."""
  def as_float(x, name):
    if not hasattr(x, 'shape'):
      x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      x = jnp.asarray(x, jnp.result_type(float))
    if x.ndim != 2:
      raise ValueError(
          f'kernel_fn: {name} has shape {tuple(x.shape)}; fully connected '
          'networks take inputs of shape (batch, features). Reshape images to '
          '(batch, -1) for a fully connected network.')
    if is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f'kernel_fn: {name} contains NaN or infinite values; '
                       'clean or impute the data first.')
    return x

  x1 = as_float(x1, 'x1')
  if x2 is not None:
    x2 = as_float(x2, 'x2')
    if x1.shape[1:] != x2.shape[1:]:
      raise ValueError(
          f'kernel_fn: x1 has {x1.shape[1]} features per sample but x2 has '
          f'{x2.shape[1]}; both batches must have the same feature dimension.')
    if x1.dtype != x2.dtype:
      dtype = jnp.promote_types(x1.dtype, x2.dtype)
      x1, x2 = x1.astype(dtype), x2.astype(dtype)
  return x1, x2


def input_kernel(x1, x2=None) -> Kernel:
  """The Kernel of the raw inputs: nngp = x1 x2^T / d (DESIGN.md section 2)."""
  d = x1.shape[-1]
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  if x2 is None:
    nngp = dot(x1, x1.T) / d
    nngp = (nngp + nngp.T) / 2  # exactly symmetric, whatever the GEMM does
    cov1 = cov2 = jnp.diagonal(nngp)
    mean1 = mean2 = jnp.mean(x1, axis=-1)
    shape2 = x1.shape
  else:
    nngp = dot(x1, x2.T) / d
    cov1, cov2 = jnp.sum(x1**2, -1) / d, jnp.sum(x2**2, -1) / d
    mean1, mean2 = jnp.mean(x1, -1), jnp.mean(x2, -1)
    shape2 = x2.shape
  source = features.new_source(nngp, jnp.zeros_like(nngp), cov1, cov2,
                               mean1=mean1, mean2=mean2, is_input=True)
  like = Kernel(nngp, nngp, cov1, cov2, x1_is_x2=x2 is None, is_input=True,
                shape1=tuple(x1.shape), shape2=tuple(shape2))
  return features.kernel_from_terms(
      [features.term_of(source, features.Linear(1.))], like, is_input=True)


# ----------------------------------------------------------------------------
# get.


@functools.lru_cache(maxsize=None)
def _kernels_tuple(names: tuple):
  return collections.namedtuple('AnalyticKernel', names)


def canonical_get(get: Get):
  """Validate `get`; return None, a field name, or a tuple of names."""
  if get is None:
    return None
  names = (get,) if isinstance(get, str) else tuple(get)
  for name in names:
    if name not in KERNEL_FIELDS:
      raise ValueError(f'kernel_fn: unknown get={name!r}; choose from '
                       f'{KERNEL_FIELDS} (or None for the whole Kernel).')
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
         if not is_concrete(leaf) and leaf.ndim == 2]
  if len(big) < 2:
    return tree
  shape = leaves[big[0]].shape
  big = [i for i in big if leaves[i].shape == shape]
  unique = {id(leaves[i]): leaves[i] for i in big}
  stacked = jax.lax.optimization_barrier(jnp.stack(list(unique.values())))
  position = {key: n for n, key in enumerate(unique)}
  for i in big:
    leaves[i] = stacked[position[id(leaves[i])]]
  return jax.tree.unflatten(treedef, leaves)


def select(kernel, get):
  """Pick `get` out of a Kernel (or of each Kernel of a branching output)."""
  if not isinstance(kernel, Kernel):
    return type(kernel)(select(k, get) for k in kernel)
  if kernel.x1_is_x2:
    # Quadrature is not exactly symmetric in (i, j); the kernel is.
    symmetrize = lambda a: (a + jnp.swapaxes(a, 0, 1)) / 2
    kernel = kernel.replace(nngp=symmetrize(kernel.nngp),
                            ntk=symmetrize(kernel.ntk))
  if get is None:
    return _computed_together(kernel)
  if isinstance(get, str):
    return getattr(kernel, get)
  return _computed_together(
      _kernels_tuple(get)(*(getattr(kernel, name) for name in get)))


# ----------------------------------------------------------------------------
# The outer kernel_fn.


class KernelFn:
  """`kernel_fn(x1, x2=None, get=None)`: a layer's infinite-width kernels.

  Args (of a call):
    x1: `(N1, d)` inputs, or a `Kernel` (then `x2` must be None).
    x2: `(N2, d)` inputs, or None for `x2 = x1` (a symmetric kernel).
    get: None for the whole `Kernel`, a field name ('nngp', 'ntk', 'cov1',
      'cov2'), or a tuple of names (returns a named tuple).

  Returns:
    The requested kernel(s). Calls run op by op; for speed wrap them in
    `jax.jit(kernel_fn, static_argnames='get')` (as with neural-tangents).
    Not jitting by default keeps very deep networks cheap to call once: XLA's
    compile time grows faster than linearly with depth.
  """

  def __init__(self, kernel_map: KernelMap, name: str):
    self.kernel_map = kernel_map
    self.name = name

  def __call__(self, x1, x2=None, get: Get = None, **kwargs):
    if kwargs:
      raise TypeError(f'{self.name}.kernel_fn got unexpected keyword arguments '
                      f'{sorted(kwargs)}.')
    get = canonical_get(get)
    if isinstance(x1, Kernel):
      if x2 is not None:
        raise ValueError('kernel_fn: pass x2=None when x1 is a Kernel.')
      return select(self.kernel_map(x1), get)
    x1, x2 = _canonical_inputs(x1, x2)
    return select(self.kernel_map(input_kernel(x1, x2)), get)

  def __repr__(self):
    return f'<kernel_fn of {self.name}>'


def layer(name: str, init_fn: Callable, apply_fn: Callable,
          kernel_map: KernelMap) -> Layer:
  """Assemble a `Layer` from its three parts."""
  return Layer(init_fn, apply_fn, KernelFn(kernel_map, name))


def kernel_map_of(a_layer: Layer) -> KernelMap:
  """The kernel map of any layer (ours, or a bare callable kernel_fn)."""
  kernel_fn = a_layer[2]
  if isinstance(kernel_fn, KernelFn):
    return kernel_fn.kernel_map
  raise TypeError(f'{kernel_fn!r} is not an ntkjax kernel_fn; build layers '
                  'with ntkjax.stax.')
