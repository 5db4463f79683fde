"""Plots, `report.html` and the terminal summary of `ntkjax compare`.

Everything here reads the results dict of `experiment.run` (the content of
`results.json`), so a report can be rebuilt from a saved run:
`write_report(json.load(open('results.json')), out_dir)`.
The HTML is self-contained: the PNGs are embedded as base64, the style is
inline, and each plot has a short reading generated from the numbers.
"""

from __future__ import annotations

import base64
import html
import math
import os

import numpy as np

PLOTS = ('metrics_vs_width', 'kernel_distance', 'divergence', 'drift')
TITLES = {
    'metrics_vs_width': 'Test metrics vs width, and the infinite-width limit',
    'kernel_distance': 'Kernel distance at initialization vs width',
    'divergence': 'Finite network vs its infinite-width NTK prediction',
    'drift': 'Kernel drift during training vs width (laziness)',
    'lazy_rich': 'The lazy-rich dial: output scale alpha',
}
# Drawn only when the run has them (`--alpha`).
OPTIONAL_PLOTS = ('lazy_rich',)


def _array(value) -> np.ndarray:
  """JSON lists (None for NaN) or arrays -> float arrays."""
  return np.array([[np.nan if v is None else v for v in row]
                   if isinstance(row, (list, tuple, np.ndarray)) else
                   (np.nan if row is None else row) for row in value],
                  dtype=np.float64)


def _num(value) -> float:
  return math.nan if value is None else float(value)


def _pct(value) -> str:
  value = _num(value)
  return 'n/a' if not math.isfinite(value) else f'{100 * value:.1f}%'


def _g(value, digits: int = 3) -> str:
  value = _num(value)
  return 'n/a' if not math.isfinite(value) else f'{value:.{digits}g}'


def _slope(results: dict, name: str) -> str:
  slope, se = _num(results.get(f'{name}_slope')), _num(
      results.get(f'{name}_slope_stderr'))
  return _slope_text(slope, se)


def _slope_text(slope: float, se: float) -> str:
  """'-0.55 ± 0.02'; three decimals when the error is below 0.005."""
  if not math.isfinite(slope):
    return 'n/a'
  digits = 3 if math.isfinite(se) and se < 0.005 else 2
  return f'{slope:.{digits}f}' + (f' ± {se:.{digits}f}' if math.isfinite(se)
                                  else '')


def _classification(results: dict) -> bool:
  return bool(results['data'].get('classification'))


def _mup(results: dict) -> bool:
  """Whether the networks are muP's (`--parameterization mup`); results
  files written before the flag existed are the NTK parameterization's."""
  return results.get('parameterization', 'ntk') == 'mup'


def _title(results: dict, plot: str) -> str:
  if _mup(results) and plot == 'divergence':
    return 'muP network vs its own linearization (no kernel limit)'
  if _mup(results) and plot == 'drift':
    return 'Kernel drift during training vs width (muP: features move)'
  return TITLES[plot]


def plot_names(results: dict) -> tuple:
  """The plots a run has: under muP no kernel distance (there is no
  kernel limit to measure it from); the lazy-rich dial with `--alpha`."""
  names = tuple(n for n in PLOTS
                if not (_mup(results) and n == 'kernel_distance'))
  return names + tuple(n for n in OPTIONAL_PLOTS if results.get(n))


# ----------------------------------------------------------------------------
# Readings: one to three sentences per plot, from the numbers.


def _verdict(slope: float, stderr: float, theory: float = -0.5) -> str:
  if not math.isfinite(slope):
    return ''
  off = abs(slope - theory)
  if math.isfinite(stderr) and off <= 2 * stderr:
    return ', consistent with it'
  # Finite-width corrections of relative order n^-1/2 bend a log-log curve
  # by about this much over 64..2048.
  if off <= 0.1:
    return (', close to it (a difference of the size finite-width '
            'corrections give over this range of widths)')
  return (', off from it (finite-size corrections, too few seeds, or a '
          'network that is not in the lazy regime)')


def readings(results: dict) -> dict:
  """A short reading of each plot, generated from the numbers."""
  widths = results['widths']
  w0, w1 = widths[0], widths[-1]
  steps = results['steps']
  seeds = len(results['seeds'])
  finite = results['test_metrics']['finite']
  infinite = results['test_metrics']['infinite']
  out = {}
  mup = _mup(results)
  who = (f'the muP networks (base width {results.get("base_width")})' if mup
         else 'the networks')
  if _classification(results):
    net, lin = _array(finite['network']['accuracy']), _array(
        finite['linearized']['accuracy'])
    out['metrics_vs_width'] = (
        f'Trained for {steps} steps, {who} reach {_pct(net[-1])} test '
        f'accuracy at width {w1} ({_pct(net[0])} at width {w0}; mean of '
        f'{seeds} seed{"s" if seeds > 1 else ""}), their linearized twins '
        f'{_pct(lin[-1])}. The infinite-width NTK'
        + (' (NTK parameterization, at its own learning rate)' if mup else '')
        + ' reaches '
        f'{_pct(infinite["ntk_at_steps"]["test_accuracy"])} after the same '
        f'time and {_pct(infinite["ntk"]["test_accuracy"])} at t = inf; the '
        f'NNGP (Bayesian posterior mean) '
        f'{_pct(infinite["nngp"]["test_accuracy"])}.')
  else:
    net = _array(finite['network']['mse'])
    out['metrics_vs_width'] = (
        f'Trained for {steps} steps, {who} reach test MSE {_g(net[-1])} '
        f'at width {w1} ({_g(net[0])} at width {w0}); the infinite-width NTK '
        f'{_g(infinite["ntk_at_steps"]["test_mse"])} after the same time and '
        f'{_g(infinite["ntk"]["test_mse"])} at t = inf, the NNGP '
        f'{_g(infinite["nngp"]["test_mse"])}.')
  if mup:
    return {**out, **_mup_readings(results)}
  distance = _array(results['kernel_distance'])
  out['kernel_distance'] = (
      f'At initialization the empirical NTK is {_pct(distance[0])} away from '
      f'the analytic one at width {w0} and {_pct(distance[-1])} at width '
      f'{w1}: the distance falls like n^({_slope(results, "kernel_distance")}) '
      f'(theory: n^-1/2)'
      + _verdict(_num(results['kernel_distance_slope']),
                 _num(results['kernel_distance_slope_stderr'])) + '.')
  div = results['divergence']
  final_net = _array(div['final']['network'])
  slope = _num(div['final_slope'])
  se = _num(div['final_slope_stderr'])
  slope_text = _slope_text(slope, se)
  between = _array(div['final']['network_vs_linearized'])
  out['divergence'] = (
      f'After {steps} steps the networks\' test outputs differ from the '
      f'infinite-width NTK prediction (same initial function, same steps) by '
      f'RMS {_g(final_net[0])} at width {w0} and {_g(final_net[-1])} at width '
      f'{w1} (targets have RMS {_g(results["data"].get("target_rms"))}), '
      f'falling like n^({slope_text}) (theory: n^-1/2)'
      + _verdict(slope, se) + '. Each network differs from its own '
      f'linearization by {_g(between[0])} and {_g(between[-1])}'
      + ('; so most of the gap comes from the finite-width kernel, not from '
         'nonlinear training.' if np.all(between < final_net) else '.'))
  drift = _array(results['drift'])
  slope = _num(results['drift_slope'])
  if not math.isfinite(slope):
    where = ''
  elif slope > -0.4:
    where = '; the measured slope is shallower'
  elif slope >= -1.1:
    where = '; the measured slope lies in that range'
  else:
    where = '; the measured slope is steeper'
  out['drift'] = (
      f'Training moves the empirical NTK by {_pct(drift[0])} at width {w0} and '
      f'{_pct(drift[-1])} at width {w1}, like n^({_slope(results, "drift")}). '
      'Theory: at most n^-1/2 (Jacot et al. 2018), and n^-1 for MSE from '
      f'perturbation theory (Dyer & Gur-Ari 2019){where}. The wider the '
      'network, the lazier its training and the better one fixed kernel '
      'describes it.')
  if results.get('lazy_rich'):
    out['lazy_rich'] = _lazy_rich_reading(results)
  return out


def _last_slope(widths, values) -> float:
  """The log-log slope between the two widest widths: whether a quantity
  has levelled off (muP's limit) is read where the widths are largest."""
  if len(widths) < 2 or not np.all(np.isfinite(values[-2:])) or np.any(
      values[-2:] <= 0):
    return math.nan
  return float(np.log(values[-1] / values[-2])
               / np.log(widths[-1] / widths[-2]))


def _mup_readings(results: dict) -> dict:
  """Readings of the divergence and drift plots under muP.

  muP keeps the features moving by an O(1) amount at every width (Yang & Hu
  2021), but that amount is set by the base width: at the base muP is the
  standard parameterization, whose NTK is dominated by the readout's
  contribution (~ base width x the others'), so the stable learning rate,
  set there, moves the features slowly. Beside it sits the finite-width
  fluctuation, ~ n^-1/2. A quantity therefore falls with width first and
  levels off once the fluctuation is below muP's feature learning; the
  readings give the slope between the two widest widths.
  """
  widths, steps = results['widths'], results['steps']
  w0, w1 = widths[0], widths[-1]
  between = _array(results['divergence']['final']['network_vs_linearized'])
  drift = _array(results['drift'])

  def tail(values) -> str:
    slope = _last_slope(widths, values)
    if not math.isfinite(slope):
      return ''
    text = (f'; between the two widest widths the slope is {slope:.2f}')
    if slope > -0.2:
      return text + (', it has levelled off: the features move at every '
                     'width and no fixed kernel describes the networks')
    return text + (', still falling: at these widths the finite-width '
                   'fluctuation (~n^-1/2) exceeds the feature learning, which '
                   'a smaller --base-width makes stronger (base 1, one hidden '
                   'layer: mean field)')
  return {
      'divergence': (
          f'muP has no kernel limit to compare with, so each network is '
          f'compared with its own linearization: after {steps} steps their '
          f'test outputs differ by RMS {_g(between[0])} at width {w0} and '
          f'{_g(between[-1])} at width {w1}' + tail(between) + '. Under the '
          'NTK parameterization this gap vanishes like n^-1/2 or faster.'),
      'drift': (
          f'Training moves the kernel SGD follows in muP, J diag(s) J^T, by '
          f'{_pct(drift[0])} at width {w0} and {_pct(drift[-1])} at width '
          f'{w1}, like n^({_slope(results, "drift")}) over all widths'
          + tail(drift) + '. Under the NTK parameterization the drift falls '
          'like n^-1/2 to n^-1 (lazy training); muP keeps it O(1) (Yang & '
          'Hu 2021).'),
      **({'lazy_rich': _lazy_rich_reading(results)}
         if results.get('lazy_rich') else {})}


def _lazy_rich_reading(results: dict) -> str:
  dial = results['lazy_rich']
  alphas = dial['alphas']
  drift = _array(dial['drift'])[-1]
  before = _array(dial['alignment_before'])[-1]
  after = _array(dial['alignment_after'])[-1]
  return (
      f'At width {results["widths"][-1]}, training alpha (f - f_0) on loss / '
      f'alpha^2 moves the empirical NTK by {_pct(drift[0])} at alpha = '
      f'{_g(alphas[0])} and {_pct(drift[-1])} at alpha = {_g(alphas[-1])}; '
      f'its centered alignment with the targets goes from {_g(before[0])} to '
      f'{_g(after[0])} at alpha = {_g(alphas[0])} and to {_g(after[-1])} at '
      f'alpha = {_g(alphas[-1])}. Large alpha is the kernel regime (drift '
      '~ 1/alpha, Chizat et al. 2019); where the drift is O(1) the network '
      'learns features and the kernel description breaks.')


# ----------------------------------------------------------------------------
# Plots.


def _errorbar(ax, widths, mean, std, **kwargs):
  std = np.where(np.isfinite(std), std, 0.)
  ax.errorbar(widths, mean, yerr=std, capsize=3, marker='o', ms=4, **kwargs)


def _log_scale(ax, *arrays, axis: str = 'y'):
  """Log scale if there is something positive to show (runs that all
  diverged leave only NaNs, which a log axis cannot place)."""
  values = np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in arrays])
  if np.any(np.isfinite(values) & (values > 0)):
    (ax.set_yscale if axis == 'y' else ax.set_xscale)('log')


def _width_axis(ax, widths):
  ax.set_xscale('log', base=2)
  ax.set_xticks(widths)
  ax.set_xticklabels([str(w) for w in widths])
  ax.set_xlabel('width n')
  ax.grid(True, which='both', alpha=0.3)


def _fit_lines(ax, results, name, widths, values, color,
               theory=(-0.5,)):
  """The fitted power law and theory slopes through the data's middle."""
  slope = _num(results[f'{name}_slope'])
  prefactor = _num(results.get(f'{name}_prefactor'))
  w = np.asarray(widths, np.float64)
  if math.isfinite(slope) and math.isfinite(prefactor):
    ax.plot(w, prefactor * w ** slope, '-', color=color, alpha=0.8,
            label=f'fit: n^({_slope(results, name)})')
  finite = np.isfinite(values) & (values > 0)
  if finite.any():
    anchor_w = np.exp(np.mean(np.log(w[finite])))
    anchor_v = np.exp(np.mean(np.log(values[finite])))
    for slope, style in zip(theory, (':', '-.')):
      ax.plot(w, anchor_v * (w / anchor_w) ** slope, style, color='gray',
              label=f'slope {slope:g}')


def plot_metrics(results: dict, path: str, plt) -> None:
  widths = results['widths']
  finite = results['test_metrics']['finite']
  infinite = results['test_metrics']['infinite']
  panels = (['accuracy'] if _classification(results) else []) + ['mse']
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4),
                           squeeze=False)
  for ax, metric in zip(axes[0], panels):
    key = 'test_accuracy' if metric == 'accuracy' else 'test_mse'
    _errorbar(ax, widths, _array(finite['network'][metric]),
              _array(finite['network'][f'{metric}_std']), color='C0',
              label='network')
    _errorbar(ax, widths, _array(finite['linearized'][metric]),
              _array(finite['linearized'][f'{metric}_std']), color='C1',
              linestyle='--', label='linearized twin')
    for name, style, label in (
        ('ntk', '-', 'NTK, t = inf'), ('ntk_at_steps', '--', 'NTK, t = steps'),
        ('nngp', '-.', 'NNGP, t = inf')):
      value = _num(infinite[name][key])
      if math.isfinite(value):
        ax.axhline(value, color='k' if name.startswith('ntk') else 'C2',
                   linestyle=style, alpha=0.7, label=label)
    _width_axis(ax, widths)
    if metric == 'mse':
      _log_scale(ax, _array(finite['network'][metric]),
                 [_num(infinite[name][key]) for name in infinite])
    ax.set_ylabel('test accuracy' if metric == 'accuracy' else 'test MSE')
    ax.legend(fontsize=8)
  fig.suptitle(f'{results["architecture"]["name"]}, {results["steps"]} steps')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _loglog_vs_width(results, name, ylabel, path, plt, title,
                     theory=(-0.5,)):
  widths = results['widths']
  per_seed = _array(results[f'{name}_per_seed'])
  mean = _array(results[name])
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for j in range(per_seed.shape[1]):
    ax.plot(widths, per_seed[:, j], 'o', color='C0', alpha=0.3, ms=4,
            label='each seed' if j == 0 else None)
  ax.plot(widths, mean, 'o', color='C0', ms=7, label='mean over seeds')
  _fit_lines(ax, results, name, widths, mean, 'C0', theory)
  _width_axis(ax, widths)
  _log_scale(ax, per_seed)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_divergence(results: dict, path: str, plt) -> None:
  """Left: the gaps along training, one colour per width; right: at the end
  of training against width. Under muP (no kernel limit) each network
  against its own linearization only."""
  widths = results['widths']
  div = results['divergence']
  steps = np.asarray(div['steps'], np.float64)
  if _mup(results):
    curves = [(_array(div['network_vs_linearized']), '-', 1.)]
    ylabel = r'RMS $f_n - f_n^{\mathrm{lin}}$ on test outputs'
    title = 'muP network vs its linearization, along training'
    points = [('network_vs_linearized', '^', 'C3', 7,
               'network vs linearized')]
  else:
    curves = [(_array(div['network']), '-', 1.),
              (_array(div['linearized']), '--', 0.6)]
    ylabel = r'RMS $f_n - f_{\mathrm{NTK}}$ on test outputs'
    title = 'along training (solid: network, dashed: linearized)'
    points = [('network', 'o', 'C0', 7, 'network'),
              ('linearized', 's', 'C1', 5, 'linearized twin'),
              ('network_vs_linearized', '^', 'C3', 5,
               'network vs linearized')]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  colors = plt.get_cmap('viridis')(np.linspace(0, 0.9, len(widths)))
  later = steps > 0   # log time axis: step 0 has gap 0 by construction
  for i, width in enumerate(widths):
    for k, (values, style, alpha) in enumerate(curves):
      left.plot(steps[later], values[i, later], style, color=colors[i],
                alpha=alpha, label=f'n = {width}' if k == 0 else None)
  left.set_xscale('log')
  _log_scale(left, *[values[:, later] for values, _, _ in curves])
  left.set_xlabel('step')
  left.set_ylabel(ylabel)
  left.set_title(title, fontsize=10)
  left.grid(True, which='both', alpha=0.3)
  left.legend(fontsize=7, ncol=2)
  finals = [_array(div['final'][key]) for key, *_ in points]
  for final, (_, marker, color, size, label) in zip(finals, points):
    right.plot(widths, final, marker, color=color, ms=size, label=label)
  if not _mup(results):
    fit = {'final_slope': div['final_slope'],
           'final_slope_stderr': div['final_slope_stderr'],
           'final_prefactor': div['final_prefactor']}
    _fit_lines(right, fit, 'final', widths, finals[0], 'C0')
  _width_axis(right, widths)
  _log_scale(right, *finals)
  right.set_ylabel(f'RMS gap after {results["steps"]} steps')
  right.set_title('at the end of training', fontsize=10)
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_lazy_rich(results: dict, path: str, plt) -> None:
  """Drift, alignment and test metric against alpha, one line per width."""
  dial = results['lazy_rich']
  alphas = np.asarray(dial['alphas'], dtype=float)
  classification = _classification(results)
  metric = 'accuracy' if classification else 'mse'
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for i, width in enumerate(results['widths']):
    color = f'C{i % 10}'
    axes[0].plot(alphas, _array(dial['drift'])[i], 'o-', color=color,
                 label=f'width {width}')
    axes[1].plot(alphas, _array(dial['alignment_after'])[i], 'o-',
                 color=color)
    axes[1].plot(alphas, _array(dial['alignment_before'])[i], ':',
                 color=color)
    axes[2].plot(alphas, _array(dial[metric])[i], 'o-', color=color)
  ntk = results['test_metrics']['infinite']['ntk_at_steps'][f'test_{metric}']
  axes[2].axhline(_num(ntk), color='k', linestyle='--',
                  label='infinite-width NTK')
  axes[0].set_yscale('log')
  titles = ('kernel drift', 'centered alignment (dotted: at init)',
            f'test {metric}')
  for ax, title in zip(axes, titles):
    ax.set_xscale('log')
    ax.set_xlabel('output scale alpha')
    ax.set_title(title, fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
  axes[0].legend(fontsize=8)
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_plots(results: dict, out_dir: str) -> dict:
  """Writes the PNGs; returns {plot name: path}."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  paths = {name: os.path.join(out_dir, f'{name}.png')
           for name in plot_names(results)}
  plot_metrics(results, paths['metrics_vs_width'], plt)
  if 'kernel_distance' in paths:
    _loglog_vs_width(results, 'kernel_distance',
                     r'$\|\Theta_n - \Theta\|_F \,/\, \|\Theta\|_F$',
                     paths['kernel_distance'], plt,
                     f'at initialization, {results["kernel_points"]} inputs')
  plot_divergence(results, paths['divergence'], plt)
  if 'lazy_rich' in paths:
    plot_lazy_rich(results, paths['lazy_rich'], plt)
  # muP's drift does not vanish: theory slope 0 (Yang & Hu 2021).
  _loglog_vs_width(results, 'drift',
                   r'$\|\Theta_T - \Theta_0\|_F \,/\, \|\Theta_0\|_F$',
                   paths['drift'], plt,
                   f'after {results["steps"]} steps'
                   + (', kernel J diag(s) J^T of muP' if _mup(results) else ''),
                   theory=(0.,) if _mup(results) else (-0.5, -1.))
  return paths


# ----------------------------------------------------------------------------
# Tables.


def table_rows(results: dict) -> tuple:
  """(header, rows) of the per-width summary."""
  finite = results['test_metrics']['finite']
  div = results['divergence']['final']
  classification = _classification(results)
  metric = 'accuracy' if classification else 'mse'
  fmt = _pct if classification else _g
  header = ['width', 'kernel dist.', 'drift',
            f'net {metric}', f'lin. {metric}', f'NTK same-init {metric}',
            'gap net-NTK', 'gap lin-NTK', 'gap net-lin']
  columns = [
      (_g, _array(results['kernel_distance'])),
      (_g, _array(results['drift'])),
      (fmt, _array(finite['network'][metric])),
      (fmt, _array(finite['linearized'][metric])),
      (fmt, _array(finite['ntk_same_init'][metric])),
      (_g, _array(div['network'])), (_g, _array(div['linearized'])),
      (_g, _array(div['network_vs_linearized']))]
  if _mup(results):
    # Columns that compare with the NTK limit do not exist under muP.
    keep = (2, 3, 4, 8)
    header = [header[0]] + [header[j] for j in keep]
    columns = [columns[j - 1] for j in keep]
  rows = [[str(width)] + [form(values[i]) for form, values in columns]
          for i, width in enumerate(results['widths'])]
  return header, rows


def _infinite_lines(results: dict) -> list:
  infinite = results['test_metrics']['infinite']
  classification = _classification(results)
  lines = []
  for name, label in (('nngp', 'NNGP, t = inf'), ('ntk', 'NTK, t = inf'),
                      ('ntk_at_steps', f'NTK, t = {results["steps"]} steps')):
    entry = infinite[name]
    text = f'{label}: test MSE {_g(entry["test_mse"])}'
    if classification:
      text = (f'{label}: test accuracy {_pct(entry["test_accuracy"])}, '
              f'MSE {_g(entry["test_mse"])}')
    lines.append(text)
  return lines


def _learning_rate_text(results: dict) -> str:
  text = (f'learning rate {_g(results["learning_rate"], 4)} '
          f'({_g(results["learning_rate_fraction"], 2)} x max '
          f'{_g(results["max_learning_rate"], 4)}')
  if _mup(results):
    text += (f' of muP at base width {results["base_width"]}; the NTK limit '
             f'at {_g(results["reference_learning_rate"], 4)}')
  return text + ')'


def summary_text(results: dict) -> str:
  """The table printed on the terminal."""
  header, rows = table_rows(results)
  widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in
            enumerate(header)]
  line = lambda cells: '  '.join(c.rjust(w) for c, w in zip(cells, widths))
  out = [line(header), line(['-' * w for w in widths])]
  out += [line(r) for r in rows]
  out.append('')
  out += ['infinite width, ' + line for line in _infinite_lines(results)]
  div = results['divergence']
  gap_se = _num(div['final_slope_stderr'])
  if _mup(results):
    out.append(f'slope vs width: drift {_slope(results, "drift")} (muP: 0, '
               'features move at every width; NTK parameterization: -1/2 to '
               '-1)')
  else:
    out.append(f'slopes vs width: kernel distance '
               f'{_slope(results, "kernel_distance")} (theory -1/2), gap at '
               f'the end {_slope_text(_num(div["final_slope"]), gap_se)} '
               f'(theory -1/2), drift {_slope(results, "drift")} (theory -1/2 '
               'to -1)')
  out.append(f'{_learning_rate_text(results)}, {results["steps"]} steps, '
             f'{len(results["seeds"])} seed(s)')
  if results.get('lazy_rich'):
    dial = results['lazy_rich']
    out.append(f'lazy-rich dial at width {results["widths"][-1]}: ' + ', '.join(
        f'alpha {_g(a)}: drift {_g(d)}, alignment {_g(b)} -> {_g(c)}'
        for a, d, b, c in zip(dial['alphas'], _array(dial['drift'])[-1],
                              _array(dial['alignment_before'])[-1],
                              _array(dial['alignment_after'])[-1])))
  if results.get('diverged'):
    out.append(f'diverged (left out of the means): {results["diverged"]}')
  return '\n'.join(out)


# ----------------------------------------------------------------------------
# HTML.

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
table.facts th, table.facts td { text-align: left; vertical-align: top; }
img { max-width: 100%; border: 1px solid #eee; }
p.reading { background: #f6f8fa; border-left: 4px solid #4a7;
            padding: 0.6em 1em; }
.small { color: #666; font-size: 0.85em; }
"""


def _table_html(header, rows, left_first: bool = True) -> str:
  cls = lambda j: ' class="l"' if left_first and j == 0 else ''
  head = ''.join(f'<th{cls(j)}>{html.escape(h)}</th>'
                 for j, h in enumerate(header))
  body = ''.join('<tr>' + ''.join(f'<td{cls(j)}>{html.escape(c)}</td>'
                                  for j, c in enumerate(r)) + '</tr>'
                 for r in rows)
  return f'<table><tr>{head}</tr>{body}</table>'


_MUP_INTRO = (' Here the networks are muP\'s, which has no kernel limit: they '
              'keep learning features at every width, so their kernel '
              'keeps moving and the gap to their own linearization does not '
              'close. This is where the kernel description breaks.')


def write_html(results: dict, plots: dict, path: str) -> None:
  """A self-contained report: embedded PNGs, inline CSS, readings."""
  read = readings(results)
  mup = _mup(results)
  config = results['config']
  data = results['data']
  facts = [
      ('data', f'{data["source"]}: {data["n_train"]} train, {data["n_test"]} '
               f'test, inputs {tuple(data["input_shape"])}, '
               f'{data["n_outputs"]} outputs'),
      ('preprocessing', data['preprocessing']),
      ('network', f'{results["architecture"]["name"]}: '
                  f'{results["architecture"]["description"]}'),
      ('widths', ', '.join(map(str, results['widths']))),
      ('parameterization',
       f'muP (maximal update, Yang & Hu 2021) relative to base width '
       f'{results.get("base_width")}; the infinite-width reference is the NTK '
       'parameterization\'s kernel limit of the same architecture' if mup
       else 'NTK (the finite networks of the kernel limit)'),
      ('training', 'full-batch gradient descent (optax.sgd'
                   + (' with muP\'s per-layer learning-rate factors' if mup
                      else '') + f'), MSE loss, '
                   f'{results["steps"]} steps, learning rate '
                   f'{_g(results["learning_rate"], 4)} = '
                   f'{_g(results["learning_rate_fraction"], 2)} x the largest '
                   'stable one '
                   + (f'of muP at base width {results.get("base_width")} '
                      '(muP\'s rates transfer across widths)' if mup else
                      'at infinite width')
                   + f', {len(results["seeds"])} seed(s) per width'),
      ('outputs', 'centered: f(params, x) - f(params_0, x), so every '
                  'network starts from the zero function like the mean of '
                  'the infinite ensemble' if config.get('center', True) else
                  'not centered: each network keeps its random initial '
                  'function f_0'),
      ('kernels compared on', f'the first {results["kernel_points"]} training '
                              'inputs (NTK averaged over outputs)'),
  ]
  facts_rows = ''.join(f'<tr><th>{html.escape(k)}</th><td>{html.escape(v)}'
                       '</td></tr>' for k, v in facts)
  header, rows = table_rows(results)
  sections = []
  for name in plot_names(results):
    with open(plots[name], 'rb') as f:
      encoded = base64.b64encode(f.read()).decode('ascii')
    sections.append(
        f'<h2>{html.escape(_title(results, name))}</h2>'
        f'<img alt="{name}" src="data:image/png;base64,{encoded}">'
        f'<p class="reading">{html.escape(read[name])}</p>')
  timings = results.get('timings', {})
  timing_text = ', '.join(f'{k} {v:.0f} s' for k, v in timings.items())
  diverged = results.get('diverged') or []
  warning = (f'<p><b>Diverged runs (left out of the means):</b> '
             f'{html.escape(str(diverged))}</p>' if diverged else '')
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>ntkjax compare: finite vs infinite width</title>
<style>{_CSS}</style></head><body>
<h1>Finite vs infinite width: {html.escape(results['architecture']['name'])}
on {html.escape(data['source'])}</h1>
<p>One network definition gives the finite networks trained below and their
exact infinite-width NNGP and NTK. As the width n grows, the finite networks
should approach the NTK's predictions, their kernels should approach the
analytic one like n<sup>-1/2</sup>, and training should move the kernel less
and less (lazy training).{_MUP_INTRO if mup else ''}</p>
<table class="facts">{facts_rows}</table>
<h2>Summary</h2>
{_table_html(header, rows)}
<p>{'<br>'.join(html.escape(l) for l in _infinite_lines(results))}</p>
{warning}
{''.join(sections)}
<h2>Definitions</h2>
<ul class="small">
<li><b>kernel distance</b>: ||Theta_emp(n) - Theta||<sub>F</sub> /
||Theta||<sub>F</sub> at initialization, mean over seeds; the slope is a
least-squares fit of log distance against log width over all seeds.</li>
<li><b>NTK same-init</b>: the infinite-width network trained by the same
discrete gradient descent, started from the finite network's initial
function f<sub>n</sub>(0) (so only the kernel differs).</li>
<li><b>gap</b>: RMS over test outputs of f<sub>n</sub>(step) -
f<sub>NTK</sub>(step) (same-init), averaged over seeds.</li>
<li><b>drift</b>: ||Theta_T - Theta_0||<sub>F</sub> / ||Theta_0||<sub>F</sub>
of the network's empirical NTK before and after training.</li>
<li><b>NTK / NNGP, t = inf</b>: mean predictions of the infinite ensemble
(<code>predict.gradient_descent_mse_ensemble</code>), i.e. kernel
regression; <b>t = steps</b>: gradient flow for the same time.</li>
</ul>
<p class="small">ntkjax {html.escape(str(results.get('ntkjax_version')))},
created {html.escape(str(results.get('created')))}; times: {timing_text}.
Config: {html.escape(str(config))}</p>
</body></html>
"""
  with open(path, 'w') as f:
    f.write(page)


def write_report(results: dict, out_dir: str) -> dict:
  """Writes the PNGs and `report.html` into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  plots = write_plots(results, out_dir)
  paths = dict(plots)
  paths['report'] = os.path.join(out_dir, 'report.html')
  write_html(results, plots, paths['report'])
  return paths
