"""Which axis of `f(params, x)` holds the examples, read off the jaxpr.

The empirical NTK is much cheaper when `f` treats examples independently:
per-example Jacobians or cotangents can then be taken under `vmap`
(`vmap_axes` in `empirical_ntk_fn`). Users rarely say so, and a wrong
`vmap_axes` silently gives a wrong kernel for functions that couple examples
(batch statistics, attention across the batch, a mean over the batch). This
module decides it from the program itself.

Method: a dependence analysis over the jaxpr of `f` traced on the actual
shapes. Every value gets a label:

* `None`: it does not depend on the examples (parameters, constants);
* an int `k`: it has the example axis at position `k` (size N), and the
  slice `i` along it depends only on example `i` of the inputs;
* `MIXED`: anything else (a slice depends on several examples, or the
  structure is not one this analysis knows).

Labels are propagated primitive by primitive with one rule per primitive
family (`_RULES`); a primitive without a rule maps unlabelled inputs to
unlabelled outputs and anything else to `MIXED`. The analysis is therefore
conservative: it may miss a per-example function (the caller then computes
the kernel without `vmap`, slower but exact), but it never calls a function
per-example that is not, up to the one assumption every `vmap_axes` makes:
that `f` traced on one example runs the same program as on N of them.

A value shared by all examples (label `None`) that has size N > 1 along the
example axis of another operand cannot be sliced per example, so e.g.
`x * m` with a per-example mask `m` passed as a shared keyword argument is
`MIXED`; `example_axes` then retries with array keyword arguments of
leading size N treated as per-example too.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

MIXED = 'mixed'

# Elementwise primitives: operands of the output's rank (or scalars), with
# sizes equal to the output's or 1 (broadcast).
_ELEMENTWISE = frozenset("""
abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp complex
conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc
exp exp2 expm1 floor ge gt igamma igammac imag integer_pow is_finite le lgamma
log log1p logistic lt max min mul ne neg nextafter not or polygamma pow
population_count real reduce_precision rem round rsqrt select_n shift_left
shift_right_arithmetic shift_right_logical sign sin sinh sqrt square
stop_gradient sub tan tanh xor zeta bessel_i0e bessel_i1e regularized_incomplete_beta
random_gamma_grad
""".split())
# Primitives that return their operands unchanged, one output per operand.
_IDENTITY = frozenset({'optimization_barrier', 'device_put',
                       'sharding_constraint', 'mesh_cast', 'reshard'})
_REDUCTIONS = frozenset({'reduce_sum', 'reduce_max', 'reduce_min',
                         'reduce_prod', 'reduce_and', 'reduce_or',
                         'reduce_xor', 'argmax', 'argmin'})
_CUMULATIVE = frozenset({'cumsum', 'cumprod', 'cummax', 'cummin',
                         'cumlogsumexp'})
_WINDOWED = frozenset({'reduce_window_sum', 'reduce_window_max',
                       'reduce_window_min'})
# Calls whose body is a closed jaxpr run once on the operands.
_CALLS = {'pjit': 'jaxpr', 'jit': 'jaxpr', 'closed_call': 'call_jaxpr',
          'core_call': 'call_jaxpr', 'custom_jvp_call': 'call_jaxpr',
          'custom_vjp_call': 'call_jaxpr', 'custom_vjp_call_jaxpr':
          'fun_jaxpr', 'remat': 'jaxpr', 'remat2': 'jaxpr',
          'checkpoint': 'jaxpr'}


def _shape(var) -> tuple:
  return tuple(var.aval.shape) if hasattr(var.aval, 'shape') else ()


def _elementwise(eqn, labels, n):
  out_shape = _shape(eqn.outvars[0])
  axis = None
  for var, label in zip(eqn.invars, labels):
    if label is MIXED:
      return MIXED
    if label is not None:
      if axis not in (None, label):
        return MIXED
      axis = label
  if axis is None:
    return None
  if len(out_shape) <= axis or out_shape[axis] != n:
    return MIXED
  for var, label in zip(eqn.invars, labels):
    shape = _shape(var)
    if label is None and shape and len(shape) == len(out_shape) and (
        shape[axis] != 1 and n != 1):
      return MIXED          # shared operand with N entries along the axis
    if shape and len(shape) != len(out_shape):
      return MIXED
  return axis


def _others_shared(labels) -> bool:
  return all(label is None for label in labels[1:])


def _broadcast_in_dim(eqn, labels, n):
  label = labels[0]
  if not _others_shared(labels):   # dynamic shapes
    return MIXED
  if label is None or label is MIXED:
    return label
  out = eqn.params['broadcast_dimensions'][label]
  return out if _shape(eqn.outvars[0])[out] == n else MIXED


def _reshape(eqn, labels, n):
  label = labels[0]
  if not _others_shared(labels):   # dynamic shapes
    return MIXED
  if label is None or label is MIXED:
    return label
  in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
  before = int(np.prod(in_shape[:label]))
  for j, size in enumerate(out_shape):
    if size == n and int(np.prod(out_shape[:j])) == before:
      return j
  return MIXED


def _squeeze(eqn, labels, n):
  label = labels[0]
  if label is None or label is MIXED:
    return label
  return _drop_axes(label, [d % len(_shape(eqn.invars[0]))
                            for d in eqn.params['dimensions']])


def _drop_axes(label: int, axes):
  """The example axis after `axes` are removed (MIXED if it is one)."""
  if label in axes:
    return MIXED
  return label - sum(a < label for a in axes)


def _transpose(eqn, labels, n):
  label = labels[0]
  if label is None or label is MIXED:
    return label
  return list(eqn.params['permutation']).index(label)


def _along(param):
  """Rule for primitives acting along the axes in `param`: fine unless the
  example axis is one of them; the other axes keep their positions."""
  def rule(eqn, labels, n):
    label = labels[0]
    if label is None or label is MIXED:
      return label
    axes = eqn.params[param]
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return MIXED if label in axes else label
  return rule


def _reduction(eqn, labels, n):
  label = labels[0]
  if not _others_shared(labels):
    return MIXED
  if label is None or label is MIXED:
    return label
  return _drop_axes(label, tuple(eqn.params['axes']))


def _windowed(eqn, labels, n):
  label = labels[0]
  if label is None or label is MIXED:
    return label
  p = eqn.params
  unchanged = (p['window_dimensions'][label] == 1 and
               p['window_strides'][label] == 1 and
               tuple(p['padding'][label]) == (0, 0) and
               p['base_dilation'][label] == 1)
  return label if unchanged else MIXED


def _dot_general(eqn, labels, n):
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lhs, rhs = labels[:2]
  if MIXED in (lhs, rhs):
    return MIXED
  if lhs is None and rhs is None:
    return None
  nl, nr = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
  l_free = [d for d in range(nl) if d not in lc and d not in lb]
  r_free = [d for d in range(nr) if d not in rc and d not in rb]
  if lhs is not None and rhs is not None:
    # Both per example: only as a batch dimension of the product.
    if lhs in lb and rhs in rb and list(lb).index(lhs) == list(rb).index(rhs):
      return list(lb).index(lhs)
    return MIXED
  if lhs is not None:
    return len(lb) + l_free.index(lhs) if lhs in l_free else MIXED
  return len(rb) + len(l_free) + r_free.index(rhs) if rhs in r_free else MIXED


def _conv(eqn, labels, n):
  lhs, rhs = labels[:2]
  if lhs is None and rhs is None:
    return None
  dn = eqn.params['dimension_numbers']
  if (rhs is not None or lhs is MIXED or lhs != dn.lhs_spec[0] or
      eqn.params['batch_group_count'] != 1):
    return MIXED
  return dn.out_spec[0]


def _concatenate(eqn, labels, n):
  if all(l is None for l in labels):
    return None
  if MIXED in labels or len({l for l in labels if l is not None}) != 1:
    return MIXED
  axis = next(l for l in labels if l is not None)
  if axis == eqn.params['dimension'] or (n != 1 and None in labels):
    return MIXED
  return axis


def _pad(eqn, labels, n):
  label, value = labels
  if value is not None:
    return MIXED
  if label is None or label is MIXED:
    return label
  return label if tuple(eqn.params['padding_config'][label]) == (0, 0, 0) \
      else MIXED


def _slice(eqn, labels, n):
  label = labels[0]
  if label is None or label is MIXED:
    return label
  p = eqn.params
  strides = p['strides'] or (1,) * len(p['start_indices'])
  whole = (p['start_indices'][label] == 0 and p['limit_indices'][label] == n
           and strides[label] == 1)
  return label if whole else MIXED


def _dynamic_slice(eqn, labels, n):
  label, indices = labels[0], labels[1:]
  if any(l is not None for l in indices):
    return MIXED
  if label is None or label is MIXED:
    return label
  return label if eqn.params['slice_sizes'][label] == n else MIXED


def _dynamic_update_slice(eqn, labels, n):
  operand, update, indices = labels[0], labels[1], labels[2:]
  if any(l is not None for l in indices):
    return MIXED
  if operand is None and update is None:
    return None
  if operand != update or operand is MIXED:
    return MIXED
  return operand if _shape(eqn.invars[1])[operand] == n else MIXED


def _gather(eqn, labels, n):
  operand, indices = labels[:2]
  dn = eqn.params['dimension_numbers']
  if MIXED in (operand, indices) or dn.operand_batching_dims:
    return MIXED if (operand, indices) != (None, None) else None
  if operand is None and indices is None:
    return None
  out_rank = len(_shape(eqn.outvars[0]))
  if operand is None:
    # Per-example indices into a shared table (an embedding lookup): the
    # output's non-offset axes are the indices' leading axes, in order.
    if indices == len(_shape(eqn.invars[1])) - 1:
      return MIXED          # the index vector axis
    batch_positions = [d for d in range(out_rank) if d not in dn.offset_dims]
    return batch_positions[indices]
  if indices is not None:
    return MIXED
  # Shared indices into per-example data: fine if the example axis is
  # sliced whole and not indexed.
  if (operand in dn.collapsed_slice_dims or operand in dn.start_index_map or
      eqn.params['slice_sizes'][operand] != n):
    return MIXED
  kept = [d for d in range(len(_shape(eqn.invars[0])))
          if d not in dn.collapsed_slice_dims]
  return dn.offset_dims[kept.index(operand)]


def _bitcast(eqn, labels, n):
  label = labels[0]
  same_rank = len(_shape(eqn.invars[0])) == len(_shape(eqn.outvars[0]))
  return label if (label is None or same_rank) else MIXED


_RULES: dict = {
    'broadcast_in_dim': _broadcast_in_dim,
    'reshape': _reshape,
    'squeeze': _squeeze,
    'transpose': _transpose,
    'rev': _along('dimensions'),
    'sort': _along('dimension'),
    'dot_general': _dot_general,
    'conv_general_dilated': _conv,
    'concatenate': _concatenate,
    'pad': _pad,
    'slice': _slice,
    'dynamic_slice': _dynamic_slice,
    'dynamic_update_slice': _dynamic_update_slice,
    'gather': _gather,
    'bitcast_convert_type': _bitcast,
}
_RULES.update({name: _elementwise for name in _ELEMENTWISE})
_RULES.update({name: _reduction for name in _REDUCTIONS})
_RULES.update({name: _along('axis') for name in _CUMULATIVE})
_RULES.update({name: _windowed for name in _WINDOWED})


def _join(a, b):
  return a if a == b else MIXED


def _top_k(eqn, labels, n):
  label = labels[0]
  last = len(_shape(eqn.invars[0])) - 1
  return [MIXED if label == last else label] * len(eqn.outvars)


def _split(eqn, labels, n):
  label = labels[0]
  out = MIXED if label == eqn.params['axis'] else label
  return [out] * len(eqn.outvars)


def _analyze_jaxpr(jaxpr, in_labels: list, const_labels: list, n: int):
  """Labels of `jaxpr`'s outputs given its inputs' (see module docstring)."""
  env = {}
  for var, label in zip(jaxpr.constvars, const_labels):
    env[var] = label
  for var, label in zip(jaxpr.invars, in_labels):
    env[var] = label
  read = lambda v: None if isinstance(v, jex.Literal) else env[v]
  for eqn in jaxpr.eqns:
    labels = [read(v) for v in eqn.invars]
    outs = _equation(eqn, labels, n)
    for var, label in zip(eqn.outvars, outs):
      env[var] = label
  return [read(v) for v in jaxpr.outvars]


def _closed(sub, labels, n):
  if isinstance(sub, jex.ClosedJaxpr):
    return _analyze_jaxpr(sub.jaxpr, labels, [None] * len(sub.consts), n)
  return _analyze_jaxpr(sub, labels, [], n)


def _equation(eqn, labels: list, n: int) -> list:
  """Output labels of one equation."""
  name = eqn.primitive.name
  count = len(eqn.outvars)
  if all(label is None for label in labels):
    return [None] * count   # nothing here depends on the examples
  if name in _RULES and count == 1:
    return [_RULES[name](eqn, labels, n)]
  if name in _IDENTITY:
    return list(labels)[:count]
  if name == 'top_k':
    return _top_k(eqn, labels, n)
  if name == 'split':
    return _split(eqn, labels, n)
  if name == 'sort':
    return [_along('dimension')(eqn, labels, n)] * count
  sub_name = _CALLS.get(name)
  if sub_name and eqn.params.get(sub_name) is not None:
    return _closed(eqn.params[sub_name], labels, n)
  if name == 'cond':
    if labels[0] is not None:
      return [MIXED] * count      # which branch runs depends on examples
    results = [_closed(branch, labels[1:], n)
               for branch in eqn.params['branches']]
    return [functools.reduce(_join, column) for column in zip(*results)]
  if name == 'scan':
    return _scan(eqn, labels, n)
  if name == 'while':
    return _while(eqn, labels, n)
  return [MIXED] * count


def _scan(eqn, labels, n):
  """`lax.scan`: carries by a fixed point, xs/ys lose/gain the leading axis."""
  p = eqn.params
  n_consts, n_carry = p['num_consts'], p['num_carry']
  consts = labels[:n_consts]
  carry = list(labels[n_consts:n_consts + n_carry])
  xs = labels[n_consts + n_carry:]
  if any(l == 0 for l in xs):
    return [MIXED] * len(eqn.outvars)    # scanning over the examples
  x_labels = [l if l in (None, MIXED) else l - 1 for l in xs]
  for _ in range(len(carry) + 2):
    outs = _closed(p['jaxpr'], consts + carry + x_labels, n)
    new = [_join(a, b) for a, b in zip(carry, outs[:n_carry])]
    if new == carry:
      break
    carry = new
  else:
    return [MIXED] * len(eqn.outvars)
  ys = [l if l in (None, MIXED) else l + 1 for l in outs[n_carry:]]
  return carry + ys


def _while(eqn, labels, n):
  """`lax.while_loop`: carries by a fixed point; the predicate must not
  depend on the examples (else each example would stop at its own step)."""
  p = eqn.params
  cond_n, body_n = p['cond_nconsts'], p['body_nconsts']
  cond_consts = labels[:cond_n]
  body_consts = labels[cond_n:cond_n + body_n]
  carry = list(labels[cond_n + body_n:])
  for _ in range(len(carry) + 2):
    outs = _closed(p['body_jaxpr'], body_consts + carry, n)
    new = [_join(a, b) for a, b in zip(carry, outs)]
    if new == carry:
      break
    carry = new
  else:
    return [MIXED] * len(eqn.outvars)
  predicate = _closed(p['cond_jaxpr'], cond_consts + carry, n)[0]
  return carry if predicate is None else [MIXED] * len(eqn.outvars)


# ----------------------------------------------------------------------------
# Entry point.


def output_label(f: Callable, params, x, kwargs: dict,
                 batched_kwargs: tuple = ()):
  """The label of `f(params, x, **kwargs)`'s output (see module docstring).

  Args:
    f: `f(params, x, **kwargs) -> array`.
    params: the call's parameters (arrays or ShapeDtypeStructs).
    x: the call's inputs (arrays or ShapeDtypeStructs); every leaf has the
      examples along axis 0.
    kwargs: the call's keyword arguments (arrays or ShapeDtypeStructs).
    batched_kwargs: names of array keyword arguments with the examples
      along axis 0; other array keyword arguments are shared.

  Returns:
    None, an int (the output's example axis) or `MIXED`.
  """
  arrays = sorted(k for k, v in kwargs.items() if _is_array(v))
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  x_leaves = jax.tree.leaves(x)
  n = int(np.shape(x_leaves[0])[0])
  call = lambda p, xi, kw: f(p, xi, **dict(zip(arrays, kw)), **static)
  spec = lambda t: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), t)
  closed, out = jax.make_jaxpr(call, return_shape=True)(
      spec(params), spec(x), spec([kwargs[k] for k in arrays]))
  if len(jax.tree.leaves(out)) != 1:
    return MIXED
  n_params = len(jax.tree.leaves(params))
  labels = ([None] * n_params + [0] * len(x_leaves) +
            [0 if k in batched_kwargs else None for k in arrays])
  (label,) = _analyze_jaxpr(closed.jaxpr, labels,
                            [None] * len(closed.consts), n)
  return label


def _is_array(value) -> bool:
  return isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 256


def example_axes(f: Callable, params, x, kwargs: dict) -> Optional[tuple]:
  """`vmap_axes` for `f` on these arguments, or None if not per-example.

  The examples are taken to be along axis 0 of every leaf of `x` (the
  convention of neural-tangents and of the kernel functions). Array keyword
  arguments are first taken as shared by all examples; if that does not
  show a per-example function, those with N entries along axis 0 are taken
  as per-example too. Results are cached per function, shapes and dtypes.

  Args:
    f: `f(params, x, **kwargs) -> array`.
    params: the call's parameters.
    x: the call's inputs.
    kwargs: the call's keyword arguments.

  Returns:
    (0, out_axis, {kwarg: 0 or None}) when each example's output depends
    on that example alone; None otherwise (or when it cannot be decided).
  """
  x_leaves = jax.tree.leaves(x)
  if not x_leaves or any(np.ndim(leaf) == 0 for leaf in x_leaves):
    return None
  n = int(np.shape(x_leaves[0])[0])
  if any(np.shape(leaf)[0] != n for leaf in x_leaves):
    return None
  describe = lambda t: str(jax.tree.map(
      lambda a: ((np.shape(a), str(jnp.result_type(a))) if _is_array(a)
                 else repr(a)), t))
  key = (f, describe(params), describe(x), describe(kwargs))
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  candidates = [()]
  per_example = tuple(sorted(
      k for k, v in kwargs.items()
      if _is_array(v) and np.ndim(v) >= 1 and np.shape(v)[0] == n))
  if per_example:
    candidates.append(per_example)
  result = None
  for batched in candidates:
    try:
      label = output_label(f, params, x, kwargs, batched)
    except Exception:  # noqa: BLE001 -- cannot trace: no automatic vmap
      break
    if isinstance(label, int) and not isinstance(label, bool):
      axes = (0, label, {k: (0 if k in batched else None)
                         for k in kwargs if _is_array(kwargs[k])})
      if _single_example_fits(f, params, x, kwargs, axes):
        result = axes
      break
  _CACHE[key] = result
  if len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return result


def _single_example_fits(f, params, x, kwargs, axes) -> bool:
  """Whether `f` on one example gives the output with that axis of size 1.

  The per-example path calls `f` on one example at a time; a function
  whose Python code depends on the batch size (e.g. `jnp.squeeze` of the
  batch axis) would change shape there, so it is not treated per example.
  """
  _, out_axis, kwargs_axes = axes
  one = lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a)[1:]),
                                       jnp.result_type(a))
  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))
  arrays = {k: v for k, v in kwargs.items() if _is_array(v)}
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  call = lambda p, xi, kw: f(p, xi, **kw, **static)
  try:
    full = jax.eval_shape(call, params, x, arrays)
    single = jax.eval_shape(
        call, params, jax.tree.map(one, x),
        {k: one(v) if kwargs_axes.get(k) == 0 else spec(v)
         for k, v in arrays.items()})
  except Exception:  # noqa: BLE001 -- f does not run on one example
    return False
  expected = list(full.shape)
  expected[out_axis] = 1
  return list(single.shape) == expected
