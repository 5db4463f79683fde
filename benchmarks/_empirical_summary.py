"""The empirical-NTK issue's goals, checked on ours and the reference's JSON.

Standard library only: benchmarks/run_all.py (README) and
compare_empirical_ntk.py (end of a run) both call it, on
results/empirical_ntk_<backend>[_quick].json (ntkjax) and
results/empirical_ntk_reference_<backend>[_quick].json (neural-tangents),
written by bench_empirical_ntk.py and reference_empirical_ntk.py. Nothing
here is timed; it only divides numbers the two scripts recorded.

Goals, per network (MLP, CNN), O (1, 10) and vmap_axes (None, 0):

- each explicit implementation (JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS,
  STRUCTURED_DERIVATIVES): ours / reference median seconds <= 1, and peak
  RSS ours / reference <= 1;
- AUTO: its median <= 1.10 x the fastest of our three explicit ones;
- per network and O, the default calls (implementation 'DEFAULT'):
  reference seconds / ours >= 20, and peak RSS ours / reference <= 1.

A goal is 'met', 'MISSED', or 'n/a' (nothing to compare: a side has no
record, or neither side could run it). A case we could not run (skipped
over the memory limit, killed, failed) while the reference ran counts as
MISSED: it needed more memory or time than the reference's.
"""

from __future__ import annotations

import json
import os
from typing import Optional

EXPLICIT = ('JACOBIAN_CONTRACTION', 'NTK_VECTOR_PRODUCTS',
            'STRUCTURED_DERIVATIVES')
TIME_GOAL = 1.0        # ours / reference, each implementation
RSS_GOAL = 1.0         # ours / reference peak RSS
AUTO_GOAL = 1.10       # AUTO / fastest of ours
DEFAULT_GOAL = 20.0    # reference default call / ours
# Other processes using more cores than this during a case inflate its time.
NOISY_CORES = 0.5


def load_pair(results_dir: str, backend: str = 'cpu', quick: bool = False):
  """Ours' and the reference's payloads, or None where a file is missing.

  Args:
    results_dir: benchmarks/results.
    backend: the jax backend in the file names.
    quick: the `_quick` files instead of the full ones.

  Returns:
    `(ours, reference)`, each a dict or None (missing or malformed file).
  """
  suffix = '_quick' if quick else ''
  out = []
  for prefix in ('empirical_ntk', 'empirical_ntk_reference'):
    path = os.path.join(results_dir, f'{prefix}_{backend}{suffix}.json')
    try:
      with open(path) as f:
        payload = json.load(f)
      out.append(payload if isinstance(payload.get('cases'), list) else None)
    except (OSError, ValueError, AttributeError):
      out.append(None)
  return tuple(out)


def _index(payload: dict) -> dict:
  """{(network, implementation, O, vmap_axes, N): record} of a payload."""
  return {(r.get('network', 'mlp'), r.get('implementation'), r.get('O'),
           r.get('vmap_axes'), r.get('N')): r
          for r in payload['cases'] if isinstance(r, dict)}


def _seconds(record: Optional[dict]) -> Optional[float]:
  if record and record.get('status') == 'ok':
    value = record.get('kernel_seconds_median')
    if isinstance(value, (int, float)) and value > 0:
      return float(value)
  return None


def _rss(record: Optional[dict]) -> Optional[float]:
  if record and record.get('status') == 'ok':
    value = record.get('peak_rss_mib')
    if isinstance(value, (int, float)) and value > 0:
      return float(value)
  return None


def _verdict(value: Optional[float], goal: float, at_most: bool,
             ours: Optional[dict], ref: Optional[dict]) -> str:
  """'met' / 'MISSED' / 'n/a' for one ratio (module docstring)."""
  if value is not None:
    return 'met' if (value <= goal if at_most else value >= goal) else 'MISSED'
  if ours is None or ref is None:
    return 'n/a'
  if _seconds(ours) is None and _seconds(ref) is not None:
    return 'MISSED'
  if _seconds(ours) is not None and _seconds(ref) is None:
    return 'met'   # the reference could not run it at all
  return 'n/a'


def _noisy(*records) -> bool:
  return any(isinstance(r, dict) and isinstance(r.get('other_cores'), float)
             and r['other_cores'] > NOISY_CORES for r in records)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  return a / b if a is not None and b is not None else None


def summarize(ours: dict, ref: dict) -> dict:
  """Every goal of the module docstring, case by case.

  Args:
    ours: the payload of empirical_ntk_<backend>[_quick].json.
    ref: the payload of empirical_ntk_reference_<backend>[_quick].json.

  Returns:
    {'implementations': rows (network, O, vmap_axes, N, implementation,
    ours_seconds, reference_seconds, time_ratio, time_goal, rss_ratio,
    rss_goal, statuses, noisy), 'auto': rows (auto_seconds, fastest,
    fastest_seconds, ratio, goal, auto_choice), 'default': rows (ours_seconds,
    reference_seconds, speedup, speedup_goal, rss_ratio, rss_goal, what our
    default chose), 'met' / 'missed' / 'n/a': counts of goals,
    'ours_finished_at' / 'reference_finished_at'}.
  """
  mine, theirs = _index(ours), _index(ref)
  nets, vmaps = ['mlp', 'cnn'], [None, 0, 'default']
  settings = sorted(
      {k[:1] + k[2:] for k in mine} | {k[:1] + k[2:] for k in theirs},
      key=lambda s: (nets.index(s[0]) if s[0] in nets else 9, str(s[0]),
                     repr(s[1]), repr(s[3]),
                     vmaps.index(s[2]) if s[2] in vmaps else 9, repr(s[2])))
  rows, autos, defaults = [], [], []
  for net, output_dim, vmap_axes, n in settings:
    def pick(index, impl):
      return index.get((net, impl, output_dim, vmap_axes, n))
    if vmap_axes == 'default':
      o, r = pick(mine, 'DEFAULT'), pick(theirs, 'DEFAULT')
      if o is None and r is None:
        continue
      speedup = _ratio(_seconds(r), _seconds(o))
      rss = _ratio(_rss(o), _rss(r))
      defaults.append({
          'network': net, 'O': output_dim, 'N': n,
          'ours_seconds': _seconds(o), 'reference_seconds': _seconds(r),
          'speedup': speedup,
          'speedup_goal': _verdict(speedup, DEFAULT_GOAL, False, o, r),
          'rss_ratio': rss, 'rss_goal': _verdict(rss, RSS_GOAL, True, o, r),
          'ours_status': (o or {}).get('status', 'missing'),
          'reference_status': (r or {}).get('status', 'missing'),
          'ours_choice': (o or {}).get('auto_choice'),
          'noisy': _noisy(o, r)})
      continue
    for impl in EXPLICIT:
      o, r = pick(mine, impl), pick(theirs, impl)
      if o is None and r is None:
        continue
      time_ratio = _ratio(_seconds(o), _seconds(r))
      rss = _ratio(_rss(o), _rss(r))
      rows.append({
          'network': net, 'O': output_dim, 'vmap_axes': vmap_axes, 'N': n,
          'implementation': impl, 'ours_seconds': _seconds(o),
          'reference_seconds': _seconds(r), 'time_ratio': time_ratio,
          'time_goal': _verdict(time_ratio, TIME_GOAL, True, o, r),
          'rss_ratio': rss, 'rss_goal': _verdict(rss, RSS_GOAL, True, o, r),
          'ours_status': (o or {}).get('status', 'missing'),
          'reference_status': (r or {}).get('status', 'missing'),
          'noisy': _noisy(o, r)})
    auto = pick(mine, 'AUTO')
    timed = {i: _seconds(pick(mine, i)) for i in EXPLICIT}
    timed = {i: t for i, t in timed.items() if t is not None}
    if auto is not None:
      fastest = min(timed, key=timed.get) if timed else None
      ratio = _ratio(_seconds(auto), timed.get(fastest))
      autos.append({
          'network': net, 'O': output_dim, 'vmap_axes': vmap_axes, 'N': n,
          'auto_seconds': _seconds(auto), 'auto_choice':
          auto.get('auto_choice'), 'fastest': fastest,
          'fastest_seconds': timed.get(fastest), 'ratio': ratio,
          'goal': _verdict(ratio, AUTO_GOAL, True, auto if fastest else None,
                           pick(mine, fastest) if fastest else None),
          'auto_status': auto.get('status', 'missing'),
          'noisy': _noisy(auto, *(pick(mine, i) for i in EXPLICIT))})
  verdicts = [r[g] for r in rows for g in ('time_goal', 'rss_goal')]
  verdicts += [r['goal'] for r in autos]
  verdicts += [r[g] for r in defaults for g in ('speedup_goal', 'rss_goal')]
  return {'implementations': rows, 'auto': autos, 'default': defaults,
          'met': verdicts.count('met'), 'missed': verdicts.count('MISSED'),
          'n/a': verdicts.count('n/a'),
          'ours_finished_at': (ours.get('last_run') or {}).get('finished_at'),
          'reference_finished_at': (ref.get('last_run') or {}).get(
              'finished_at')}


def _num(value, digits: int = 3) -> str:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return f'{value:.{digits}g}'
  return '—'


def _notes(*parts) -> str:
  """The non-empty parts, '; '-separated."""
  return '; '.join(p for p in parts if p)


def _status(ours_status: str, ref_status: str) -> str:
  """The statuses worth showing (not 'ok'), shortened."""
  return _notes(*(f'{who}: {s[:60]}' for who, s in (('ours', ours_status),
                                                    ('ref', ref_status))
                  if s != 'ok'))


def markdown(summary: dict) -> str:
  """Three markdown tables (implementations, AUTO, default call).

  Args:
    summary: output of `summarize`.

  Returns:
    The tables, each row with its verdicts; 'noisy' marks a row where
    other processes used over NOISY_CORES cores during one of its cases.
  """
  lines = [
      f'Goals met: {summary["met"]}, missed: {summary["missed"]}, n/a: '
      f'{summary["n/a"]} (last runs finished: ours '
      f'{summary["ours_finished_at"] or "unknown"}, the reference '
      f'{summary["reference_finished_at"] or "unknown"}).', '',
      '| network | O | vmap_axes | N | implementation | ours (s) | '
      'reference (s) | ours / ref (goal <= 1) | peak RSS ours / ref '
      '(goal <= 1) | notes |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for r in summary['implementations']:
    note = _notes(_status(r['ours_status'], r['reference_status']),
                  'noisy' if r['noisy'] else '')
    lines.append(
        f'| {r["network"]} | {r["O"]} | {r["vmap_axes"]} | {r["N"]} | '
        f'{r["implementation"]} | {_num(r["ours_seconds"])} | '
        f'{_num(r["reference_seconds"])} | {_num(r["time_ratio"])} '
        f'{r["time_goal"]} | {_num(r["rss_ratio"])} {r["rss_goal"]} | '
        f'{note} |')
  lines += ['', '| network | O | vmap_axes | N | AUTO (s), chose | fastest '
            'of ours (s) | AUTO / fastest (goal <= 1.10) | notes |',
            '|---|---|---|---|---|---|---|---|']
  for r in summary['auto']:
    note = _notes('' if r['auto_status'] == 'ok' else r['auto_status'][:60],
                  'noisy' if r['noisy'] else '')
    lines.append(
        f'| {r["network"]} | {r["O"]} | {r["vmap_axes"]} | {r["N"]} | '
        f'{_num(r["auto_seconds"])}, {r["auto_choice"]} | '
        f'{_num(r["fastest_seconds"])}, {r["fastest"]} | '
        f'{_num(r["ratio"])} {r["goal"]} | {note} |')
  lines += ['', '| network | O | N | ours: default call (s) | reference: '
            'default call (s) | ref / ours (goal >= 20) | peak RSS ours / '
            'ref (goal <= 1) | notes |',
            '|---|---|---|---|---|---|---|---|']
  for r in summary['default']:
    note = _notes(r['ours_choice'] and f'ours chose {r["ours_choice"]}',
                  _status(r['ours_status'], r['reference_status']),
                  'noisy' if r['noisy'] else '')
    lines.append(
        f'| {r["network"]} | {r["O"]} | {r["N"]} | '
        f'{_num(r["ours_seconds"])} | {_num(r["reference_seconds"])} | '
        f'{_num(r["speedup"])} {r["speedup_goal"]} | {_num(r["rss_ratio"])} '
        f'{r["rss_goal"]} | {note} |')
  return '\n'.join(lines) + '\n'
