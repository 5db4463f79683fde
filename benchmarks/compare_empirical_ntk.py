"""Empirical NTK, both libraries in one run: ours, then the reference's.

Runs bench_empirical_ntk.py (ntkjax, this interpreter) and then
reference_empirical_ntk.py (neural-tangents, in its own virtualenv; see that
script's docstring), one after the other so they never share the 2 CPUs,
with the same selection of cases (networks, data, cases and protocol:
_empirical_protocol.py); then prints the issue's goals, case by case
(_empirical_summary.py: each implementation <= the reference's, peak RSS <=
the reference's, AUTO within 10% of the fastest of ours, default call >= 20x
faster than the reference's), and regenerates benchmarks/README.md, where
run_all.py shows the same goals table.

Full run: 36 cases of ours and 28 of the reference's (its 2 default calls
reuse its JACOBIAN_CONTRACTION vmap_axes=None records: the same call). On
the 2-core CPU, estimated at 60-70 minutes: the MLP ~31 (ours ~13, the
reference ~17, from the previous full run), the CNN ~30 (ours ~19, the
reference ~11; the --quick times scaled by (128 / 16)^2, an upper bound,
taken under load), plus at most 5 minutes per script of waiting for quiet.
`--network mlp --update` then `--network cnn --update` splits it in two.
The per-case budget is the protocol's (_empirical_protocol.py): plans over
20 GB skipped, 1 timed call after a warm-up over 30 s, 600 s timeout.

Usage (from the repository root):
    .venv/bin/python benchmarks/compare_empirical_ntk.py            # full
    .venv/bin/python benchmarks/compare_empirical_ntk.py --quick    # N = 16
    .venv/bin/python benchmarks/compare_empirical_ntk.py --network cnn \\
        --update                      # a subset, merged into both files
    .venv/bin/python benchmarks/compare_empirical_ntk.py --summary-only
Any option but --reference-python, --skip-ours, --skip-reference and
--summary-only is passed to both scripts (see `--help` of either).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _empirical_summary  # noqa: E402

REFERENCE_PYTHON = os.environ.get('NT_REF_PYTHON',
                                  '/tmp/nt_ref_venv/bin/python')


def run(command: list) -> tuple:
  """Run a benchmark script to completion, its output going to ours.

  Args:
    command: argv.

  Returns:
    `(exit code, seconds)`.
  """
  print('$ ' + ' '.join(command), flush=True)
  start = time.perf_counter()
  code = subprocess.call(command, cwd=os.path.dirname(HERE))
  seconds = time.perf_counter() - start
  print(f'exit {code} after {seconds:.0f} s', flush=True)
  return code, seconds


def main(argv=None) -> int:
  """Run both scripts, print the goals, rebuild the README.

  Args:
    argv: command-line arguments (None for sys.argv).

  Returns:
    1 if either script failed, else 0 (missed goals are results, not
    failures).
  """
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog='Other options go to both benchmark scripts.')
  parser.add_argument('--reference-python', default=REFERENCE_PYTHON,
                      help='the reference venv\'s interpreter (default: '
                           '$NT_REF_PYTHON or /tmp/nt_ref_venv/bin/python)')
  parser.add_argument('--skip-ours', action='store_true')
  parser.add_argument('--skip-reference', action='store_true')
  parser.add_argument('--summary-only', action='store_true',
                      help='only print the goals from the existing files')
  args, passed = parser.parse_known_args(argv)
  quick = '--quick' in passed
  failed, seconds = [], {}
  if not args.summary_only:
    if not args.skip_reference and not os.path.exists(args.reference_python):
      sys.exit(f'no reference interpreter at {args.reference_python}; create '
               'the venv (reference_empirical_ntk.py docstring) or pass '
               '--reference-python / --skip-reference')
    jobs = []
    if not args.skip_ours:
      jobs.append(('ours', [sys.executable,
                            os.path.join(HERE, 'bench_empirical_ntk.py')]))
    if not args.skip_reference:
      jobs.append(('reference', [
          args.reference_python,
          os.path.join(HERE, 'reference_empirical_ntk.py')]))
    for name, command in jobs:
      code, seconds[name] = run(command + passed)
      if code:
        failed.append(name)
  ours, ref = _empirical_summary.load_pair(
      os.path.join(HERE, 'results'), quick=quick)
  if ours is None or ref is None:
    print('goals: need both results files '
          f'(ours: {"found" if ours else "missing"}, reference: '
          f'{"found" if ref else "missing"})')
  else:
    print(_empirical_summary.markdown(_empirical_summary.summarize(ours, ref)))
  if not args.summary_only:
    subprocess.call([sys.executable, os.path.join(HERE, 'run_all.py'),
                     '--readme-only'], cwd=os.path.dirname(HERE))
    print('seconds: ' + ', '.join(f'{k} {v:.0f}' for k, v in seconds.items())
          + f', total {sum(seconds.values()):.0f}')
  if failed:
    print(f'failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
