"""CNN kernels (issue 4): 3 x [Conv(64, 3x3, SAME), Relu], GlobalAvgPool or Flatten, Dense(1), 8x8x1 images.

Protocol and flop floors: `_cnn_protocol.py`. The reference library's
numbers come from `reference_cnn_kernel.py` (its own virtualenv).

Usage: python benchmarks/bench_cnn_kernel.py [--quick] [--sizes N ...]
Output: benchmarks/results/cnn_kernel_<backend>[_quick].json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cnn_protocol as protocol  # noqa: E402
import ntkjax  # noqa: E402
from ntkjax import stax  # noqa: E402


def main(argv=None) -> int:
  """Run the benchmark; write the JSON file and print a table."""
  sizes, quick = protocol.parse(argv, __doc__.splitlines()[0])
  records = protocol.run(stax, sizes)
  protocol.write(records, 'ntkjax', ntkjax.__version__, quick, 'cnn_kernel')
  return 0


if __name__ == '__main__':
  sys.exit(main())
