"""Empirical NTK of a wide MLP and a small CNN: ntkjax, time and peak memory.

Networks, data, cases and protocol are in _empirical_protocol.py (shared with
reference_empirical_ntk.py, which runs neural-tangents 0.6.5 on the same
cases; compare_empirical_ntk.py runs both and checks the issue's goals): the
ReLU MLP 784 -> 1024 -> 1024 -> 1024 -> O and the CNN 3 x [Conv(64, 3x3,
SAME), Relu] -> GlobalAvgPool -> Dense(O) on 8x8x1 images, x1 and x2 two
different batches of N = 128 float32 samples, trace_axes=(), O in (1, 10),
vmap_axes in (None, 0), and every `ntkjax.NtkImplementation`:
JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS, STRUCTURED_DERIVATIVES and AUTO;
plus, per network and O, the default call `ntkjax.empirical_ntk_fn(apply_fn,
trace_axes=())` (implementation 'DEFAULT'). We time
`jax.jit(lambda a, b, p: ntk_fn(a, b, p))` with
`ntk_fn = ntkjax.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=V,
implementation=I)` after checking XLA's memory plan (cases planning over
20 GB are skipped), each case in a fresh subprocess so its peak RSS is its
own. Implementations that raise NotImplementedError are recorded as
'not implemented'.

For AUTO (and for DEFAULT where ntkjax's default implementation is AUTO) the
record also has `auto_costs` ({implementation: cost}, from
`ntkjax.ntk_implementation_costs` on the same shapes and axes; cost =
flops + 8 x bytes of XLA's analysis), `auto_choice` (their argmin, with
near-ties settled by `ntkjax.empirical.auto_choice`'s order),
`auto_costs_seconds`, and, after all cases ran, `fastest_measured` (the
fastest of the other three at the same network, O and vmap_axes) and
`auto_chose_fastest`. Every record carries `ntkjax_sources_sha256`, a digest
of ntkjax/*.py when the case ran (others edit ntkjax/ on this machine).

The top-level 'reference' block keeps the numbers quoted in the
neural-tangents GitHub issue that motivated this benchmark (vmap setting not
stated; not measured here) as context only; the measured reference numbers
are in empirical_ntk_reference_<backend>.json. 'ntkjax_git' records the
commit and whether ntkjax/ had uncommitted changes.

Output: benchmarks/results/empirical_ntk_<backend>.json
(empirical_ntk_<backend>_quick.json for --quick).

Usage:
    python benchmarks/bench_empirical_ntk.py            # N = 128, ~30 min
    python benchmarks/bench_empirical_ntk.py --quick    # N = 16
    python benchmarks/bench_empirical_ntk.py --network cnn --update
    python benchmarks/bench_empirical_ntk.py --cases 'mlp:*:10:0' --update
    python benchmarks/bench_empirical_ntk.py --case cnn AUTO 10 0
"""

from __future__ import annotations

import inspect
import os
import sys
import time

# Run as a script: make the helpers next to this file importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import _empirical_protocol as protocol  # noqa: E402
import ntkjax  # noqa: E402
from ntkjax import stax  # noqa: E402

IMPLEMENTATIONS = ('JACOBIAN_CONTRACTION', 'NTK_VECTOR_PRODUCTS',
                   'STRUCTURED_DERIVATIVES', 'AUTO')

# neural-tangents 0.6.5 on a 2-core CPU, same network, N = 128, d = 784, as
# quoted in the neural-tangents GitHub issue (vmap_axes not stated; not
# measured by this script). Context only: not attached to cases.
REFERENCE = {
    'library': 'neural_tangents',
    'library_version': '0.6.5',
    'source': ('neural-tangents GitHub issue (empirical NTK of this MLP, '
               'N = 128, d = 784, trace_axes=(), vmap_axes not stated), '
               '2-core CPU; quoted, not measured here'),
    'cases': [
        {'implementation': 'JACOBIAN_CONTRACTION', 'O': 1, 'seconds': 5.9},
        {'implementation': 'NTK_VECTOR_PRODUCTS', 'O': 1, 'seconds': 1.3},
        {'implementation': 'STRUCTURED_DERIVATIVES', 'O': 1, 'seconds': 0.69},
        {'implementation': 'JACOBIAN_CONTRACTION', 'O': 10, 'seconds': None,
         'status': 'did not fit in 24 GB'},
        {'implementation': 'NTK_VECTOR_PRODUCTS', 'O': 10, 'seconds': None,
         'status': 'did not fit in 24 GB'},
        {'implementation': 'STRUCTURED_DERIVATIVES', 'O': 10, 'seconds': 7.6},
    ],
}


sources_digest = _common.ntkjax_source_digest


def describe(apply_fn, x1, x2, params, impl_name: str, vmap_axes) -> dict:
  """The sources' digest, and AUTO's cost estimates and choice.

  Args:
    apply_fn: the network's apply function.
    x1, x2, params: the case's inputs.
    impl_name: the case's implementation name.
    vmap_axes: the case's vmap_axes.

  Returns:
    ntkjax_sources_sha256; for AUTO, and for DEFAULT where the default
    implementation is AUTO, also auto_costs ({name: cost}), auto_choice
    (`empirical.auto_choice`: the argmin, near-ties by its order) and auto_costs_seconds (or auto_costs_error where the costs
    cannot be had for the default vmap_axes).
  """
  out = {'ntkjax_sources_sha256': sources_digest()}
  if impl_name == protocol.DEFAULT:
    params_ = inspect.signature(ntkjax.empirical_ntk_fn).parameters
    if params_['implementation'].default != ntkjax.NtkImplementation.AUTO:
      return out
    # The default call's vmap_axes is whatever empirical_ntk_fn defaults to
    # (possibly an automatic-detection marker): ask for the costs with it.
    vmap_axes = params_['vmap_axes'].default
  elif impl_name != 'AUTO':
    return out
  start = time.perf_counter()
  try:
    costs = ntkjax.ntk_implementation_costs(
        apply_fn, x1, x2, params, trace_axes=protocol.TRACE_AXES,
        vmap_axes=vmap_axes)
  except Exception as error:  # noqa: BLE001 -- recorded, the case still runs
    out['auto_costs_error'] = f'{type(error).__name__}: {error}'[:300]
    return out
  seconds = time.perf_counter() - start
  choice = ntkjax.empirical.auto_choice(costs).name
  costs = {ntkjax.NtkImplementation(k).name: float(v)
           for k, v in costs.items()}
  out.update(auto_choice=choice, auto_costs=costs,
             auto_costs_seconds=seconds)
  return out


def mark_fastest(records: list):
  """Add fastest_measured / auto_chose_fastest to the AUTO records.

  Args:
    records: all case records of the run (modified in place).
  """
  def setting(r):
    return r.get('network', 'mlp'), r['O'], r['vmap_axes']
  for auto in records:
    if auto['implementation'] != 'AUTO' or 'auto_choice' not in auto:
      continue
    timed = [r for r in records
             if r['implementation'] in IMPLEMENTATIONS[:3]
             and r.get('status') == 'ok' and setting(r) == setting(auto)]
    if timed:
      best = min(timed, key=lambda r: r['kernel_seconds_median'])
      auto['fastest_measured'] = best['implementation']
      auto['auto_chose_fastest'] = (best['implementation'] ==
                                    auto['auto_choice'])


def git_state() -> dict:
  """The commit measured, and whether ntkjax/ differed from it."""
  state = _common.ntkjax_git_state()
  return {'commit': state['ntkjax_commit'],
          'ntkjax_dirty': state['ntkjax_dirty']}


def main(argv=None) -> int:
  """Run the benchmark (see the module docstring)."""
  library = {'name': 'ntkjax', 'version': ntkjax.__version__, 'stax': stax,
             'empirical_ntk_fn': ntkjax.empirical_ntk_fn,
             'implementation_enum': ntkjax.NtkImplementation,
             'implementations': IMPLEMENTATIONS, 'describe': describe}
  return protocol.main(
      argv, script=__file__, library=library, prefix='empirical_ntk',
      finish=mark_fastest,
      extra={'ntkjax_git': git_state(), 'reference': REFERENCE})


if __name__ == '__main__':
  sys.exit(main())
