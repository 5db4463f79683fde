"""Combinators: `serial`, `parallel`, `repeat`, `FanOut`, `FanInSum`,
`FanInProd`, `FanInConcat`.

Each composes the finite network's init/apply functions and the layers'
kernel maps; the branch rules for the kernels (what a sum or product of
branches does to the NNGP and NTK) live in `_features.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ntkjax.kernel import Kernel
from ntkjax.stax import _features as features
from ntkjax.stax._features import KernelError
from ntkjax.stax._layer import (KernelFn, Layer, as_layer, branch_kernels,
                               layer, mask_of, same_shapes,
                               zero_masked_outputs)


def _layers(layers, who: str) -> tuple:
  """The combinator's arguments as `Layer`s (clear errors otherwise)."""
  return tuple(as_layer(l, who, i) for i, l in enumerate(layers))


def _check_params_count(params, n_layers: int, who: str):
  """params holds one entry per layer: zip() would silently skip layers
  (params=[] returned the input unchanged)."""
  if not isinstance(params, (tuple, list)) or len(params) != n_layers:
    got = (f'{len(params)} entries' if isinstance(params, (tuple, list))
           else type(params).__name__)
    raise ValueError(
        f'{who}.apply_fn: params has {got} but this network has {n_layers} '
        "layers here; pass the params returned by this network's init_fn.")


def serial(*layers: Layer) -> Layer:
  """Layers applied one after another.

  Args:
    *layers: the layers, first to last.

  Returns:
    A `Layer` whose kernel map is the composition of the layers' maps.
  """
  layers = _layers(layers, 'serial')
  names = [l.kernel_fn.name for l in layers]
  maps = [l.kernel_fn.kernel_map for l in layers]
  name = f'serial({", ".join(names)})'

  def init_fn(key, input_shape):
    params = []
    for a_layer, layer_key in zip(layers, jax.random.split(key, max(len(layers), 1))):
      input_shape, p = a_layer.init_fn(layer_key, input_shape)
      params.append(p)
    return input_shape, tuple(params)

  mask_fns = [l.kernel_fn.mask_fn for l in layers]

  def apply_fn(params, x, *, key=None, rng=None, mask_constant=None,
               mask=None, **kwargs):
    """Args beyond the layers': key/rng (split per layer), mask_constant
    (inputs equal to it are masked; masked outputs come back as zeros) and
    mask (per-position masks, from an enclosing combinator)."""
    key = rng if key is None else key  # `rng`: neural-tangents' name
    keys = ([None] * len(layers) if key is None
            else list(jax.random.split(key, max(len(layers), 1))))
    _check_params_count(params, len(layers), 'serial')
    outermost = mask_constant is not None
    if outermost:
      x, mask = mask_of(x, mask_constant)
    for a_layer, mask_fn, p, layer_key in zip(layers, mask_fns, params, keys):
      if mask is None:
        x = a_layer.apply_fn(p, x, key=layer_key, **kwargs)
      else:
        x = a_layer.apply_fn(p, x, key=layer_key, mask=mask, **kwargs)
        mask = mask_fn(mask)
    return zero_masked_outputs(x, mask) if outermost else x

  def mask_fn(mask):
    for one in mask_fns:
      mask = one(mask)
    return mask

  def kernel_map(k):
    for position, (kernel_map_i, layer_name) in enumerate(zip(maps, names)):
      try:
        k = kernel_map_i(k)
      except KernelError as error:
        raise KernelError(f'in serial layer {position} ({layer_name}): '
                          f'{error}') from None
    return k

  requirements = [l.kernel_fn.input_diagonal for l in layers]

  def input_diagonal(output_diagonal):
    for requirement in reversed(requirements):
      output_diagonal = requirement(output_diagonal)
    return output_diagonal

  # The layers' own kernel maps set the masks; mask_fn is for enclosing
  # combinators' finite networks.
  return Layer(init_fn, apply_fn,
               KernelFn(kernel_map, name, input_diagonal, mask_fn))


def parallel(*layers: Layer) -> Layer:
  """Layers applied to the matching branches of a multi-branch input.

  Args:
    *layers: one layer per branch.

  Returns:
    A `Layer` mapping n branches to n branches.
  """
  layers = _layers(layers, 'parallel')
  maps = [l.kernel_fn.kernel_map for l in layers]
  name = f'parallel({", ".join(l.kernel_fn.name for l in layers)})'

  def check(xs, what):
    if len(xs) != len(layers):
      raise ValueError(f'{name}: received {len(xs)} {what} for {len(layers)} '
                       'layers; use FanOut(n) with n equal to the number of '
                       'layers.')

  def init_fn(key, input_shapes):
    check(input_shapes, 'input shapes')
    keys = jax.random.split(key, max(len(layers), 1))
    outs = [l.init_fn(k, s) for l, k, s in zip(layers, keys, input_shapes)]
    return [o[0] for o in outs], tuple(o[1] for o in outs)

  mask_fns = [l.kernel_fn.mask_fn for l in layers]

  def apply_fn(params, xs, *, key=None, rng=None, mask=None, **kwargs):
    key = rng if key is None else key  # `rng`: neural-tangents' name
    check(xs, 'inputs')
    _check_params_count(params, len(layers), 'parallel')
    keys = ([None] * len(layers) if key is None
            else list(jax.random.split(key, len(layers))))
    if mask is None:
      return [l.apply_fn(p, x, key=k, **kwargs)
              for l, p, x, k in zip(layers, params, xs, keys)]
    return [l.apply_fn(p, x, key=k, mask=m, **kwargs)
            for l, p, x, k, m in zip(layers, params, xs, keys, mask)]

  def mask_fn(masks):
    return [f(m) for f, m in zip(mask_fns, masks)]

  def kernel_map(ks):
    ks = branch_kernels(ks, name)
    if len(ks) != len(layers):
      raise KernelError(f'{name}: received {len(ks)} branches for '
                        f'{len(layers)} layers; use FanOut({len(layers)}).')
    return tuple(m(k) for m, k in zip(maps, ks))

  requirements = [l.kernel_fn.input_diagonal for l in layers]

  def input_diagonal(output_diagonal):
    # One layout for all branches: diagonal only if every branch allows it.
    return all(r(output_diagonal) for r in requirements)

  return Layer(init_fn, apply_fn,
               KernelFn(kernel_map, name, input_diagonal, mask_fn))


def repeat(a_layer: Layer, n: int) -> Layer:
  """`a_layer` applied `n` times (each copy with its own parameters).

  Args:
    a_layer: a layer whose output shape equals its input shape.
    n: number of repetitions (0 gives the identity).

  Returns:
    A `Layer`, equivalent to `serial(*[a_layer] * n)`.
  """
  a_layer = as_layer(a_layer, 'repeat')
  if not isinstance(n, int) or n < 0:
    raise ValueError(f'repeat: n must be an int >= 0, got {n!r}.')
  chain = serial(*([a_layer] * n))
  init_serial = chain.init_fn

  def init_fn(key, input_shape):
    output_shape, params = init_serial(key, input_shape)
    if tuple(output_shape) != tuple(input_shape):
      raise ValueError(
          f'repeat({a_layer.kernel_fn.name}, {n}): the layers map shape '
          f'{tuple(input_shape)} to {tuple(output_shape)}; repeat needs a '
          'layer that keeps the shape (e.g. put the first Dense outside).')
    return output_shape, params

  one = a_layer.kernel_fn.kernel_map
  unrolled = chain.kernel_fn.kernel_map

  def kernel_map(k):
    if n < 2:
      return unrolled(k)
    first = one(k)
    if not _is_fresh_gaussian(first):
      return serial(*([a_layer] * (n - 1))).kernel_fn.kernel_map(first)

    # A block that ends in a fresh Gaussian field (e.g. Relu then Dense) maps
    # (nngp, ntk, cov1, cov2) to the same four arrays: loop over it with
    # lax.scan, so compile time does not grow with n (unrolled, XLA's compile
    # time grows faster than linearly with depth).
    def step(arrays, _):
      out = one(features.gaussian_kernel(*arrays, first))
      if not _is_fresh_gaussian(out):
        raise KernelError(f'repeat: {a_layer.kernel_fn.name} changed the kind of '
                          'kernel it returns between applications.')
      return (out.nngp, out.ntk, out.cov1, out.cov2), None

    arrays, _ = jax.lax.scan(
        step, (first.nngp, first.ntk, first.cov1, first.cov2), None,
        length=n - 1)
    return features.gaussian_kernel(*arrays, first)

  return Layer(init_fn, chain.apply_fn,
               KernelFn(kernel_map, f'repeat({a_layer.kernel_fn.name}, {n})',
                        chain.kernel_fn.input_diagonal,
                        chain.kernel_fn.mask_fn))


def _is_fresh_gaussian(k) -> bool:
  """One zero-mean Gaussian field independent of everything before it."""
  if not (isinstance(k, Kernel) and len(k.terms) == 1):
    return False
  term = k.terms[0]
  return (isinstance(term.fn, features.Linear) and term.fn.scale == 1
          and term.source is not None and not term.source.is_input
          and term.source.components == frozenset([term.source.source_id]))


def FanOut(num: int) -> Layer:
  """Copies the input into `num` branches."""
  return layer(f'FanOut({num})',
               lambda key, shape: ([shape] * num, ()),
               lambda params, x, **kwargs: [x] * num,
               lambda k: (k,) * num, mask_fn=lambda mask: [mask] * num)


def _common_mask(masks):
  """Merging branches: a position stays masked only if it is masked in
  every branch (features of any branch there are kept)."""
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out


def _check_same_input_shapes(shapes, name):
  if len({tuple(s) for s in shapes}) > 1:
    raise ValueError(f'{name}: branch shapes {list(shapes)} differ; they must '
                     'be equal.')


def FanInSum() -> Layer:
  """Sums the branches. Exact for non-Gaussian branches too (see features)."""
  name = 'FanInSum()'

  def init_fn(key, shapes):
    _check_same_input_shapes(shapes, name)
    return shapes[0], ()

  def kernel_map(ks):
    ks = branch_kernels(ks, name)
    same_shapes(ks, name)
    return features.fan_in_sum(ks)

  return layer(name, init_fn, lambda params, xs, **kwargs: sum(xs[1:], xs[0]),
               kernel_map, mask_fn=_common_mask)


def FanInProd() -> Layer:
  """Multiplies the branches elementwise."""
  name = 'FanInProd()'

  def init_fn(key, shapes):
    _check_same_input_shapes(shapes, name)
    return shapes[0], ()

  def apply_fn(params, xs, **kwargs):
    out = xs[0]
    for x in xs[1:]:
      out = out * x
    return out

  def kernel_map(ks):
    ks = branch_kernels(ks, name)
    same_shapes(ks, name)
    return features.fan_in_prod(ks)

  return layer(name, init_fn, apply_fn, kernel_map, mask_fn=_common_mask)


def FanInConcat(axis: int = -1) -> Layer:
  """Concatenates the branches along `axis` (the channel axis for kernels)."""
  name = f'FanInConcat(axis={axis})'

  def checked_axis(ndim: int) -> int:
    # axis % ndim would wrap an out-of-range axis onto a real one.
    if not -ndim <= axis < ndim:
      raise ValueError(f'{name}: axis={axis} is out of range for {ndim}-d '
                       f'features; use an axis in [-{ndim}, {ndim}) (-1, the '
                       'channel axis, for kernels).')
    return axis % ndim

  def init_fn(key, shapes):
    ndim = len(shapes[0])
    ax = checked_axis(ndim)
    rest = [tuple(s[:ax]) + tuple(s[ax + 1:]) for s in shapes]
    _check_same_input_shapes(rest, name)
    size = sum(s[ax] for s in shapes)
    return tuple(shapes[0][:ax]) + (size,) + tuple(shapes[0][ax + 1:]), ()

  def apply_fn(params, xs, **kwargs):
    return jnp.concatenate(xs, axis=axis)

  def kernel_map(ks):
    ks = branch_kernels(ks, name)
    ndim = len(ks[0].shape1)
    if checked_axis(ndim) != ndim - 1:
      raise KernelError(
          f'{name}: kernels support concatenation along the channel axis '
          f'(axis=-1) only; axis={axis} concatenates along the batch axis of '
          'fully connected features.')
    same_shapes(ks, name, axis_free=-1)
    widths = [k.shape1[-1] for k in ks]
    out = features.fan_in_concat(ks, widths)
    total = sum(widths)
    return out.replace(shape1=ks[0].shape1[:-1] + (total,),
                       shape2=ks[0].shape2[:-1] + (total,))

  return layer(name, init_fn, apply_fn, kernel_map, mask_fn=_common_mask)
