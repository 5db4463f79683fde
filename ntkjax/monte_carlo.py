"""Monte Carlo estimates of the NNGP/NTK from finite networks.

Averages the empirical kernels (`ntkjax.empirical`) of `n_samples` random
initializations of a finite network. As the hidden widths grow, the average
converges to the infinite-width `kernel_fn` of the same `stax` definition
(the error of one sample falls like width^-1/2). Pairs of inputs are
processed in blocks of `batch_size` so memory stays bounded.
"""

from __future__ import annotations

from typing import Callable, Iterable, Union

import jax
import jax.numpy as jnp

from ntkjax import _get
from ntkjax.empirical import (Axes, NtkImplementation, empirical_kernel_fn)

MonteCarloKernel = _get.result_tuple('MonteCarloKernel', ('nngp', 'ntk'))


def _blocks(kernel_fn, x1, x2, get, params, kwargs, batch_size, diagonal_batch):
  """kernel_fn on blocks of batch_size x batch_size input pairs, reassembled."""
  n1 = x1.shape[0]
  n2 = n1 if x2 is None else x2.shape[0]
  if batch_size <= 0 or (batch_size >= n1 and batch_size >= n2):
    return kernel_fn(x1, x2, get, params, **kwargs)
  if n1 % batch_size or n2 % batch_size:
    raise ValueError(f'monte_carlo_kernel_fn: batch_size={batch_size} must '
                     f'divide the numbers of inputs ({n1} and {n2}).')
  x2_ = x1 if x2 is None else x2
  starts1, starts2 = range(0, n1, batch_size), range(0, n2, batch_size)
  chunk = lambda x, s: x[s:s + batch_size]
  if diagonal_batch:  # only the diagonal blocks exist
    parts = [kernel_fn(chunk(x1, s), chunk(x2_, s), get, params, **kwargs)
             for s in starts1]
    return jax.tree.map(lambda *p: jnp.concatenate(p, axis=0), *parts)
  rows = []
  for s1 in starts1:
    row = [kernel_fn(chunk(x1, s1), chunk(x2_, s2), get, params, **kwargs)
           for s2 in starts2]
    rows.append(jax.tree.map(lambda *p: jnp.concatenate(p, axis=1), *row))
  return jax.tree.map(lambda *p: jnp.concatenate(p, axis=0), *rows)


def monte_carlo_kernel_fn(init_fn: Callable, apply_fn: Callable, key,
                          n_samples: Union[int, Iterable[int]],
                          batch_size: int = 0, device_count: int = -1,
                          store_on_device: bool = True,
                          trace_axes: Axes = (-1,), diagonal_axes: Axes = (),
                          vmap_axes='auto',
                          implementation=NtkImplementation.AUTO
                          ) -> Callable:
  """Kernels averaged over random initializations of a finite network.

  Args:
    init_fn: the finite network's initialization (e.g. from `stax`).
    apply_fn: the finite network's forward pass.
    key: PRNG key; sample i uses `fold_in(key, i)`.
    n_samples: number of initializations, or an iterable of counts: then
      `kernel_fn` returns a generator of the running averages at those counts
      (in increasing order; later estimates reuse the earlier samples).
    batch_size: inputs per block of pairs (0: all at once); must divide the
      numbers of inputs.
    device_count: accepted for compatibility; one device.
    store_on_device: accepted for compatibility.
    trace_axes: as in `ntkjax.empirical_ntk_fn`.
    diagonal_axes: as in `ntkjax.empirical_ntk_fn`.
    vmap_axes: as in `ntkjax.empirical_ntk_fn`.
    implementation: as in `ntkjax.empirical_ntk_fn`.

  Returns:
    `kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)`: a
    `MonteCarloKernel(nngp, ntk)` for `get=None`, an array for a name, a named
    tuple for a tuple of names.
  """
  del device_count, store_on_device
  counts = ({n_samples} if isinstance(n_samples, int) else set(n_samples))
  if not counts or any(not isinstance(n, int) or n < 1 for n in counts):
    raise ValueError(f'monte_carlo_kernel_fn: n_samples={n_samples!r} must be '
                     'a positive int or an iterable of positive ints.')
  empirical = empirical_kernel_fn(apply_fn, trace_axes, diagonal_axes,
                                  vmap_axes, implementation)
  diagonal = (diagonal_axes,) if isinstance(diagonal_axes, int) else tuple(
      diagonal_axes)

  def one_sample(sample_key, x1, x2, get, kwargs):
    _, params = init_fn(sample_key, x1.shape)
    return _blocks(empirical, x1, x2, get, params, kwargs, batch_size,
                   0 in diagonal)

  one_sample = jax.jit(one_sample, static_argnums=(3,))

  def running_means(x1, x2, get, kwargs):
    total = None
    for n in range(1, max(counts) + 1):
      value = one_sample(jax.random.fold_in(key, n - 1), x1, x2, get, kwargs)
      total = value if total is None else jax.tree.map(jnp.add, total, value)
      if n in counts:
        yield jax.tree.map(lambda t: t / n, total)

  def kernel_fn(x1, x2=None, get=None, **kwargs):
    names = _get.requested(get, MonteCarloKernel._fields,
                           'monte_carlo kernel_fn')
    request = get if isinstance(get, str) else names

    def shaped(value):
      if isinstance(get, str):
        return value
      return (MonteCarloKernel(*value) if get is None else value)
    estimates = (shaped(v) for v in running_means(x1, x2, request, kwargs))
    if isinstance(n_samples, int):
      return next(estimates)
    return estimates
  return kernel_fn
