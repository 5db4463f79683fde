"""muTransfer on digits: learning-rate sweeps across widths in the standard, muP and NTK parameterizations.

The demonstration of Tensor Programs V (Yang et al. 2022, Fig. 1), a
demonstration with goals rather than a timing benchmark: tune the learning
rate on a narrow network, and see whether the optimum carries over to wide
ones. Protocol:

- data: scikit-learn's digits (1797 8x8 images, 10 classes), a fixed random
  split (numpy seed 0) of 1280 training and 517 test examples, features
  standardized on the training part (constant pixels left at 0);
- network: Dense(w)-Relu-Dense(w)-Relu-Dense(10), W_std = sqrt(2) (1 on the
  output layer), b_std = 0.1, widths w = 64, 256, 1024, 2048 (--quick: 64, 256);
- parameterizations: `sp` (stax `parameterization='standard'`), `mup`
  (`ntkjax.mup.MuP` with base width 64: `init_fn`, and
  `scale_updates(params, optimizer)` chained after the optimizer; at width
  64 it *is* sp, checked: the losses agree exactly) and `ntp` (stax's
  default NTK parameterization; its optax lr is the grid's times
  64 / W_std^2 = 32 for SGD, 8 / W_std = 5.66 for Adam, so that at width 64
  its input and hidden weights move as sp's do: `LR_MULTIPLIER`);
- training: `ntkjax.train`, cross-entropy on one-hot targets, minibatches of
  128 (fresh permutation each epoch), 200 steps (20 epochs; --quick: 100),
  float32, with each of `optax.adam(lr)` (default betas) and `optax.sgd(lr)`
  (no momentum). Grids: Adam lr = 2^-13 .. 2^-4 (octaves, 10), SGD lr =
  2^-2.5 .. 2^3.5 (half-octaves, 13); seeds 0, 1 (init and minibatch
  order; the data split is fixed). One optimizer object per (width, lr),
  shared by the seeds, and one apply_fn per width, so `train` compiles once
  per (width, lr);
- recorded per (optimizer, parameterization, width, lr): the final loss on
  the full training set and the test accuracy, per seed and averaged (the
  accuracy over the seeds that did not diverge). A diverged seed
  (non-finite loss) makes the mean loss inf (`"inf"` in the JSON), so the
  argmin never picks it.

Per (optimizer, parameterization), `summarize` reports the optimal lr per
width (grid argmin of the mean loss, and `log2_lr_opt_refined`: the vertex
of a parabola through log(loss) at the argmin and its two neighbours), the
shift log2(lr* at 2048 / lr* at 64), the loss at the transferred lr (the
width-64 optimum used at width 2048) against the best loss at 2048
(`transfer_regret`, their ratio), the largest lr without a diverged seed,
and the lrs at which the loss falls with width.

Measured (full run; results/mutransfer_cpu.json), log2 of the optimal lr at
widths 64 / 256 / 1024 / 2048 (refined), and the transferred lr's loss at
2048:

    adam sp:  -6 / -7 / -7 / -7 (-6.26 / -7.29 / -7.42 / -7.38): shift -1
              (-1.12); transferred 0.0501 vs best 7.7e-5 (653x)
    adam mup: -6 / -6 / -6 / -6 (-6.26 / -6.29 / -6.26 / -5.96): shift 0
              (+0.30); transferred = best (9.3e-5)
    adam ntp: -6 / -6 / -5 / -6 (-6.31 / -6.33 / -5.47 / -6.48): shift 0
              (-0.17; +1 at 1024); transferred = best (1.4e-4)
    sgd sp:   0.5 / 0 / -0.5 / -1: shift -1.5; the transferred lr 2^0.5
              diverges at widths 1024 and 2048 (both seeds); best losses
              1.3e-3 at every width
    sgd mup:  0.5 / 0.5 / 0.5 / 0.5: shift 0; transferred = best (1.0e-3)
    sgd ntp:  1 / 2 / 3 / 3.5 (at the grid's edge, so >= 3.5): shift
              >= +2.5; transferred 5.8x the best; at every lr up to 2^1
              the loss *rises* with width (consistent with lazy training:
              NTP approaches its kernel limit)

So muP holds the optimum in place for both optimizers while SP's moves
down and NTP's (with SGD) up. Caveats: digits is easy, so every well-tuned
run drives the training loss to ~1e-4 (Adam) or ~1e-3 (SGD) in 200 steps,
and the optimum sits next to the edge of stability; with SGD the sp curves
are monotone up to that edge, so its shift is the edge moving (the largest
lr without divergence: 2^2 / 2^0.5 / 2^0 / 2^-1), and the best loss is the
same at every width; muP's SGD edge drops from 2^2 at width 64 to 2^0.5
and stays there (2^1 diverges for a seed at 256..2048). Training loss
differences at the optimum do not show in test accuracy (97.9-98.4% for
all of them at 2048). Wider is better at a fixed lr under muP (and, at
most lrs where no seed diverged, also under SP, whose effective step grows
with width); under NTP with SGD it is worse. With two seeds and octave
(Adam) or half-octave (SGD) grids, a shift of one grid step is at the
resolution of the measurement (Adam ntp's +1 at 1024 and back at 2048).

Timing (this 2-core shared CPU, with a test run beside it part of the
time): the full run took 39 min (2361 s inside the script); a width-2048
run of 200 steps ~8 s alone, 30-45 s beside the test run; widths up to
1024 alone took 4 min 40 s in an earlier run. --quick ~45 s. Runs are
deterministic on this CPU: three full runs gave bit-identical losses and
accuracies (widths up to 1024; the widths shared with this run agree).

Output: benchmarks/results/mutransfer_<backend>.json (_quick for --quick):
`cases` has one summary per (optimizer, parameterization) (`case` =
e.g. 'adam_mup'; `status` is its one-line summary in the README), `grid`
one record per (optimizer, parameterization, width, lr) with per-seed and
mean/median losses, test accuracies and seconds; top level: `protocol`,
`sweep_seconds`, `max_abs_loss_diff_sp_vs_mup_at_base_width`, git state
and source hash.

Usage:
    python benchmarks/bench_mutransfer.py [--quick] [--optimizers adam sgd]
        [--parameterizations sp mup ntp] [--widths ...] [--log2-lrs ...]
        [--seeds ...] [--steps N] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ntkjax  # noqa: E402
from ntkjax import stax  # noqa: E402
from ntkjax.mup import MuP  # noqa: E402

BASE_WIDTH = 64
OPTIMIZERS = ('adam', 'sgd')
WIDTHS = {False: (64, 256, 1024, 2048), True: (64, 256)}
# log2 of the learning rate, per optimizer: Adam octaves around its optimum
# (~2^-6 at width 64); SGD half-octaves up to past its edge of stability.
LOG2_LRS = {
    False: {'adam': tuple(range(-13, -3)),
            'sgd': tuple(k / 2 for k in range(-5, 8))},
    True: {'adam': (-12, -9, -6, -3), 'sgd': (-3., -1., 1., 3.)},
}
SEEDS = {False: (0, 1), True: (0, 1)}
STEPS = {False: 200, True: 100}
BATCH_SIZE = 128
N_TRAIN = 1280            # of digits' 1797 examples; the other 517 are test
SPLIT_SEED = 0
W_STD, W_STD_OUT, B_STD = math.sqrt(2.), 1., 0.1
PARAMETERIZATIONS = ('sp', 'mup', 'ntp')
# Optax learning rate = 2^log2_lr x this. NTP's weights are W_std /
# sqrt(fan_in) x omega, omega ~ N(0, 1); at the base width every layer of
# this network has fan-in 64 (digits has 64 features), so NTP weights move
# like SP weights with the grid's lr if the optax lr is 64 / W_std^2 x it
# (SGD: the multiplier enters the gradient twice) or sqrt(64) / W_std x it
# (Adam: once). With W_std = sqrt(2) this is exact for the input and hidden
# layers; the output layer (W_std = 1) and the biases get a smaller step.
# So one grid serves all three parameterizations, which nearly coincide at
# width 64 (muP and SP exactly: muP at the base width is SP).
LR_MULTIPLIER = {'sgd': {'sp': 1., 'mup': 1., 'ntp': BASE_WIDTH / W_STD**2},
                 'adam': {'sp': 1., 'mup': 1.,
                          'ntp': math.sqrt(BASE_WIDTH) / W_STD}}
COLUMNS = ('case', 'log2_lr_opt', 'shift_log2', 'shift_log2_refined',
           'transferred_loss', 'best_loss_widest', 'transfer_regret')


def load_data():
  """Digits, standardized on the training part, fixed random split.

  Returns:
    (x_train, y_train one-hot, x_test, labels_test, labels_train), float32.
  """
  from sklearn.datasets import load_digits
  x, labels = load_digits(return_X_y=True)
  order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  train, test = order[:N_TRAIN], order[N_TRAIN:]
  mean, std = x[train].mean(0), x[train].std(0)
  std = np.where(std > 0, std, 1.)     # constant (always-blank) pixels
  x = ((x - mean) / std).astype(np.float32)
  one_hot = np.eye(10, dtype=np.float32)[labels]
  return (jnp.asarray(x[train]), jnp.asarray(one_hot[train]),
          jnp.asarray(x[test]), labels[test], labels[train])


def network(width: int, parameterization: str = 'sp'):
  """Dense(w)-Relu-Dense(w)-Relu-Dense(10); 'ntp': NTK parameterization,
  else the standard one (muP rescales the standard network)."""
  p = 'ntk' if parameterization == 'ntp' else 'standard'
  return stax.serial(
      stax.Dense(width, W_STD, B_STD, parameterization=p), stax.Relu(),
      stax.Dense(width, W_STD, B_STD, parameterization=p), stax.Relu(),
      stax.Dense(10, W_STD_OUT, B_STD, parameterization=p))


def _refined_optimum(log2_lrs, losses, i):
  """Vertex of the parabola through log(loss) at the grid argmin `i` and
  its neighbours (in log2 lr), clamped to one grid step; None at an edge
  or next to a diverged point."""
  if i == 0 or i == len(losses) - 1 or not all(
      np.isfinite(losses[i - 1:i + 2])):
    return None
  a, b, c = np.log(losses[i - 1:i + 2])
  step = log2_lrs[i + 1] - log2_lrs[i]
  curvature = a - 2 * b + c
  if curvature <= 0:
    return None
  offset = float(np.clip(0.5 * (a - c) / curvature, -1., 1.))
  return round(log2_lrs[i] + offset * step, 3)


def sweep(optimizer_name, parameterization, widths, log2_lrs, seeds, steps,
          data):
  """Train every (width, lr, seed) of one parameterization.

  Returns:
    A list of grid records, one per (width, lr).
  """
  x_train, y_train, x_test, labels_test, _ = data
  mup = MuP(network, BASE_WIDTH, x_train.shape)
  records = []
  for width in widths:
    apply_fn = network(width, parameterization).apply_fn   # one per width
    inits = {}
    for seed in seeds:
      key = jax.random.PRNGKey(seed)
      inits[seed] = (mup.init_fn(key, width)[1] if parameterization == 'mup'
                     else network(width, parameterization).init_fn(
                         key, x_train.shape)[1])
    for log2_lr in log2_lrs:
      lr = 2.**log2_lr * LR_MULTIPLIER[optimizer_name][parameterization]
      # One optimizer object per (width, lr), shared by the seeds: train
      # compiles once per (apply_fn, optimizer) object.
      optimizer = getattr(optax, optimizer_name)(lr)
      if parameterization == 'mup':
        optimizer = optax.chain(
            optimizer, mup.scale_updates(inits[seeds[0]], optimizer_name))
      losses, accuracies, seconds = [], [], []
      for seed in seeds:
        start = time.perf_counter()
        result = ntkjax.train(apply_fn, inits[seed], x_train, y_train,
                              optimizer, steps, loss='cross_entropy',
                              batch_size=BATCH_SIZE, x_test=x_test,
                              key=jax.random.key(1000 + seed))
        loss = float(result.loss[-1])
        seconds.append(time.perf_counter() - start)
        predicted = np.asarray(jnp.argmax(result.fx_test[-1], -1))
        losses.append(loss if math.isfinite(loss) else math.inf)
        accuracies.append(float(np.mean(predicted == labels_test))
                          if math.isfinite(loss) else None)
      finite_acc = [a for a in accuracies if a is not None]
      records.append({
          'optimizer': optimizer_name,
          'parameterization': parameterization, 'width': width,
          'log2_lr': log2_lr, 'lr': 2.**log2_lr, 'optax_lr': lr,
          'loss_per_seed': [_json_float(v) for v in losses],
          'loss_mean': _json_float(float(np.mean(losses))),
          'loss_median': _json_float(float(np.median(losses))),
          'diverged_seeds': sum(not math.isfinite(v) for v in losses),
          'test_accuracy_per_seed': accuracies,
          'test_accuracy_mean': (float(np.mean(finite_acc)) if finite_acc
                                 else None),
          'seconds_first_seed': round(seconds[0], 3),
          'seconds_median_rest': (round(float(np.median(seconds[1:])), 3)
                                  if len(seconds) > 1 else None),
      })
      print(f'{optimizer_name} {parameterization} width={width} '
            f'log2_lr={log2_lr}: loss {records[-1]["loss_mean"]} acc '
            f'{records[-1]["test_accuracy_mean"]} ({sum(seconds):.1f} s)',
            flush=True)
  return records


def _json_float(value):
  """inf/nan are not JSON: a diverged loss is written as the string."""
  return value if math.isfinite(value) else str(value)


def _loss(record):
  """Mean loss over seeds, inf if any seed diverged (for the argmin)."""
  value = record['loss_mean']
  return value if isinstance(value, float) else math.inf


def summarize(optimizer_name, parameterization, records, widths, log2_lrs):
  """Optimal lr per width, its shift, and the transferred lr's loss."""
  table = {(r['width'], r['log2_lr']): r for r in records}
  per_width = {}
  for width in widths:
    losses = np.array([_loss(table[width, k]) for k in log2_lrs])
    i = int(np.argmin(losses))
    stable = [k for k in log2_lrs if table[width, k]['diverged_seeds'] == 0]
    per_width[str(width)] = {
        'log2_lr_opt': log2_lrs[i] if np.isfinite(losses[i]) else None,
        'log2_lr_opt_refined': _refined_optimum(log2_lrs, losses, i),
        'at_grid_edge': i in (0, len(log2_lrs) - 1),
        'loss_opt': _json_float(float(losses[i])),
        'test_accuracy_at_opt': table[width, log2_lrs[i]][
            'test_accuracy_mean'],
        'log2_lr_max_stable': max(stable) if stable else None,
    }
  narrow, wide = per_width[str(widths[0])], per_width[str(widths[-1])]
  shift = (None if None in (narrow['log2_lr_opt'], wide['log2_lr_opt'])
           else wide['log2_lr_opt'] - narrow['log2_lr_opt'])
  refined = (None if None in (narrow['log2_lr_opt_refined'],
                              wide['log2_lr_opt_refined'])
             else round(wide['log2_lr_opt_refined']
                        - narrow['log2_lr_opt_refined'], 3))
  transferred = (table[widths[-1], narrow['log2_lr_opt']]
                 if narrow['log2_lr_opt'] is not None else None)
  best_wide = wide['loss_opt']
  transferred_loss = _loss(transferred) if transferred else math.inf
  regret = (transferred_loss / best_wide
            if isinstance(best_wide, float) and best_wide > 0 else None)
  # Wider is better at a fixed lr: among lrs where every width trained
  # (no seed diverged), the fraction whose mean loss falls with width.
  both = [k for k in log2_lrs
          if all(math.isfinite(_loss(table[w, k])) for w in widths)]
  monotone = [k for k in both if all(
      _loss(table[a, k]) > _loss(table[b, k])
      for a, b in zip(widths, widths[1:]))]
  summary = {
      'case': f'{optimizer_name}_{parameterization}',
      'optimizer': optimizer_name, 'parameterization': parameterization,
      'widths': list(widths),
      'per_width': per_width,
      'log2_lr_opt': [per_width[str(w)]['log2_lr_opt'] for w in widths],
      'shift_log2': shift, 'shift_log2_refined': refined,
      'transferred_log2_lr': narrow['log2_lr_opt'],
      'transferred_loss': _json_float(transferred_loss),
      'transferred_test_accuracy': (transferred['test_accuracy_mean']
                                    if transferred else None),
      'best_loss_widest': best_wide,
      'transfer_regret': (_json_float(regret) if regret is not None
                          else None),
      'lrs_all_widths_trained': both,
      'lrs_loss_falls_with_width': monotone,
  }
  summary['status'] = _status(summary, widths)
  return summary


def _status(s, widths):
  """One line for the README."""
  def fmt(v):
    return f'{v:.3g}' if isinstance(v, float) else str(v)
  opt = ' / '.join(
      'none' if s['per_width'][str(w)]['log2_lr_opt'] is None else
      ('>= ' if s['per_width'][str(w)]['at_grid_edge'] else '')
      + f'2^{s["per_width"][str(w)]["log2_lr_opt"]:g}' for w in widths)
  losses = ' / '.join(fmt(s['per_width'][str(w)]['loss_opt']) for w in widths)
  shift = ('none' if s['shift_log2'] is None else
           f'{s["shift_log2"]:+g} octaves')
  if s['shift_log2_refined'] is not None:
    shift += f', refined {s["shift_log2_refined"]:+.2f}'
  if any(s['per_width'][str(w)]['at_grid_edge'] for w in
         (widths[0], widths[-1])):
    shift += ', an optimum at the grid\'s edge'
  if isinstance(s['transferred_loss'], float):
    transferred = (f'loss {fmt(s["transferred_loss"])} = '
                   f'{fmt(s["transfer_regret"])}x the best there')
  else:
    transferred = 'diverged'
  return (f'optimal lr {opt} at widths {"/".join(map(str, widths))} '
          f'(shift {shift}); best train loss {losses}; width-'
          f'{widths[0]} optimum at width {widths[-1]}: {transferred}; '
          f'loss falls with width at {len(s["lrs_loss_falls_with_width"])}'
          f'/{len(s["lrs_all_widths_trained"])} lrs where no seed diverged')


def print_grid(records, widths, log2_lrs):
  """Mean final training loss: one row per lr, one column per width."""
  table = {(r['width'], r['log2_lr']): r for r in records}
  print(f'{records[0]["optimizer"]} {records[0]["parameterization"]}: '
        'mean final training loss '
        '(div: a seed diverged)')
  print('log2_lr ' + ''.join(f'{w:>10d}' for w in widths))
  for k in log2_lrs:
    cells = []
    for w in widths:
      v = _loss(table[w, k])
      cells.append(f'{v:10.4f}' if math.isfinite(v) else f'{"div":>10}')
    print(f'{k:7g} ' + ''.join(cells))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='widths 64, 256; 4 lrs; 100 steps')
  parser.add_argument('--optimizers', nargs='+', default=OPTIMIZERS,
                      choices=OPTIMIZERS)
  parser.add_argument('--parameterizations', nargs='+',
                      default=PARAMETERIZATIONS, choices=PARAMETERIZATIONS)
  parser.add_argument('--widths', nargs='+', type=int, default=None)
  parser.add_argument('--log2-lrs', nargs='+', type=float, default=None,
                      help='one grid for every optimizer given')
  parser.add_argument('--seeds', nargs='+', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--no-write', action='store_true',
                      help='print only (for trying other settings)')
  args = parser.parse_args(argv)
  widths = tuple(args.widths or WIDTHS[args.quick])
  grids = {o: tuple(args.log2_lrs or LOG2_LRS[args.quick][o])
           for o in args.optimizers}
  seeds = tuple(args.seeds if args.seeds is not None else SEEDS[args.quick])
  steps = args.steps or STEPS[args.quick]
  if widths[0] != BASE_WIDTH:
    print(f'note: the narrowest width {widths[0]} is not the base width '
          f'{BASE_WIDTH}', file=sys.stderr)
  start = time.perf_counter()
  digest = _common.ntkjax_source_digest()
  data = load_data()
  grid, summaries, sweep_seconds, base_diff = [], [], {}, {}
  for opt in args.optimizers:
    for parameterization in args.parameterizations:
      t0 = time.perf_counter()
      records = sweep(opt, parameterization, widths, grids[opt], seeds, steps,
                      data)
      sweep_seconds[f'{opt}_{parameterization}'] = round(
          time.perf_counter() - t0, 1)
      grid += records
      summaries.append(summarize(opt, parameterization, records, widths,
                                 grids[opt]))
    # muP at the base width is SP: same seeds, same losses.
    if {'sp', 'mup'} <= set(args.parameterizations):
      pairs = {(r['parameterization'], r['log2_lr']): _loss(r) for r in grid
               if r['width'] == BASE_WIDTH and r['optimizer'] == opt}
      diffs = [abs(pairs['sp', k] - pairs['mup', k]) for k in grids[opt]
               if math.isfinite(pairs['sp', k])
               and math.isfinite(pairs['mup', k])]
      base_diff[opt] = max(diffs) if diffs else None
  for opt in args.optimizers:
    for parameterization in args.parameterizations:
      print_grid([r for r in grid if r['optimizer'] == opt and
                  r['parameterization'] == parameterization],
                 widths, grids[opt])
  for s in summaries:
    print(f'{s["case"]}: {s["status"]}')
  print(f'max |loss(sp) - loss(mup)| at the base width: {base_diff}')
  total = round(time.perf_counter() - start, 1)
  print(f'total {total} s')
  if args.no_write:
    return 0
  changed = _common.ntkjax_sources_changed(digest)
  _common.write_benchmark(
      'mutransfer', summaries, 'ntkjax', ntkjax.__version__, args.quick,
      'mutransfer', COLUMNS,
      protocol={
          'dataset': 'sklearn digits (1797 8x8 images, 10 classes), '
                     'standardized on the training part',
          'n_train': N_TRAIN, 'n_test': 1797 - N_TRAIN,
          'split_seed': SPLIT_SEED,
          'network': 'Dense(w)-Relu-Dense(w)-Relu-Dense(10)',
          'W_std': W_STD, 'W_std_out': W_STD_OUT, 'b_std': B_STD,
          'loss': 'cross_entropy (one-hot)',
          'optimizers': {'sgd': 'optax.sgd(lr), no momentum',
                         'adam': 'optax.adam(lr), default betas'},
          'mup': f'MuP(network, base_width={BASE_WIDTH}): init_fn and '
                 'scale_updates(params, optimizer) chained after it',
          'batch_size': BATCH_SIZE, 'steps': steps,
          'loss_recorded': 'full training set, after the last step',
          'base_width': BASE_WIDTH, 'widths': list(widths),
          'log2_lrs': {o: list(g) for o, g in grids.items()},
          'seeds': list(seeds), 'lr_multiplier': LR_MULTIPLIER,
          'dtype': 'float32'},
      grid=grid, sweep_seconds=sweep_seconds,
      max_abs_loss_diff_sp_vs_mup_at_base_width=base_diff,
      total_seconds=total, **_common.ntkjax_git_state(),
      ntkjax_sources_sha256=digest,
      ntkjax_sources_changed_during_run=changed)
  return 0


if __name__ == '__main__':
  sys.exit(main())
