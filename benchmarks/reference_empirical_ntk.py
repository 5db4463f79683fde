"""Reference timings for bench_empirical_ntk.py, with neural-tangents.

Same networks, data, cases and protocol as benchmarks/bench_empirical_ntk.py
(all in _empirical_protocol.py, whose docstring states the flop floors): the
ReLU MLP 784 -> 1024 -> 1024 -> 1024 -> O and the CNN 3 x [Conv(64, 3x3,
SAME), Relu] -> GlobalAvgPool -> Dense(O) on 8x8x1 images, two different
batches of N = 128 float32 samples (same numpy seed, so the same data),
trace_axes=(), O in (1, 10), vmap_axes in (None, 0), each case in a fresh
subprocess, timing `jax.jit(lambda a, b, p: ntk_fn(a, b, p))` with
`ntk_fn = neural_tangents.empirical_ntk_fn(apply_fn, trace_axes=(),
vmap_axes=V, implementation=I)` for I in JACOBIAN_CONTRACTION,
NTK_VECTOR_PRODUCTS and STRUCTURED_DERIVATIVES (its AUTO is not timed), and
the default call `empirical_ntk_fn(apply_fn, trace_axes=())` (implementation
'DEFAULT'; neural-tangents defaults to vmap_axes=None and
JACOBIAN_CONTRACTION, so its record is that case's, `same_as`, unless
--no-alias). The command line (--network, --implementations, --outputs,
--cases, --update) is the protocol's; compare_empirical_ntk.py runs this
script after ours.

jax 0.4.25 reports no memory plan on CPU (planned_gb is null), so a
reference case is not skipped in advance: it runs under the protocol's
watchdog, which kills it once its RSS passes 20 GB or the machine runs low
('failed: killed ...').

This script runs ONLY in a separate virtualenv outside the repository;
neural-tangents is never a dependency of ntkjax, and this file must not import
ntkjax. Create the venv with (Python 3.11):

    python3 -m venv /tmp/nt_ref_venv
    /tmp/nt_ref_venv/bin/pip install --upgrade pip
    /tmp/nt_ref_venv/bin/pip install neural-tangents==0.6.5 jax==0.4.25 \
        jaxlib==0.4.25 numpy==1.26.4 scipy==1.12.0 tensorflow==2.15.1 \
        tf2jax==0.3.5

and run it from the repository root:

    /tmp/nt_ref_venv/bin/python benchmarks/reference_empirical_ntk.py [--quick]
    /tmp/nt_ref_venv/bin/python benchmarks/reference_empirical_ntk.py \
        --network cnn --update

Output: benchmarks/results/empirical_ntk_reference_<backend>.json
(_quick.json for --quick), with the same per-case fields as ours
(benchmarks/run_all.py puts them side by side).
"""

from __future__ import annotations

import os
import sys

# Run as a script: make the helpers next to this file importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _empirical_protocol as protocol  # noqa: E402

try:
  import neural_tangents as nt  # noqa: E402
  from neural_tangents import stax  # noqa: E402
except ImportError:
  sys.exit('reference_empirical_ntk.py needs neural-tangents; run it with '
           "the reference venv (see this file's docstring), e.g. "
           '/tmp/nt_ref_venv/bin/python benchmarks/reference_empirical_ntk.py')

IMPLEMENTATIONS = ('JACOBIAN_CONTRACTION', 'NTK_VECTOR_PRODUCTS',
                   'STRUCTURED_DERIVATIVES')


def main(argv=None) -> int:
  """Run the reference benchmark (see the module docstring)."""
  library = {'name': 'neural_tangents',
             'version': getattr(nt, '__version__', '?'), 'stax': stax,
             'empirical_ntk_fn': nt.empirical_ntk_fn,
             'implementation_enum': nt.NtkImplementation,
             'implementations': IMPLEMENTATIONS}
  return protocol.main(argv, script=__file__, library=library,
                       prefix='empirical_ntk_reference')


if __name__ == '__main__':
  sys.exit(main())
