"""`batch`: kernels computed block by block — over every local device, on a
Dask cluster, into an on-disk store that survives interruptions.

A kernel's cost and memory grow with the number of input pairs, and every
entry depends only on its own pair of inputs (and on each input's own
variances), so the kernel of (x1, x2) is the block matrix of the kernels of
(x1 block, x2 block). `batch` cuts the pairs into blocks of `batch_size`
samples (`ntkjax.scale.blocks`), computes them concurrently on all local
devices or as tasks of a Dask `Client` (`ntkjax.scale.executors`), and
assembles them in memory or writes each to a zarr store, one chunk per block
(`ntkjax.scale.store`). A stored computation is resumable: rerunning the
same call computes only the blocks not yet stored. For a symmetric kernel
(x2=None) only the blocks on and above the diagonal are computed; the others
are their transposes.

The signature follows neural-tangents' `nt.batch`; `store`, `client`,
`devices`, `progress` and `verify` extend it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax import _get
from ntkjax.kernel import KERNEL_FIELDS
from ntkjax.scale import executors
from ntkjax.scale.blocks import PAIR, BlockJob
from ntkjax.stax._layer import KernelFn


def _stax_get(args: tuple, kwargs: dict) -> tuple:
  """(get as given, field names to compute, remaining args) for a stax
  kernel_fn, whose third argument is `get`."""
  if args:
    get, args = args[0], args[1:]
  else:
    get = kwargs.pop('get', None)
  return get, _get.requested(get, KERNEL_FIELDS, 'batch'), args


def _check_finite(x, name: str):
  """NaN inputs raise here: inside the jit-compiled blocks they could not."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    raise ValueError(f'batch: {name} contains NaN or infinite values; clean '
                     'or impute the data first.')
  return x


def block_job(kernel_fn: Callable, batch_size: int, x1, x2=None, *args,
              **kwargs) -> tuple:
  """The `BlockJob` of `batch(kernel_fn, batch_size)(x1, x2, *args,
  **kwargs)`, and `get` as given (for a stax kernel_fn)."""
  get, names = None, None
  if isinstance(kernel_fn, KernelFn):
    kwargs = dict(kwargs)
    get, names, args = _stax_get(args, kwargs)
  x1 = _check_finite(x1, 'x1')
  x2 = None if x2 is None else _check_finite(x2, 'x2')
  return BlockJob(kernel_fn, x1, x2, args, kwargs, int(batch_size),
                  get=names), get


def _devices(devices, device_count: int) -> list:
  if devices is not None:
    devices = list(devices)
    if not devices:
      raise ValueError('batch: devices is empty; pass None for every local '
                       'device.')
    return devices
  local = jax.local_devices()
  if device_count == 0:
    return local[:1]
  return local if device_count < 0 else local[:device_count]


def batch(kernel_fn: Callable, batch_size: int = 0, device_count: int = -1,
          store_on_device: bool = True, *, store=None, client=None,
          devices: Optional[Sequence] = None, progress: bool = True,
          verify: bool = True) -> Callable:
  """Wrap `kernel_fn` to compute kernels block by block.

  Args:
    kernel_fn: an ntkjax `kernel_fn(x1, x2=None, get=None, **kwargs)` (from
      `stax`), or any function `f(x1, x2, *args, **kwargs)` whose result per
      pair of samples depends only on that pair, e.g.
      `empirical_ntk_fn(apply_fn, vmap_axes=0)` called as
      `f(x1, x2, params)`. Its outputs must have both batch axes first.
    batch_size: samples per block along each batch axis (0: one block).
    device_count: local devices to spread blocks over, as in
      neural-tangents: -1 every one, 0 the default device only, n the first
      n. Ignored when `devices` or `client` is given.
    store_on_device: in memory, return JAX arrays on the default device
      (True) or NumPy arrays (False).
    store: a path, fsspec URL (e.g. 's3://bucket/ntk.zarr') or zarr
      `Store` to write the kernel to, one chunk per block; the call then
      returns lazy `StoredKernel` arrays that read only what is indexed.
      Rerunning the same call resumes (computes only missing blocks); a
      store of a different computation raises `StoreMismatchError`. Needs
      `pip install 'ntkjax[scale]'`.
    client: a Dask distributed `Client`: each block becomes a task on its
      workers (one compilation per worker). With `store`, workers write
      their blocks to it, so it must be reachable from every worker (a
      shared filesystem or an object store).
    devices: the local devices to use (default: as `device_count` says).
    progress: show a progress bar (entries per second, blocks done, ETA)
      on calls taking over a second, and what a resume found.
    verify: on resume, read every stored block back and check its checksum
      (recomputing torn or lost ones); False trusts the markers (for stores
      too large to read once).

  Returns:
    `batched(x1, x2=None, *args, **kwargs)`, returning what `kernel_fn`
    returns: for a stax kernel_fn and `get` a field name or a tuple of
    names ('nngp', 'ntk', 'cov1', 'cov2'), that array or a named tuple;
    `get=None` returns all four as a named tuple. With a store, the arrays
    are `StoredKernel`s.
  """
  if (not isinstance(batch_size, (int, np.integer)) or isinstance(
      batch_size, bool) or batch_size < 0):
    raise ValueError(f'batch: batch_size must be an int >= 0, got '
                     f'{batch_size!r}.')
  if not isinstance(device_count, (int, np.integer)) or device_count < -1:
    raise ValueError(f'batch: device_count must be -1 (every device), 0 or a '
                     f'positive int, got {device_count!r}.')
  if client is not None and not hasattr(client, 'submit'):
    raise TypeError(f'batch: client must be a dask.distributed.Client, got '
                    f'{type(client).__name__}.')
  if store is not None:
    from ntkjax.scale import store as stores
    stores.zarr_module()   # ImportError now, naming the extra
  is_stax = isinstance(kernel_fn, KernelFn)

  def batched(x1, x2=None, *args, **kwargs):
    job, get = block_job(kernel_fn, batch_size, x1, x2, *args, **kwargs)
    names = job.get
    result = _run(job, store=store, client=client,
                  devices=_devices(devices, device_count),
                  progress=progress, verify=verify)
    if store is None and store_on_device:
      result = {name: jnp.asarray(a) for name, a in result.items()}
    if is_stax:
      if isinstance(get, str):
        return result[get]
      return _get.result_tuple('BatchedKernel', names)(*(result[n] for n in names))
    kind = job.output
    if kind[0] == 'array':
      return result[kind[1]]
    if kind[0] == 'dict':
      return {name: result[name] for name in kind[1]}
    return _get.result_tuple(kind[1], kind[2])(*(result[n] for n in kind[2]))

  return batched


def _run(job: BlockJob, store, client, devices, progress: bool,
         verify: bool) -> dict:
  """Compute every block not yet done; return {field: array}."""
  from ntkjax.scale import store as stores
  kernel_store = None
  # For a function other than stax's, decide how block (i, j) mirrors into
  # (j, i) (computing block (1, 0) once, here); block (0, 1) is kept.
  extra = job.check_swaps(devices[0])
  plan = job.plan
  if store is not None:
    kernel_store = stores.KernelStore(store, job.fingerprint(), job.fields,
                                      plan)
    done = kernel_store.done(verify=verify)
  else:
    done = set()
    out = {f.name: np.empty(f.shape, f.dtype) for f in job.fields}
  blocks = plan.blocks()
  todo = [ij for ij in blocks if ij not in done]
  total = sum(plan.entries(*ij) for ij in blocks)
  where = repr(store) if isinstance(store, str) else 'the store'
  bar = executors.progress_bar(
      total, len(blocks), len(done), sum(plan.entries(*ij) for ij in done),
      progress, where)
  counter = executors._Counter(bar, len(done), len(blocks))

  def keep(ij, block):
    if kernel_store is not None:
      kernel_store.write(*ij, block)
      return
    i, j = ij
    (r0, r1), (c0, c1) = plan.rows(i), plan.columns(j)
    for field in job.fields:
      if field.name not in block:
        continue
      a = block[field.name]
      if field.kind == PAIR:
        out[field.name][r0:r1, c0:c1] = a
        if plan.symmetric and i != j:
          out[field.name][c0:c1, r0:r1] = a.transpose(field.swap)
      elif field.kind == 'row':
        out[field.name][r0:r1] = a
      else:
        out[field.name][c0:c1] = a

  for ij, block in extra.items():
    if ij in todo:
      keep(ij, block)
      todo.remove(ij)
      counter.add(plan.entries(*ij))
  try:
    if client is not None:
      executors.run_dask(job, todo, client, kernel_store, keep, counter)
    else:
      executors.run_local(job, todo, devices, keep, counter)
  except BaseException as e:
    if kernel_store is not None:
      stored = len(kernel_store.done(verify=False))
      e.add_note(f'batch: {stored} of {len(blocks)} blocks are stored in '
                 f'{where}; rerun the same call to resume (finished blocks '
                 'are kept).')
    raise
  finally:
    bar.close()
  if kernel_store is None:
    return out
  return {f.name: stores.StoredKernel(kernel_store, f) for f in job.fields}
