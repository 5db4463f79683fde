"""Run as a script with XLA_FLAGS=--xla_force_host_platform_device_count=4
(tests/test_scale_parallel.py does): `batch` over 4 CPU devices, in memory
and into a store, equals the unblocked kernel for every case of
scale_cases.py, and every device computes blocks. Prints 'ok' and the
number of blocks each device computed; raises on any difference."""

import collections
import sys
import tempfile

import jax

jax.config.update('jax_enable_x64', True)


import numpy as np  # noqa: E402

import ntkjax  # noqa: E402
import scale_cases  # noqa: E402
from ntkjax.scale import blocks  # noqa: E402


def main():
  devices = jax.local_devices()
  assert len(devices) == 4, devices
  used = collections.Counter()
  original = blocks.BlockJob.compute

  def compute(job, i, j, device=None):
    used[device] += 1
    return original(job, i, j, device)
  blocks.BlockJob.compute = compute
  # A kernel_fn, one with a per-call context (dropout's sample ids) and an
  # empirical NTK, each compiled on 4 devices; the store path (shared by
  # all cases) once per kind of function. (The CNN and graph cases, which
  # cost most of the compile time here, are blocked in-process by
  # test_batching.py / test_graph.py and over Dask workers by
  # test_scale_parallel.py; what this script adds is the 4 devices.)
  for name in ('fc', 'dropout', 'empirical'):
    for symmetric in (False, True):
      kernel_fn, x1, x2, args, kwargs = scale_cases.CASES[name](9, 7)
      if symmetric:
        x2, kwargs = None, scale_cases.symmetric_kwargs(kwargs)
      expected = scale_cases.unblocked_of(kernel_fn, x1, x2, args, kwargs)
      with tempfile.TemporaryDirectory() as folder:
        stores = [None] + ([folder + '/k.zarr'] if symmetric and name in (
            'fc', 'empirical') else [])
        for store in stores:
          out = ntkjax.batch(kernel_fn, 2, store=store, progress=False)(
              x1, x2, *args, **kwargs)
          got = scale_cases.as_fields(out)
          for field, value in expected.items():
            error = scale_cases.relative_error(got[field], value)
            if not error < 1e-12:
              sys.exit(f'{name} symmetric={symmetric} store={store}: '
                       f'{field} off by {error}')
  assert set(used) == set(devices), used
  sharded_solve(devices)
  print('ok', sorted(used.values()))


def sharded_solve(devices):
  """A train kernel sharded by rows over the 4 devices: CG's products run
  sharded and the predictions equal the dense solve."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from ntkjax import predict, solvers
  kernel_fn, x1, _, _, _ = scale_cases.CASES['fc'](400, 1)
  k = kernel_fn(x1, None, 'ntk')
  y = np.random.default_rng(0).standard_normal((400, 2))
  mesh = Mesh(np.array(devices), ('rows',))
  sharded = jax.device_put(k, NamedSharding(mesh, PartitionSpec('rows')))
  assert len(sharded.sharding.device_set) == 4
  got = predict.gp_inference(sharded, y, diag_reg=1e-3, solver=solvers.CG(
      tol=1e-12))('ntk', k[:50])
  expected = predict.gp_inference(np.asarray(k), y, diag_reg=1e-3,
                                  solver='cholesky')('ntk', k[:50])
  error = scale_cases.relative_error(got, expected)
  if not error < 1e-9:
    sys.exit(f'sharded CG off by {error}')


if __name__ == '__main__':
  main()
