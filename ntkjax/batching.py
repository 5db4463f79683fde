"""`batch`: kernels computed over blocks of input pairs, so memory stays
bounded.

A kernel's cost and memory grow with the number of input pairs (for a CNN
with the full spatial covariance, N1 N2 P^2 entries per layer: 200 x 200
images of 8 x 8 pixels is 1.6e8 floats per array). Each entry depends only
on its own pair of inputs (and on the inputs' own variances), so the kernel
of (x1, x2) is the block matrix of the kernels of (x1 block, x2 block).
`batch` computes those blocks one at a time with one jit-compiled function
(the last blocks are padded to the same shape, so there is one compilation)
and assembles them. For a symmetric kernel (x2=None) only the blocks on and
above the diagonal are computed; the others are their transposes.

The signature follows neural-tangents' `nt.batch`.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax.kernel import KERNEL_FIELDS

Get = Union[None, str, Sequence[str]]


@functools.lru_cache(maxsize=None)
def _named(names: tuple):
  return collections.namedtuple('BatchedKernel', names)


def _blocks(n: int, size: int):
  """(start, stop) of each block of `size` rows covering range(n)."""
  return [(start, min(start + size, n)) for start in range(0, n, size)]


def _padded(x, start: int, stop: int, size: int):
  """Rows start:stop of x, padded to `size` rows by repeating the last row
  (the padding's results are dropped)."""
  block = x[start:stop]
  missing = size - (stop - start)
  if missing:
    block = jnp.concatenate([block, jnp.repeat(block[-1:], missing, 0)])
  return block


def _patterns(pattern, symmetric: bool) -> tuple:
  """`(pattern1, pattern2)` from `kernel_fn`'s `pattern` keyword."""
  if pattern is None:
    return None, None
  if isinstance(pattern, (tuple, list)):
    first, second = pattern
  else:
    first, second = pattern, None
  if second is None and symmetric:
    second = first
  return first, second


def batch(kernel_fn: Callable, batch_size: int = 0, device_count: int = -1,
          store_on_device: bool = True) -> Callable:
  """Wrap `kernel_fn` to compute kernels block by block.

  Args:
    kernel_fn: a `kernel_fn(x1, x2=None, get=None, **kwargs)` of ntkjax
      (analytic, from `stax`); its results per pair must depend only on the
      pair (true for every `stax` layer).
    batch_size: inputs per block along each batch axis (0: one block, i.e.
      just the jit-compiled `kernel_fn`).
    device_count, store_on_device: accepted for compatibility with
      neural-tangents; blocks run on the default device and are gathered
      there (store_on_device=False gathers them as NumPy arrays on the host).

  Returns:
    `batched(x1, x2=None, get=None, **kwargs)`, returning what `kernel_fn`
    returns for `get` a field name or a tuple of names ('nngp', 'ntk',
    'cov1', 'cov2'); `get=None` returns all four as a named tuple.
  """
  del device_count
  if not isinstance(batch_size, int) or batch_size < 0:
    raise ValueError(f'batch: batch_size must be an int >= 0, got '
                     f'{batch_size!r}.')
  compiled = jax.jit(kernel_fn, static_argnames=('get', 'diagonal_spatial'))
  gather = (lambda a: a) if store_on_device else np.asarray
  concatenate = jnp.concatenate if store_on_device else np.concatenate

  def batched(x1, x2=None, get: Get = None, **kwargs):
    names = KERNEL_FIELDS if get is None else (
        (get,) if isinstance(get, str) else tuple(get))
    for name in names:
      if name not in KERNEL_FIELDS:
        raise ValueError(f'batch: unknown get={name!r}; choose from '
                         f'{KERNEL_FIELDS}.')
    x1 = jnp.asarray(x1)
    symmetric = x2 is None
    x2 = x1 if symmetric else jnp.asarray(x2)
    n1, n2 = x1.shape[0], x2.shape[0]
    pattern = kwargs.pop('pattern', None)
    if batch_size == 0 or (batch_size >= n1 and batch_size >= n2):
      if pattern is not None:
        kwargs['pattern'] = pattern
      out = compiled(x1, None if symmetric else x2, names, **kwargs)
      out = {name: gather(getattr(out, name)) for name in names}
    else:
      size = batch_size
      rows, cols = _blocks(n1, size), _blocks(n2, size)
      pair_names = [n for n in names if n in ('nngp', 'ntk')]
      pattern1, pattern2 = _patterns(pattern, symmetric)
      if symmetric:
        # Blocks below the diagonal are the transposes of those above; the
        # layout (which axes pair up) is static metadata of the Kernel.
        first = {} if pattern1 is None else {
            'pattern': (pattern1[:size], pattern2[:size])}
        spatial = jax.eval_shape(
            functools.partial(kernel_fn, get=None, **kwargs, **first),
            x1[:size], x2[:size]).spatial
      cut = lambda p, start, stop: (None if p is None
                                    else _padded(p, start, stop, size))
      results = {}
      for i, (r0, r1) in enumerate(rows):
        xi = _padded(x1, r0, r1, size)
        for j, (c0, c1) in enumerate(cols):
          if symmetric and j < i:
            continue
          xj = _padded(x2, c0, c1, size)
          if pattern1 is not None:
            kwargs['pattern'] = (cut(pattern1, r0, r1), cut(pattern2, c0, c1))
          if symmetric and j == i:
            # A diagonal block of one batch is computed as x2 = None, so the
            # layers know which pairs are the same sample (Dropout).
            xj = None
            if pattern1 is not None:
              kwargs['pattern'] = kwargs['pattern'][0]
          block = compiled(xi, xj, tuple(pair_names) + ('cov1', 'cov2'),
                           **kwargs)
          results[i, j] = {name: gather(getattr(block, name)
                                        [:r1 - r0, :c1 - c0])
                           for name in pair_names}
          if j == i or (not symmetric and i == 0):
            results[i, j]['cov2'] = gather(block.cov2[:c1 - c0])
          if j == i or j == 0:
            results[i, j]['cov1'] = gather(block.cov1[:r1 - r0])
      out = {}
      for name in pair_names:
        grid = []
        for i in range(len(rows)):
          row = []
          for j in range(len(cols)):
            if (i, j) in results:
              row.append(results[i, j][name])
            else:  # symmetric: the transpose of block (j, i)
              row.append(spatial.swap_public(results[j, i][name]))
          grid.append(concatenate(row, axis=1))
        out[name] = concatenate(grid, axis=0)
      if 'cov1' in names:
        out['cov1'] = concatenate([results[i, i if symmetric else 0]['cov1']
                                   for i in range(len(rows))], axis=0)
      if 'cov2' in names:
        if symmetric:
          out['cov2'] = out['cov1'] if 'cov1' in out else concatenate(
              [results[i, i]['cov1'] for i in range(len(rows))], axis=0)
        else:
          out['cov2'] = concatenate([results[0, j]['cov2']
                                     for j in range(len(cols))], axis=0)
    if isinstance(get, str):
      return out[get]
    return _named(names)(*(out[name] for name in names))

  return batched
