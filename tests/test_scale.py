"""`ntkjax.batch` at scale: blocks in memory and in a zarr store, resume
after interruptions (Ctrl-C, SIGKILL, torn or lost chunks), refusal to mix
computations, bad input. Multiple devices and Dask workers are checked in
tests/test_scale_parallel.py.

Every result is compared with the unblocked kernel_fn in float64: blocks
are exact (each entry depends only on its pair of inputs), so the only
difference is the rounding of differently shaped computations (1e-12).
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ntkjax
import scale_cases
from ntkjax import batching
from ntkjax.scale import StoreMismatchError, StoredKernel
from ntkjax.scale import blocks as blocks_module
from ntkjax.scale.store import KernelStore

pytest.importorskip('zarr')

HERE = os.path.dirname(os.path.abspath(__file__))


def _inputs(name, symmetric):
  kernel_fn, x1, x2, args, kwargs = scale_cases.CASES[name]()
  if symmetric:
    x2, kwargs = None, scale_cases.symmetric_kwargs(kwargs)
  return kernel_fn, x1, x2, args, kwargs


def _assert_equal_fields(got, expected):
  got = scale_cases.as_fields(got) if not isinstance(got, dict) else got
  assert set(got) == set(expected)
  for field, value in expected.items():
    error = scale_cases.relative_error(np.asarray(got[field]), value)
    assert error < 1e-12, (field, error)


def _stored_fields(out) -> dict:
  if isinstance(out, StoredKernel):
    return {'kernel': np.asarray(out)}
  for value in out:
    assert isinstance(value, StoredKernel)
  return {k: np.asarray(v) for k, v in out._asdict().items()}


class _Counting:
  """Counts (and optionally interrupts) BlockJob.compute calls."""

  def __init__(self, monkeypatch, fail_at=None, error=KeyboardInterrupt):
    self.blocks = []
    original = blocks_module.BlockJob.compute
    counter = self

    def compute(job, i, j, device=None):
      if fail_at is not None and len(counter.blocks) == fail_at:
        raise error('stopped by the test')
      counter.blocks.append((i, j))
      return original(job, i, j, device)
    monkeypatch.setattr(blocks_module.BlockJob, 'compute', compute)


@pytest.mark.parametrize('symmetric', [False, True], ids=['x2', 'x2_none'])
@pytest.mark.parametrize('name', sorted(scale_cases.CASES))
def test_blocks_equal_unblocked(name, symmetric, tmp_path):
  """In memory and in a store (blocks of 2: padded last blocks; x2=None
  mirrors the upper triangle), every field equals the unblocked kernel;
  the stored arrays are lazy and read back the same."""
  kernel_fn, x1, x2, args, kwargs = _inputs(name, symmetric)
  expected = scale_cases.unblocked(name, symmetric)
  in_memory = ntkjax.batch(kernel_fn, 2, progress=False)(x1, x2, *args,
                                                         **kwargs)
  _assert_equal_fields(in_memory, expected)
  store = str(tmp_path / 'k.zarr')
  stored = ntkjax.batch(kernel_fn, 2, store=store, progress=False)(
      x1, x2, *args, **kwargs)
  _assert_equal_fields(_stored_fields(stored), expected)


def test_symmetric_computes_upper_blocks_only(monkeypatch, tmp_path):
  """x2=None: 3 x 3 blocks of 3, only the 6 with i <= j are computed (the
  diagonal ones with x2=None), and the result is exactly symmetric."""
  kernel_fn, x1, _, args, _ = _inputs('fc', True)
  x1 = np.concatenate([x1, x1[:2] + 0.5])     # 9 samples
  counter = _Counting(monkeypatch)
  k = ntkjax.batch(kernel_fn, 3, progress=False, store_on_device=False)(
      x1, None, 'ntk')
  assert sorted(counter.blocks) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2),
                                    (2, 2)]
  np.testing.assert_array_equal(k, k.T)


def test_lazy_reads(tmp_path):
  """Indexing a StoredKernel reads what it needs, mirrored below the
  diagonal: slices with steps, single rows and columns, negative indices,
  trailing axes (a network ending in a Conv: (N, N, H, H', W, W'))."""
  kernel_fn, x1, _, args, _ = _inputs('conv_output', True)
  x1 = np.concatenate([x1, -x1])               # 10 samples, blocks of 3
  full = scale_cases.as_fields(kernel_fn(x1, None, 'nngp'))['kernel']
  k = ntkjax.batch(kernel_fn, 3, store=str(tmp_path / 'k.zarr'),
                   progress=False)(x1, None, 'nngp')
  assert k.shape == full.shape and k.dtype == full.dtype and len(k) == 10
  for key in [np.s_[:], np.s_[7:2:-2, 1:9:3], np.s_[4], np.s_[:, -1],
              np.s_[5, 2], np.s_[8:, :4, 0], np.s_[..., 1, 0],
              np.s_[2:7, 3:8, :, 1]]:
    np.testing.assert_allclose(k[key], full[key], rtol=1e-12, atol=0,
                               err_msg=str(key))
  rows = np.array([9, 0, 4])
  np.testing.assert_allclose(k[rows], full[rows], rtol=1e-12, atol=0)
  np.testing.assert_allclose(k[:, rows], full[:, rows], rtol=1e-12, atol=0)
  with pytest.raises(IndexError, match='one of the two batch axes'):
    k[rows, rows]


def test_interrupt_then_resume(monkeypatch, tmp_path):
  """Ctrl-C after 4 blocks: those 4 are stored, the error says how many
  and how to resume; rerunning computes exactly the missing blocks and the
  result equals the unblocked kernel."""
  kernel_fn, x1, _, args, kwargs = _inputs('cnn_flatten', True)
  x1 = np.concatenate([x1, x1 * 0.5, x1[:2]])  # 12 samples: 4 x 4 blocks
  store = str(tmp_path / 'k.zarr')
  run = lambda: ntkjax.batch(kernel_fn, 3, store=store, progress=False)(
      x1, None, *args, **kwargs)
  with monkeypatch.context() as patch:
    _Counting(patch, fail_at=4)
    with pytest.raises(KeyboardInterrupt) as info:
      run()
  assert any('4 of 10 blocks are stored' in note and 'rerun' in note
             for note in info.value.__notes__)
  counter = _Counting(monkeypatch)
  out = run()
  assert len(counter.blocks) == 10 - 4
  _assert_equal_fields(_stored_fields(out), scale_cases.as_fields(
      kernel_fn(x1, None, *args, **kwargs)))
  # Everything done: a third run computes nothing.
  counter.blocks.clear()
  run()
  assert counter.blocks == []


def _chunk_files(store, field):
  root = os.path.join(store, field, 'c')
  return sorted(os.path.join(d, f) for d, _, files in os.walk(root)
                for f in files)


@pytest.mark.parametrize('damage', ['truncate_data', 'delete_data',
                                    'torn_marker', 'partial_file'])
def test_damaged_chunks_are_recomputed(damage, monkeypatch, tmp_path):
  """A data chunk truncated or lost on disk, or a torn marker, is not
  taken as done: the rerun recomputes exactly that block. A leftover
  '.partial' file of an interrupted write is ignored."""
  kernel_fn, x1, _, args, kwargs = _inputs('fc', True)
  store = str(tmp_path / 'k.zarr')
  run = lambda: ntkjax.batch(kernel_fn, 3, store=store, progress=False)(
      x1, None, 'ntk')
  expected = np.asarray(run())
  # Block (1, 2) of the 3 x 3 grid: ntk/c/1/2, done/c/1/2.
  data = os.path.join(store, 'ntk', 'c', '1', '2')
  marker = os.path.join(store, 'done', 'c', '1', '2')
  if damage == 'truncate_data':
    with open(data, 'r+b') as f:
      f.truncate(os.path.getsize(data) // 2)
  elif damage == 'delete_data':
    os.remove(data)
  elif damage == 'torn_marker':
    with open(marker, 'r+b') as f:
      f.truncate(3)
  else:
    with open(data + '.abc.partial', 'wb') as f:
      f.write(b'\0' * 10)
  counter = _Counting(monkeypatch)
  again = run()
  assert counter.blocks == ([] if damage == 'partial_file' else [(1, 2)])
  np.testing.assert_array_equal(np.asarray(again), expected)


def test_sigkill_then_resume(tmp_path):
  """A process writing a store is SIGKILLed after some blocks; the rerun
  computes exactly the blocks not marked done (counted from the store)
  and the result is identical to an uninterrupted computation."""
  store = str(tmp_path / 'k.zarr')
  child = subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'scale_worker.py'), 'slow', store],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  markers = os.path.join(store, 'done', 'c')
  count = lambda: sum(len(f) for _, _, f in os.walk(markers))
  while count() < 5 and time.time() < deadline and child.poll() is None:
    time.sleep(0.05)
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  assert child.returncode == -signal.SIGKILL, child.stderr.read()[-2000:]
  kernel_fn, x1, args = _slow_case()
  job, _ = batching.block_job(kernel_fn, 4, x1, None, *args)
  total = len(job.plan.blocks())
  done = KernelStore(store, job.fingerprint(), job.fields, job.plan).done()
  assert 5 <= len(done) < total
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, 'scale_worker.py'), 'resume', store],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  computed = int(result.stdout.split('computed=')[1].split()[0])
  assert computed == total - len(done)
  assert f'{len(done)} of {total} blocks already stored' in result.stderr
  stored = np.asarray(ntkjax.batch(kernel_fn, 4, store=store,
                                   progress=False)(x1, None, *args))
  np.testing.assert_array_equal(stored, np.asarray(
      ntkjax.batch(kernel_fn, 4, progress=False)(x1, None, *args)))


def _slow_case():
  sys.path.insert(0, HERE)
  import scale_worker
  return scale_worker.case()


def test_store_of_another_computation_is_refused(tmp_path):
  """Reopening a store for a different architecture, hyperparameter,
  inputs, block size or field raises StoreMismatchError naming what
  differs; the store is left as it was."""
  from ntkjax import stax
  kernel_fn, x1, _, args, _ = _inputs('fc', True)
  store = str(tmp_path / 'k.zarr')
  ntkjax.batch(kernel_fn, 3, store=store, progress=False)(x1, None, 'ntk')
  other_w = stax.serial(stax.Dense(8, 1.4, 0.1), stax.Erf(),
                        stax.Dense(8, 1.2, 0.2), stax.Relu(),
                        stax.Dense(1, 1.3, 0.05)).kernel_fn
  cases = [
      (other_w, x1, 3, 'ntk', 'kernel function'),
      (kernel_fn, x1 + 1e-9, 3, 'ntk', 'inputs'),
      (kernel_fn, x1, 2, 'ntk', 'block plan'),
      (kernel_fn, x1, 3, 'nngp', 'arguments'),
  ]
  for fn, x, size, get, reason in cases:
    with pytest.raises(StoreMismatchError, match=reason) as info:
      ntkjax.batch(fn, size, store=store, progress=False)(x, None, get)
    assert 'new store path' in str(info.value)
  k = ntkjax.batch(kernel_fn, 3, store=store, progress=False)(x1, None, 'ntk')
  np.testing.assert_allclose(np.asarray(k), np.asarray(
      kernel_fn(x1, None, 'ntk')), rtol=1e-12)


def test_bad_arguments(tmp_path):
  kernel_fn, x1, x2, _, _ = _inputs('fc', False)
  for size in (-1, 1.5, True):
    with pytest.raises(ValueError, match='batch_size'):
      ntkjax.batch(kernel_fn, size)
  with pytest.raises(ValueError, match='device_count'):
    ntkjax.batch(kernel_fn, 2, device_count=-3)
  with pytest.raises(TypeError, match='client'):
    ntkjax.batch(kernel_fn, 2, client='localhost:8786')
  with pytest.raises(ValueError, match="unknown get='ntk2'"):
    ntkjax.batch(kernel_fn, 2)(x1, x2, 'ntk2')
  with pytest.raises(ValueError, match='x2 contains NaN'):
    ntkjax.batch(kernel_fn, 2)(x1, np.full_like(x2, np.nan), 'ntk')
  with pytest.raises(ValueError, match='devices is empty'):
    ntkjax.batch(kernel_fn, 2, devices=[])(x1, x2, 'ntk')
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(ValueError, match='cannot (open|write) the kernel store'):
    ntkjax.batch(kernel_fn, 2, store=str(blocker / 'k.zarr'),
                 progress=False)(x1, x2, 'ntk')
  import zarr
  zarr.open_group(str(tmp_path / 'other.zarr'), mode='w').create_array(
      'weights', shape=(2,), dtype='f8')
  with pytest.raises(ValueError, match='not an ntkjax kernel store'):
    ntkjax.batch(kernel_fn, 2, store=str(tmp_path / 'other.zarr'),
                 progress=False)(x1, x2, 'ntk')


def test_error_in_a_block_keeps_finished_blocks(monkeypatch, tmp_path):
  """An exception in one block stops the run with that exception, notes
  how many blocks are stored, and keeps them for the rerun."""
  kernel_fn, x1, _, _, _ = _inputs('fc', True)
  store = str(tmp_path / 'k.zarr')
  with monkeypatch.context() as patch:
    _Counting(patch, fail_at=2, error=RuntimeError)
    with pytest.raises(RuntimeError, match='stopped by the test') as info:
      ntkjax.batch(kernel_fn, 3, store=store, progress=False)(x1, None, 'ntk')
  assert any('2 of 6 blocks are stored' in n for n in info.value.__notes__)


def test_progress_bar_and_resume_message(tmp_path, capfd):
  """progress=True reports blocks and entries and, on resume, how many
  blocks were already stored; progress=False prints nothing."""
  kernel_fn, x1, _, _, _ = _inputs('fc', True)
  store = str(tmp_path / 'k.zarr')
  ntkjax.batch(kernel_fn, 3, store=store, progress=False)(x1, None, 'ntk')
  assert capfd.readouterr().err == ''
  ntkjax.batch(kernel_fn, 3, store=store)(x1, None, 'ntk')
  err = capfd.readouterr().err
  assert 'resuming' in err and '6 of 6 blocks already stored' in err


def test_repeated_calls_share_the_compiled_function():
  """A second batch() of the same network and shapes reuses the first's
  jit-compiled block function (found by the program's jaxpr and
  constants), so it compiles nothing; a different hyperparameter does
  not share it."""
  from ntkjax import stax
  kernel_fn, x1, _, _, _ = _inputs('fc', True)
  first, _ = batching.block_job(kernel_fn, 3, x1, None, 'ntk')
  again, _ = batching.block_job(kernel_fn, 3, x1 + 1., None, 'ntk')
  assert first._function() is again._function()
  other = stax.serial(stax.Dense(8, 1.4, 0.1), stax.Erf(),
                      stax.Dense(8, 1.2, 0.2), stax.Relu(),
                      stax.Dense(1, 1.3, 0.05)).kernel_fn
  different, _ = batching.block_job(other, 3, x1, None, 'ntk')
  assert different._function() is not first._function()


def test_compiled_function_under_concurrent_device_threads():
  """Device threads ask a new job for its compiled function at once: all
  get the same one, keyed by the whole program (a half-built key once let
  a CNN job reuse an FC job's function)."""
  import concurrent.futures
  import hashlib
  kernel_fn, x1, _, _, _ = _inputs('cnn_flatten', True)
  job, _ = batching.block_job(kernel_fn, 2, x1, None, 'ntk')
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    functions = list(pool.map(lambda _: job._function(), range(4)))
  assert all(f is functions[0] for f in functions)
  assert job.program_key() != hashlib.sha256(b'').hexdigest()
  assert len(job._traced()) == 2          # diagonal and off-diagonal forms
