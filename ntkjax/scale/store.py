"""Kernels on disk: a zarr (v3) group, one chunk per block, and a manifest.

Layout of a store (a local path, an fsspec URL such as `s3://bucket/k.zarr`,
or a zarr `Store`):

    <store>/zarr.json        group; attribute 'ntkjax' = the manifest
    <store>/<field>/         one array per field ('nngp', 'ntk', 'cov1', ...),
                             chunks = one block (rows x columns x rest)
    <store>/done/            (row blocks x column blocks) int64, one chunk
                             per block: -1, or the CRC-32 of the block's data

The manifest records what the store holds: a fingerprint of the program
(jaxpr of the block function, digest of its constants), of the inputs
(SHA-256), the static arguments, the fields with shapes and dtypes, and the
block plan. Reopening it for a different computation raises
`StoreMismatchError` naming what differs; nothing is ever mixed.

A block counts as done only once its data chunks are written *and* its
marker holds the data's CRC-32 (write, then mark). On resume every marked
block's data is read back and its checksum compared, so a chunk torn,
truncated or lost on disk is recomputed, not trusted (`verify=False` skips
that read, for stores too large to read once per resume). Zarr's local
store writes each chunk to a temporary file and renames it; object stores
replace objects whole.
"""

from __future__ import annotations

import concurrent.futures
import json
import math

import numpy as np

from ntkjax.scale.blocks import (COLUMN, PAIR, ROW, BlockPlan, FieldSpec,
                                 checksum, optional_module)

FORMAT = 1


class StoreMismatchError(ValueError):
  """A kernel store holds a different computation than the one asked for."""


def zarr_module():
  return optional_module('zarr', 'batch(store=...)')


def _describe(store) -> str:
  return store if isinstance(store, str) else type(store).__name__


def open_group(store, mode: str):
  """The zarr group at `store`, with errors that name the store."""
  zarr = zarr_module()
  try:
    return zarr.open_group(store, mode=mode, zarr_format=3)
  except (OSError, PermissionError) as e:
    raise ValueError(
        f'batch: cannot open the kernel store {_describe(store)!r} '
        f'({type(e).__name__}: {e}); pass store= a writable path or URL.'
    ) from e


def _differences(stored: dict, wanted: dict) -> list:
  """Human-readable reasons why two fingerprints are different
  computations (constants compared to rounding, the rest exactly)."""
  reasons = []
  if stored.get('format') != FORMAT:
    return [f"it was written by another ntkjax store format "
            f"({stored.get('format')}, this is {FORMAT})"]
  program = stored['program'] != wanted['program']
  constants = stored['constants'] != wanted['constants'] and not (
      len(stored['constants']) == len(wanted['constants']) and all(
          len(a) == len(b) and all(
              x == y if isinstance(x, (list, str)) else
              math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12)
              for x, y in zip(a, b))
          for a, b in zip(stored['constants'], wanted['constants'])))
  if program or constants:
    note = ''
    if stored.get('jax') != wanted.get('jax'):
      note = (f' (written with JAX {stored.get("jax")}, this is '
              f'{wanted.get("jax")}: a new JAX may trace the same network '
              'differently)')
    reasons.append('the kernel function (architecture, hyperparameters or '
                   f'constants) is different{note}')
  if stored['inputs'] != wanted['inputs']:
    reasons.append('the inputs (x1, x2, parameters or patterns) are different')
  if stored['static'] != wanted['static'] or stored['get'] != wanted['get']:
    reasons.append(f"the arguments are different (get={stored['get']}, "
                   f"{stored['static']} stored; get={wanted['get']}, "
                   f"{wanted['static']} asked)")
  if stored['plan'] != wanted['plan']:
    reasons.append(f"the block plan is different ({stored['plan']} stored, "
                   f"{wanted['plan']} asked)")
  if stored['fields'] != wanted['fields'] and not reasons:
    reasons.append('the output fields are different')
  return reasons


class KernelStore:
  """A kernel store for one computation (created, or reopened and checked).

  Args:
    store: a path, fsspec URL or zarr `Store`.
    fingerprint: `BlockJob.fingerprint()` of the computation.
    fields: the job's `FieldSpec`s; plan: its `BlockPlan`.
    check: compare the manifest of an existing store (False only for
      workers writing to a store the client has checked).
  """

  def __init__(self, store, fingerprint: dict, fields: tuple,
               plan: BlockPlan, check: bool = True):
    self.location = store
    self.fields = fields
    self.plan = plan
    group = open_group(store, 'a')
    manifest = group.attrs.get('ntkjax')
    if manifest is None:
      if check:
        self._create(group, fingerprint)
    elif check:
      reasons = _differences(manifest, dict(fingerprint, format=FORMAT))
      if reasons:
        done = int((group['done'][...] >= 0).sum()) if 'done' in group else 0
        raise StoreMismatchError(
            f'batch: the store {_describe(store)!r} holds a different '
            f'computation: {"; ".join(reasons)}. Use a new store path, or '
            f'delete this one to start over (it holds {done} finished '
            'blocks of that other computation).')
    self.group = group
    self.arrays = {f.name: group[f.name] for f in fields}
    self.markers = group['done']

  def __getstate__(self):
    # Workers reopen the store by its location.
    return {'location': self.location, 'fields': self.fields,
            'plan': self.plan}

  def __setstate__(self, state):
    self.__dict__.update(state)
    group = open_group(self.location, 'r+')
    self.group = group
    self.arrays = {f.name: group[f.name] for f in self.fields}
    self.markers = group['done']

  def _create(self, group, fingerprint: dict):
    """Arrays first, the manifest last: a store without a manifest was never
    finished being created and holds no finished block."""
    members = set(group.keys()) - {f.name for f in self.fields} - {'done'}
    if members:
      raise ValueError(
          f'batch: {_describe(self.location)!r} is a zarr group that is not '
          f'an ntkjax kernel store (it holds {sorted(members)}); pass another '
          'store path.')
    plan = self.plan
    try:
      for f in self.fields:
        leading = {PAIR: (plan.size1, plan.size2), ROW: (plan.size1,),
                   COLUMN: (plan.size2,)}[f.kind]
        chunks = leading + tuple(f.shape[len(leading):])
        group.create_array(f.name, shape=f.shape, chunks=chunks,
                           dtype=f.dtype, fill_value=np.nan,
                           compressors=None, overwrite=True)
      group.create_array('done', shape=self.plan.grid, chunks=(1, 1),
                         dtype='int64', fill_value=-1, compressors=None,
                         overwrite=True)
      group.attrs['ntkjax'] = json.loads(json.dumps(
          dict(fingerprint, format=FORMAT)))
    except OSError as e:
      raise ValueError(
          f'batch: cannot write the kernel store {_describe(self.location)!r}'
          f' ({type(e).__name__}: {e}); pass store= a writable path or URL.'
      ) from e

  # --------------------------------------------------------------------------
  # Blocks.

  def _region(self, field: FieldSpec, i: int, j: int) -> tuple:
    (r0, r1), (c0, c1) = self.plan.rows(i), self.plan.columns(j)
    if field.kind == PAIR:
      return slice(r0, r1), slice(c0, c1)
    return (slice(r0, r1),) if field.kind == ROW else (slice(c0, c1),)

  def write(self, i: int, j: int, block: dict) -> int:
    """Write block (i, j)'s data, then its marker; returns the checksum."""
    for field in self.fields:
      if field.name in block:
        self.arrays[field.name][self._region(field, i, j)] = block[field.name]
    crc = checksum(block)
    self.markers[i, j] = crc
    return crc

  def read_block(self, i: int, j: int) -> dict:
    """The stored data of block (i, j) (the fields it wrote)."""
    return {f.name: self.arrays[f.name][self._region(f, i, j)]
            for f in self.fields if self.plan.writes(f.kind, i, j)}

  def done(self, verify: bool = True, threads: int = 8) -> set:
    """The finished blocks: marked, and (if `verify`) whose data read back
    has the marked checksum. A marker that cannot be read (torn) or data
    that cannot be decoded counts as not done."""
    try:
      marks = self.markers[...]
    except Exception:  # a torn marker chunk: read them one by one
      marks = np.full(self.plan.grid, -1, np.int64)
      for i, j in self.plan.blocks():
        try:
          marks[i, j] = self.markers[i, j]
        except Exception:
          pass
    marked = [(i, j) for i, j in self.plan.blocks() if marks[i, j] >= 0]
    if not verify:
      return set(marked)

    def intact(ij):
      try:
        return checksum(self.read_block(*ij)) == marks[ij]
      except Exception:
        return False
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      ok = list(pool.map(intact, marked))
    return {ij for ij, good in zip(marked, ok) if good}


class StoredKernel:
  """A kernel field in a store, read lazily: `k[rows, cols]` reads only the
  blocks it needs; `np.asarray(k)` reads everything. For a symmetric kernel
  the blocks below the diagonal are read as transposes of those above.

  Attributes:
    shape, dtype, ndim: as a NumPy array's.
    name: the field ('nngp', 'ntk', 'cov1', 'cov2', 'kernel').
    store: the `KernelStore`.
  """

  def __init__(self, store: KernelStore, field: FieldSpec):
    self.store = store
    self.field = field
    self.name = field.name
    self.shape = tuple(field.shape)
    self.dtype = np.dtype(field.dtype)
    self.ndim = len(self.shape)
    self._array = store.arrays[field.name]

  def __len__(self):
    return self.shape[0]

  def __getstate__(self):
    # The zarr array is reopened from the store (e.g. on a Dask worker).
    return {k: v for k, v in self.__dict__.items() if k != '_array'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._array = self.store.arrays[self.field.name]

  def __repr__(self):
    return (f'StoredKernel({self.name!r}, shape={self.shape}, '
            f'dtype={self.dtype}, store={_describe(self.store.location)!r})')

  def __array__(self, dtype=None, copy=None):
    out = self[...]
    return out if dtype is None else out.astype(dtype)

  def __getitem__(self, key) -> np.ndarray:
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
      at = next(n for n, k in enumerate(key) if k is Ellipsis)
      fill = self.ndim - (len(key) - 1)
      key = key[:at] + (slice(None),) * fill + key[at + 1:]
    key = key + (slice(None),) * (self.ndim - len(key))
    if self.field.kind != PAIR:
      return np.asarray(self._array[key])
    rows, cols, rest = key[0], key[1], key[2:]
    if not isinstance(rows, (slice, int, np.integer)) and not isinstance(
        cols, (slice, int, np.integer)):
      # NumPy would pair the two index arrays; reading blockwise, we would
      # take their outer product: refuse rather than differ silently.
      raise IndexError(
          f'StoredKernel {self.name!r}: index one of the two batch axes with '
          'an array at a time (k[rows][:, cols] for an outer product, or '
          'np.asarray(k[rows])[np.arange(len(rows)), cols] for pairs).')
    row_index = np.arange(self.shape[0])[rows]
    col_index = np.arange(self.shape[1])[cols]
    out = self._read(np.atleast_1d(row_index), np.atleast_1d(col_index))
    out = out[(slice(None), slice(None)) + rest]
    if np.ndim(row_index) == 0:
      out = out[0] if np.ndim(col_index) else out[0, 0]
    elif np.ndim(col_index) == 0:
      out = out[:, 0]
    return out

  def _read(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Rows x columns (index arrays) of a pair field, block by block."""
    plan = self.store.plan
    out = np.empty((rows.size, cols.size) + self.shape[2:], self.dtype)
    row_blocks, col_blocks = rows // plan.size1, cols // plan.size2
    for i in np.unique(row_blocks):
      at_r = np.nonzero(row_blocks == i)[0]
      for j in np.unique(col_blocks):
        at_c = np.nonzero(col_blocks == j)[0]
        local_r = rows[at_r] - i * plan.size1
        local_c = cols[at_c] - j * plan.size2
        if plan.symmetric and j < i:   # stored as the transpose of (j, i)
          part = self._box(j, i, local_c, local_r)
          part = part.transpose(self.field.swap)
        else:
          part = self._box(i, j, local_r, local_c)
        out[np.ix_(at_r, at_c)] = part
    return out

  def _box(self, i: int, j: int, local_r, local_c) -> np.ndarray:
    """The entries (local_r x local_c) of stored block (i, j), read as the
    bounding box of the indices."""
    plan = self.store.plan
    r0, c0 = i * plan.size1, j * plan.size2
    box = self._array[r0 + local_r.min(): r0 + local_r.max() + 1,
                      c0 + local_c.min(): c0 + local_c.max() + 1]
    return np.asarray(box)[np.ix_(local_r - local_r.min(),
                                  local_c - local_c.min())]
