"""Closed-form ensemble predictions: NTK mean + covariance, 1000 train / 500 test, 10 outputs.

Protocol and flop floor: `_predict_protocol.py`. The reference library's
numbers come from `reference_predict.py` (its own virtualenv).

Usage: python benchmarks/bench_predict.py [--quick]
Output: benchmarks/results/predict_ensemble_<backend>[_quick].json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _predict_protocol as protocol  # noqa: E402
import ntkjax  # noqa: E402
from ntkjax import stax  # noqa: E402


def main(argv=None) -> int:
  """Run the benchmark; write the JSON file and print a table."""
  quick = '--quick' in (sys.argv[1:] if argv is None else argv)
  records = protocol.run(stax, ntkjax.predict.gradient_descent_mse_ensemble,
                         quick)
  protocol.write(records, 'ntkjax', ntkjax.__version__, quick,
                 'predict_ensemble')
  return 0


if __name__ == '__main__':
  sys.exit(main())
