"""`ntkjax compare`: the CLI end to end on tiny runs, its errors, its maths.

The end-to-end runs use the `--quick` configuration (2 widths, 1 seed, 20
steps, 100 train / 100 test digits): seconds, dominated by compilation.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ntkjax import predict, stax
from ntkjax.__main__ import main
from ntkjax.compare import (DiscreteNtkDynamics, architectures, data,
                            fit_power_law, record_schedule, report)
from ntkjax.compare.progress import Progress

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
PLOTS = ('metrics_vs_width', 'kernel_distance', 'divergence', 'drift')


# ----------------------------------------------------------------------------
# The slope fit.


def test_fit_power_law_exact_on_a_power_law():
  widths = np.array([64, 128, 256, 512, 1024, 2048])
  fit = fit_power_law(widths, 3. * widths ** -0.5)
  np.testing.assert_allclose(fit.slope, -0.5, rtol=1e-12)
  np.testing.assert_allclose(fit.prefactor, 3., rtol=1e-10)
  assert fit.stderr < 1e-10
  assert fit.n_points == 6


def test_fit_power_law_recovers_slope_from_noisy_seeds():
  """c n^-1/2 (1 + 2% noise) over 4 seeds: slope -1/2 within 4 standard
  errors, and the reported standard error near the true one.

  With log-noise sd sigma ~ 0.02 and S seeds per width, least squares gives
  se = sigma / sqrt(S sum_w (log w - mean)^2) ~ 0.0035 here. A 4-sigma band
  fails by chance with probability 6e-5 (and the draw is seeded). The
  residual estimate of se from 22 degrees of freedom has a relative spread
  of ~15%, so it must lie within a factor 2 of the truth.
  """
  rng = np.random.default_rng(0)
  widths = np.array([64, 128, 256, 512, 1024, 2048], np.float64)
  seeds, sigma = 4, 0.02
  values = 0.8 * widths[:, None] ** -0.5 * (
      1 + sigma * rng.standard_normal((len(widths), seeds)))
  fit = fit_power_law(widths, values)
  logs = np.log(widths)
  true_se = sigma / np.sqrt(seeds * np.sum((logs - logs.mean()) ** 2))
  assert abs(fit.slope + 0.5) < 4 * true_se, (fit, true_se)
  assert true_se / 2 < fit.stderr < 2 * true_se, (fit, true_se)
  assert fit.n_points == widths.size * seeds


def test_fit_power_law_skips_unusable_points():
  fit = fit_power_law([64, 256, 1024], [0.25, np.nan, 0.0625])
  np.testing.assert_allclose(fit.slope, -0.5, rtol=1e-12)
  assert fit.n_points == 2 and np.isnan(fit.stderr)   # 2 points: no residual
  assert np.isnan(fit_power_law([64], [0.1]).slope)
  assert np.isnan(fit_power_law([64, 128], [0., -1.]).slope)


def test_record_schedule():
  assert record_schedule(400, 16)[0] == 0
  assert record_schedule(400, 16)[-1] == 400
  steps = record_schedule(400, 16)
  assert list(steps) == sorted(set(steps)) and len(steps) <= 16
  assert record_schedule(3, 16) == (0, 1, 2, 3)
  assert record_schedule(0, 16) == (0,)


# ----------------------------------------------------------------------------
# The infinite-width network under discrete gradient descent.


def _psd(rng, n, rank=None):
  a = rng.standard_normal((n, rank or n))
  return a @ a.T / (rank or n)


def test_discrete_dynamics_equal_explicit_gradient_descent():
  """Closed form == iterating f <- f - (lr / |y|) Theta (f - y), train and
  test, including a rank-deficient kernel (zero modes keep f_0)."""
  rng = np.random.default_rng(1)
  n_train, n_test, classes = 7, 5, 3
  full = _psd(rng, n_train + n_test, rank=n_train - 2)
  theta, theta_test = full[:n_train, :n_train], full[n_train:, :n_train]
  y = rng.standard_normal((n_train, classes))
  f0, f0_test = rng.standard_normal((n_train, classes)), rng.standard_normal(
      (n_test, classes))
  lr = 0.9 * float(predict.max_learning_rate(theta, y.size))
  dynamics = DiscreteNtkDynamics(theta, theta_test, y, lr)
  steps = (0, 1, 2, 5, 17)
  f_train, f_test = dynamics(steps, f0, f0_test)
  f, ft = f0.copy(), f0_test.copy()
  for k in range(steps[-1] + 1):
    if k in steps:
      i = steps.index(k)
      np.testing.assert_allclose(f_train[i], f, rtol=1e-10, atol=1e-10)
      np.testing.assert_allclose(f_test[i], ft, rtol=1e-10, atol=1e-10)
    residual = f - y
    f, ft = (f - lr / y.size * theta @ residual,
             ft - lr / y.size * theta_test @ residual)


def test_discrete_dynamics_approach_gradient_flow_for_small_steps():
  """At learning rate -> 0 with lr * steps fixed, discrete steps become
  `predict.gradient_descent_mse`'s gradient flow; the gap is O(lr):
  (1 - x)^k = exp(-k x) (1 + O(k x^2)), here k x^2 <= 1e-3."""
  rng = np.random.default_rng(2)
  theta_all = _psd(rng, 9)
  theta, theta_test = theta_all[:6, :6], theta_all[6:, :6]
  y = rng.standard_normal((6, 2))
  x_max = 1e-3
  lr = x_max * y.size / np.linalg.eigvalsh(theta)[-1]
  steps = np.array([0, 300, 1000])
  zeros = np.zeros_like(y), np.zeros((3, 2))
  _, discrete = DiscreteNtkDynamics(theta, theta_test, y, lr)(steps, *zeros)
  _, flow = predict.gradient_descent_mse(theta, y, lr)(
      t=steps.astype(np.float64), fx_train_0=zeros[0], fx_test_0=zeros[1],
      k_test_train=theta_test)
  np.testing.assert_allclose(discrete, flow, atol=1e-3 * np.abs(flow).max())


# ----------------------------------------------------------------------------
# Data and architectures.


def _npz(tmp_path, name='data.npz', **arrays):
  path = os.path.join(tmp_path, name)
  np.savez(path, **arrays)
  return path


def test_npz_labels_are_one_hot_centered_and_inputs_on_a_sphere(tmp_path):
  rng = np.random.default_rng(3)
  path = _npz(tmp_path, x_train=rng.normal(size=(12, 5)) * 7 + 3,
              y_train=np.arange(12) % 3, x_test=rng.normal(size=(4, 5)),
              y_test=np.array([0, 1, 2, 2]))
  ds = data.load(path)
  assert ds.y_train.shape == (12, 3) and ds.n_outputs == 3
  np.testing.assert_allclose(ds.y_train.sum(1), 0., atol=1e-6)
  np.testing.assert_array_equal(np.argmax(ds.y_train, 1), np.arange(12) % 3)
  np.testing.assert_allclose(np.linalg.norm(ds.x_train, axis=1), np.sqrt(5),
                             rtol=1e-5)
  assert ds.x_train.dtype == np.float32
  summary = ds.summary()
  assert summary['classification'] and summary['n_train'] == 12


def test_digits_split_is_fixed_and_complete():
  ds = data.load(None)
  assert len(ds.x_train) == 1000 and len(ds.x_test) == 797
  assert ds.x_train.shape[1:] == (64,) and ds.n_outputs == 10
  again = data.load(None, train_size=10, images=True)
  assert again.x_train.shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(again.labels_train, ds.labels_train[:10])


@pytest.mark.parametrize('arrays, message', [
    (dict(x_train=np.ones((5, 2)), y_train=np.zeros(5), x_test=np.ones((2, 2))),
     'missing array(s) y_test'),
    (dict(x_train=np.ones((5, 2)), y_train=np.zeros(4), x_test=np.ones((2, 2)),
          y_test=np.zeros(2)),
     'x_train has 5 examples but y_train has 4'),
    (dict(x_train=np.ones((5, 2)), y_train=np.zeros(5), x_test=np.ones((2, 3)),
          y_test=np.zeros(2)),
     'x_train examples have shape (2,) but x_test examples have (3,)'),
    (dict(x_train=np.array([[1., np.nan]] * 5), y_train=np.zeros(5),
          x_test=np.ones((2, 2)), y_test=np.zeros(2)),
     'x_train has 5 NaN or infinite value(s)'),
    (dict(x_train=np.ones((5, 2)), y_train=np.zeros((5, 2, 2)),
          x_test=np.ones((2, 2)), y_test=np.zeros((2, 2, 2))),
     'targets are 1-d'),
    (dict(x_train=np.ones(5), y_train=np.zeros(5), x_test=np.ones(2),
          y_test=np.zeros(2)),
     'inputs need shape (examples, features...)'),
])
def test_bad_data_exits_with_a_clear_message(tmp_path, capsys, arrays,
                                             message):
  path = _npz(tmp_path, **arrays)
  code = main(['compare', '--data', path, '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err
  assert code == 1
  assert message in err, err
  assert 'Traceback' not in err


def test_labels_are_mapped_to_their_classes(tmp_path):
  """Classes are the distinct labels: 0/5/2000/4000 are 4 classes (max + 1
  made 4001 outputs)."""
  rng = np.random.default_rng(4)
  labels = np.array([0, 2000, 4000, 5] * 3)
  path = _npz(tmp_path, x_train=rng.normal(size=(12, 5)), y_train=labels,
              x_test=rng.normal(size=(4, 5)),
              y_test=np.array([4000, 5, 0, 2000]))
  ds = data.load(path)
  assert ds.n_outputs == 4
  # Sorted distinct labels 0, 5, 2000, 4000 -> classes 0..3.
  np.testing.assert_array_equal(ds.labels_test, [3, 1, 0, 2])
  np.testing.assert_array_equal(np.argmax(ds.y_train, 1),
                                np.searchsorted([0, 5, 2000, 4000], labels))


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('a file, not a folder')
  assert main(['compare', '--quick', '--out', str(blocker / 'out')]) == 1
  err = capsys.readouterr().err
  assert 'cannot write to --out' in err and 'Traceback' not in err


def test_unreadable_or_missing_data_file(tmp_path, capsys):
  assert main(['compare', '--data', str(tmp_path / 'none.npz')]) == 1
  assert 'no such file' in capsys.readouterr().err
  text = tmp_path / 'notes.npz'
  text.write_text('not an archive')
  assert main(['compare', '--data', str(text), '--out',
               str(tmp_path / 'o')]) == 1
  assert 'cannot read it as an .npz archive' in capsys.readouterr().err


def test_custom_architecture_contract(tmp_path):
  module = tmp_path / 'my_nets.py'
  module.write_text(
      'from ntkjax import stax\n'
      'def good(width, out_dim):\n'
      '  return stax.serial(stax.Dense(width), stax.Erf(),\n'
      '                     stax.Dense(out_dim))\n'
      'def wrong_outputs(width, out_dim):\n'
      '  return stax.serial(stax.Dense(width), stax.Relu(), stax.Dense(3))\n'
      'def one_argument(width):\n'
      '  return stax.Dense(width)\n'
      'not_a_function = 3\n')
  arch = architectures.resolve(f'{module}:good')
  init_fn, apply_fn, kernel_fn = architectures.build_checked(arch, 16, 10,
                                                             (64,))
  assert kernel_fn(np.ones((2, 64)), None, 'ntk').shape == (2, 2)
  with pytest.raises(architectures.ArchitectureError,
                     match=r'must give \(N, 10\) outputs'):
    architectures.build_checked(
        architectures.resolve(f'{module}:wrong_outputs'), 16, 10, (64,))
  with pytest.raises(architectures.ArchitectureError,
                     match=r'must accept \(width, out_dim\)'):
    architectures.resolve(f'{module}:one_argument')
  with pytest.raises(architectures.ArchitectureError, match='not callable'):
    architectures.resolve(f'{module}:not_a_function')
  with pytest.raises(architectures.ArchitectureError, match='no attribute'):
    architectures.resolve(f'{module}:missing')
  with pytest.raises(architectures.ArchitectureError, match='cannot import'):
    architectures.resolve('no_such_module_xyz:net')
  with pytest.raises(architectures.ArchitectureError, match='unknown preset'):
    architectures.resolve('fc-tanh')


def test_cnn_preset_builds_on_images_or_says_it_is_not_available(
    tmp_path, capsys, monkeypatch):
  if hasattr(stax, 'Conv'):
    arch = architectures.resolve('cnn')
    assert arch.images
    init_fn, _, _ = architectures.build_checked(arch, 8, 10, (8, 8, 1))
  monkeypatch.delattr(stax, 'Conv', raising=False)
  assert main(['compare', '--arch', 'cnn', '--quick', '--out',
               str(tmp_path)]) == 1
  assert 'not available yet' in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Flags.


@pytest.mark.parametrize('flags, message', [
    (['--widths', '64,abc'], "'abc' is not an integer"),
    (['--widths', '64,64'], 'widths repeat'),
    (['--steps', '0'], 'must be >= 1'),
    (['--seeds', 'two'], 'expected an integer'),
    (['--lr', '-1'], 'must be a positive number'),
    (['--lr-fraction', '1.5'], 'must be in (0, 1)'),
    (['--lr', '1', '--lr-fraction', '0.5'], 'not allowed with argument'),
    (['--bogus'], 'unrecognized arguments: --bogus'),
])
def test_bad_flags_are_usage_errors(capsys, flags, message):
  with pytest.raises(SystemExit) as exit_info:
    main(['compare'] + flags)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err and 'usage:' in err, err


def test_python_dash_m_entry_point():
  """`python -m ntkjax` exists and reports flag errors with exit code 2."""
  done = subprocess.run([sys.executable, '-m', 'ntkjax', 'compare', '--steps',
                         '0'], capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert 'argument --steps: must be >= 1' in done.stderr


# ----------------------------------------------------------------------------
# End to end.


def _check_png(path):
  with open(path, 'rb') as f:
    head = f.read(8)
  assert head == PNG_MAGIC, path
  import matplotlib.image
  pixels = matplotlib.image.imread(path)
  assert pixels.shape[0] > 200 and pixels.shape[1] > 300
  assert np.ptp(pixels[..., :3]) > 0.5, f'{path} is blank'


def test_cli_end_to_end_on_a_tiny_run(tmp_path, capsys):
  out = tmp_path / 'run'
  assert main(['compare', '--quick', '--alpha', '0.1,30', '--out',
               str(out)]) == 0
  printed = capsys.readouterr()
  assert 'kernel dist.' in printed.out and 'slopes vs width' in printed.out
  assert 'lazy-rich dial at width 128: alpha 0.1: drift' in printed.out
  assert 'training [' in printed.err and 'done' in printed.err

  for name in PLOTS:
    _check_png(out / f'{name}.png')
  results = json.loads((out / 'results.json').read_text())
  assert results['status'] == 'complete'
  widths = results['widths']
  assert widths == [32, 128] and results['seeds'] == [0]
  n_w = len(widths)
  for key in ('kernel_distance', 'drift'):
    values = np.array(results[key], np.float64)
    assert values.shape == (n_w,) and np.all(values > 0)
    assert np.isfinite(results[f'{key}_slope'])
  # The kernel at 4x the width is closer to the limit (expected ratio 2;
  # seed-to-seed spread of one estimate is ~10%).
  assert results['kernel_distance'][1] < results['kernel_distance'][0]
  assert -1.5 < results['kernel_distance_slope'] < 0
  infinite = results['test_metrics']['infinite']
  for name in ('nngp', 'ntk', 'nngp_at_steps', 'ntk_at_steps'):
    assert 0 <= infinite[name]['test_accuracy'] <= 1
    assert infinite[name]['test_mse'] > 0
  finite = results['test_metrics']['finite']
  for model in ('network', 'linearized', 'ntk_same_init'):
    for metric in ('accuracy', 'mse'):
      assert len(finite[model][metric]) == n_w
      assert len(finite[model][f'{metric}_per_seed']) == n_w
  divergence = results['divergence']
  steps = divergence['steps']
  assert steps[0] == 0 and steps[-1] == results['steps'] == 20
  gaps = np.array(divergence['network'])
  assert gaps.shape == (n_w, len(steps))
  assert gaps[:, 0] == pytest.approx(0, abs=1e-5)   # same initial function
  assert np.all(gaps[:, -1] > 0)
  assert len(divergence['final']['network']) == n_w
  np.testing.assert_allclose(results['learning_rate'],
                             0.5 * results['max_learning_rate'], rtol=1e-6)

  # The lazy-rich dial: the kernel moves less at large alpha (~ 1/alpha).
  dial = results['lazy_rich']
  assert dial['alphas'] == [0.1, 30.]
  drift = np.array(dial['drift'], np.float64)
  assert drift.shape == (n_w, 2) and np.all(drift[:, 1] < drift[:, 0] / 10)
  for name in ('accuracy', 'alignment_before', 'alignment_after'):
    assert np.all(np.isfinite(np.array(dial[name], np.float64)))
  _check_png(out / 'lazy_rich.png')

  page = (out / 'report.html').read_text()
  assert page.count('src="data:image/png;base64,') == len(PLOTS) + 1
  assert 'The lazy-rich dial' in page
  assert 'src="http' not in page and '<link' not in page
  assert 'falls like n^(' in page

  # A saved run rebuilds its report; runs that diverged (NaN -> null in
  # the JSON) leave gaps in the plots, not a crash.
  results['drift'] = [None] * n_w
  results['drift_per_seed'] = [[None]] * n_w
  results['drift_slope'] = results['drift_slope_stderr'] = None
  results['divergence']['network'] = [[None] * len(steps)] * n_w
  results['divergence']['final']['network'] = [None] * n_w
  files = report.write_report(results, str(tmp_path / 'rebuilt'))
  for name in PLOTS:
    _check_png(files[name])
  assert 'n/a' in report.summary_text(results)


def test_mup_end_to_end(tmp_path, capsys):
  """--parameterization mup: the muP networks' learning rate is half the
  largest stable one of the kernel SGD follows in muP at the base width;
  the NTK limit keeps its own; columns that compare with the NTK limit are
  absent (NaN -> null), and the report says why. Base width 32 is the
  smallest width: there muP is the standard parameterization, whose
  kernel is ~width x the NTK parameterization's, so its rate is smaller."""
  out = tmp_path / 'mup'
  assert main(['compare', '--quick', '--parameterization', 'mup', '--out',
               str(out)]) == 0
  printed = capsys.readouterr().out
  assert 'gap net-lin' in printed and 'NTK same-init' not in printed
  assert 'of muP at base width 32' in printed
  results = json.loads((out / 'results.json').read_text())
  assert results['parameterization'] == 'mup' and results['base_width'] == 32
  np.testing.assert_allclose(results['learning_rate'],
                             0.5 * results['max_learning_rate'], rtol=1e-6)
  np.testing.assert_allclose(results['reference_learning_rate'],
                             0.5 * results['ntk_max_learning_rate'],
                             rtol=1e-6)
  assert results['learning_rate'] < results['reference_learning_rate'] / 4
  assert results['kernel_distance'] == [None, None]
  finite = results['test_metrics']['finite']
  assert finite['ntk_same_init']['accuracy'] == [None, None]
  assert results['divergence']['final']['network'] == [None, None]
  for values in (results['drift'], finite['network']['accuracy'],
                 results['divergence']['final']['network_vs_linearized']):
    assert all(v is not None and v > 0 for v in values), values
  assert not (out / 'kernel_distance.png').exists()
  for name in ('metrics_vs_width', 'divergence', 'drift'):
    _check_png(out / f'{name}.png')
  page = (out / 'report.html').read_text()
  assert page.count('src="data:image/png;base64,') == 3
  assert 'muP network vs its own linearization' in page
  assert 'base width 32' in page


def test_mup_flags_and_networks_without_the_keyword(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(['compare', '--parameterization', 'standard'])
  assert exit_info.value.code == 2
  assert "invalid choice: 'standard'" in capsys.readouterr().err
  assert main(['compare', '--base-width', '16', '--out',
               str(tmp_path / 'o')]) == 2
  assert 'give it with --parameterization mup' in capsys.readouterr().err
  module = tmp_path / 'ntk_only.py'
  module.write_text(
      'from ntkjax import stax\n'
      'def net(width, out_dim):\n'
      '  return stax.serial(stax.Dense(width), stax.Relu(),\n'
      '                     stax.Dense(out_dim))\n')
  assert main(['compare', '--quick', '--arch', f'{module}:net',
               '--parameterization', 'mup', '--out',
               str(tmp_path / 'o')]) == 1
  assert 'must accept a keyword parameterization' in capsys.readouterr().err


def test_regression_data_end_to_end(tmp_path, capsys):
  """1-d float targets: regression, no accuracy; the report still builds."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(30, 3))
  y = np.sin(x @ np.array([1., -0.5, 0.25]))
  path = _npz(tmp_path, x_train=x[:20], y_train=y[:20], x_test=x[20:],
              y_test=y[20:])
  out = tmp_path / 'reg'
  assert main(['compare', '--data', path, '--widths', '8,32', '--steps', '5',
               '--seeds', '2', '--records', '3', '--kernel-points', '10',
               '--out', str(out)]) == 0
  results = json.loads((out / 'results.json').read_text())
  assert results['data']['classification'] is False
  assert results['test_metrics']['infinite']['ntk']['test_accuracy'] is None
  assert all(v is None for v in
             results['test_metrics']['finite']['network']['accuracy'])
  assert np.isfinite(results['kernel_distance_slope_stderr'])   # 2 seeds
  _check_png(out / 'metrics_vs_width.png')
  assert 'test MSE' in (out / 'report.html').read_text()


def test_progress_without_a_terminal():
  stream = io.StringIO()
  with Progress('work', 4, stream, interval=3600) as bar:
    for _ in range(4):
      bar.advance(1, 'item')
  lines = stream.getvalue().splitlines()
  # The opening line and the closing one; no line per item off a terminal.
  assert len(lines) == 2 and lines[-1].endswith('done')
  assert '100%' in lines[-1] and '\r' not in stream.getvalue()


def test_progress_says_interrupted_or_failed():
  """Ctrl-C or an error ends the bar as such, not as 'done'."""
  for error, word in ((KeyboardInterrupt, 'interrupted'),
                      (RuntimeError, 'failed')):
    stream = io.StringIO()
    with pytest.raises(error):
      with Progress('work', 4, stream, interval=3600) as bar:
        bar.advance(1, 'item')
        raise error()
    last = stream.getvalue().splitlines()[-1]
    assert last.endswith(word) and 'done' not in last, last


def test_rerun_removes_the_previous_report_only(tmp_path, capsys):
  """A rerun into a folder with an old report removes that report (it
  would sit beside new, maybe partial, results) and nothing else."""
  out = tmp_path / 'out'
  out.mkdir()
  for name in ('report.html', 'metrics_vs_width.png', 'mine.txt'):
    (out / name).write_text('old')
  bad = _npz(tmp_path, x_train=np.ones((5, 2)), y_train=np.zeros(4),
             x_test=np.ones((2, 2)), y_test=np.zeros(2))
  assert main(['compare', '--data', bad, '--out', str(out)]) == 1
  assert sorted(p.name for p in out.iterdir()) == ['mine.txt']
  assert 'removed the previous report' in capsys.readouterr().err
