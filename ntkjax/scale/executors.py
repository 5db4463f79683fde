"""Executors: who computes the blocks of a `BlockJob`, and where.

Both run the same `BlockJob.compute(i, j)`:

* `run_local`: one thread per local device (JAX releases the GIL while a
  computation runs, so devices work concurrently); each thread takes the
  next block from a shared list, computes it on its device (jit compiles
  once per device) and hands the result to a small pool of writer threads,
  so storing a block overlaps computing the next. At most two blocks per
  device wait to be written (bounded memory).
* `run_dask`: a Dask distributed `Client`; the job (inputs included) is
  scattered to every worker once, each block is one task, and a worker
  keeps the job's compiled function between tasks (one compilation per
  worker). With a store, workers write their blocks themselves and return
  only the checksum; without one they return the block. Tasks of a worker
  that dies are rescheduled by Dask; blocks are idempotent, so a block
  computed twice is harmless.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import sys
import threading
import time
import uuid
from typing import Callable, Sequence

from ntkjax.scale.blocks import BlockJob, optional_module


def progress_bar(total_entries: int, total_blocks: int, done_blocks: int,
                 done_entries: int, enabled: bool, where: str):
  """A tqdm bar counting kernel entries (entries per second, ETA), with
  blocks done / total beside it; shown after 1 s so that quick calls print
  nothing. On resume it starts at what was already done and says so."""
  from tqdm import tqdm   # plain text (tqdm.auto warns in notebooks without ipywidgets)
  bar = tqdm(total=total_entries, initial=done_entries, unit=' entries',
             unit_scale=True, desc='kernel blocks', disable=not enabled,
             delay=1., dynamic_ncols=True,
             file=sys.stderr)
  if done_blocks and enabled:
    bar.write(f'batch: resuming {where}: {done_blocks} of {total_blocks} '
              'blocks already stored.', file=sys.stderr)
  bar.set_postfix_str(f'{done_blocks}/{total_blocks} blocks', refresh=False)
  return bar


class _Counter:
  """Blocks done, shown on the bar."""

  def __init__(self, bar, done: int, total: int):
    self.bar, self.done, self.total = bar, done, total
    self.lock = threading.Lock()

  def add(self, entries: int):
    with self.lock:
      self.done += 1
      self.bar.set_postfix_str(f'{self.done}/{self.total} blocks',
                               refresh=False)
      self.bar.update(entries)


def run_local(job: BlockJob, todo: Sequence[tuple], devices: Sequence,
              sink: Callable[[tuple, dict], None], counter: _Counter,
              writers: int = 2):
  """Compute the blocks `todo` over `devices`; `sink((i, j), block)` stores
  each (in a writer thread). Ctrl-C finishes the blocks in flight, stores
  them, and raises `KeyboardInterrupt`; an error in a block stops the
  others and is raised here."""
  queue = collections.deque(todo)
  lock = threading.Lock()
  stop = threading.Event()
  errors = []
  room = threading.Semaphore(2 * len(devices))
  pool = concurrent.futures.ThreadPoolExecutor(writers)

  def write(ij, block):
    try:
      sink(ij, block)
      counter.add(job.plan.entries(*ij))
    except BaseException as e:  # noqa: BLE001 (raised in the main thread)
      errors.append((ij, e))
      stop.set()
    finally:
      room.release()

  def work(device):
    while not stop.is_set():
      with lock:
        if not queue:
          return
        ij = queue.popleft()
      try:
        block = job.compute(*ij, device=device)
      except BaseException as e:  # noqa: BLE001
        errors.append((ij, e))
        stop.set()
        return
      room.acquire()
      pool.submit(write, ij, block)

  threads = [threading.Thread(target=work, args=(d,), daemon=True)
             for d in devices]
  for t in threads:
    t.start()
  interrupted = False
  try:
    for t in threads:
      while t.is_alive():
        t.join(0.1)
  except KeyboardInterrupt:
    interrupted = True
    stop.set()
    for t in threads:   # the blocks in flight finish and are stored
      t.join()
  finally:
    pool.shutdown(wait=True)
  if errors:
    raise errors[0][1]
  if interrupted:
    raise KeyboardInterrupt


def _block_task(job: BlockJob, store, i: int, j: int):
  """One block on a worker: written to the store (returns its checksum and
  seconds), or returned (no store)."""
  start = time.perf_counter()
  block = job.compute(i, j)
  if store is None:
    return block
  crc = store.write(i, j, block)
  return crc, time.perf_counter() - start


def run_dask(job: BlockJob, todo: Sequence[tuple], client, store,
             sink: Callable[[tuple, dict], None], counter: _Counter,
             retries: int = 2):
  """Compute the blocks `todo` as tasks of `client`; with a `store` the
  workers write them, else `sink((i, j), block)` receives each."""
  distributed = optional_module('distributed', 'batch(client=...)')
  job_future, = client.scatter([job], broadcast=True, hash=False)
  store_future = None
  if store is not None:
    store_future, = client.scatter([store], broadcast=True, hash=False)
  futures = {}
  # A fresh token per run: task keys of an earlier run (its job freed and
  # its id reused) never collide with this one's.
  token = uuid.uuid4().hex
  for i, j in todo:
    future = client.submit(_block_task, job_future, store_future, i, j,
                           key=f'ntkjax-block-{token}-{i}-{j}',
                           retries=retries, pure=False)
    futures[future] = (i, j)
  try:
    # loop=: the client need not be the default one (set_as_default=False).
    for future in distributed.as_completed(futures, loop=client.loop):
      ij = futures[future]
      result = future.result()
      if store is None:
        sink(ij, result)
      counter.add(job.plan.entries(*ij))
  except KeyboardInterrupt:
    client.cancel(list(futures))
    raise
  finally:
    with contextlib.suppress(Exception):
      client.cancel([f for f in futures if not f.done()])
