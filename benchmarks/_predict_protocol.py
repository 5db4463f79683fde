"""Ensemble-prediction benchmark protocol, shared by ours and the reference.

`gradient_descent_mse_ensemble` for the depth-3 fully connected ReLU kernel
of `_fc_protocol` (width 512, W_std 1.5, b_std 0.05, d = 784), 1000 training
and 500 test points (random normal float32), 10 outputs, diag_reg = 1e-4:
the NTK mean and covariance at t = None and t = 1. `kernel_fn` is jitted
(`jax.jit(kernel_fn, static_argnames='get')`), as both libraries advise.

Timed, per t (medians after a warm-up call that compiles everything):
* `total`: a fresh `predict_fn` (nothing cached) called once:
  `gradient_descent_mse_ensemble(...)(t, x_test, 'ntk', compute_cov=True)`;
* `kernels`: the three kernel calls it needs (train-train, test-train,
  test-test), timed alone;
* `solve` = total - kernels: factorization and products.

Flop floor: the train-train kernel is a 1000 x 1000 x 784 GEMM (1.6 GFLOP)
plus elementwise work; the solve is a Cholesky (t = None, ~0.3 GFLOP) or an
eigendecomposition (t = 1, ~4 GFLOP in LAPACK's syevd) of a 1000 x 1000
matrix, and the covariance needs 500 x 1000 x 1000 products (~1-2 GFLOP).
Imports neither library; the scripts pass their own.
"""

from __future__ import annotations

import statistics

import jax
import numpy as np

import _common
import _fc_protocol as fc

N_TRAIN, N_TEST, OUTPUTS = 1000, 500, 10
QUICK = (200, 100)
DIAG_REG = 1e-4
TIMES = (None, 1.0)
REPEATS = 5
COLUMNS = ('t', 'N_train', 'total_seconds_median', 'kernel_seconds_median',
           'solve_seconds_median', 'peak_rss_mib')


def data(quick: bool):
  """x_train, y_train, x_test (float32)."""
  n_train, n_test = QUICK if quick else (N_TRAIN, N_TEST)
  x_train, x_test = _common.make_inputs(max(n_train, n_test), fc.D)
  rng = np.random.default_rng(1)
  y_train = rng.standard_normal((n_train, OUTPUTS)).astype(np.float32)
  return x_train[:n_train], jax.numpy.asarray(y_train), x_test[:n_test]


def run(stax, ensemble_fn, quick: bool) -> list:
  """Time every t.

  Args:
    stax: the library's stax module (same constructor names in both).
    ensemble_fn: the library's `predict.gradient_descent_mse_ensemble`.
    quick: small sizes.

  Returns:
    One record per t.
  """
  _, _, kernel_fn = stax.serial(*fc.network_layers(stax, 'Relu'))
  kernel_fn = jax.jit(kernel_fn, static_argnames='get')
  x_train, y_train, x_test = data(quick)

  def total(t):
    predict_fn = ensemble_fn(kernel_fn, x_train, y_train, diag_reg=DIAG_REG)
    return predict_fn(t, x_test, 'ntk', compute_cov=True)

  def kernels():
    return (kernel_fn(x_train, None, ('nngp', 'ntk')),
            kernel_fn(x_test, x_train, ('nngp', 'ntk')),
            kernel_fn(x_test, None, 'nngp'))

  records = []
  for t in TIMES:
    total_times, kernel_times = _common.time_interleaved(
        [lambda: total(t), kernels], REPEATS)
    t_total = statistics.median(total_times)
    t_kernel = statistics.median(kernel_times)
    records.append({
        't': 'None' if t is None else t, 'N_train': len(x_train),
        'N_test': len(x_test), 'outputs': OUTPUTS, 'repeats': REPEATS,
        'total_seconds_median': t_total, 'total_seconds_min': min(total_times),
        'kernel_seconds_median': t_kernel,
        'solve_seconds_median': t_total - t_kernel,
        'peak_rss_mib': _common.peak_rss_mib()})
    print(f'  done: t={t}: total {t_total:.3g} s, kernels {t_kernel:.3g} s',
          flush=True)
  return records


def write(records: list, library: str, version: str, quick: bool,
          prefix: str) -> str:
  """Write `<prefix>_<backend>[_quick].json` under results/, print a table
  (`_common.write_benchmark`)."""
  return _common.write_benchmark('predict_ensemble', records, library, version, quick,
                                 prefix, COLUMNS)
