"""Reference timings for bench_cnn_kernel.py, with neural-tangents.

Same network, data and protocol (`_cnn_protocol.py`). Runs ONLY in the
reference virtualenv outside the repository (see reference_fc_kernel.py for
how to create /tmp/nt_ref_venv); never imports ntkjax:

    /tmp/nt_ref_venv/bin/python benchmarks/reference_cnn_kernel.py [--quick]

Output: benchmarks/results/cnn_kernel_reference_<backend>.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cnn_protocol as protocol  # noqa: E402

try:
  import neural_tangents as nt  # noqa: E402
  from neural_tangents import stax  # noqa: E402
except ImportError:
  sys.exit('reference_cnn_kernel.py needs neural-tangents; run it with the '
           "reference venv (see this file's docstring).")


def main(argv=None) -> int:
  """Run the reference benchmark; write the JSON file and print a table."""
  sizes, quick = protocol.parse(argv, __doc__.splitlines()[0])
  records = protocol.run(stax, sizes)
  protocol.write(records, 'neural_tangents', getattr(nt, '__version__', '?'),
                 quick, 'cnn_kernel_reference')
  return 0


if __name__ == '__main__':
  sys.exit(main())
