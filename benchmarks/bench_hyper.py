"""Hyperparameters by marginal likelihood: default vs fitted NNGP / NTK kernels.

A demonstration with goals, not a timing benchmark (accuracies, with the
seconds each fit took for context). On scikit-learn's four bundled
classification data sets (digits, breast cancer, wine, iris):

- each split: stratified 70/30 (`train_test_split(..., stratify=y,
  random_state=seed)`), features standardized on the training part
  (`StandardScaler`), seeds 0-4;
- models, all on the same splits:
  `nngp_default` / `ntk_default`: `NNGPClassifier()` / `NTKClassifier()`
    (the depth-3 ReLU network of `estimators.default_builder`, W_std=1.5,
    b_std=0.05, diag_reg=1e-6 relative);
  `nngp_fitted` / `ntk_fitted`: the same with `optimize=True` (W_std, b_std
    and diag_reg fitted by evidence, `hyper.fit`, 2 runs: from the defaults
    and from one random start);
  `nngp_choices`: `optimize=True` over a builder with depth in {1, 2, 3} and
    activation in {relu, erf}, compared by evidence (`hyper.fit(...,
    choices=...)`; --no-choices skips it);
  `random_forest`: `RandomForestClassifier(n_estimators=500,
    random_state=seed)`;
  `rbf_svm`: `SVC(kernel='rbf')` with C in 10^[-2..3] and gamma in
    10^[-4..1] (6 x 6) chosen by `GridSearchCV(cv=5)` on the training part.
- recorded per data set and model: accuracy per seed, its mean, the fit
  seconds (wall, this 2-core CPU), and the fitted hyperparameters.

Goals (from the issue): the fitted kernel's mean accuracy >= the default's
on every data set (NNGP and NTK each), and the fitted NNGP ahead of the
random forest on at least three of the four.

Output: benchmarks/results/hyper_<backend>.json (_quick: 2 seeds, digits
subsampled to 600 samples).

Usage:
    python benchmarks/bench_hyper.py [--quick] [--no-choices]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update('jax_enable_x64', True)

import ntkjax  # noqa: E402
from ntkjax import estimators, stax  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)
SEEDS_QUICK = (0, 1)
DATASETS = ('digits', 'breast_cancer', 'wine', 'iris')
COLUMNS = ('dataset', 'model', 'accuracy_mean', 'accuracy_min',
           'fit_seconds_mean')


def choice_builder(W_std=1.5, b_std=0.05, depth=3, activation='relu'):
  """The default architecture with depth and activation as choices."""
  layers = []
  for _ in range(depth - 1):
    layers += [stax.Dense(512, W_std, b_std),
               stax.Relu() if activation == 'relu' else stax.Erf()]
  return stax.serial(*layers, stax.Dense(1, W_std, b_std))[2]


class ChoiceClassifier(estimators.NNGPClassifier):
  """NNGPClassifier(optimize=True) whose fit also compares depth and
  activation by evidence; the rest (posterior, predict) is inherited."""

  def _optimize(self, X, targets):
    result = ntkjax.hyper.fit(
        choice_builder, X, targets, {'W_std': 1.5, 'b_std': 0.05},
        get='nngp', diag_reg=1e-3, restarts=self.n_restarts,
        choices={'depth': [1, 2, 3], 'activation': ['relu', 'erf']})
    self._choice = result.choice
    return result

  def _fitted_kernel_fn(self, hyperparameters):
    values = {k: v for k, v in hyperparameters.items() if k != 'diag_reg'}
    return jax.jit(choice_builder(**values, **self._choice),
                   static_argnames='get')


def load(name: str, quick: bool):
  import sklearn.datasets
  data = getattr(sklearn.datasets, f'load_{name}')()
  x, y = data.data, data.target
  if quick and len(x) > 600:
    keep = np.random.default_rng(0).permutation(len(x))[:600]
    x, y = x[keep], y[keep]
  return x, y


def models(seed: int, with_choices: bool) -> dict:
  from sklearn.ensemble import RandomForestClassifier
  from sklearn.model_selection import GridSearchCV
  from sklearn.svm import SVC
  grid = {'C': np.logspace(-2, 3, 6), 'gamma': np.logspace(-4, 1, 6)}
  out = {
      'nngp_default': estimators.NNGPClassifier(),
      'nngp_fitted': estimators.NNGPClassifier(optimize=True),
      'ntk_default': estimators.NTKClassifier(),
      'ntk_fitted': estimators.NTKClassifier(optimize=True),
      'random_forest': RandomForestClassifier(n_estimators=500,
                                              random_state=seed),
      'rbf_svm': GridSearchCV(SVC(kernel='rbf'), grid, cv=5),
  }
  if with_choices:
    out['nngp_choices'] = ChoiceClassifier(optimize=True)
  return out


def run(quick: bool, with_choices: bool) -> list:
  from sklearn.model_selection import train_test_split
  from sklearn.preprocessing import StandardScaler
  records = []
  for name in DATASETS:
    x, y = load(name, quick)
    per_model = {}
    for seed in (SEEDS_QUICK if quick else SEEDS):
      x_train, x_test, y_train, y_test = train_test_split(
          x, y, test_size=0.3, stratify=y, random_state=seed)
      scaler = StandardScaler().fit(x_train)
      x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
      for model_name, model in models(seed, with_choices).items():
        start = time.perf_counter()
        model.fit(x_train, y_train)
        seconds = time.perf_counter() - start
        accuracy = float(np.mean(model.predict(x_test) == y_test))
        entry = per_model.setdefault(model_name, {
            'accuracy': [], 'fit_seconds': [], 'hyperparameters': []})
        entry['accuracy'].append(accuracy)
        entry['fit_seconds'].append(round(seconds, 2))
        fitted = getattr(model, 'hyperparameters_', None)
        if fitted is not None:
          fitted = dict(fitted, log_marginal_likelihood=float(
              model.log_marginal_likelihood_))
          fitted.update(getattr(model, '_choice', {}))
        elif hasattr(model, 'best_params_'):
          fitted = {k: float(v) for k, v in model.best_params_.items()}
        entry['hyperparameters'].append(fitted)
        print(f'{name} seed {seed} {model_name}: {accuracy:.4f} '
              f'({seconds:.1f} s)', flush=True)
    for model_name, entry in per_model.items():
      records.append(dict(
          dataset=name, model=model_name, n_samples=len(x),
          accuracy=entry['accuracy'],
          accuracy_mean=float(np.mean(entry['accuracy'])),
          accuracy_min=float(np.min(entry['accuracy'])),
          fit_seconds=entry['fit_seconds'],
          fit_seconds_mean=float(np.mean(entry['fit_seconds'])),
          hyperparameters=entry['hyperparameters']))
  return records


def goals(records: list) -> dict:
  mean = {(r['dataset'], r['model']): r['accuracy_mean'] for r in records}
  out = {}
  for kind in ('nngp', 'ntk'):
    out[f'{kind}_fitted_at_least_default_on_every_dataset'] = {
        d: mean[d, f'{kind}_fitted'] >= mean[d, f'{kind}_default']
        for d in DATASETS}
  ahead = {d: mean[d, 'nngp_fitted'] > mean[d, 'random_forest']
           for d in DATASETS}
  out['nngp_fitted_ahead_of_random_forest'] = ahead
  out['met'] = {
      'fitted_at_least_default': all(
          all(v.values()) for k, v in out.items()
          if k.endswith('every_dataset')),
      'ahead_of_random_forest_on_3_of_4': sum(ahead.values()) >= 3}
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--no-choices', action='store_true')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  records = run(args.quick, not args.no_choices)
  _common.write_benchmark(
      'hyper', records, 'ntkjax', ntkjax.__version__, args.quick, 'hyper',
      COLUMNS, goals=goals(records),
      protocol={'seeds': list(SEEDS_QUICK if args.quick else SEEDS),
                'split': 'stratified 70/30, StandardScaler on train',
                'choices': not args.no_choices},
      total_seconds=round(time.perf_counter() - start, 1),
      ntkjax_git=_common.ntkjax_git_state())
  return 0


if __name__ == '__main__':
  sys.exit(main())
