"""Structured derivatives: the empirical NTK without forming Jacobians.

For a parameter W consumed by one equation y = op(..., W, ...) that is linear
in W, the chain rule factors the Jacobian of the outputs through y:

    df/dW = (df/dy) (dy/dW),

and dy/dW is known in closed form. Write g = df/dy (one cotangent per output
entry o). For a contraction y = dot_general(a, W), J[o] = g[o] . a, so

    NTK_W[o1, o2] = <J1[o1], J2[o2]> = einsum(g1, a1, g2, a2)

(indices of W shared between the two sides and summed). `jnp.einsum`'s path
optimizer then picks the cheapest order, typically (a1 . a2) * (g1 . g2): for
a dense layer of width n_in -> n_out and per-example cotangents this costs
N1 N2 (n_in + O^2 n_out) instead of N1 N2 O^2 n_in n_out for the Jacobian
contraction (Novak, Sohl-Dickstein & Schoenholz 2022, "Fast finite width
neural tangent kernel").

The rules are one table, `RULES`: primitive name -> `Rule`, each stating
(a) when it applies (which operand holds the parameter view, conditions on
the equation's parameters), (b) what to record during the forward pass and
(c) the einsum subscripts, for ONE side, of the cotangent g of y and of the
records, the parameter's dimensions named by letters shared between the two
sides and every other dimension by a letter private to its side:

  dot_general      y = a . W            J = g . a          records a
  conv             y = conv(a, W)       J = g . patches(a) records the patches
  add, add_any     y = a + b            J = sum_bcast g    records nothing
  sub              y = a - b, b - a     J = -/+ sum_bcast g  records the sign
  mul              y = a * s            J = sum_bcast g * a  records a
  div              y = s / a            J = sum_bcast g / a  records 1 / a
  broadcast_in_dim y = broadcast(b)     J = sum_new g      records nothing

"sum_bcast" sums over the dimensions of y along which the parameter view is
broadcast (size 1 against a larger size, or a scalar): JAX emits a bias add
`x @ W + b` as `broadcast_in_dim` of b to (1, n) (size preserving, a view)
and an `add` with size-1 broadcasting, or as a plain `add` when `f` is traced
on one example without a batch axis; a bias broadcast that grows the size
(`jnp.broadcast_to`) is the `broadcast_in_dim` rule. For a bias the kernel is
einsum(g1[o1, ..., c], g2[o2, ..., c]) with the broadcast dimensions summed
on each side first (`jnp.einsum` sums an axis private to one operand before
contracting). That is the same work as the per-leaf fallback (a bias's
Jacobian is exactly g summed over the broadcast axes, and XLA compiles both
to the same cost); likewise for a scale. Their rules put every standard
layer on the structured path, with no per-leaf Jacobian output, rather than
saving flops. Adding a primitive is one entry in `RULES`.

How it is done, with public JAX APIs only: the jaxpr of `f` (from
`jax.make_jaxpr`) is flattened (nested `jit` calls inlined) and re-evaluated
primitive by primitive with `Primitive.bind` (`jax.extend.core`). Each
structured equation's output gets an additive perturbation `delta`
(zero), so g = df/d(delta) comes from one reverse pass per output entry
(`vmap` of `vjp` over output basis vectors), and the rule's records are
taken on the way. Parameter *views* are followed through reshape, transpose,
dtype conversion, size-preserving broadcasts and multiplication by a
parameter-free scalar (the scale enters the NTK squared).

Fallback, never failure: a parameter leaf that is used more than once (after
its views), used by a primitive without a rule or whose rule does not apply
(a grouped convolution, a custom_jvp function, a nonlinearity, ...), used by
an equation that also consumes another parameter view, or returned directly
is handled by the Jacobian contraction for that leaf alone: its Jacobian
comes out of the same reverse pass as the cotangents g.
"""

from __future__ import annotations

import string
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex

# Primitives whose sub-jaxpr is inlined (semantically transparent calls).
_INLINE = frozenset({'pjit', 'jit', 'closed_call', 'core_call'})
# Primitives that only relabel the entries of their input (bijections).
_RELABEL = frozenset({'reshape', 'transpose', 'convert_element_type',
                      'squeeze', 'expand_dims', 'copy', 'copy_p', 'rev'})


class _Const(NamedTuple):
  """A literal operand of a flattened equation."""
  value: Any


class _Step(NamedTuple):
  """One primitive application; operands are slots (ints) or `_Const`s."""
  primitive: Any
  params: dict
  inputs: tuple
  outputs: tuple


class Program(NamedTuple):
  """A flattened jaxpr: every variable is an integer slot."""
  param_slots: tuple
  input_slots: tuple
  const_slots: tuple
  const_values: tuple
  steps: tuple
  outputs: tuple            # slots or `_Const`s
  out_tree: Any


def _flatten(closed, out_tree, n_inputs: int) -> Program:
  """Flattens `closed` (a ClosedJaxpr of f(params, x)) into a `Program`."""
  counter = iter(range(1 << 62))
  steps = []

  def atom(env, var):
    if isinstance(var, jex.Literal):
      return _Const(var.val)
    return env[var]

  def inline(jaxpr, consts_slots, in_atoms):
    env = dict(zip(jaxpr.constvars, consts_slots))
    env.update(zip(jaxpr.invars, in_atoms))
    for eqn in jaxpr.eqns:
      ins = tuple(atom(env, v) for v in eqn.invars)
      sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
      if eqn.primitive.name in _INLINE and isinstance(sub, jex.ClosedJaxpr):
        const_slots = []
        for value in sub.consts:
          slot = next(counter)
          steps.append(_Step(None, {'value': value}, (), (slot,)))
          const_slots.append(slot)
        results = inline(sub.jaxpr, const_slots, ins)
        env.update(zip(eqn.outvars, results))
        continue
      outs = tuple(next(counter) for _ in eqn.outvars)
      env.update(zip(eqn.outvars, outs))
      steps.append(_Step(eqn.primitive, dict(eqn.params), ins, outs))
    return tuple(atom(env, v) for v in jaxpr.outvars)

  jaxpr = closed.jaxpr
  const_slots = tuple(next(counter) for _ in jaxpr.constvars)
  in_slots = tuple(next(counter) for _ in jaxpr.invars)
  outputs = inline(jaxpr, const_slots, in_slots)
  n_params = len(in_slots) - n_inputs
  return Program(in_slots[:n_params], in_slots[n_params:], const_slots,
                 tuple(closed.consts), tuple(steps), outputs, out_tree)


def einsum(subscripts: str, *operands, **kwargs):
  """`jnp.einsum` with the axes of size 1 everywhere left out, then put back.

  XLA's CPU dot ran 1.5x slower on (N, 1, P) x (N, 1, P) than on the same
  (N, P) x (N, P) GEMM (one output, the usual case in NTK benchmarks), so
  every kernel contraction goes through here.

  Args:
    subscripts: explicit einsum subscripts ('ab,cb->ac'; no ellipsis).
    *operands: the arrays.
    **kwargs: passed to `jnp.einsum`.

  Returns:
    The same array as `jnp.einsum(subscripts, *operands)`.
  """
  inputs, output = subscripts.split('->')
  terms = inputs.split(',')
  sizes = {}
  for term, operand in zip(terms, operands):
    for letter, size in zip(term, np.shape(operand)):
      sizes.setdefault(letter, set()).add(size)
  unit = {letter for letter, s in sizes.items() if s == {1}}
  if not unit:
    return jnp.einsum(subscripts, *operands, **kwargs)
  keep = lambda term: ''.join(l for l in term if l not in unit)
  squeezed = [jnp.reshape(operand, tuple(
      d for l, d in zip(term, np.shape(operand)) if l not in unit))
      for term, operand in zip(terms, operands)]
  result = jnp.einsum(','.join(keep(t) for t in terms) + '->' + keep(output),
                      *squeezed, **kwargs)
  return result.reshape(tuple(max(sizes[l]) for l in output))


def trace_program(f: Callable, params, x) -> Program:
  """The flattened jaxpr of `f(params, x)` (x may be a ShapeDtypeStruct)."""
  closed, out_shape = jax.make_jaxpr(f, return_shape=True)(params, x)
  return _flatten(closed, jax.tree.structure(out_shape),
                  len(jax.tree.leaves(x)))


def _bind(step: _Step, args: list) -> list:
  bound = step.primitive.get_bind_params(step.params)
  if isinstance(bound, tuple):          # older JAX: (subfuns, params)
    subfuns, bound = bound
    args = [*subfuns, *args]
  out = step.primitive.bind(*args, **bound)
  return list(out) if step.primitive.multiple_results else [out]


# ----------------------------------------------------------------------------
# The rule table: one entry per primitive that is linear in one operand.


class Rule(NamedTuple):
  """How a primitive y = op(..., v, ...), linear in the parameter view v at
  operand `position`, is contracted (see the module docstring's table).

  Attributes:
    applies: `(step, position, avals) -> bool`, whether the rule covers a
      parameter view at operand `position` of `step`.
    record: `(step, args, position) -> tuple of arrays`, what the forward
      pass keeps: the factors of dy/dv other than the identity.
    subscripts: `(step, position, avals, shared, fresh) -> (y, records)`,
      einsum subscripts for ONE side of the cotangent g = df/dy (its axes
      after the output axes) and of each recorded array. `shared(key)` is
      the letter of v's dimension `key` (the same on both sides, so summed
      between them); `fresh()` is a letter private to this side (summed on
      this side, e.g. a dimension of y along which v is broadcast).
      Then J_v[o] = einsum(g[o], *records) over the side's letters.
  """
  applies: Callable
  record: Callable
  subscripts: Callable


def _shape(avals: dict, operand) -> tuple:
  """Shape of a slot or of a literal constant operand."""
  if isinstance(operand, _Const):
    return np.shape(operand.value)
  return tuple(avals[operand].shape)


def _rank(avals: dict, operand) -> int:
  """Number of axes of a slot or of a literal constant operand."""
  return len(_shape(avals, operand))


def _dot_letters(step, position, avals, shared, fresh):
  """dot_general, v at `position`, a the other operand: J = g . a.

  y's axes are (batch, lhs free, rhs free); a's contracting and batch axes
  carry the letters of v's matching axes, its free axes fresh letters (the
  same letters in y, so they are summed between g and a on this side).
  """
  (lc, rc), (lb, rb) = step.params['dimension_numbers']
  i = position
  v_ndim = _rank(avals, step.inputs[i])
  a_ndim = _rank(avals, step.inputs[1 - i])
  v_c, a_c = (rc, lc) if i == 1 else (lc, rc)
  v_b, a_b = (rb, lb) if i == 1 else (lb, rb)
  a_letters = []
  for d in range(a_ndim):
    if d in a_c:
      a_letters.append(shared(v_c[list(a_c).index(d)]))
    elif d in a_b:
      a_letters.append(shared(v_b[list(a_b).index(d)]))
    else:
      a_letters.append(fresh())
  a_free = [a_letters[d] for d in range(a_ndim)
            if d not in a_c and d not in a_b]
  v_free = [shared(d) for d in range(v_ndim) if d not in v_c and d not in v_b]
  batch = [shared(d) for d in v_b]
  y = batch + (v_free + a_free if i == 0 else a_free + v_free)
  return ''.join(y), (''.join(a_letters),)


def _conv_applies(step, position, avals):
  # A grouped convolution is block diagonal in the kernel: not this rule.
  return (position == 1 and step.params['feature_group_count'] == 1 and
          step.params['batch_group_count'] == 1)


def _conv_patches(step, args, position):
  """conv(a, W) = patches(a) . W: the patches are the operand to record."""
  p = step.params
  rhs_spec = p['dimension_numbers'].rhs_spec
  filter_shape = tuple(np.shape(args[1])[d] for d in rhs_spec[2:])
  return (lax.conv_general_dilated_patches(
      args[0], filter_shape, p['window_strides'], p['padding'],
      p['lhs_dilation'], p['rhs_dilation'], p['dimension_numbers'],
      precision=lax.Precision.HIGHEST),)


def _conv_letters(step, position, avals, shared, fresh):
  """conv: y[b, C, s...] = patches[b, K, s...] W[K, C]; batch and spatial
  axes fresh (summed on this side), K and C shared."""
  ndim = _rank(avals, step.inputs[0])
  out_spec = step.params['dimension_numbers'].out_spec
  patches, y = [None] * ndim, [None] * ndim
  patches[out_spec[0]] = y[out_spec[0]] = fresh()
  patches[out_spec[1]], y[out_spec[1]] = shared('K'), shared('C')
  for d in out_spec[2:]:
    patches[d] = y[d] = fresh()
  return ''.join(y), (''.join(patches),)


def _broadcast_letters(y_shape, v_shape, shared, fresh):
  """Letters of y for an elementwise op whose operand v broadcasts to y.

  lax's binary ops take equal ranks with size-1 broadcasting, or a scalar:
  axis d of y is v's axis d where the sizes agree (shared), and is summed
  on this side (fresh) where v has size 1 or is a scalar.
  """
  if len(v_shape) == 0:
    return ''.join(fresh() for _ in y_shape)
  return ''.join(shared(d) if v_shape[d] == y_shape[d] else fresh()
                 for d in range(len(y_shape)))


def _elementwise_applies(step, position, avals):
  v = _shape(avals, step.inputs[position])
  y = _shape(avals, step.outputs[0])
  return (len(step.inputs) == 2 and
          (len(v) == 0 or (len(v) == len(y) and
                           all(a in (1, b) for a, b in zip(v, y)))))


def _add_letters(step, position, avals, shared, fresh):
  """y = a + v: dy/dv = 1, J_v[o] = sum over v's broadcast axes of g[o]."""
  y = _shape(avals, step.outputs[0])
  return (_broadcast_letters(y, _shape(avals, step.inputs[position]), shared,
                             fresh), ())


def _sub_record(step, args, position):
  """y = a - v: dy/dv = -1 (squares away in the NTK, kept for exactness)."""
  dtype = jnp.result_type(args[position])
  return () if position == 0 else (-jnp.ones((), dtype),)


def _sub_letters(step, position, avals, shared, fresh):
  y, _ = _add_letters(step, position, avals, shared, fresh)
  return y, (() if position == 0 else ('',))


def _mul_letters(step, position, avals, shared, fresh):
  """y = a * v (or v / a with the record 1 / a): dy/dv = a, elementwise, so
  J_v[o] = sum over v's broadcast axes of g[o] * a. a's axes take y's
  letters, except its own size-1 (broadcast) axes, which get fresh ones."""
  y_shape = _shape(avals, step.outputs[0])
  a_shape = _shape(avals, step.inputs[1 - position])
  y = _broadcast_letters(y_shape, _shape(avals, step.inputs[position]),
                         shared, fresh)
  if len(a_shape) == 0:
    return y, ('',)
  a = ''.join(y[d] if a_shape[d] == y_shape[d] else fresh()
              for d in range(len(y_shape)))
  return y, (a,)


def _broadcast_applies(step, position, avals):
  return position == 0 and len(step.inputs) == 1


def _broadcast_in_dim_letters(step, position, avals, shared, fresh):
  """y = broadcast_in_dim(v): axis broadcast_dimensions[j] of y is v's axis
  j (shared, unless v has size 1 there); the other axes of y are new.
  J_v[o] = sum over the new and size-1-broadcast axes of g[o]."""
  y_shape = _shape(avals, step.outputs[0])
  v_shape = _shape(avals, step.inputs[0])
  dims = list(step.params['broadcast_dimensions'])
  y = []
  for d in range(len(y_shape)):
    j = dims.index(d) if d in dims else None
    y.append(shared(j) if j is not None and v_shape[j] == y_shape[d]
             else fresh())
  return ''.join(y), ()


_always = lambda step, position, avals: True
_nothing = lambda step, args, position: ()
_ADD = Rule(_elementwise_applies, _nothing, _add_letters)

RULES = {
    'dot_general': Rule(_always,
                        lambda step, args, i: (args[1 - i],), _dot_letters),
    'conv_general_dilated': Rule(_conv_applies, _conv_patches, _conv_letters),
    'add': _ADD,
    'add_any': _ADD,
    'sub': Rule(_elementwise_applies, _sub_record, _sub_letters),
    'mul': Rule(_elementwise_applies,
                lambda step, args, i: (jnp.asarray(args[1 - i]),),
                _mul_letters),
    # Only v / a is linear in v; a / v is not (it stays a fallback).
    'div': Rule(lambda step, i, avals: i == 0 and _elementwise_applies(
                    step, i, avals),
                lambda step, args, i: (1 / jnp.asarray(args[1]),),
                _mul_letters),
    'broadcast_in_dim': Rule(_broadcast_applies, _nothing,
                             _broadcast_in_dim_letters),
}


# ----------------------------------------------------------------------------
# Analysis: which parameter leaves have one structured use.


class Use(NamedTuple):
  """A structured use of a parameter leaf: operand `position` of `step`."""
  leaf: int
  step: int
  position: int
  kind: Optional[str]        # its `RULES` key; None = not structured


class Analysis(NamedTuple):
  uses: tuple                # one `Use` per structured leaf
  fallback_leaves: tuple     # leaf indices handled by Jacobian contraction
  views: dict                # slot -> leaf, for views of parameter leaves


def _is_scalar_slot(avals, operand, dependent):
  if isinstance(operand, _Const):
    return np.ndim(operand.value) == 0
  return operand not in dependent and avals[operand].shape == ()


def analyze(program: Program, avals: dict) -> Analysis:
  """Finds the views of each parameter leaf and classifies the leaves.

  Args:
    program: the flattened jaxpr.
    avals: slot -> ShapeDtypeStruct, for every slot (`slot_avals`).

  Returns:
    The structured uses and the fallback leaves.
  """
  views = {slot: leaf for leaf, slot in enumerate(program.param_slots)}
  dependent = set(program.param_slots)
  uses = {leaf: [] for leaf in range(len(program.param_slots))}
  for index, step in enumerate(program.steps):
    if step.primitive is None:
      continue
    name = step.primitive.name
    ins = step.inputs
    view_positions = [i for i, v in enumerate(ins)
                      if not isinstance(v, _Const) and v in views]
    if any(not isinstance(v, _Const) and v in dependent for v in ins):
      dependent.update(step.outputs)
    if not view_positions:
      continue
    leaf0 = views[ins[view_positions[0]]]
    if len(view_positions) == 1 and len(step.outputs) == 1:
      i = view_positions[0]
      other = ins[1 - i] if len(ins) == 2 else None
      relabel = name in _RELABEL or (
          name == 'broadcast_in_dim' and
          np.prod(avals[step.outputs[0]].shape) ==
          np.prod(avals[ins[i]].shape))
      scale = (name == 'neg' or
               (name == 'mul' and _is_scalar_slot(avals, other, dependent)) or
               (name == 'div' and i == 0 and
                _is_scalar_slot(avals, other, dependent)))
      if relabel or scale:
        views[step.outputs[0]] = leaf0
        continue
    rule = RULES.get(name)
    for i in view_positions:
      # One perturbation and one record per step: an equation consuming two
      # parameter views (W1 @ W2, b + b) leaves both leaves to the fallback.
      structured = (rule is not None and len(view_positions) == 1 and
                    len(step.outputs) == 1 and rule.applies(step, i, avals))
      uses[views[ins[i]]].append(
          Use(views[ins[i]], index, i, name if structured else None))
  for out in program.outputs:               # f returns a parameter view
    if not isinstance(out, _Const) and out in views:
      uses[views[out]].append(Use(views[out], -1, 0, None))
  structured, fallback = [], []
  for leaf, leaf_uses in uses.items():
    if len(leaf_uses) == 1 and leaf_uses[0].kind is not None:
      structured.append(leaf_uses[0])
    else:
      fallback.append(leaf)
  return Analysis(tuple(structured), tuple(fallback), views)


def slot_avals(program: Program, leaves, xs) -> dict:
  """slot -> ShapeDtypeStruct of every slot, by abstract evaluation."""
  avals = {}

  def record(leaves, xs):
    evaluate(program, leaves, xs, {}, avals_out=avals)
    return 0
  jax.eval_shape(record, leaves, xs)
  for slot, value in zip(program.param_slots + program.input_slots
                         + program.const_slots,
                         list(leaves) + list(xs) + list(program.const_values)):
    avals[slot] = jax.ShapeDtypeStruct(np.shape(value),
                                       jnp.result_type(value))
  return avals


def evaluate(program: Program, leaves, xs, deltas: dict,
             uses: tuple = (), views: Optional[dict] = None,
             avals_out: Optional[dict] = None):
  """Runs the program; perturbs structured outputs, records their operands.

  Args:
    program: the flattened jaxpr.
    leaves: parameter leaves.
    xs: input leaves.
    deltas: step index -> perturbation added to that step's output.
    uses: structured uses whose operands (and view scales) to record.
    views: slot -> leaf for parameter views (`Analysis.views`).
    avals_out: if a dict, filled with slot -> ShapeDtypeStruct.

  Returns:
    (outputs, records) with records[k] = (arrays, scale) for uses[k]: the
    arrays its rule records (`Rule.record`: the other operand of a
    dot_general or mul, the image patches of a convolution's input, nothing
    for a bias add, ...) and the product of the scalars the parameter view
    was multiplied by.
  """
  env = dict(zip(program.param_slots, leaves))
  env.update(zip(program.input_slots, xs))
  env.update(zip(program.const_slots, program.const_values))
  views = views or {}
  scales = {slot: 1. for slot in program.param_slots}
  by_step = {use.step: use for use in uses}
  records = {}
  read = lambda v: v.value if isinstance(v, _Const) else env[v]
  for index, step in enumerate(program.steps):
    if step.primitive is None:
      env[step.outputs[0]] = step.params['value']
      continue
    args = [read(v) for v in step.inputs]
    outs = _bind(step, args)
    if step.outputs[0] in views:
      _track_scale(step, args, scales)
    if index in by_step:
      use = by_step[index]
      scale = scales.get(step.inputs[use.position], 1.)
      records[index] = (RULES[use.kind].record(step, args, use.position),
                        scale)
    if index in deltas:
      outs[0] = outs[0] + deltas[index]
    for slot, value in zip(step.outputs, outs):
      env[slot] = value
      if avals_out is not None:
        avals_out[slot] = jax.ShapeDtypeStruct(np.shape(value), value.dtype)
  outputs = [read(v) for v in program.outputs]
  return (jax.tree.unflatten(program.out_tree, outputs),
          [records[use.step] for use in uses])


def _track_scale(step, args, scales):
  """The scalar factor of a new parameter view (see `analyze`)."""
  name = step.primitive.name
  ins = step.inputs
  if name in ('mul', 'div'):
    i = 0 if (not isinstance(ins[0], _Const) and ins[0] in scales) else 1
    other = args[1 - i]
    factor = (1 / other) if name == 'div' else other
    scales[step.outputs[0]] = scales[ins[i]] * factor
  elif name == 'neg':
    scales[step.outputs[0]] = -scales[ins[0]]
  else:
    scales[step.outputs[0]] = scales[ins[0]]


# ----------------------------------------------------------------------------
# The NTK from cotangents and recorded operands.


class _Side(NamedTuple):
  """Per-side quantities, one entry per structured use (cotangents g, the
  tuple of its rule's records, view scales) or per fallback leaf (J)."""
  cotangents: list
  operands: list
  scales: list
  jacobians: list


def _side(program: Program, analysis: Analysis, avals: dict, leaves,
          xs) -> _Side:
  """Cotangents df/dy of the structured outputs and fallback Jacobians.

  One reverse pass per output entry (`vmap` of `vjp` over basis vectors).
  """
  uses, fallback = analysis.uses, analysis.fallback_leaves
  step_outputs = [avals[program.steps[u.step].outputs[0]] for u in uses]

  def one(xs):
    def fn(deltas, fallback_leaves):
      current = list(leaves)
      for index, leaf in zip(fallback, fallback_leaves):
        current[index] = leaf
      out, records = evaluate(program, current, xs,
                              {u.step: d for u, d in zip(uses, deltas)},
                              uses, analysis.views)
      return out, records
    zeros = [jnp.zeros(a.shape, a.dtype) for a in step_outputs]
    out, vjp_fn, records = jax.vjp(fn, zeros, [leaves[i] for i in fallback],
                                   has_aux=True)
    basis = jnp.eye(out.size, dtype=out.dtype).reshape((out.size,) + out.shape)
    g, jac = jax.vmap(vjp_fn)(basis)
    unflat = lambda t: t.reshape(out.shape + t.shape[1:])
    return _Side([unflat(t) for t in g], [r[0] for r in records],
                 [jnp.asarray(r[1]) for r in records],
                 [unflat(t) for t in jac])
  return one(xs)


def contract(program: Program, analysis: Analysis, avals: dict, side1: _Side,
             side2: _Side, out1: str, out2: str, result: str,
             batched: bool) -> jnp.ndarray:
  """Sum over parameter leaves of <J1[o1], J2[o2]> from the two sides.

  Args:
    program, analysis, avals: from `trace_program`, `analyze`, `slot_avals`.
    side1, side2: `_side` results.
    out1, out2: subscripts of the leading (output) axes of the cotangents
      on each side, following the trace/diagonal conventions; when
      `batched`, the first letter is the example axis.
    result: subscripts of the kernel.
    batched: whether the sides were computed per example.

  Returns:
    The NTK (not yet divided by the size of the traced axes).
  """
  taken = set(out1 + out2 + result)
  new_letters = lambda: iter([c for c in string.ascii_letters
                              if c not in taken])
  total = 0.
  for k, use in enumerate(analysis.uses):
    step = program.steps[use.step]
    letters = new_letters()
    table = {}
    shared = lambda d: table.setdefault(d, next(letters))
    terms, operands = [], []
    for side, out in ((side1, out1), (side2, out2)):
      fresh = lambda: next(letters)
      y_sub, record_subs = RULES[use.kind].subscripts(
          step, use.position, avals, shared, fresh)
      prefix = out[0] if batched else ''   # the example axis
      terms += [out + y_sub, *(prefix + s for s in record_subs), prefix]
      operands += [side.cotangents[k], *side.operands[k], side.scales[k]]
    total = total + einsum(','.join(terms) + '->' + result, *operands)
  for k, leaf in enumerate(analysis.fallback_leaves):
    letters = new_letters()
    leaf_letter = next(letters)
    # One flattened parameter axis: a GEMM XLA runs faster than the same
    # dot with several contracting axes.
    flat = lambda j, out: j.reshape(j.shape[:len(out)] + (-1,))
    total = total + einsum(
        f'{out1}{leaf_letter},{out2}{leaf_letter}->{result}',
        flat(side1.jacobians[k], out1), flat(side2.jacobians[k], out2))
  return total


# ----------------------------------------------------------------------------
# Entry point.


class Prepared(NamedTuple):
  """A traced and analysed side: its program and per-leaf vmap axes."""
  program: Program
  analysis: Analysis
  avals: dict
  in_axes: Optional[list]      # per input leaf: 0 or None; None = unbatched


def prepare(f: Callable, params, x, kwargs: dict, vmap_axes) -> tuple:
  """Traces `f` on one side's inputs (one example of them when batched).

  Args:
    f: `f(params, x, **kwargs)`.
    params: parameters.
    x: this side's inputs.
    kwargs: keyword arguments of `f`.
    vmap_axes: None, or (in_axis, out_axis, {kwarg: axis or None}).

  Returns:
    (prepared, inputs): the `Prepared` side and the input leaves to pass to
    `_side` (with the example axis moved first when batched).
  """
  leaves = jax.tree.leaves(params)
  treedef = jax.tree.structure(params)
  # Array keyword arguments are inputs of the program; others are static.
  names = sorted(k for k, v in kwargs.items()
                 if isinstance(v, (jax.Array, np.ndarray)))
  static = {k: v for k, v in kwargs.items() if k not in names}
  call = lambda p, xi, kw: f(jax.tree.unflatten(treedef, p), xi,
                             **dict(zip(names, kw)), **static)
  if vmap_axes is None:
    inputs = (x, [kwargs[n] for n in names])
    g = lambda p, inputs: call(p, *inputs)
    in_axes = None
    example = inputs
  else:
    in_axis, out_axis, kwargs_axes = vmap_axes
    kw_axes = [kwargs_axes.get(n) for n in names]

    def g(p, inputs):
      xi, kw = inputs
      xi = jnp.expand_dims(xi, in_axis)
      kw = [v if a is None else jnp.expand_dims(v, a)
            for v, a in zip(kw, kw_axes)]
      return jnp.squeeze(call(p, xi, kw), out_axis)
    inputs = (jnp.moveaxis(x, in_axis, 0),
              [v if a is None else jnp.moveaxis(v, a, 0)
               for v, a in zip((kwargs[n] for n in names), kw_axes)])
    in_axes = [0] + [None if a is None else 0 for a in kw_axes]
    example = jax.tree.map(
        lambda v, a: jax.ShapeDtypeStruct(v.shape[1:] if a == 0 else v.shape,
                                          v.dtype),
        inputs, (0, [None if a is None else 0 for a in kw_axes]))
  program = trace_program(g, leaves, example)
  flat_example = jax.tree.leaves(example)
  avals = slot_avals(program, leaves, flat_example)
  analysis = analyze(program, avals)
  return Prepared(program, analysis, avals, in_axes), jax.tree.leaves(inputs)


def side(prepared: Prepared, params, inputs) -> _Side:
  """Cotangents, operands and fallback Jacobians of one side."""
  leaves = jax.tree.leaves(params)
  p = prepared
  if p.in_axes is None:
    return _side(p.program, p.analysis, p.avals, leaves, inputs)
  return jax.vmap(
      lambda xs: _side(p.program, p.analysis, p.avals, leaves, xs),
      in_axes=(p.in_axes,))(inputs)
