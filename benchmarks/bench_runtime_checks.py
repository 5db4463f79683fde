"""Cost of the checks that run inside jitted programs (issue 17).

Under `jit`, `kernel_fn` checks its inputs for NaN/inf and its output for
non-finite entries (an overflow), and `predict.gradient_descent_mse` checks
the training kernel (finite, symmetric, non-negative diagonal), targets and
times; each check is a reduction plus one host callback per call
(`ntkjax/_runtime_checks.py`). This script compiles every case twice, with
the checks staged (the default) and without (NTKJAX_RUNTIME_CHECKS=0 while
tracing), times both interleaved in one run (medians after a warm-up call),
and records the ratio checked / unchecked.

Floor: the checks read every input and output entry once (the kernels
themselves read the inputs once and write the outputs once), so their
extra work is at most one more pass over those arrays; a host round trip
costs tens of microseconds, which dominates only for tiny programs.

Cases:
  - mlp_kernel_n{8,1000}: Dense(512)-Relu-Dense(512)-Erf-Dense(1), NNGP and
    NTK, x1 (N, 64), x2 = None;
  - cnn_kernel_n32: Conv(64, 3x3)-Relu x2, Flatten, Dense(1), 8x8x3 inputs;
  - predict_n{100,2000}: gradient_descent_mse(K, y)(t) with K = X X^T / d + I
    from random data, 10 targets, 3 times.

Output: benchmarks/results/runtime_checks_<backend>.json.

Usage:
    python benchmarks/bench_runtime_checks.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ntkjax  # noqa: E402
from ntkjax import predict, stax  # noqa: E402

COLUMNS = ('case', 'unchecked_s', 'checked_s', 'ratio')


def _traced_with_checks(fn, checks: bool):
  """`jax.jit(fn)` traced (on its first call) with checks on or off."""
  # A fresh function per variant: jit caches traces by the function, so
  # two jax.jit(fn) of one fn would share the first variant's trace.
  jitted = jax.jit(lambda *args: fn(*args))

  def call(*args):
    previous = os.environ.get('NTKJAX_RUNTIME_CHECKS')
    os.environ['NTKJAX_RUNTIME_CHECKS'] = '1' if checks else '0'
    try:
      return jitted(*args)
    finally:
      if previous is None:
        del os.environ['NTKJAX_RUNTIME_CHECKS']
      else:
        os.environ['NTKJAX_RUNTIME_CHECKS'] = previous
  return call


def _cases(quick: bool):
  rng = np.random.default_rng(0)
  mlp = stax.serial(stax.Dense(512, W_std=1.5, b_std=0.1), stax.Relu(),
                    stax.Dense(512, W_std=1.5), stax.Erf(), stax.Dense(1))[2]
  for n in (8, 1000) if not quick else (8, 200):
    x = jnp.asarray(rng.standard_normal((n, 64), dtype=np.float32))
    yield (f'mlp_kernel_n{n}',
           lambda x: mlp(x, None, ('nngp', 'ntk')), (x,))
  cnn = stax.serial(stax.Conv(64, (3, 3), padding='SAME'), stax.Relu(),
                    stax.Conv(64, (3, 3), padding='SAME'), stax.Relu(),
                    stax.Flatten(), stax.Dense(1))[2]
  n = 32 if not quick else 8
  x = jnp.asarray(rng.standard_normal((n, 8, 8, 3), dtype=np.float32))
  yield f'cnn_kernel_n{n}', lambda x: cnn(x, None, ('nngp', 'ntk')), (x,)
  for n in (100, 2000) if not quick else (100,):
    data = rng.standard_normal((n, 32))
    k = jnp.asarray(data @ data.T / 32 + np.eye(n), jnp.float32)
    y = jnp.asarray(rng.standard_normal((n, 10)), jnp.float32)
    t = jnp.asarray([0.5, 1., 10.], jnp.float32)
    yield (f'predict_n{n}',
           lambda k, y, t: predict.gradient_descent_mse(k, y)(t), (k, y, t))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  repeats = 5 if args.quick else 21
  records = []
  for name, fn, fn_args in _cases(args.quick):
    unchecked = _traced_with_checks(fn, False)
    checked = _traced_with_checks(fn, True)
    times = _common.time_interleaved(
        [lambda: unchecked(*fn_args), lambda: checked(*fn_args)], repeats)
    off, on = (float(np.median(t)) for t in times)
    records.append(dict(case=name, unchecked_s=off, checked_s=on,
                        ratio=on / off, repeats=repeats))
  _common.write_benchmark('runtime_checks', records, 'ntkjax',
                          ntkjax.__version__, args.quick, 'runtime_checks',
                          COLUMNS)


if __name__ == '__main__':
  main()
