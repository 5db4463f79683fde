"""`batch` with blocks computed in parallel: over 4 local devices (CPU
devices forced by XLA_FLAGS in a subprocess, as on a multi-GPU host) and as
tasks of a Dask `LocalCluster` of 2 worker processes, one of them SIGKILLed
mid-run. Results must equal the unblocked kernel (float64, 1e-12)."""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import ntkjax
import scale_cases

distributed = pytest.importorskip('distributed')
cloudpickle = pytest.importorskip('cloudpickle')
pytest.importorskip('zarr')

HERE = os.path.dirname(os.path.abspath(__file__))
# Workers unpickle this module's functions by value (tests/ is not on
# their path).
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(scale_cases)


def test_four_local_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, 'scale_devices.py')], cwd=HERE,
      env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:] + result.stdout
  assert result.stdout.startswith('ok'), result.stdout


@pytest.fixture(scope='module')
def cluster():
  """Two single-threaded worker processes with float64 enabled (as the
  client has: see test_worker_precision_must_match)."""
  cluster = distributed.LocalCluster(
      n_workers=2, threads_per_worker=1, processes=True,
      dashboard_address=':0',
      env={'JAX_ENABLE_X64': '1', 'JAX_PLATFORMS': 'cpu',
           'OPENBLAS_NUM_THREADS': '1'})
  yield cluster
  cluster.close()


@pytest.fixture
def client(cluster):
  """Not the default client: batch must use the one it is given."""
  with distributed.Client(cluster, set_as_default=False) as client:
    yield client


@pytest.mark.parametrize('name', ['fc', 'cnn_pool', 'dropout', 'empirical'])
def test_dask_workers_equal_unblocked(name, client, tmp_path):
  """Blocks as Dask tasks, written by the workers into a store and
  returned to the client (no store), for x2 given and x2=None."""
  for symmetric in (False, True):
    kernel_fn, x1, x2, args, kwargs = scale_cases.CASES[name]()
    if symmetric:
      x2, kwargs = None, scale_cases.symmetric_kwargs(kwargs)
    expected = scale_cases.unblocked_of(kernel_fn, x1, x2, args, kwargs)
    for store in (None, str(tmp_path / f'{symmetric}.zarr')):
      out = ntkjax.batch(kernel_fn, 2, store=store, client=client,
                         progress=False)(x1, x2, *args, **kwargs)
      got = scale_cases.as_fields(out)
      for field, value in expected.items():
        assert scale_cases.relative_error(got[field], value) < 1e-12, field


_FC = scale_cases.fc()[0]


def _sleep(x):
  time.sleep(0.25)
  return np.zeros((), x.dtype)


def slow_ntk(x1, x2):
  """The FC NTK, taking at least 0.25 s per block (a host callback)."""
  pause = jax.pure_callback(_sleep, jax.ShapeDtypeStruct((), x1.dtype),
                            x1[0, 0])
  return _FC(x1, x2, 'ntk') + 0 * pause


def _slow_inputs():
  rng = np.random.default_rng(3)
  return rng.standard_normal((24, 6)), rng.standard_normal((24, 6))


def _markers(store):
  return sum(len(f) for _, _, f in os.walk(os.path.join(store, 'done', 'c')))


def _in_background(fn):
  outcome = {}

  def run():
    try:
      outcome['value'] = fn()
    except BaseException as e:  # noqa: BLE001
      outcome['error'] = e
  thread = threading.Thread(target=run)
  thread.start()
  return thread, outcome


def _wait_for_markers(store, count, thread):
  deadline = time.time() + 120
  while _markers(store) < count and time.time() < deadline:
    assert thread.is_alive()
    time.sleep(0.05)


def test_worker_killed_mid_run(client, tmp_path):
  """One of the two workers is SIGKILLed after 4 of 36 blocks are stored:
  Dask reschedules its tasks, the run completes, identical to the
  unblocked kernel."""
  x1, x2 = _slow_inputs()
  store = str(tmp_path / 'k.zarr')
  thread, outcome = _in_background(lambda: np.asarray(ntkjax.batch(
      slow_ntk, 4, store=store, client=client, progress=False)(x1, x2)))
  _wait_for_markers(store, 4, thread)
  pids = client.run(os.getpid)
  victim = sorted(pids.values())[0]
  before = _markers(store)
  os.kill(victim, signal.SIGKILL)
  thread.join(300)
  assert before < 36
  assert 'error' not in outcome, outcome.get('error')
  np.testing.assert_allclose(outcome['value'], np.asarray(_FC(x1, x2, 'ntk')),
                             rtol=1e-12, atol=0)
  assert victim not in client.run(os.getpid).values()


def test_client_gone_mid_run_keeps_blocks(cluster, tmp_path):
  """The client closes mid-run: the error says how many blocks are stored
  and how to resume; resuming on a new client finishes the rest."""
  x1, x2 = _slow_inputs()
  store = str(tmp_path / 'k.zarr')
  client = distributed.Client(cluster)
  thread, outcome = _in_background(lambda: ntkjax.batch(
      slow_ntk, 4, store=store, client=client, progress=False)(x1, x2))
  _wait_for_markers(store, 3, thread)
  client.close()
  thread.join(120)
  error = outcome.get('error')
  assert error is not None
  notes = ' '.join(getattr(error, '__notes__', []))
  assert 'blocks are stored' in notes and 'rerun the same call' in notes
  with distributed.Client(cluster) as again:
    k = ntkjax.batch(slow_ntk, 4, store=store, client=again,
                     progress=False)(x1, x2)
    np.testing.assert_allclose(np.asarray(k), np.asarray(_FC(x1, x2, 'ntk')),
                               rtol=1e-12, atol=0)


def test_worker_precision_must_match(tmp_path):
  """A float64 kernel computed by workers without float64 raises a clear
  error instead of storing float32 values."""
  with distributed.LocalCluster(n_workers=1, threads_per_worker=1,
                                processes=True, dashboard_address=':0',
                                env={'JAX_ENABLE_X64': '0',
                                     'JAX_PLATFORMS': 'cpu'}) as cluster32, \
      distributed.Client(cluster32) as client:
    kernel_fn, x1, x2, _, _ = scale_cases.fc()
    with pytest.raises(TypeError, match='JAX_ENABLE_X64'):
      ntkjax.batch(kernel_fn, 3, client=client, progress=False)(x1, x2, 'ntk')


def test_cg_products_on_the_cluster(client, tmp_path):
  """predict with solvers.CG(client=...): a stored kernel's products run as
  Dask tasks (one strip of rows each) and the predictions equal the
  in-memory solve."""
  from ntkjax import predict, solvers
  kernel_fn, x1, x2, _, _ = scale_cases.fc(60, 20)
  y = np.random.default_rng(5).standard_normal((60, 2))
  stored = ntkjax.batch(kernel_fn, 16, store=str(tmp_path / 'k.zarr'),
                        progress=False)(x1, None, 'ntk')
  k, kt = kernel_fn(x1, None, 'ntk'), kernel_fn(x2, x1, 'ntk')
  settings = solvers.CG(tol=1e-12, client=client)
  got = predict.gp_inference(stored, y, diag_reg=1e-3, solver=settings)(
      'ntk', kt)
  expected = predict.gp_inference(k, y, diag_reg=1e-3, solver='cholesky')(
      'ntk', kt)
  assert scale_cases.relative_error(got, expected) < 1e-9
  assert settings.history[-1].converged
