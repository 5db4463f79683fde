"""A process that writes a kernel store, for tests/test_scale.py's SIGKILL
test (run as a script, not collected by pytest).

    python scale_worker.py slow STORE     # each block also sleeps 0.1 s
    python scale_worker.py resume STORE   # prints computed=<blocks computed>
"""

import sys
import time

import jax

jax.config.update('jax_enable_x64', True)

import numpy as np  # noqa: E402

import ntkjax  # noqa: E402
from ntkjax import stax  # noqa: E402
from ntkjax.scale import blocks  # noqa: E402


def case():
  """A depth-2 FC NTK of 40 samples: 55 blocks of 4 (x2=None)."""
  kernel_fn = stax.serial(stax.Dense(8, 1.3, 0.1), stax.Relu(),
                          stax.Dense(1, 1.1, 0.2)).kernel_fn
  x1 = np.random.default_rng(0).standard_normal((40, 5))
  return kernel_fn, x1, ('ntk',)


def main(mode: str, store: str):
  computed = []
  original = blocks.BlockJob.compute

  def compute(job, i, j, device=None):
    computed.append((i, j))
    out = original(job, i, j, device)
    if mode == 'slow':
      time.sleep(0.1)
    return out
  blocks.BlockJob.compute = compute
  kernel_fn, x1, args = case()
  ntkjax.batch(kernel_fn, 4, store=store)(x1, None, *args)
  print(f'computed={len(computed)}')


if __name__ == '__main__':
  main(*sys.argv[1:])
