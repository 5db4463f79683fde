"""Empirical NNGP and NTK of any function `f(params, x, **kwargs)`.

    NNGP_emp(x1, x2) = f(params, x1) (x) f(params, x2)
    NTK_emp(x1, x2)  = sum_p df(params, x1)/dp (x) df(params, x2)/dp

where (x) is the outer product over output axes, with neural-tangents'
conventions for the output axes (the batch axis 0 counts as one):

* `trace_axes`: output axes contracted between the two sides and divided by
  their size (a mean), e.g. the default `(-1,)` averages over logits;
* `diagonal_axes`: output axes on which only the diagonal is kept (one axis
  in the result instead of two);
* every other axis appears twice, interleaved: for f(x) of shape (N, H, O)
  and no trace/diagonal axes the kernel has shape (N1, N2, H1, H2, O1, O2).

Implementations (`NtkImplementation`, values as in neural-tangents):
* JACOBIAN_CONTRACTION: Jacobians by reverse mode, then one contraction per
  parameter leaf. Memory ~ (N1 + N2) x outputs x parameters.
* NTK_VECTOR_PRODUCTS: `vmap` over output basis vectors of a `vjp` on x2
  followed by a `jvp` on x1 (Novak et al. 2022); never forms a Jacobian.
* STRUCTURED_DERIVATIVES and AUTO are not implemented yet (they raise).

`vmap_axes` (None or an int) declares that `f` treats the examples along that
axis of x and f(x) independently, so per-example Jacobians can be computed
with `vmap`; it must be None if examples interact (e.g. batch norm).
"""

from __future__ import annotations

import collections
import enum
import functools
import string
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Axes = Union[int, Sequence[int]]


class NtkImplementation(enum.IntEnum):
  """How the empirical NTK is computed (values as in neural-tangents)."""
  AUTO = 0
  JACOBIAN_CONTRACTION = 1
  NTK_VECTOR_PRODUCTS = 2
  STRUCTURED_DERIVATIVES = 3


# ----------------------------------------------------------------------------
# Output-axis bookkeeping.


def _canonical_axes(axes: Axes, ndim: int, name: str) -> tuple:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(f'{name}={axes}: axis {axis} is out of range for '
                       f'outputs with {ndim} axes.')
  return tuple(sorted({axis % ndim for axis in axes}))


def _subscripts(ndim: int, trace: tuple, diagonal: tuple, extra: int = 0):
  """einsum subscripts (x1 side, x2 side, result) for the output axes.

  `extra` trailing axes (parameter axes) are shared and summed.
  """
  letters = iter(string.ascii_letters)
  side1, side2, result = [], [], []
  for axis in range(ndim):
    a = next(letters)
    if axis in trace:
      side1.append(a)
      side2.append(a)
    elif axis in diagonal:
      side1.append(a)
      side2.append(a)
      result.append(a)
    else:
      b = next(letters)
      side1.append(a)
      side2.append(b)
      result.extend([a, b])
  shared = [next(letters) for _ in range(extra)]
  return ''.join(side1 + shared), ''.join(side2 + shared), ''.join(result)


def _check_outputs(fx1, fx2, trace, diagonal, who):
  if fx1.ndim != fx2.ndim:
    raise ValueError(f'{who}: f(x1) has shape {fx1.shape} and f(x2) has '
                     f'{fx2.shape}; they need the same number of axes.')
  for axis in trace + diagonal:
    if fx1.shape[axis] != fx2.shape[axis]:
      raise ValueError(
          f'{who}: output axis {axis} is traced or diagonal but has size '
          f'{fx1.shape[axis]} on x1 and {fx2.shape[axis]} on x2.')


def _axes_for(fx, trace_axes, diagonal_axes, who):
  trace = _canonical_axes(trace_axes, fx.ndim, 'trace_axes')
  diagonal = _canonical_axes(diagonal_axes, fx.ndim, 'diagonal_axes')
  if set(trace) & set(diagonal):
    raise ValueError(f'{who}: axes {sorted(set(trace) & set(diagonal))} are in '
                     'both trace_axes and diagonal_axes; choose one.')
  return trace, diagonal


def _trace_size(fx, trace) -> int:
  return int(np.prod([fx.shape[a] for a in trace])) if trace else 1


def _call(f, params, x, kwargs, who):
  """f(params, x) with a clear error when params or x do not fit f."""
  try:
    return f(params, x, **kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(f'{who}: calling f(params, x) on x of shape '
                     f'{jnp.shape(x)} failed ({error}); check that params '
                     'come from the same model and x has the shape f '
                     'expects.') from error


# ----------------------------------------------------------------------------
# NNGP.


def empirical_nngp_fn(f: Callable, trace_axes: Axes = (-1,),
                      diagonal_axes: Axes = ()) -> Callable:
  """The empirical NNGP kernel (outer product of outputs) of `f`.

  Args:
    f: `f(params, x, **kwargs) -> array`.
    trace_axes: output axes averaged over (see module docstring).
    diagonal_axes: output axes on which only the diagonal is kept.

  Returns:
    `nngp_fn(x1, x2, params, **kwargs)`; `x2=None` means `x2 = x1`.
  """
  def nngp_fn(x1, x2, params, **kwargs):
    fx1 = _call(f, params, x1, kwargs, 'empirical_nngp_fn')
    fx2 = fx1 if x2 is None else _call(f, params, x2, kwargs,
                                        'empirical_nngp_fn')
    trace, diagonal = _axes_for(fx1, trace_axes, diagonal_axes,
                                'empirical_nngp_fn')
    _check_outputs(fx1, fx2, trace, diagonal, 'empirical_nngp_fn')
    s1, s2, out = _subscripts(fx1.ndim, trace, diagonal)
    return jnp.einsum(f'{s1},{s2}->{out}', fx1, fx2) / _trace_size(fx1, trace)
  return nngp_fn


# ----------------------------------------------------------------------------
# NTK.


def _jacobian(f, params, x, kwargs, vmap_axis: Optional[int]):
  """d f(params, x) / d params as a pytree with leaves (*f(x).shape, *leaf)."""
  if vmap_axis is None:
    return jax.jacrev(lambda p: f(p, x, **kwargs))(params)

  def one_example(xi):
    single = lambda p: jnp.squeeze(
        f(p, jnp.expand_dims(xi, vmap_axis), **kwargs), vmap_axis)
    return jax.jacrev(single)(params)
  jac = jax.vmap(one_example, in_axes=vmap_axis)(x)
  # vmap put the example axis first; move it to where f puts it.
  return jax.tree.map(lambda j: jnp.moveaxis(j, 0, vmap_axis), jac)


def _ntk_jacobian_contraction(f, params, x1, x2, kwargs, trace, diagonal,
                              ndim, vmap_axis):
  j1 = _jacobian(f, params, x1, kwargs, vmap_axis)
  j2 = j1 if x2 is None else _jacobian(f, params, x2, kwargs, vmap_axis)
  total = 0.
  for leaf1, leaf2, p in zip(jax.tree.leaves(j1), jax.tree.leaves(j2),
                             jax.tree.leaves(params)):
    s1, s2, out = _subscripts(ndim, trace, diagonal, extra=jnp.ndim(p))
    total = total + jnp.einsum(f'{s1},{s2}->{out}', leaf1, leaf2)
  return total


def _ntk_vector_products(f, params, x1, x2, kwargs, trace, diagonal, ndim,
                         fx2_shape):
  f1 = lambda p: f(p, x1, **kwargs)
  f2 = lambda p: f(p, x1 if x2 is None else x2, **kwargs)
  _, vjp2 = jax.vjp(f2, params)

  def column(cotangent):
    (param_tangent,) = vjp2(cotangent)
    return jax.jvp(f1, (params,), (param_tangent,))[1]
  size2 = int(np.prod(fx2_shape))
  basis = jnp.eye(size2, dtype=jnp.result_type(*jax.tree.leaves(params)))
  full = jax.vmap(column)(basis.reshape((size2,) + tuple(fx2_shape)))
  full = full.reshape(tuple(fx2_shape) + full.shape[1:])   # (x2 axes, x1 axes)
  s1, s2, out = _subscripts(ndim, trace, diagonal)
  return jnp.einsum(f'{s2}{s1}->{out}', full)


def empirical_ntk_fn(f: Callable, trace_axes: Axes = (-1,),
                     diagonal_axes: Axes = (), vmap_axes: Optional[int] = None,
                     implementation: Union[int, NtkImplementation] =
                     NtkImplementation.JACOBIAN_CONTRACTION) -> Callable:
  """The empirical NTK `J(x1) J(x2)^T` of `f` at `params`.

  Args:
    f: `f(params, x, **kwargs) -> array`; params any pytree.
    trace_axes: output axes averaged over (see module docstring).
    diagonal_axes: output axes on which only the diagonal is kept.
    vmap_axes: None, or the axis of x and f(x) along which examples are
      independent (per-example Jacobians by `vmap`).
    implementation: an `NtkImplementation` (or its int value).

  Returns:
    `ntk_fn(x1, x2, params, **kwargs)`; `x2=None` means `x2 = x1`.
  """
  implementation = NtkImplementation(implementation)
  if implementation in (NtkImplementation.AUTO,
                        NtkImplementation.STRUCTURED_DERIVATIVES):
    raise NotImplementedError(
        f'empirical_ntk_fn: implementation={implementation.name} is not '
        'available yet; use JACOBIAN_CONTRACTION or NTK_VECTOR_PRODUCTS.')
  if vmap_axes is not None and not isinstance(vmap_axes, int):
    raise NotImplementedError(
        f'empirical_ntk_fn: vmap_axes={vmap_axes!r}; only None or an int '
        '(the example axis of x and f(x)) is supported so far.')

  def ntk_fn(x1, x2, params, **kwargs):
    who = 'empirical_ntk_fn'
    fx1 = jax.eval_shape(lambda p: _call(f, p, x1, kwargs, who), params)
    fx2 = fx1 if x2 is None else jax.eval_shape(
        lambda p: _call(f, p, x2, kwargs, who), params)
    trace, diagonal = _axes_for(fx1, trace_axes, diagonal_axes, who)
    _check_outputs(fx1, fx2, trace, diagonal, who)
    size = _trace_size(fx1, trace)
    if implementation == NtkImplementation.JACOBIAN_CONTRACTION:
      ntk = _ntk_jacobian_contraction(f, params, x1, x2, kwargs, trace,
                                      diagonal, fx1.ndim, vmap_axes)
    else:
      ntk = _ntk_vector_products(f, params, x1, x2, kwargs, trace, diagonal,
                                 fx1.ndim, fx2.shape)
    return ntk / size
  return ntk_fn


def empirical_kernel_fn(f: Callable, trace_axes: Axes = (-1,),
                        diagonal_axes: Axes = (),
                        vmap_axes: Optional[int] = None,
                        implementation: Union[int, NtkImplementation] =
                        NtkImplementation.JACOBIAN_CONTRACTION) -> Callable:
  """Both empirical kernels: `kernel_fn(x1, x2, get, params, **kwargs)`.

  Args:
    f, trace_axes, diagonal_axes, vmap_axes, implementation: as in
      `empirical_ntk_fn`.

  Returns:
    `kernel_fn(x1, x2, get, params, **kwargs)`: `get` is 'nngp', 'ntk', a
    tuple of them (a named tuple) or None (both).
  """
  fns = {'nngp': empirical_nngp_fn(f, trace_axes, diagonal_axes),
         'ntk': empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes,
                                 implementation)}

  def kernel_fn(x1, x2, get: Any, params, **kwargs):
    names = ('nngp', 'ntk') if get is None else (
        (get,) if isinstance(get, str) else tuple(get))
    for name in names:
      if name not in fns:
        raise ValueError(f"empirical kernel_fn: unknown get={name!r}; choose "
                         "'nngp', 'ntk' or a tuple of them.")
    values = [fns[name](x1, x2, params, **kwargs) for name in names]
    if isinstance(get, str):
      return values[0]
    return _empirical_tuple(names)(*values)
  return kernel_fn


@functools.lru_cache(maxsize=None)
def _empirical_tuple(names: tuple):
  return collections.namedtuple('EmpiricalKernel', names)
