"""The computations of `ntkjax compare`: one definition, finite vs infinite.

For one architecture, at every width n and for every seed:

1. infinite width (once): the NNGP and NTK predictions of
   `predict.gradient_descent_mse_ensemble` at t = inf and at t = steps;
2. a finite network trained by full-batch gradient descent (`optax.sgd`, MSE)
   with `ntkjax.train`, and its linearized twin (`linearized=True`, the same
   initialization);
3. the kernel distance ||Theta_emp(n) - Theta||_F / ||Theta||_F at
   initialization, on the first `kernel_points` training inputs (empirical
   NTK with trace_axes=(-1,), i.e. averaged over outputs, the layout of the
   analytic NTK), with a least-squares log-log slope (theory: -1/2);
4. the divergence: RMS over test outputs of f_n(step) - f_NTK(step), where
   f_NTK is the infinite-width network under the *same discrete* gradient
   descent started from the same initial function f_n(0) (so the gap is
   width-induced only; gradient flow would add an O(learning rate) gap at
   early steps);
5. the kernel drift ||Theta_T - Theta_0||_F / ||Theta_0||_F after training;
6. with `alphas` (the lazy-rich dial of Chizat, Oyallon & Bach 2019), the
   same network trained as alpha (f - f_0) on loss / alpha^2
   (`train(..., output_scale=alpha)`) for each alpha: test metrics, kernel
   drift, and the centered kernel-target alignment of its empirical NTK
   before and after (`ntkjax.feature_learning`). Large alpha is the kernel
   regime (drift ~ 1/alpha); small alpha learns features.

With `parameterization='mup'` the finite networks are the muP ones
(`ntkjax.mup.MuP`, relative to `base_width`): built in the standard
parameterization, output layer scaled at initialization, and trained by
`optax.chain(optax.sgd(lr), mup.scale_updates(...))`. muP has no kernel
limit (Yang & Hu 2021), so the reference stays the NTK parameterization's
infinite-width NNGP/NTK of the same architecture (step 1, at its own
learning rate), and the steps that compare a network with that kernel
(3 and 4's same-init dynamics and gaps) are left out (NaN). What remains
is what muP is about: test metrics against width, each network's gap to
its own linearization, and the drift and alignment of the kernel that
SGD follows in muP, J diag(s) J^T (`MuP.effective_ntk_fn`, s the
learning-rate factors), which stays O(1) at every width where the NTK
parameterization's falls. The networks' learning rate is `lr_fraction` of
the largest stable one of that kernel at the base width (seed 0, all
training inputs): muP's rates transfer across widths.

Centering (default): a network's output at initialization is a random
function f_0 whose size does not shrink with width (for W_std = 1.5 its
standard deviation exceeds the targets'), so one trained network equals the
infinite ensemble's *mean* prediction only up to that noise, at every width
(with the digits: ~77% test accuracy against 97% for the mean). Centering
trains g(params, x) = f(params, x) - f(params_0, x) instead (Chizat et al.
2019; Hu et al. 2020): the same parameters, Jacobian, NTK and linearization,
with g_0 = 0, so as n -> inf g follows the ensemble mean. It costs nothing:
the loss |g - y|^2 is |f - (y + f_0)|^2, i.e. `train` on shifted targets.
`center=False` trains f itself, and compares it with the NTK dynamics
started from its own f_0.

Results go to `results.json` after every width, so an interrupted run keeps
what it finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkjax
from ntkjax import feature_learning, predict
from ntkjax.compare import architectures, data as data_lib
from ntkjax.compare.progress import Progress, format_seconds
from ntkjax.empirical import NtkImplementation, empirical_ntk_fn

DEFAULT_WIDTHS = (64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass
class Config:
  """What `ntkjax compare` runs (the CLI flags).

  Attributes:
    out: output folder.
    data: an `.npz` path, or None for scikit-learn's digits.
    arch: a preset ('fc-relu', 'fc-erf', 'cnn') or 'module:function'.
    depth: hidden layers of the presets.
    widths: hidden widths of the finite networks.
    seeds: number of initializations per width (seeds 0..seeds-1).
    steps: gradient-descent steps.
    learning_rate: absolute learning rate; None: `lr_fraction` of
      `predict.max_learning_rate` of the analytic NTK.
    lr_fraction: see `learning_rate`.
    train_size, test_size: use only the first that many examples.
    kernel_points: training inputs on which kernels are compared.
    records: how many steps (geometrically spaced, with 0 and `steps`)
      the outputs are recorded at.
    images: digits as 8x8x1 images (implied by image architectures).
    center: measure each network's outputs from its initial function,
      f(params, x) - f(params_0, x) (see `run`).
    alphas: output scales of the lazy-rich sweep (item 6 above); empty:
      none.
    parameterization: 'ntk' (the networks of the kernel limit) or 'mup'
      (module docstring).
    base_width: muP's base width; None: the smallest of `widths`.
  """
  out: str = 'compare_output'
  data: Optional[str] = None
  arch: str = 'fc-relu'
  depth: int = 1
  widths: Sequence[int] = DEFAULT_WIDTHS
  seeds: int = 3
  steps: int = 400
  learning_rate: Optional[float] = None
  lr_fraction: float = 0.5
  train_size: Optional[int] = None
  test_size: Optional[int] = None
  kernel_points: int = 256
  records: int = 16
  images: bool = False
  center: bool = True
  alphas: Sequence[float] = ()
  parameterization: str = 'ntk'
  base_width: Optional[int] = None

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out['widths'] = [int(w) for w in self.widths]
    out['alphas'] = [float(a) for a in self.alphas]
    return out


# ----------------------------------------------------------------------------
# Small numerical helpers (public: tested on their own).


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """A least-squares fit log(value) = log(prefactor) + slope * log(width).

  Attributes:
    slope: the fitted exponent.
    stderr: its standard error from the residuals (NaN with < 3 points).
    prefactor: value at width 1.
    n_points: points used (positive, finite values).
  """
  slope: float
  stderr: float
  prefactor: float
  n_points: int

  def at(self, widths) -> np.ndarray:
    return self.prefactor * np.asarray(widths, np.float64) ** self.slope


def fit_power_law(widths, values) -> PowerLaw:
  """Fits value ~ prefactor * width^slope by least squares in log-log.

  Args:
    widths: (W,) widths.
    values: (W,) values, or (W, S) values over S seeds; every positive,
      finite value is one point (independent seeds add information about
      the scatter, so the standard error reflects it).

  Returns:
    A `PowerLaw`; NaN slope with fewer than 2 distinct widths.
  """
  widths = np.asarray(widths, np.float64)
  values = np.asarray(values, np.float64)
  if values.ndim == 1:
    values = values[:, None]
  x = np.repeat(np.log(widths), values.shape[1])
  y = values.reshape(-1)
  ok = np.isfinite(y) & (y > 0)
  x, y = x[ok], np.log(y[ok])
  if len(np.unique(x)) < 2:
    return PowerLaw(math.nan, math.nan, math.nan, int(ok.sum()))
  xm = x - x.mean()
  slope = float(xm @ (y - y.mean()) / (xm @ xm))
  intercept = float(y.mean() - slope * x.mean())
  residual = y - intercept - slope * x
  dof = len(x) - 2
  stderr = (float(np.sqrt(residual @ residual / dof / (xm @ xm)))
            if dof > 0 else math.nan)
  return PowerLaw(slope, stderr, float(np.exp(intercept)), len(x))


def record_schedule(steps: int, count: int) -> tuple:
  """0, then about `count - 1` geometrically spaced steps ending at `steps`."""
  if steps <= 0:
    return (0,)
  grid = np.geomspace(1, steps, max(count - 1, 1))
  return tuple(sorted({0, steps, *np.unique(np.round(grid).astype(int))}))


class DiscreteNtkDynamics:
  """The infinite-width network under discrete full-batch gradient descent.

  With s = learning_rate / |y| (|y| = y_train.size, the 'mse' loss of
  `ntkjax.train`), Theta the analytic NTK and Theta_* its test-train block,
  each `optax.sgd` step of the linearized infinite network is

      f_{k+1}  = f_k  - s Theta   (f_k - y),
      f*_{k+1} = f*_k - s Theta_* (f_k - y),

  so with Theta = V diag(lambda) V^T and x = s lambda:

      f_k  = y + V diag((1 - x)^k) V^T (f_0 - y),
      f*_k = f*_0 - s Theta_* V diag((1 - (1 - x)^k) / x) V^T (f_0 - y).

  (`predict.gradient_descent_mse` solves the gradient flow instead, which
  differs from this by O(learning_rate); here the comparison is exact.)

  Args:
    ntk_train: (N, N) analytic NTK on the training set.
    ntk_test_train: (M, N) analytic NTK between test and training inputs.
    y_train: (N, C) targets.
    learning_rate: the optimizer's learning rate.
  """

  def __init__(self, ntk_train, ntk_test_train, y_train, learning_rate: float):
    k = np.asarray(ntk_train, np.float64)
    evals, self.evecs = np.linalg.eigh((k + k.T) / 2)
    self.scale = float(learning_rate) / np.size(y_train)
    self.x = self.scale * np.maximum(evals, 0.)
    self.y = np.asarray(y_train, np.float64)
    self.kv = np.asarray(ntk_test_train, np.float64) @ self.evecs

  def __call__(self, steps, f0_train, f0_test):
    """Outputs after each of `steps` (ints): (R, N, C) train, (R, M, C) test."""
    k = np.asarray(steps, np.int64)[:, None]
    one_minus = 1. - self.x
    decay = one_minus[None, :] ** k                      # (R, modes)
    small = self.x < 1e-12
    # (1 - (1 - x)^k) / x, with its limit k at x = 0.
    geometric = np.where(small, k, (1. - decay) / np.where(small, 1., self.x))
    coeffs = self.evecs.T @ (np.asarray(f0_train, np.float64) - self.y)
    f_train = self.y + np.einsum('nm,rm,mc->rnc', self.evecs, decay, coeffs,
                                 optimize=True)
    f_test = (np.asarray(f0_test, np.float64) - self.scale *
              np.einsum('tm,rm,mc->rtc', self.kv, geometric, coeffs,
                        optimize=True))
    return f_train, f_test


def accuracy(outputs, labels) -> Optional[float]:
  """Fraction of argmax(outputs) equal to labels (None without labels)."""
  if labels is None:
    return None
  return float(np.mean(np.argmax(np.asarray(outputs), -1) == labels))


def mean_squared_error(outputs, targets) -> float:
  """Mean over all entries of (outputs - targets)^2."""
  return float(np.mean((np.asarray(outputs, np.float64) - targets) ** 2))


def rms_gap(a, b) -> np.ndarray:
  """RMS of a - b over all but the leading (time) axis."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return np.sqrt(np.mean(d.reshape(d.shape[0], -1) ** 2, axis=1))


def relative_distance(a, b) -> float:
  """||a - b||_F / ||b||_F."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------
# JSON.


def _clean(value):
  """Numbers to JSON: numpy scalars/arrays to lists, NaN/inf to null."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.ndarray):
    return _clean(value.tolist())
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, (np.bool_,)):
    return bool(value)
  return value


def write_json(results: dict, path: str) -> None:
  """Writes atomically (a crash never leaves half a file)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(_clean(results), f, indent=1)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# The run.


class _Stages:
  """Prints and records the wall time of each stage."""

  def __init__(self, stream: TextIO, timings: dict):
    self.stream, self.timings = stream, timings

  def __call__(self, name: str):
    stages = self

    class _Stage:
      def __enter__(self):
        self.start = time.perf_counter()
        stages.stream.write(f'== {name}\n')
        stages.stream.flush()

      def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.start
        stages.timings[name] = elapsed
        if exc[0] is None:
          stages.stream.write(f'   {name}: {format_seconds(elapsed)}\n')
          stages.stream.flush()
    return _Stage()


def _count_params(init_fn, input_shape) -> int:
  shapes = jax.eval_shape(lambda k: init_fn(k, (-1,) + input_shape)[1],
                          jax.random.key(0))
  return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))


def _stats(per_seed: np.ndarray):
  """Means and standard deviations over seeds (axis 1), NaN-aware."""
  per_seed = np.asarray(per_seed, np.float64)
  with np.errstate(invalid='ignore'), _quiet_nan():
    mean = np.nanmean(per_seed, axis=1)
    std = (np.nanstd(per_seed, axis=1, ddof=1) if per_seed.shape[1] > 1
           else np.full(len(per_seed), np.nan))
  return mean, std


class _quiet_nan:
  """Silences numpy's 'mean of empty slice' for all-NaN rows (diverged)."""

  def __enter__(self):
    import warnings
    self.catch = warnings.catch_warnings()
    self.catch.__enter__()
    warnings.simplefilter('ignore', RuntimeWarning)

  def __exit__(self, *exc):
    self.catch.__exit__(*exc)


def run(config: Config, stream: Optional[TextIO] = None) -> dict:
  """Runs the comparison and writes `results.json` into `config.out`.

  Args:
    config: a `Config`.
    stream: where progress goes (default stderr).

  Returns:
    The results (the content of `results.json`, before JSON cleaning).

  Raises:
    data.DataError, architectures.ArchitectureError: bad data or network.
  """
  stream = sys.stderr if stream is None else stream
  os.makedirs(config.out, exist_ok=True)
  with _single_threaded_lapack():
    return _run(config, stream)


def _single_threaded_lapack():
  """One BLAS/LAPACK thread for this run, where threadpoolctl is installed.

  On 2 shared cores, OpenBLAS's threads spin against other processes: the
  eigendecomposition of a 1000 x 1000 kernel took 4-12 s with 2 threads and
  0.13-0.25 s with 1 on the same loaded machine (DESIGN.md, section 4). The
  networks' matrix products are XLA's, not BLAS's, and are unaffected.
  """
  try:
    import threadpoolctl
  except ImportError:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(1, user_api='blas')


def _run(config: Config, stream: TextIO) -> dict:
  json_path = os.path.join(config.out, 'results.json')
  timings = {}
  stage = _Stages(stream, timings)
  started = time.perf_counter()
  results = {'ntkjax_version': ntkjax.__version__, 'status': 'running',
             'created': time.strftime('%Y-%m-%dT%H:%M:%S'),
             'config': config.to_json(), 'timings': timings}

  with stage('data and networks'):
    arch = architectures.resolve(config.arch, config.depth)
    dataset = data_lib.load(config.data, config.train_size, config.test_size,
                            images=config.images or arch.images)
    input_shape = tuple(dataset.x_train.shape[1:])
    out_dim = dataset.n_outputs
    widths = [int(w) for w in config.widths]
    mup_mode = config.parameterization == 'mup'
    networks = {w: architectures.build_checked(
        arch, w, out_dim, input_shape,
        'standard' if mup_mode else 'ntk') for w in widths}
    # The infinite-width reference: the NTK parameterization's limit.
    reference = (architectures.build_checked(arch, widths[0], out_dim,
                                             input_shape)
                 if mup_mode else networks[widths[0]])
    base_width = (config.base_width or widths[0]) if mup_mode else None
    mup = (_mup_family(arch, out_dim, input_shape, base_width) if mup_mode
           else None)
    n_params = {w: _count_params(networks[w][0], input_shape) for w in widths}
    kernel_points = min(config.kernel_points, len(dataset.x_train))
    record = record_schedule(config.steps, config.records)
    stream.write(f'   data: {dataset.name}, {len(dataset.x_train)} train / '
                 f'{len(dataset.x_test)} test, inputs {input_shape}, '
                 f'{out_dim} outputs\n   network: {arch.description}\n')
  results.update({
      'data': dataset.summary(),
      'architecture': {'name': arch.name, 'description': arch.description},
      'widths': widths, 'n_params': [n_params[w] for w in widths],
      'seeds': list(range(config.seeds)), 'steps': config.steps,
      'parameterization': config.parameterization, 'base_width': base_width,
      'record_steps': list(record), 'kernel_points': kernel_points})
  write_json(results, json_path)

  x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
  x_test = jnp.asarray(dataset.x_test)
  with stage('infinite width'):
    # Under the NTK parameterization the kernel does not depend on the
    # width; any width's kernel_fn is the infinite-width one.
    kernel_fn = jax.jit(reference[2], static_argnames='get')
    with Progress('   kernels', 2, stream) as bar:
      try:
        k_train = kernel_fn(x_train, None, ('nngp', 'ntk'))
        bar.advance(1, 'train x train')
        k_test = kernel_fn(x_test, x_train, ('nngp', 'ntk'))
        bar.advance(1, 'test x train')
      except (ValueError, TypeError, NotImplementedError) as error:
        # KernelError is a ValueError: a network without an exact kernel.
        raise architectures.ArchitectureError(
            f'--arch {arch.name}: its infinite-width kernel_fn failed on the '
            f'data: {type(error).__name__}: {error}') from error
    cached = {id(x_train): k_train, id(x_test): k_test}

    def known_kernels(x1, x2=None, get=None):
      # gradient_descent_mse_ensemble asks for the two blocks computed
      # above; serve them instead of computing them again.
      if id(x1) in cached and get == ('nngp', 'ntk'):
        return cached[id(x1)]
      return kernel_fn(x1, x2, get)
    ntk_max_lr = float(predict.max_learning_rate(k_train.ntk, y_train.size))
    if mup_mode:
      max_lr = _mup_max_learning_rate(mup, base_width, x_train, y_train.size)
      where = f'for muP at base width {base_width}'
    else:
      max_lr, where = ntk_max_lr, 'at infinite width'
    lr = (float(config.learning_rate) if config.learning_rate is not None
          else config.lr_fraction * max_lr)
    # Under muP the NTK limit runs at its own rate, the networks at a
    # fraction of their own kernel's (module docstring).
    reference_lr = config.lr_fraction * ntk_max_lr if mup_mode else lr
    if lr >= max_lr:
      stream.write(f'   warning: learning rate {lr:.4g} >= {max_lr:.4g}, the '
                   f'largest stable one {where}; expect divergence.\n')
    ensemble = predict.gradient_descent_mse_ensemble(
        known_kernels, x_train, y_train, learning_rate=reference_lr)
    infinite = {}
    with Progress('   predictions', 2, stream) as bar:
      for name, t in (('', None), ('_at_steps', config.steps)):
        prediction = ensemble(t=t, x_test=x_test, get=('nngp', 'ntk'))
        for kind in ('nngp', 'ntk'):
          f = np.asarray(getattr(prediction, kind))
          infinite[kind + name] = {
              'test_accuracy': accuracy(f, dataset.labels_test),
              'test_mse': mean_squared_error(f, dataset.y_test)}
        bar.advance(1, 't = inf' if t is None else f't = {t}')
    # The same-init NTK dynamics and the kernel distance compare a network
    # with the NTK limit: only in the NTK parameterization.
    dynamics = (None if mup_mode else DiscreteNtkDynamics(
        k_train.ntk, k_test.ntk, dataset.y_train, lr))
    theta_sub = np.asarray(k_train.ntk)[:kernel_points, :kernel_points]
  results.update({'learning_rate': lr, 'max_learning_rate': max_lr,
                  'learning_rate_fraction': lr / max_lr,
                  'reference_learning_rate': reference_lr,
                  'ntk_max_learning_rate': ntk_max_lr})
  results['test_metrics'] = {'infinite': infinite}
  write_json(results, json_path)

  optimizer = optax.sgd(lr)   # one object: train() compiles once per width
  x_sub = x_train[:kernel_points]
  y_sub = np.asarray(dataset.y_train)[:kernel_points]
  y_shape, y_test_shape = dataset.y_train.shape, dataset.y_test.shape
  n_w, n_s, n_r = len(widths), config.seeds, len(record)
  nan = lambda *shape: np.full(shape, np.nan)
  per_seed = {name: nan(n_w, n_s) for name in (
      'kernel_distance', 'drift', 'network_accuracy', 'network_mse',
      'linearized_accuracy', 'linearized_mse', 'ntk_same_init_accuracy',
      'ntk_same_init_mse')}
  gaps = {name: nan(n_w, n_s, n_r) for name in (
      'network', 'linearized', 'network_vs_linearized')}
  alphas = [float(a) for a in config.alphas]
  dial = {name: nan(n_w, n_s, len(alphas)) for name in LAZY_RICH_METRICS}
  diverged = []
  # Cost of a (width, seed) ~ parameters (+ a fixed overhead per task), so
  # the bar's percentage and time estimate follow the work.
  weight = {w: n_params[w] + n_params[widths[0]] for w in widths}
  with stage('finite widths'), Progress(
      '   training', sum(weight.values()) * n_s, stream) as bar:
    for i, width in enumerate(widths):
      init_fn, apply_fn, _ = networks[width]
      ntk_kwargs = dict(trace_axes=(-1,), vmap_axes=0,
                        implementation=NtkImplementation.AUTO)
      if mup_mode:
        init_fn = lambda key, _, width=width: mup.init_fn(key, width)
        ntk_fn = jax.jit(mup.effective_ntk_fn(width, **ntk_kwargs))
        shapes = jax.eval_shape(lambda: init_fn(jax.random.key(0), None)[1])
        width_optimizer = optax.chain(optimizer,
                                      mup.scale_updates(shapes, 'sgd'))
      else:
        ntk_fn = jax.jit(empirical_ntk_fn(apply_fn, **ntk_kwargs))
        width_optimizer = optimizer
      forward = jax.jit(apply_fn)
      for seed in range(n_s):
        key = jax.random.fold_in(jax.random.key(seed), width)
        _, params = init_fn(key, (-1,) + input_shape)
        theta0 = np.asarray(ntk_fn(x_sub, None, params))
        if not mup_mode:
          per_seed['kernel_distance'][i, seed] = relative_distance(theta0,
                                                                   theta_sub)
        f0_train, f0_test = forward(params, x_train), forward(params, x_test)
        # Centered: |f - f_0 - y|^2 = |f - (y + f_0)|^2 (module docstring).
        targets = y_train + f0_train if config.center else y_train
        runs = {}
        for name, linearized in (('network', False), ('linearized', True)):
          result = ntkjax.train(apply_fn, params, x_train, targets,
                                width_optimizer, config.steps,
                                record_steps=record, x_test=x_test,
                                linearized=linearized)
          f_test = np.asarray(result.fx_test)
          runs[name] = (result, f_test - np.asarray(f0_test) if config.center
                        else f_test)
        start_train = 0. if config.center else np.asarray(f0_train)
        start_test = 0. if config.center else np.asarray(f0_test)
        ref_test = None if dynamics is None else dynamics(
            record, np.broadcast_to(start_train, y_shape),
            np.broadcast_to(start_test, y_test_shape))[1]
        for name, (result, f_test) in runs.items():
          if not np.all(np.isfinite(f_test)):
            diverged.append({'width': width, 'seed': seed, 'model': name})
            continue
          if dataset.labels_test is not None:
            per_seed[f'{name}_accuracy'][i, seed] = accuracy(
                f_test[-1], dataset.labels_test)
          per_seed[f'{name}_mse'][i, seed] = mean_squared_error(
              f_test[-1], dataset.y_test)
          if ref_test is not None:
            gaps[name][i, seed] = rms_gap(f_test, ref_test)
        net = runs['network'][0]
        gaps['network_vs_linearized'][i, seed] = rms_gap(runs['network'][1],
                                                         runs['linearized'][1])
        if ref_test is not None:
          if dataset.labels_test is not None:
            per_seed['ntk_same_init_accuracy'][i, seed] = accuracy(
                ref_test[-1], dataset.labels_test)
          per_seed['ntk_same_init_mse'][i, seed] = mean_squared_error(
              ref_test[-1], dataset.y_test)
        if np.all(np.isfinite(np.asarray(net.loss))):
          theta_t = np.asarray(ntk_fn(x_sub, None, net.params))
          per_seed['drift'][i, seed] = relative_distance(theta_t, theta0)
        if alphas:
          # The same initial kernel for every alpha.
          dial['alignment_before'][i, seed] = feature_learning.kernel_alignment(
              theta0, y_sub)
        for j, alpha in enumerate(alphas):
          metrics = _lazy_rich_run(apply_fn, params, alpha, width_optimizer,
                                   config.steps, (x_train, y_train, x_test),
                                   dataset, ntk_fn, x_sub, theta0, y_sub)
          for name, value in metrics.items():
            dial[name][i, seed, j] = value
        bar.advance(weight[width], f'width {width}, seed {seed}')
      _summarize(results, per_seed, gaps, widths, record, diverged)
      if alphas:
        with _quiet_nan():
          results['lazy_rich'] = {'alphas': alphas, **{
              name: np.nanmean(values, axis=1) for name, values in
              dial.items()}}
      results['widths_done'] = widths[:i + 1]
      write_json(results, json_path)

  results['status'] = 'complete'
  timings['total'] = time.perf_counter() - started
  write_json(results, json_path)
  return results


def _mup_family(arch, out_dim: int, input_shape: tuple, base_width: int):
  """`MuP` of the architecture's standard-parameterization networks."""
  from ntkjax.mup import MuP
  try:
    return MuP(lambda width: arch.build(width, out_dim, 'standard'),
               base_width, (-1,) + tuple(input_shape))
  except (ValueError, TypeError) as error:
    raise architectures.ArchitectureError(
        f'--arch {arch.name} --parameterization mup: {error}') from error


def _mup_max_learning_rate(mup, base_width: int, x_train, y_size: int
                           ) -> float:
  """The largest stable SGD rate of muP at its base width: from the
  kernel SGD follows there (`MuP.effective_ntk_fn`), on all training
  inputs, seed 0. muP's point is that this rate transfers to every width."""
  ntk_fn = jax.jit(mup.effective_ntk_fn(
      base_width, trace_axes=(-1,), vmap_axes=0,
      implementation=NtkImplementation.AUTO))
  _, params = mup.init_fn(jax.random.key(0), base_width)
  return float(predict.max_learning_rate(ntk_fn(x_train, None, params),
                                         y_size))


LAZY_RICH_METRICS = ('accuracy', 'mse', 'drift', 'alignment_before',
                     'alignment_after')


def _lazy_rich_run(apply_fn, params, alpha: float, optimizer, steps: int,
                   arrays, dataset, ntk_fn, x_sub, theta0, y_sub) -> dict:
  """One network trained at output scale alpha (item 6 of the module
  docstring): its test metrics, NTK drift and kernel-target alignment
  after training, on the kernel points (y_sub: their targets). NaN where
  it diverged."""
  x_train, y_train, x_test = arrays      # already on the device
  result = ntkjax.train(apply_fn, params, x_train, y_train, optimizer, steps,
                        x_test=x_test, output_scale=alpha)
  f_test = np.asarray(result.fx_test[-1])
  out = dict.fromkeys(('accuracy', 'mse', 'drift', 'alignment_after'), np.nan)
  if not np.all(np.isfinite(f_test)):
    return out
  theta_t = np.asarray(ntk_fn(x_sub, None, result.params))
  out.update(mse=mean_squared_error(f_test, dataset.y_test),
             drift=relative_distance(theta_t, theta0),
             alignment_after=feature_learning.kernel_alignment(theta_t,
                                                               y_sub))
  if dataset.labels_test is not None:
    out['accuracy'] = accuracy(f_test, dataset.labels_test)
  return out


def _summarize(results: dict, per_seed: dict, gaps: dict, widths, record,
               diverged) -> None:
  """Means, standard deviations and slopes into `results` (in place)."""
  finite = {}
  for model in ('network', 'linearized', 'ntk_same_init'):
    entry = {}
    for metric in ('accuracy', 'mse'):
      values = per_seed[f'{model}_{metric}']
      mean, std = _stats(values)
      entry.update({metric: mean, f'{metric}_std': std,
                    f'{metric}_per_seed': values})
    finite[model] = entry
  results['test_metrics']['finite'] = finite
  for name in ('kernel_distance', 'drift'):
    mean, std = _stats(per_seed[name])
    fit = fit_power_law(widths, per_seed[name])
    results.update({name: mean, f'{name}_std': std,
                    f'{name}_per_seed': per_seed[name],
                    f'{name}_slope': fit.slope,
                    f'{name}_slope_stderr': fit.stderr,
                    f'{name}_prefactor': fit.prefactor})
  divergence = {'metric': 'RMS over test outputs of f_width(step) - '
                          'f_NTK(step), same initial function',
                'steps': list(record)}
  for name, values in gaps.items():
    with _quiet_nan():
      divergence[name] = np.nanmean(values, axis=1)          # (W, R)
  final = gaps['network'][:, :, -1]
  fit = fit_power_law(widths, final)
  divergence.update({'final': {name: divergence[name][:, -1]
                               for name in gaps},
                     'final_slope': fit.slope,
                     'final_slope_stderr': fit.stderr,
                     'final_prefactor': fit.prefactor})
  between = fit_power_law(widths, gaps['network_vs_linearized'][:, :, -1])
  divergence.update({'network_vs_linearized_slope': between.slope,
                     'network_vs_linearized_slope_stderr': between.stderr})
  results['divergence'] = divergence
  results['diverged'] = list(diverged)
