"""Batches of forward or reverse passes, within memory and in XLA's good paths.

Every batch of passes of the empirical NTK (the rows of a Jacobian, the
examples of a vmapped one, the columns of NTK-vector products, blocks of
J(x1)) goes through `map_passes` or `sequence`: one `vmap` when it fits, else
chunks run one after another, bounded by the bytes of parameter tangents
(`JACOBIAN_BLOCK_BYTES`) and, for programs with convolutions, of the passes'
intermediates (`WORKING_SET_BYTES`). DESIGN.md section 3 has the
measurements behind each choice. Internal to `ntkjax.empirical`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


# J(x1) in blocks of examples past this (peak: J(x2) and one block, same
# flops). Not smaller: every block reads J(x2) again (256 MB blocks: the
# MLP benchmark ran 1.5-3x slower).
JACOBIAN_BLOCK_BYTES = 1 << 31


def block_size(n: int, row_bytes: float) -> int:
  """Examples per block of J(x1): all of them if small, else the largest
  divisor of n whose block fits `JACOBIAN_BLOCK_BYTES`."""
  if n * row_bytes <= JACOBIAN_BLOCK_BYTES:
    return n
  target = max(1, int(JACOBIAN_BLOCK_BYTES // max(row_bytes, 1)))
  return max(d for d in range(1, min(target, n) + 1) if n % d == 0)


def equations(f, params, x, kwargs) -> list:
  """The equations of f(params, x)'s jaxpr, sub-jaxprs included."""
  closed = jax.make_jaxpr(lambda p, a: f(p, a, **kwargs))(params, x)

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for sub in eqn.params.values():
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from walk(inner)
  return list(walk(closed.jaxpr))


def activation_bytes(f, params, x, kwargs) -> int:
  """Bytes of all intermediate values of f(params, x): what one reverse
  (or forward) pass over this batch holds as cotangents (tangents)."""
  return sum(int(np.prod(v.aval.shape)) * jnp.dtype(v.aval.dtype).itemsize
             for eqn in equations(f, params, x, kwargs)
             for v in eqn.outvars
             if hasattr(v.aval, 'shape') and hasattr(v.aval, 'dtype'))


def param_bytes(params) -> int:
  return sum(np.size(leaf) * jnp.dtype(jnp.result_type(leaf)).itemsize
             for leaf in jax.tree.leaves(params))


# Intermediates of one unrolled chunk of `map_passes`'s passes stay under this:
# XLA CPU ran 128 whole-batch reverse passes of the CNN benchmark 1.6x
# slower in one vmap (3 GB by the jaxpr sum) than in chunks of 4 to 32.
WORKING_SET_BYTES = 1 << 29
# Chunks are unrolled (`sequence`); more would only lengthen compilation.
MAX_CHUNKS = 64


def map_passes(fn, xs, item_bytes: float, work_bytes: float = 0.,
         unroll: bool = False):
  """`vmap(fn)(xs)` over the leading axis, in chunks run one after another
  when all items at once would hold more than `JACOBIAN_BLOCK_BYTES` of
  parameter tangents (`item_bytes` each) or, with `unroll`,
  `WORKING_SET_BYTES` of intermediates (`work_bytes` each).

  `unroll` (for programs with convolutions, `convolves`): the chunks are
  static slices in a Python loop, not `lax.map`: XLA CPU ran convolutions
  inside a while loop ~50x slower (the CNN benchmark's Jacobian: 320 s in
  `lax.map` against 4.4 s unrolled), while the MLP's vector products ran
  1.2x faster in `lax.map` than unrolled. Unrolled chunks are
  concatenated at the end (DESIGN.md section 3 says why).
  """
  if not unroll:
    n = jax.tree.leaves(xs)[0].shape[0]
    if n * item_bytes <= JACOBIAN_BLOCK_BYTES:
      return jax.vmap(fn)(xs)
    # A divisor of n: lax.map would concatenate a remainder (a copy).
    return jax.lax.map(fn, xs, batch_size=block_size(n, item_bytes))
  n = jax.tree.leaves(xs)[0].shape[0]
  chunk = min(n, int(JACOBIAN_BLOCK_BYTES // max(item_bytes, 1)),
              int(WORKING_SET_BYTES // max(work_bytes, 1)))
  chunk = max(chunk, 1, -(-n // MAX_CHUNKS))
  if chunk >= n:
    return jax.vmap(fn)(xs)
  # Equal chunks where a divisor is close (a ragged last chunk compiles
  # one more program).
  divisor = max(d for d in range(1, chunk + 1) if n % d == 0)
  chunk = divisor if 2 * divisor >= chunk else chunk
  pieces = sequence(jax.vmap(fn), [
      jax.tree.map(lambda a: a[start:start + chunk], xs)
      for start in range(0, n, chunk)])
  return jax.tree.map(lambda *p: jnp.concatenate(p), *pieces)


def convolves(f, params, x, kwargs) -> bool:
  """Whether f(params, x) convolves: then batches of passes run as unrolled
  chunks (`map_passes`), since XLA CPU runs convolutions in loops slowly."""
  return any(eqn.primitive.name == 'conv_general_dilated'
             for eqn in equations(f, params, x, kwargs))


def sequence(fn, inputs: list) -> list:
  """[fn(x) for x in inputs], each call ordered after the previous one's
  result (an optimization barrier ties its input to that result): XLA
  would otherwise be free to run all calls at once and hold all their
  intermediates."""
  results = []
  for x in inputs:
    if results:
      x, results[-1] = jax.lax.optimization_barrier((x, results[-1]))
    results.append(fn(x))
  return results
