"""Reference timings for bench_predict.py, with neural-tangents.

Same protocol (`_predict_protocol.py`). Runs ONLY in the reference
virtualenv outside the repository (see reference_fc_kernel.py's docstring
for how to create /tmp/nt_ref_venv); never imports ntkjax.

Usage: /tmp/nt_ref_venv/bin/python benchmarks/reference_predict.py [--quick]
Output: benchmarks/results/predict_ensemble_reference_<backend>[_quick].json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _predict_protocol as protocol  # noqa: E402

try:
  import neural_tangents as nt  # noqa: E402
  from neural_tangents import stax  # noqa: E402
except ImportError:
  sys.exit('reference_predict.py needs neural-tangents; run it with the '
           'reference venv, e.g. /tmp/nt_ref_venv/bin/python '
           'benchmarks/reference_predict.py')


def main(argv=None) -> int:
  """Run the reference benchmark; write the JSON file and print a table."""
  quick = '--quick' in (sys.argv[1:] if argv is None else argv)
  records = protocol.run(stax, nt.predict.gradient_descent_mse_ensemble,
                         quick)
  protocol.write(records, 'neural_tangents', getattr(nt, '__version__', '?'),
                 quick, 'predict_ensemble_reference')
  return 0


if __name__ == '__main__':
  sys.exit(main())
