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
* STRUCTURED_DERIVATIVES: parameters consumed once by a primitive in
  `structured.RULES` (dot_general, convolutions, bias adds, elementwise
  scales) contribute einsum(cotangents, recorded operands) without any
  Jacobian; other parameter leaves fall back to the contraction.
* AUTO: the cheapest of the three by XLA's cost analysis of each, lowered
  on abstract inputs (`ntk_implementation_costs`).

`vmap_axes` says whether `f` treats examples independently, so per-example
Jacobians / cotangents can be computed with `vmap`: 'auto' (the default:
decided from `f`'s jaxpr by `ntkjax.example_axis`, examples along axis 0 of
x), None (examples may interact, e.g. batch norm), an int (the example axis
of x and of f(x)), or `(in_axis, out_axis, {kwarg_name: axis or None})`,
with the example axis of x, of f(x) and of each keyword argument (None:
shared by all examples). An explicit value always wins.

Defaults differ from neural-tangents' (vmap_axes=None,
JACOBIAN_CONTRACTION) on purpose: 'auto' and AUTO give the same kernel, by
the fastest path this module knows (~100x faster for an MLP), while None
remains available for a caller who wants to be explicit.
"""

from __future__ import annotations

import collections
import enum
import functools
import string
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax import _get, _passes, example_axis
from ntkjax import _structured as structured

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


# Full float32 accuracy by default (see `empirical_ntk_fn`).
DEFAULT_PRECISION = 'highest'
_PRECISIONS = {None: None, 'default': 'default', 'high': 'high',
               'highest': 'highest', 'float32': 'highest',
               'tensorfloat32': 'high', 'bfloat16': 'default'}


def _with_precision(precision, who: str):
  """Decorator: trace the kernel function under `precision`.

  `jax.default_matmul_precision` is a tracing-time setting, so under an
  outer `jit` it still applies to everything traced inside.
  """
  if isinstance(precision, jax.lax.Precision):
    precision = {jax.lax.Precision.DEFAULT: 'default',
                 jax.lax.Precision.HIGH: 'high',
                 jax.lax.Precision.HIGHEST: 'highest'}[precision]
  if precision not in _PRECISIONS:
    raise ValueError(f'{who}: precision={precision!r}; use None, '
                     "'default', 'high', 'highest' or a jax.lax.Precision.")
  name = _PRECISIONS[precision]

  def decorate(fn):
    if name is None:
      return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      with jax.default_matmul_precision(name):
        return fn(*args, **kwargs)
    return wrapped
  return decorate


def _trace_size(shape, trace) -> int:
  return int(np.prod([shape[a] for a in trace])) if trace else 1


def _call(f, params, x, kwargs, who):
  """f(params, x) with a clear error when params or x do not fit f."""
  try:
    out = f(params, x, **kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(f'{who}: calling f(params, x) on x of shape '
                     f'{jnp.shape(x)} failed ({error}); check that params '
                     'come from the same model and x has the shape f '
                     'expects.') from error
  if not hasattr(out, 'ndim') or not hasattr(out, 'shape'):
    raise TypeError(
        f'{who}: f(params, x) returned {type(out).__name__}, not one array; '
        'empirical kernels need a single output array. Select or join the '
        'outputs, e.g. lambda p, x: f(p, x)[0] or jnp.concatenate(...).')
  return out


# ----------------------------------------------------------------------------
# NNGP.


def empirical_nngp_fn(f: Callable, trace_axes: Axes = (-1,),
                      diagonal_axes: Axes = (),
                      precision: Any = DEFAULT_PRECISION) -> Callable:
  """The empirical NNGP kernel (outer product of outputs) of `f`.

  Args:
    f: `f(params, x, **kwargs) -> array`.
    trace_axes: output axes averaged over (see module docstring).
    diagonal_axes: output axes on which only the diagonal is kept.
    precision: matmul precision of the calls of `f` and of the contraction
      (see `empirical_ntk_fn`).

  Returns:
    `nngp_fn(x1, x2, params, **kwargs)`; `x2=None` means `x2 = x1`.
  """
  @_with_precision(precision, 'empirical_nngp_fn')
  def nngp_fn(x1, x2, params, **kwargs):
    fx1 = _call(f, params, x1, kwargs, 'empirical_nngp_fn')
    fx2 = fx1 if x2 is None else _call(f, params, x2, kwargs,
                                        'empirical_nngp_fn')
    trace, diagonal = _axes_for(fx1, trace_axes, diagonal_axes,
                                'empirical_nngp_fn')
    _check_outputs(fx1, fx2, trace, diagonal, 'empirical_nngp_fn')
    s1, s2, out = _subscripts(fx1.ndim, trace, diagonal)
    return structured.einsum(f'{s1},{s2}->{out}', fx1, fx2) / _trace_size(
        fx1.shape, trace)
  return nngp_fn


# ----------------------------------------------------------------------------
# NTK.


AUTO_AXES = 'auto'


def _vmap_axes(vmap_axes, kwargs: dict, x, who: str):
  """`vmap_axes` as None or (in_axis, out_axis, {kwarg: axis or None}).

  An int `a` means (a, a, {}): examples along axis a of x and f(x), keyword
  arguments shared by all examples. 'auto' is resolved by `_setup`.
  """
  if vmap_axes is None:
    return None
  if isinstance(vmap_axes, int):
    vmap_axes = (vmap_axes, vmap_axes, {})
  if (not isinstance(vmap_axes, tuple) or len(vmap_axes) != 3 or
      not isinstance(vmap_axes[0], int) or not isinstance(vmap_axes[1], int)
      or not isinstance(vmap_axes[2] or {}, dict)):
    raise ValueError(
        f'{who}: vmap_axes={vmap_axes!r}; use None, an int (the example axis '
        'of x and f(x)), or (in_axis, out_axis, {kwarg_name: axis or None}) '
        'with int in_axis and out_axis.')
  in_axis, out_axis, kwargs_axes = vmap_axes
  kwargs_axes = dict(kwargs_axes or {})
  unknown = set(kwargs_axes) - set(kwargs)
  if unknown:
    raise ValueError(f'{who}: vmap_axes names keyword arguments '
                     f'{sorted(unknown)} that were not passed.')
  for name, axis in kwargs_axes.items():
    if axis is not None and not isinstance(kwargs[name],
                                           (jax.Array, np.ndarray)):
      raise ValueError(f'{who}: vmap_axes maps keyword argument {name!r} '
                       f'along axis {axis}, but it is not an array.')
  if not -jnp.ndim(x) <= in_axis < jnp.ndim(x):
    raise ValueError(f'{who}: vmap_axes in_axis={in_axis} is out of range '
                     f'for x of shape {jnp.shape(x)}.')
  return in_axis % jnp.ndim(x), out_axis, kwargs_axes


def _jacobian(f, params, x, kwargs, vmap, batch_rows: bool = True):
  """d f(params, x) / d params as a pytree with leaves (*f(x).shape, *leaf).

  `batch_rows=False`: one `jacrev` even when large (for the leaf groups of
  `_ntk_jacobian_contraction`, where XLA planned 14 GB for whole groups
  and 20 GB with their rows batched, MLP at O = 10).
  """
  if vmap is None:
    fx = jax.eval_shape(lambda p: f(p, x, **kwargs), params)
    rows = int(np.prod(fx.shape))
    activations = _passes.activation_bytes(f, params, x, kwargs)
    unroll = _passes.convolves(f, params, x, kwargs)
    # Without convolutions: the sum overstates what a pass holds (fusion)
    # and looped rows ran slower: rows batched only past 4x the budget.
    row_bytes = (_passes.param_bytes(params) + activations) / 4
    if not batch_rows or (not unroll and
                          rows * row_bytes <= _passes.JACOBIAN_BLOCK_BYTES):
      return jax.jacrev(lambda p: f(p, x, **kwargs))(params)
    # One reverse pass per output entry, each holding a cotangent of every
    # intermediate of the whole batch: with convolutions `map_passes` runs
    # them in chunks whose cotangents stay small (XLA CPU ran the CNN
    # benchmark's 128 passes in one vmap 1.6x slower than in chunks).
    _, vjp = jax.vjp(lambda p: f(p, x, **kwargs), params)
    basis = jnp.eye(rows, dtype=fx.dtype).reshape((rows,) + fx.shape)
    pullback = lambda e: vjp(e)[0]
    jac = (_passes.map_passes(pullback, basis, _passes.param_bytes(params),
                              activations, unroll=True) if unroll else
           _passes.map_passes(pullback, basis, row_bytes))
    return jax.tree.map(lambda j: j.reshape(fx.shape + j.shape[1:]), jac)
  in_axis, out_axis, kwargs_axes = vmap
  batched = {k: v for k, v in kwargs.items() if kwargs_axes.get(k) is not None}
  shared = {k: v for k, v in kwargs.items() if k not in batched}

  def one_example(xi, kw):
    kw = {k: jnp.expand_dims(v, kwargs_axes[k]) for k, v in kw.items()}
    single = lambda p: jnp.squeeze(
        f(p, jnp.expand_dims(xi, in_axis), **kw, **shared), out_axis)
    return jax.jacrev(single)(params)
  # Examples in chunks (`_passes.map_passes`) when their reverse passes
  # together would pass the working set or the tangents budget.
  n = x.shape[in_axis]
  fx = jax.eval_shape(lambda p: f(p, x, **kwargs), params)
  rows = int(np.prod(fx.shape)) // max(n, 1)
  moved = (jnp.moveaxis(x, in_axis, 0),
           {k: jnp.moveaxis(v, kwargs_axes[k], 0) for k, v in batched.items()})
  if _passes.convolves(f, params, x, kwargs):
    jac = _passes.map_passes(
        lambda xk: one_example(*xk), moved,
        rows * _passes.param_bytes(params),
        rows * _passes.activation_bytes(f, params, x, kwargs) / max(n, 1),
        unroll=True)
  else:
    jac = jax.vmap(lambda xk: one_example(*xk))(moved)
  # vmap put the example axis first; move it to where f puts it.
  return jax.tree.map(lambda j: jnp.moveaxis(j, 0, out_axis), jac)


def _ntk_jacobian_contraction(f, params, x1, x2, kwargs, trace, diagonal,
                              ndim, vmap, group: bool = False):
  if not group:
    groups = _leaf_groups(f, params, x1 if x2 is None else x2, kwargs)
    if len(groups) > 1:
      # J(x2) is materialized whole (a sum over the batch per entry, or
      # every example's with vmap): by groups of parameter leaves it peaks
      # at one group's. The passes repeat only the propagation above each
      # group's layers (without vmap) or one example's (with it).
      leaves, treedef = jax.tree.flatten(params)
      total = jnp.zeros((), jnp.result_type(*leaves))
      for group in groups:
        def f_group(sub, x, group=group, **kw):
          full = list(leaves)
          for i, leaf in zip(group, sub):
            full[i] = leaf
          return f(jax.tree.unflatten(treedef, full), x, **kw)
        # The barrier orders the groups: XLA would otherwise schedule all
        # groups' Jacobians before the contractions (no memory saved).
        total, sub = jax.lax.optimization_barrier(
            (total, [leaves[i] for i in group]))
        total = total + _ntk_jacobian_contraction(
            f_group, sub, x1, x2, kwargs, trace, diagonal, ndim, vmap,
            group=True)
      return total
  s1, s2, out = _subscripts(ndim, trace, diagonal, extra=1)
  fx1 = jax.eval_shape(lambda p: f(p, x1, **kwargs), params)
  axis = 0 if vmap is None else vmap[1] % ndim     # examples in f(x1)
  n1 = fx1.shape[axis]
  row_bytes = np.prod(fx1.shape) // max(n1, 1) * _passes.param_bytes(params)
  block = _passes.block_size(n1, row_bytes)
  j2 = _jacobian(f, params, x1 if x2 is None else x2, kwargs, vmap,
                 batch_rows=not group)
  contract = lambda j1: _contract_jacobians(j1, j2, s1, s2, out, ndim)
  if x2 is None or axis in trace or axis in diagonal or block == n1:
    return contract(j2 if x2 is None else _jacobian(f, params, x1, kwargs,
                                                   vmap))
  inputs, rows = _jacobian_rows(f, params, x1, kwargs, vmap, fx1, block)
  if _passes.convolves(f, params, x1, kwargs):
    blocks = jnp.stack(_passes.sequence(lambda xs: contract(rows(xs)), inputs))
  else:
    blocks = jax.lax.map(lambda xs: contract(rows(xs)),
                         jax.tree.map(lambda *a: jnp.stack(a), *inputs))
  # (blocks, ..., block, ...) -> (..., n1, ...), block-major as in x1.
  k = out.index(s1[axis])
  blocks = jnp.moveaxis(blocks, 0, k)
  return blocks.reshape(blocks.shape[:k] + (n1,) + blocks.shape[k + 2:])


def _leaf_groups(f, params, x2, kwargs) -> list:
  """Parameter leaf indices in consecutive groups whose J(x2) fits
  `_passes.JACOBIAN_BLOCK_BYTES` (a larger leaf is a group of its own)."""
  fx2 = jax.eval_shape(lambda p: f(p, x2, **kwargs), params)
  row_bytes = np.prod(fx2.shape) * jnp.dtype(fx2.dtype).itemsize
  groups, size = [[]], 0
  for i, leaf in enumerate(jax.tree.leaves(params)):
    leaf_bytes = np.size(leaf) * row_bytes
    if groups[-1] and size + leaf_bytes > _passes.JACOBIAN_BLOCK_BYTES:
      groups.append([])
      size = 0
    groups[-1].append(i)
    size += leaf_bytes
  return [g for g in groups if g]


def _jacobian_rows(f, params, x1, kwargs, vmap, fx1, block: int):
  """(inputs, rows): rows(inputs[i]) is the Jacobian of examples
  [i * block, (i + 1) * block) of f(x1)."""
  n1 = fx1.shape[0 if vmap is None else vmap[1] % len(fx1.shape)]
  if vmap is None:
    # f may couple examples: the rows come from reverse passes of the whole
    # batch, one per output entry of these examples (basis vectors).
    _, vjp1 = jax.vjp(lambda p: f(p, x1, **kwargs), params)
    size = int(np.prod(fx1.shape))
    rest = size // n1
    activations = _passes.activation_bytes(f, params, x1, kwargs)
    unroll = _passes.convolves(f, params, x1, kwargs)
    inputs = [jax.nn.one_hot(start * rest + jnp.arange(block * rest), size,
                             dtype=fx1.dtype).reshape((-1,) + fx1.shape)
              for start in range(0, n1, block)]

    def rows(basis):
      (jac,) = (_passes.map_passes(vjp1, basis, _passes.param_bytes(params),
                                   activations, unroll=True)
                if unroll else jax.vmap(vjp1)(basis))
      return jax.tree.map(
          lambda j: j.reshape((block,) + fx1.shape[1:] + j.shape[1:]), jac)
    return inputs, rows
  in_axis, _, kwargs_axes = vmap
  cut = lambda v, a, start: jax.lax.slice_in_dim(v, start, start + block,
                                                 axis=a)
  inputs = [(cut(x1, in_axis, start),
             {k: v if kwargs_axes.get(k) is None else
              cut(v, kwargs_axes[k], start) for k, v in kwargs.items()})
            for start in range(0, n1, block)]
  return inputs, lambda xk: _jacobian(f, params, xk[0], xk[1], vmap)


def _contract_jacobians(j1, j2, s1, s2, out, ndim):
  """sum over leaves of einsum(J1, J2) with one flattened parameter axis."""
  total = 0.
  for leaf1, leaf2 in zip(jax.tree.leaves(j1), jax.tree.leaves(j2)):
    # One parameter axis per leaf, axes of size 1 dropped: XLA's CPU dot
    # ran 1.5x slower with them than the same GEMM on (N, P) operands.
    total = total + structured.einsum(f'{s1},{s2}->{out}',
                                      _flat_params(leaf1, ndim),
                                      _flat_params(leaf2, ndim))
  return total


def _flat_params(jacobian, ndim: int):
  """A leaf's Jacobian (output axes, parameter axes) -> (output axes, P)."""
  return jacobian.reshape(jacobian.shape[:ndim] + (-1,))


def _ntk_vector_products(f, params, x1, x2, kwargs, trace, diagonal, ndim,
                         fx2_shape, vmap):
  """NTK-vector products (Novak et al. 2022): a `vjp` on one side and a
  `jvp` on the other per basis vector of one side's outputs, `vmap`ped.

  With `vmap` (per-example f), the vjp runs on one example of x2 at a time
  and the basis spans that example's outputs only: N2 x O columns, each a
  one-example vjp plus a whole-batch jvp, instead of N2 x O whole-batch
  vjps. The jvp is linearized once (`jax.linearize`), outside the map.
  """
  f1 = lambda p: f(p, x1, **kwargs)
  s1, s2, out = _subscripts(ndim, trace, diagonal)
  if vmap is None:
    # Rows e -> J2 (J1^T e) as the transpose of the linear map
    # d -> J1 (J2^T d) (`jax.linear_transpose`): the same products, but XLA
    # ran the transposed program 1.35x faster than vjp-then-jvp columns.
    f2 = lambda p: f(p, x1 if x2 is None else x2, **kwargs)
    fx1 = jax.eval_shape(f1, params)
    fx2 = jax.eval_shape(f2, params)
    columns = lambda d: jax.jvp(f1, (params,), jax.vjp(f2, params)[1](d))[1]
    rows = jax.linear_transpose(columns, fx2)
    size1 = int(np.prod(fx1.shape))
    basis = jnp.eye(size1, dtype=fx1.dtype).reshape((size1,) + fx1.shape)
    full = _passes.map_passes(
        lambda e: rows(e)[0], basis, _passes.param_bytes(params),
        _passes.activation_bytes(f, params, x1, kwargs),
        unroll=_passes.convolves(f, params, x1, kwargs))
    full = full.reshape(fx1.shape + full.shape[1:])    # (x1 axes, x2 axes)
    return jnp.einsum(f'{s1}{s2}->{out}', full)
  _, jvp1 = jax.linearize(f1, params)
  dtype = jnp.result_type(*jax.tree.leaves(params))
  in_axis, out_axis, kwargs_axes = vmap
  out_axis %= ndim
  batched = {k: v for k, v in kwargs.items() if kwargs_axes.get(k) is not None}
  shared = {k: v for k, v in kwargs.items() if k not in batched}
  one_shape = tuple(d for a, d in enumerate(fx2_shape) if a != out_axis)
  size = int(np.prod(one_shape))
  basis = jnp.eye(size, dtype=dtype).reshape((size,) + one_shape)

  def example_columns(xj, kw):
    kw = {k: jnp.expand_dims(v, kwargs_axes[k]) for k, v in kw.items()}
    single = lambda p: jnp.squeeze(
        f(p, jnp.expand_dims(xj, in_axis), **kw, **shared), out_axis)
    _, vjp2 = jax.vjp(single, params)
    return jax.vmap(lambda e: jvp1(vjp2(e)[0]))(basis)
  moved = (jnp.moveaxis(x1 if x2 is None else x2, in_axis, 0),
           {k: jnp.moveaxis(v, kwargs_axes[k], 0) for k, v in batched.items()})
  full = _passes.map_passes(
      lambda xk: example_columns(*xk), moved,
      size * _passes.param_bytes(params),
      size * _passes.activation_bytes(f, params, x1, kwargs),
      unroll=_passes.convolves(f, params, x1, kwargs))
  # (N2, one example's outputs, f(x1) axes) -> f(x2) axes, f(x1) axes.
  full = full.reshape((full.shape[0],) + one_shape + full.shape[2:])
  full = jnp.moveaxis(full, 0, out_axis)
  return jnp.einsum(f'{s2}{s1}->{out}', full)


def _ntk_structured(f, params, x1, x2, kwargs, trace, diagonal, ndim, vmap):
  prepared1, inputs1 = structured.prepare(f, params, x1, kwargs, vmap)
  side1 = structured.side(prepared1, params, inputs1)
  if x2 is None:
    side2 = side1
  else:
    prepared2, inputs2 = structured.prepare(f, params, x2, kwargs, vmap)
    if prepared2.analysis[:2] != prepared1.analysis[:2]:
      # f traced to different programs on x1 and x2 (shape-dependent
      # Python control flow): the per-leaf pairing is not available.
      return _ntk_jacobian_contraction(f, params, x1, x2, kwargs, trace,
                                       diagonal, ndim, vmap)
    side2 = structured.side(prepared2, params, inputs2)
  s1, s2, result = _subscripts(ndim, trace, diagonal)
  if vmap is not None:
    out_axis = vmap[1] % ndim
    s1 = s1[out_axis] + s1[:out_axis] + s1[out_axis + 1:]
    s2 = s2[out_axis] + s2[:out_axis] + s2[out_axis + 1:]
  return structured.contract(prepared1.program, prepared1.analysis,
                             prepared1.avals, side1, side2, s1, s2, result,
                             vmap is not None)


def empirical_ntk_fn(f: Callable, trace_axes: Axes = (-1,),
                     diagonal_axes: Axes = (), vmap_axes: Any = AUTO_AXES,
                     implementation: Union[int, NtkImplementation] =
                     NtkImplementation.AUTO,
                     precision: Any = DEFAULT_PRECISION) -> Callable:
  """The empirical NTK `J(x1) J(x2)^T` of `f` at `params`.

  Args:
    f: `f(params, x, **kwargs) -> array`; params any pytree.
    trace_axes: output axes averaged over (see module docstring).
    diagonal_axes: output axes on which only the diagonal is kept.
    vmap_axes: 'auto' (detected from f), None, an int, or (in_axis,
      out_axis, {kwarg: axis or None}): where examples are independent (see
      module docstring).
    implementation: an `NtkImplementation` (or its int value); AUTO picks
      the cheapest by XLA's cost analysis.
    precision: matmul precision (`jax.lax.Precision` or its name) of every
      matrix product traced for the kernel: the contractions and the
      forward / derivative passes of `f` (except products where `f` sets its
      own). Default 'highest': full float32 accuracy even where a default
      float32 matmul would run in TF32 or bfloat16 (GPUs, TPUs); free on
      CPUs. None keeps JAX's default.

  Returns:
    `ntk_fn(x1, x2, params, **kwargs)`; `x2=None` means `x2 = x1`.
  """
  implementation = NtkImplementation(implementation)

  @_with_precision(precision, 'empirical_ntk_fn')
  def ntk_fn(x1, x2, params, **kwargs):
    call = _setup(f, x1, x2, params, kwargs, trace_axes, diagonal_axes,
                  vmap_axes, 'empirical_ntk_fn')
    chosen = implementation
    if chosen == NtkImplementation.AUTO:
      chosen = _cheapest(call)
    return _ntk(chosen, call) / _trace_size(call.fx2_shape, call.trace)
  return ntk_fn


class _NtkCall(NamedTuple):
  """One validated call of an ntk_fn: what every implementation needs.

  Attributes:
    f, x1, x2, params, kwargs: the function and its call (x2 None: x1).
    trace, diagonal: the output axes summed over / kept diagonal
      (non-negative ints).
    ndim: the rank of f(x).
    fx2_shape: the shape of f(x2).
    vmap: (in_axis, out_axis, kwargs axes) of a per-example f, or None.
  """
  f: Callable
  x1: Any
  x2: Any
  params: Any
  kwargs: dict
  trace: tuple
  diagonal: tuple
  ndim: int
  fx2_shape: tuple
  vmap: Any


def _setup(f, x1, x2, params, kwargs, trace_axes, diagonal_axes, vmap_axes,
           who) -> _NtkCall:
  """Validates the call; returns it as an `_NtkCall`."""
  fx1 = jax.eval_shape(lambda p: _call(f, p, x1, kwargs, who), params)
  fx2 = fx1 if x2 is None else jax.eval_shape(
      lambda p: _call(f, p, x2, kwargs, who), params)
  trace, diagonal = _axes_for(fx1, trace_axes, diagonal_axes, who)
  _check_outputs(fx1, fx2, trace, diagonal, who)
  if isinstance(vmap_axes, str):
    if vmap_axes != AUTO_AXES:
      raise ValueError(f"{who}: vmap_axes={vmap_axes!r}; use 'auto', None, "
                       'an int or (in_axis, out_axis, {kwarg: axis}).')
    vmap_axes = _detected_axes(f, params, x1, x2, kwargs)
  vmap = _vmap_axes(vmap_axes, kwargs, x1, who)
  if vmap is not None and not -fx1.ndim <= vmap[1] < fx1.ndim:
    raise ValueError(f'{who}: vmap_axes out_axis={vmap[1]} is out of range '
                     f'for f(x) of shape {fx1.shape}.')
  return _NtkCall(f, x1, x2, params, kwargs, trace, diagonal, fx1.ndim,
                  fx2.shape, vmap)


def _detected_axes(f, params, x1, x2, kwargs):
  """vmap_axes='auto': the example axes if `f` is per-example on both
  x1 and x2 (same axes), else None (`example_axis.example_axes`)."""
  axes = example_axis.example_axes(f, params, x1, kwargs)
  if axes is not None and x2 is not None:
    if example_axis.example_axes(f, params, x2, kwargs) != axes:
      return None
  return axes


def ntk_implementation_costs(f: Callable, x1, x2, params,
                             trace_axes: Axes = (-1,),
                             diagonal_axes: Axes = (),
                             vmap_axes=AUTO_AXES, **kwargs) -> dict:
  """AUTO's cost estimate of each implementation (smaller is cheaper).

  Args:
    f: as in `empirical_ntk_fn`.
    x1: as in the call of the `ntk_fn` that `empirical_ntk_fn` returns.
    x2: as in that call.
    params: as in that call.
    trace_axes: as in `empirical_ntk_fn`.
    diagonal_axes: as in `empirical_ntk_fn`.
    vmap_axes: as in `empirical_ntk_fn`.
    **kwargs: as in that call.

  Returns:
    dict `NtkImplementation` -> flops + 8 x bytes accessed, from XLA's cost
    analysis of each implementation lowered on these shapes (nothing runs).
  """
  return _costs(_setup(f, x1, x2, params, kwargs, trace_axes, diagonal_axes,
                       vmap_axes, 'ntk_implementation_costs'))


def _ntk(implementation, call: _NtkCall):
  """The untraced-axes-unnormalised NTK by one implementation."""
  (f, x1, x2, params, kwargs, trace, diagonal, ndim, fx2_shape,
   vmap) = call
  if implementation == NtkImplementation.JACOBIAN_CONTRACTION:
    return _ntk_jacobian_contraction(f, params, x1, x2, kwargs, trace,
                                     diagonal, ndim, vmap)
  if implementation == NtkImplementation.STRUCTURED_DERIVATIVES:
    return _ntk_structured(f, params, x1, x2, kwargs, trace, diagonal, ndim,
                           vmap)
  return _ntk_vector_products(f, params, x1, x2, kwargs, trace, diagonal,
                              ndim, fx2_shape, vmap)


# Relative cost of one byte moved and one flop in AUTO's cost model: peak
# flop rate over memory bandwidth is ~5-10 on a few CPU cores and ~10-20 on
# a GPU (float32 without tensor cores); the counts come from XLA's analysis
# of the unoptimised HLO, which is device independent.
_BYTE_COST = 8.
# Costs within 5% of the cheapest are a tie (XLA's analysis of unoptimised
# HLO is no finer), settled by this order. Measured (benchmarks/results/
# empirical_ntk_cpu.json): on the CNN without vmap, where all three costs
# were within 2%, the vector products ran fastest or within 0.3% of it and
# the Jacobian contraction slowest (3.94 s against 3.40 s at O = 1, 48.8 s
# against 40.6 s at O = 10); with vmap_axes=0 structured derivatives beat
# a Jacobian contraction costed 4.9% above them (0.12 s against 0.15 s).
_COST_TIE = 0.05
_TIE_ORDER = (NtkImplementation.NTK_VECTOR_PRODUCTS,
              NtkImplementation.STRUCTURED_DERIVATIVES,
              NtkImplementation.JACOBIAN_CONTRACTION)
# AUTO's choices, most recently used last: keyed on the user's function, so
# bounded (an unbounded dict kept every function ever passed alive).
_AUTO_CHOICES = collections.OrderedDict()
_AUTO_CHOICES_KEPT = 64


def _costs(call: _NtkCall) -> dict:
  """flops + _BYTE_COST x bytes of each implementation, by XLA's analysis.

  Each candidate is lowered (not compiled, not run) on abstract inputs of
  the same shapes and dtypes.
  """
  spec = lambda t: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), t)
  arrays = {k: v for k, v in call.kwargs.items()
            if isinstance(v, (jax.Array, np.ndarray))}
  static = {k: v for k, v in call.kwargs.items() if k not in arrays}
  costs = {}
  for candidate in (NtkImplementation.STRUCTURED_DERIVATIVES,
                    NtkImplementation.NTK_VECTOR_PRODUCTS,
                    NtkImplementation.JACOBIAN_CONTRACTION):
    def run(a, b, p, kw, candidate=candidate):
      return _ntk(candidate, call._replace(x1=a, x2=b, params=p,
                                           kwargs={**kw, **static}))
    lowered = jax.jit(run).lower(*spec((call.x1, call.x2, call.params,
                                        arrays)))
    analysis = lowered.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    costs[candidate] = (float(analysis.get('flops', 0.)) + _BYTE_COST *
                        float(analysis.get('bytes accessed', 0.)))
  return costs


def auto_choice(costs: dict) -> NtkImplementation:
  """AUTO's pick from `ntk_implementation_costs`' estimates: the cheapest,
  near-ties (within `_COST_TIE`) settled by `_TIE_ORDER`."""
  cheapest = min(costs.values())
  return next(c for c in _TIE_ORDER if costs[c] <= cheapest * (1 + _COST_TIE))


def _cheapest(call: _NtkCall) -> NtkImplementation:
  """AUTO: the implementation with the smallest estimated cost (`_costs`);
  near-ties (within `_COST_TIE`) go to the first in `_TIE_ORDER`.

  The choice is cached per function, shapes, dtypes and axes. If lowering
  fails (e.g. `f` closes over values being traced by an outer
  transformation), STRUCTURED_DERIVATIVES is used: its cost is never
  asymptotically worse than the other two.
  """
  spec = lambda t: jax.tree.map(
      lambda a: ((np.shape(a), str(a.dtype))
                 if isinstance(a, (jax.Array, np.ndarray)) else repr(a)), t)
  key = (call.f, str(spec((call.x1, call.x2, call.params))),
         str(spec(call.kwargs)), call.trace, call.diagonal, repr(call.vmap))
  if key not in _AUTO_CHOICES:
    try:
      choice = auto_choice(_costs(call))
    except Exception:  # noqa: BLE001 -- any failure means "cannot estimate"
      return NtkImplementation.STRUCTURED_DERIVATIVES
    _AUTO_CHOICES[key] = choice
    while len(_AUTO_CHOICES) > _AUTO_CHOICES_KEPT:
      _AUTO_CHOICES.popitem(last=False)
  _AUTO_CHOICES.move_to_end(key)
  return _AUTO_CHOICES[key]


def empirical_kernel_fn(f: Callable, trace_axes: Axes = (-1,),
                        diagonal_axes: Axes = (),
                        vmap_axes: Any = AUTO_AXES,
                        implementation: Union[int, NtkImplementation] =
                        NtkImplementation.AUTO,
                        precision: Any = DEFAULT_PRECISION) -> Callable:
  """Both empirical kernels: `kernel_fn(x1, x2, get, params, **kwargs)`.

  Args:
    f: as in `empirical_ntk_fn`.
    trace_axes: as in `empirical_ntk_fn`.
    diagonal_axes: as in `empirical_ntk_fn`.
    vmap_axes: as in `empirical_ntk_fn`.
    implementation: as in `empirical_ntk_fn`.
    precision: as in `empirical_ntk_fn`.

  Returns:
    `kernel_fn(x1, x2, get, params, **kwargs)`: `get` is 'nngp', 'ntk', a
    tuple of them (a named tuple) or None (both).
  """
  fns = {'nngp': empirical_nngp_fn(f, trace_axes, diagonal_axes, precision),
         'ntk': empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes,
                                 implementation, precision)}

  def kernel_fn(x1, x2, get: Any, params, **kwargs):
    names = _get.requested(get, tuple(fns), 'empirical kernel_fn')
    values = {name: fns[name](x1, x2, params, **kwargs) for name in names}
    return _get.pick(get, values, 'EmpiricalKernel')
  return kernel_fn
