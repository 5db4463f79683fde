"""Linearization and Taylor expansion of a network in its parameters.

For a network `f(params, x)` and expansion point `params0`, with
`dp = params - params0`:

    linearize:      f_lin(params, x) = f(params0, x) + J(params0, x) dp
    taylor_expand:  f_k(params, x)   = sum_{j <= k} (1/j!) d^j/dt^j f(params0 + t dp, x) |_{t=0}

Wide networks trained by gradient descent stay close to their linearization
(Lee et al. 2019), whose training dynamics are those of its (fixed)
empirical NTK. Both use forward-mode derivatives only (one `jax.jvp` per
order), so they cost a small multiple of a forward pass and never form a
Jacobian.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def _check_same_structure(params, params0, who: str):
  structure, structure0 = (jax.tree.structure(params),
                           jax.tree.structure(params0))
  if structure != structure0:
    raise ValueError(f'{who}: params have structure {structure}, but the '
                     f'expansion point has {structure0}; pass parameters '
                     'from the same init_fn.')
  for leaf, leaf0 in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
    if jnp.shape(leaf) != jnp.shape(leaf0):
      raise ValueError(f'{who}: a parameter has shape {jnp.shape(leaf)} but '
                       f'{jnp.shape(leaf0)} at the expansion point.')


def linearize(f: Callable, params: PyTree) -> Callable:
  """The first-order Taylor expansion of `f` around `params`.

  Args:
    f: `f(params, *args, **kwargs) -> outputs` (any pytree of parameters).
    params: the expansion point.

  Returns:
    `f_lin(p, *args, **kwargs) = f(params, ...) + J(params, ...) (p - params)`,
    computed with one `jax.jvp`.
  """
  def f_lin(p, *args, **kwargs):
    _check_same_structure(p, params, 'linearize')
    dp = jax.tree.map(jnp.subtract, p, params)
    f0, df = jax.jvp(lambda q: f(q, *args, **kwargs), (params,), (dp,))
    return jax.tree.map(jnp.add, f0, df)
  return f_lin


def taylor_expand(f: Callable, params: PyTree, degree: int) -> Callable:
  """The Taylor expansion of `f` around `params` to order `degree`.

  Args:
    f: `f(params, *args, **kwargs) -> outputs`.
    params: the expansion point.
    degree: the order (0: the constant f(params); 1: `linearize`).

  Returns:
    `f_taylor(p, *args, **kwargs)`, the sum over j <= degree of the j-th
    directional derivative of f along p - params, divided by j!. The j-th
    derivative is j nested forward-mode passes of t -> f(params + t dp).
  """
  if not isinstance(degree, int) or degree < 0:
    raise ValueError(f'taylor_expand: degree must be an int >= 0, got {degree!r}.')

  def f_taylor(p, *args, **kwargs):
    _check_same_structure(p, params, 'taylor_expand')
    dp = jax.tree.map(jnp.subtract, p, params)
    dtype = jnp.result_type(*jax.tree.leaves(params))

    def along(t):
      moved = jax.tree.map(lambda a, d: a + t.astype(a.dtype) * d, params, dp)
      return f(moved, *args, **kwargs)

    def derivative(g):
      return lambda t: jax.jvp(g, (t,), (jnp.ones((), dtype),))[1]

    zero = jnp.zeros((), dtype)
    g, total = along, along(zero)
    for order in range(1, degree + 1):
      g = derivative(g)
      scale = 1. / math.factorial(order)
      total = jax.tree.map(lambda acc, term: acc + scale * term, total, g(zero))
    return total
  return f_taylor
