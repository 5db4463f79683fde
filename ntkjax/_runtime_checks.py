"""Checks that raise now on concrete values, and at run time under `jit`.

A check on a traced value cannot raise while tracing: the value does not
exist yet. `fail_if` then stages a host callback (`jax.pure_callback`) that
raises when the compiled program runs, the pattern of equinox's `error_if`;
its result is tied into the checked values, so the check runs whenever they
are used. `jit`, `grad` and `vmap` pass through it (vmap hands it the whole
batch of flags at once). The raised error surfaces as a
`jax.errors.JaxRuntimeError` whose text contains the error type and
message.

Cost: the predicate's reduction (one pass over the checked arrays) and one
host round trip per call of the compiled program; measured in
benchmarks/bench_runtime_checks.py (DESIGN.md section 11). Set the
environment variable NTKJAX_RUNTIME_CHECKS=0 to stage no callbacks (the
checks on concrete values still run).

This is the lowest layer of the package: it imports nothing from ntkjax.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np


_suspended = threading.local()


def enabled() -> bool:
  """Whether checks on traced values are staged (NTKJAX_RUNTIME_CHECKS, and
  not inside `suspended`)."""
  if getattr(_suspended, 'depth', 0):
    return False
  return os.environ.get('NTKJAX_RUNTIME_CHECKS', '1') not in ('0', 'false',
                                                              'False')


@contextlib.contextmanager
def suspended():
  """Stage no checks while tracing inside: for callers that check the
  results themselves and explain them better (hyper.fit names the
  hyperparameter whose gradient is NaN; an L-BFGS line search may try
  values whose kernel is not finite and step back)."""
  _suspended.depth = getattr(_suspended, 'depth', 0) + 1
  try:
    yield
  finally:
    _suspended.depth -= 1


def is_traced(*values) -> bool:
  """Whether any leaf of `values` is a tracer (under jit, grad or vmap)."""
  return any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(values))


Message = Union[str, Callable[..., str]]


def fail_if(bad, error: type, message: Message, *details, keep=None):
  """Raise `error(message)` where `bad` is true; return `keep`.

  Args:
    bad: a boolean scalar or array (any true entry fails), concrete or
      traced.
    error: the exception class (ValueError, FloatingPointError, ...).
    message: the message, or a function of `details` (as NumPy values)
      returning it, so a traced check can report numbers it computes.
    *details: arrays passed to `message` (computed in the same program).
    keep: a pytree the check is attached to. Under jit the check's result
      flows into it (`where(failed, nan, leaf)`, an exact copy when the
      check passes), so XLA keeps the check exactly when the caller uses
      `keep`; the caller must use the returned value.

  Returns:
    `keep` (tied to the check when traced).
  """
  def text(values):
    return message(*values) if callable(message) else message

  if not is_traced(bad, *details):
    if np.any(np.asarray(bad)):
      raise error(text([np.asarray(d) for d in details]))
    return keep
  if not enabled():
    return keep

  def check(flag, *values):
    if np.any(flag):
      raise error(text([np.asarray(v) for v in values]))
    return np.zeros(np.shape(flag), np.bool_)

  # A pure callback, not jax.debug.callback: under vmap the latter is
  # unrolled into one host call per batch element (a vmapped sweep of 861
  # kernels x 200 layers took 51 s instead of 0.9 s); `broadcast_all` makes
  # one call per batch.
  bad = jnp.asarray(bad)
  failed = jax.pure_callback(check, jax.ShapeDtypeStruct(bad.shape, jnp.bool_),
                             bad, *details, vmap_method='broadcast_all')
  failed = jnp.any(failed)

  def tie(leaf):
    if not (hasattr(leaf, 'dtype')
            and jnp.issubdtype(leaf.dtype, jnp.inexact)):
      return leaf
    return jnp.where(failed, jnp.asarray(jnp.nan, leaf.dtype), leaf)

  return jax.tree.map(tie, keep)


def any_not_finite(*arrays):
  """A scalar: whether any entry of any floating array is NaN or infinite."""
  flags = [jnp.any(~jnp.isfinite(a)) for a in arrays
           if a is not None and jnp.issubdtype(jnp.result_type(a),
                                               jnp.inexact)]
  return jnp.any(jnp.stack(flags)) if flags else jnp.bool_(False)
