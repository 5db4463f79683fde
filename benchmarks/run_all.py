"""Run every benchmarks/bench_*.py, then regenerate benchmarks/README.md.

Each benchmark runs in its own subprocess with the current interpreter, so
one crashing (or leaking memory) does not take the others down, and each
starts with a fresh jax. The README is rebuilt from whatever JSON files are in
benchmarks/results/, including reference results written by the
reference_*.py scripts (which run in their own virtualenv and are NOT run
here: neural-tangents is never a dependency of ntkjax).

Usage:
    python benchmarks/run_all.py            # full sizes
    python benchmarks/run_all.py --quick    # smoke sizes, passed to each script
    python benchmarks/run_all.py --readme-only
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a script or imported: make the helpers next to this file importable.
sys.path.insert(0, HERE)

import _empirical_summary  # noqa: E402

RESULTS_DIR = os.path.join(HERE, 'results')
README = os.path.join(HERE, 'README.md')

# Fields that identify a case within a benchmark (the rest are measurements),
# in the order rows are sorted (a file without some of them still pairs on
# the rest). CASE_TEXT_FIELDS are those shown in the table, in that order.
KEY_FIELDS = ('case', 'activation', 'readout', 'network', 'O', 'vmap_axes',
              'implementation', 'N', 'batch_size', 'd', 'depth', 'width', 't',
              'N_train', 'N_test')
CASE_TEXT_FIELDS = ('case', 'activation', 'readout', 'network',
                    'implementation', 'O', 'vmap_axes', 'N', 'batch_size',
                    't', 'N_train', 'N_test')
OURS = 'ntkjax'


def warn(message: str):
  """Print a warning to stderr (and carry on)."""
  print(f'warning: {message}', file=sys.stderr)


def scripts(pattern: str) -> list:
  """Benchmark scripts next to this file matching `pattern`, sorted."""
  return sorted(glob.glob(os.path.join(HERE, pattern)))


def run_scripts(quick: bool) -> list:
  """Run each bench_*.py in a subprocess.

  Args:
    quick: pass `--quick` to every script.

  Returns:
    Names of the scripts that failed.
  """
  failed = []
  for path in scripts('bench_*.py'):
    name = os.path.basename(path)
    command = [sys.executable, path] + (['--quick'] if quick else [])
    print(f'== {name}', flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=os.path.dirname(HERE))
    print(f'== {name}: exit {code} after {time.perf_counter() - start:.1f} s',
          flush=True)
    if code:
      failed.append(name)
  return failed


def first_docstring_paragraph(path: str) -> str:
  """The first paragraph of a script's module docstring, without importing it.

  Args:
    path: a Python file.

  Returns:
    The paragraph on one line, or '' if the file has no docstring.
  """
  try:
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ''
  except (OSError, SyntaxError) as error:
    warn(f'cannot read the docstring of {path}: {error}')
    return ''
  return ' '.join(doc.split('\n\n')[0].split())


def load_results() -> list:
  """Every well-formed JSON file in results/, malformed ones skipped.

  Returns:
    `(file name, payload)` pairs; a payload has at least 'benchmark' (str)
    and 'cases' (a list of dicts).
  """
  loaded = []
  for path in sorted(glob.glob(os.path.join(RESULTS_DIR, '*.json'))):
    name = os.path.basename(path)
    try:
      with open(path) as f:
        payload = json.load(f)
      if not isinstance(payload, dict):
        raise ValueError('top level is not an object')
      if not isinstance(payload.get('benchmark'), str):
        raise ValueError("no 'benchmark' name")
      cases = payload.get('cases')
      if not isinstance(cases, list) or not all(
          isinstance(c, dict) for c in cases):
        raise ValueError("'cases' is not a list of objects")
    except (OSError, ValueError) as error:  # JSONDecodeError is a ValueError
      warn(f'skipping malformed results file {name}: {error}')
      continue
    loaded.append((name, payload))
  return loaded


def _backend(payload: dict) -> str:
  machine = payload.get('machine')
  return machine.get('backend', '?') if isinstance(machine, dict) else '?'


def _key(case: dict) -> tuple:
  return tuple((f, case[f]) for f in KEY_FIELDS if f in case)


def _number(value, digits: int = 3) -> str:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return f'{value:.{digits}g}'
  return '—'


def summary_rows(results: list) -> list:
  """Pair our cases with the reference's (same benchmark, backend and key).

  Args:
    results: output of `load_results`.

  Returns:
    One dict per case of ours (plus reference-only cases), sorted, with the
    payloads' quick flags and both sides' numbers where they exist.
  """
  rows = {}
  for _, payload in results:
    if payload['benchmark'] in ACCURACY_BENCHMARKS:
      continue        # no timings to pair: its own section (hyper_section)
    side = 'ours' if payload.get('library') == OURS else 'ref'
    group = (payload['benchmark'], _backend(payload))
    for case in payload['cases']:
      key = group + (_key(case),)
      row = rows.setdefault(key, {'benchmark': group[0], 'backend': group[1],
                                  'case': dict(_key(case))})
      if side in row:
        warn(f'two {side} results for {key}; keeping the first')
        continue
      row[side] = dict(case, quick=bool(payload.get('quick')))
  def order(key):
    # Type names keep mixed-type values comparable (e.g. a malformed N).
    return key[:2] + tuple((f, type(v).__name__, v) for f, v in key[2])
  try:
    keys = sorted(rows, key=order)
  except TypeError:
    keys = sorted(rows, key=repr)
  return [rows[k] for k in keys]


def case_text(key: dict, ours: dict) -> str:
  """The table's case column: the key fields, and AUTO's choice if known.

  Args:
    key: the row's case key (field -> value).
    ours: our record for the case ({} if none).

  Returns:
    e.g. 'implementation=AUTO (chose STRUCTURED_DERIVATIVES), O=1,
    vmap_axes=0, N=128'.
  """
  parts = []
  for field in CASE_TEXT_FIELDS:
    if field not in key:
      continue
    text = f'{field}={key[field]}'
    if field == 'implementation' and isinstance(ours.get('auto_choice'), str):
      text += f' (chose {ours["auto_choice"]})'
    parts.append(text)
  return ', '.join(parts)


def summary_table(rows: list) -> str:
  """A markdown table of `summary_rows`.

  Args:
    rows: output of `summary_rows`.

  Returns:
    The table, or a line saying there are no results.
  """
  if not rows:
    return '_No results yet: run `python benchmarks/run_all.py`._\n'
  header = ('| benchmark | backend | case | ours (s) | ours / GEMM | '
            'reference (s) | reference / GEMM | ours / reference |')
  lines = [header, '|' + '---|' * header.count(' | ') + '---|']
  for row in rows:
    ours, ref = row.get('ours', {}), row.get('ref', {})
    # A whole-pipeline benchmark (predict) reports its total; kernels alone
    # are one part of it.
    t_ours = ours.get('total_seconds_median', ours.get('kernel_seconds_median'))
    # A benchmark may carry the reference's numbers as constants in our file.
    t_ref = ref.get('total_seconds_median', ref.get(
        'kernel_seconds_median', ours.get('reference_seconds')))
    both = all(isinstance(t, (int, float)) and t > 0 for t in (t_ours, t_ref))
    case = case_text(row['case'], ours)
    if ours.get('quick') or ref.get('quick'):
      case += ' (quick)'
    status = ours.get('status')
    if isinstance(status, str) and status != 'ok':
      case += f' ({status})'
    ref_status = ref.get('status', ours.get('reference_status'))
    if t_ref is None and ref_status not in (None, 'ok'):
      case += f' (reference: {ref_status})'
    lines.append(' | '.join([
        f'| {row["benchmark"]}', row['backend'], case,
        _number(t_ours), _number(ours.get('ratio_to_gemm')),
        _number(t_ref), _number(ref.get('ratio_to_gemm')),
        _number(t_ours / t_ref) if both else '—']) + ' |')
  return '\n'.join(lines) + '\n'


def empirical_goals() -> str:
  """The empirical-NTK issue's goals section (full and quick results).

  Returns:
    Markdown: for each of the full and the quick pair of ours' and the
    reference's empirical_ntk files present, the tables of
    `_empirical_summary.markdown`; '' if neither pair is complete.
  """
  parts = []
  for quick in (False, True):
    ours, ref = _empirical_summary.load_pair(RESULTS_DIR, quick=quick)
    if ours is None or ref is None:
      continue
    parts.append(f'### {"Quick run (N = 16)" if quick else "Full run"}\n')
    parts.append(_empirical_summary.markdown(
        _empirical_summary.summarize(ours, ref)))
  if not parts:
    return ''
  return '\n'.join([
      '## Empirical NTK against the reference: the issue\'s goals\n',
      'From `results/empirical_ntk_cpu*.json` and '
      '`results/empirical_ntk_reference_cpu*.json` '
      '(`benchmarks/compare_empirical_ntk.py` writes both; goals in '
      '`benchmarks/_empirical_summary.py`). Seconds are medians; peak RSS '
      'includes each jax\'s baseline.\n'] + parts)


# Benchmarks whose records are accuracies, not timings.
ACCURACY_BENCHMARKS = ('hyper',)


def hyper_section(results: list) -> str:
  """Mean test accuracy per data set and model, and the goals, from
  bench_hyper.py's results ('' if there are none)."""
  parts = []
  for name, payload in results:
    if payload['benchmark'] != 'hyper':
      continue
    cases = payload['cases']
    models = list(dict.fromkeys(c['model'] for c in cases))
    datasets = list(dict.fromkeys(c['dataset'] for c in cases))
    mean = {(c['dataset'], c['model']): c for c in cases}
    lines = ['| data set | ' + ' | '.join(models) + ' |',
             '|---|' + '---|' * len(models)]
    for d in datasets:
      cells = [f'{mean[d, m]["accuracy_mean"]:.4f} '
               f'({mean[d, m]["fit_seconds_mean"]:.1f} s)'
               if (d, m) in mean else '—' for m in models]
      lines.append(f'| {d} | ' + ' | '.join(cells) + ' |')
    seeds = payload.get('protocol', {}).get('seeds', '?')
    parts.append(f'`results/{name}` (seeds {seeds}; mean test accuracy, '
                 'mean fit seconds):\n\n' + '\n'.join(lines) + '\n\n'
                 f'Goals: {json.dumps(payload.get("goals", {}).get("met"))}'
                 '\n')
  if not parts:
    return ''
  return '\n'.join(['## Hyperparameters by marginal likelihood\n'] + parts)


def machines(results: list) -> str:
  """One bullet per results file: where and with what it was measured."""
  lines = []
  for name, payload in results:
    m = payload.get('machine') if isinstance(payload.get('machine'),
                                             dict) else {}
    lines.append(
        f'- `{name}`: {payload.get("library", "?")} '
        f'{payload.get("library_version", "?")}, jax '
        f'{m.get("jax_version", "?")}, {m.get("backend", "?")} '
        f'({m.get("device_kind", "?")}), {m.get("cpu_count", "?")} CPUs, '
        f'1-minute load average {m.get("loadavg_1min", "?")} at the end '
        '(the benchmark itself counts).')
  return '\n'.join(lines) + '\n'


def write_readme(results: list) -> str:
  """Regenerate README.md from the scripts' docstrings and `results`.

  Args:
    results: output of `load_results`.

  Returns:
    The path written.
  """
  parts = [
      '# Benchmarks\n',
      '_Generated by `benchmarks/run_all.py`; edit that script, not this '
      'file._\n',
      'Timings live here, never in the tests. `python benchmarks/run_all.py '
      '[--quick]` (or `make bench`) runs every `bench_*.py` and rebuilds this '
      'page from `results/*.json`. Reference numbers come from the '
      '`reference_*.py` scripts, which run in their own virtualenv (see each '
      "script's docstring); the reference library is never a dependency of "
      'ntkjax.\n',
      '## Benchmarks\n',
  ]
  for path in (scripts('bench_*.py') + scripts('reference_*.py') +
               scripts('compare_*.py')):
    parts.append(f'- `{os.path.basename(path)}`: '
                 f'{first_docstring_paragraph(path) or "(no description)"}')
  parts += [
      '',
      '## Results\n',
      'Seconds are medians after a warm-up call. "GEMM" is the bare '
      '`x1 @ x2.T` (float32, highest precision) timed in the same process, '
      'the flop floor of any kernel on those inputs; ours / reference '
      'compares seconds measured in different processes (and jax versions) on '
      'the same machine. On a small shared machine other processes inflate '
      'timings: check the load averages below.\n',
      summary_table(summary_rows(results)),
      empirical_goals(),
      hyper_section(results),
      '## Machines\n',
      machines(results) if results else '_None._\n',
  ]
  with open(README, 'w') as f:
    f.write('\n'.join(parts))
  return README


def main(argv=None) -> int:
  """Run the benchmarks (unless --readme-only) and rebuild the README.

  Args:
    argv: command-line arguments (None for sys.argv).

  Returns:
    The process exit code: 1 if any benchmark failed, else 0.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='pass --quick to every benchmark')
  parser.add_argument('--readme-only', action='store_true',
                      help='only rebuild README.md from results/')
  args = parser.parse_args(argv)
  failed = [] if args.readme_only else run_scripts(args.quick)
  print(f'wrote {write_readme(load_results())}')
  if failed:
    print(f'failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
