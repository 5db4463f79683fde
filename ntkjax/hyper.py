"""Kernel hyperparameters by marginal likelihood (type-II maximum likelihood).

An infinite-width kernel has hyperparameters: per-layer `W_std` and `b_std`,
the observation noise `diag_reg`, an output scale, and discrete choices such
as the depth or the activation. Instead of a default or a grid, choose them
as Gaussian-process libraries do (Rasmussen & Williams 2006, ch. 5;
scikit-learn's `GaussianProcessRegressor`, GPyTorch): maximize the evidence
log p(y | X) of the training targets, by gradient, since `ntkjax.stax`
kernels are differentiable in `W_std` / `b_std` passed as arrays.

    from ntkjax import hyper, stax
    builder = lambda W_std, b_std: stax.serial(
        stax.Dense(512, W_std, b_std), stax.Erf(),
        stax.Dense(1, W_std, b_std))[2]
    fit = hyper.fit(builder, x, y, init={'W_std': 1.5, 'b_std': 0.1},
                    diag_reg=1e-3)
    fit.hyperparameters        # {'W_std': ..., 'b_std': ..., 'diag_reg': ...}
    fit.kernel_fn              # builder(**fitted), ready for predict

The evidence. With kernel K on the N training inputs, targets Y (N x C, each
column an independent draw of the same Gaussian process) and A = K +
sigma^2 I (sigma^2 = `diag_reg` times the mean of K's diagonal unless
`diag_reg_absolute_scale`, the convention of `predict.gp_inference`):

    log p(Y) = -1/2 tr(Y^T A^{-1} Y) - C/2 log det A - N C/2 log(2 pi)

(Rasmussen & Williams eq. 2.30, summed over columns). `get='nngp'` uses the
NNGP: the evidence of the Bayesian infinite network (Lee et al. 2018).
`get='ntk'` uses the NTK: the evidence of the NTK-GP, the Gaussian process
whose covariance is the NTK (He, Lakshminarayanan & Teh 2020, "Bayesian Deep
Ensembles via the Neural Tangent Kernel"); its posterior mean Theta_*
(Theta + sigma^2 I)^{-1} y is exactly the mean of `gp_inference`'s 'ntk'
mode (the infinite ensemble trained to convergence), which has no
likelihood of its own (it interpolates the training targets).

Numerics: float64 (`fit` switches JAX's x64 mode on for its own work),
a Cholesky factor of A, with jitter added only when the factorization fails
(1e-12, 1e-10, ..., 1e-4 times the mean diagonal; the jitter is a constant
for the gradient).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from ntkjax import _runtime_checks as runtime_checks
from ntkjax import predict

__all__ = ['FitResult', 'fit', 'log_marginal_likelihood']

# Names `fit` handles itself (not passed to the builder).
NOISE, SCALE = 'diag_reg', 'output_scale'
# Bounds of the fitted values: W_std, b_std, output_scale stay within
# [1e-4, 1e4]; the noise (relative to the mean prior variance, or absolute)
# within [1e-8, 1e2]. The map from the optimizer's unconstrained variable
# is smooth (`_Bounded`), so no value runs to 0 or infinity.
DEFAULT_BOUNDS = (1e-4, 1e4)
NOISE_BOUNDS = (1e-8, 1e2)
# Jitter ladder, relative to the mean diagonal, tried only if the Cholesky
# factorization of K + sigma^2 I fails.
_JITTERS = (0., 1e-12, 1e-10, 1e-8, 1e-6, 1e-4)


# ----------------------------------------------------------------------------
# The evidence.


def _jitter(a):
  """The first jitter of `_JITTERS` (times the mean diagonal) for which a
  Cholesky factorization of `a` is finite; the last one if none is."""
  n = a.shape[0]
  mean_diag = jnp.trace(a) / n
  ladder = jnp.asarray(_JITTERS, a.dtype)
  eye = jnp.eye(n, dtype=a.dtype)

  def failed(i):
    chol = jnp.linalg.cholesky(a + ladder[i] * mean_diag * eye)
    return ~jnp.all(jnp.isfinite(chol))

  i = jax.lax.while_loop(
      lambda i: (i < len(_JITTERS) - 1) & failed(i), lambda i: i + 1, 0)
  return ladder[i] * mean_diag


def _evidence(k, y, diag_reg, absolute: bool):
  """log p(y) for kernel matrix k (N, N), targets y (N, C); jit/grad-able.

  NaN when K + sigma^2 I is not positive definite even with the largest
  jitter (or K has NaN entries).
  """
  n, c = y.shape
  k = (k + k.T) / 2                      # rounding asymmetry only
  noise = diag_reg if absolute else diag_reg * jnp.trace(k) / n
  eye = jnp.eye(n, dtype=k.dtype)
  a = k + noise * eye
  a = a + jax.lax.stop_gradient(_jitter(jax.lax.stop_gradient(a))) * eye
  chol = jnp.linalg.cholesky(a)
  alpha = jsl.cho_solve((chol, True), y)
  return (-0.5 * jnp.sum(y * alpha)
          - c * jnp.sum(jnp.log(jnp.diagonal(chol)))
          - 0.5 * n * c * math.log(2 * math.pi))


def _kernel_matrix(k, get: str, who: str):
  """The (N, N) matrix of a kernel argument: an array, or `k.nngp`/`k.ntk`
  (picked as `predict.gp_inference` does)."""
  k = jnp.asarray(predict._field(k, get, who))
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(
        f'{who}: the train-train kernel must be a square (N, N) matrix, got '
        f'shape {k.shape}; compute it with kernel_fn(x_train, None, '
        f"get={get!r}) and trace_axes covering the output axes.")
  return k


def _targets(y, n: int, who: str) -> jnp.ndarray:
  """y as an (N, C) matrix: one column per output."""
  y = jnp.asarray(y)
  if y.ndim == 0 or y.shape[0] != n:
    raise ValueError(f'{who}: y_train of shape {y.shape} does not match the '
                     f'{n} training inputs; one row of targets per input.')
  return y.reshape(n, -1)


def _check_get(get, who: str):
  if get not in ('nngp', 'ntk'):
    raise ValueError(f"{who}: get must be 'nngp' (the NNGP evidence) or "
                     f"'ntk' (the NTK-GP evidence), got {get!r}.")


def log_marginal_likelihood(k_train_train, y_train, diag_reg: float = 0.,
                            diag_reg_absolute_scale: bool = False,
                            get: str = 'nngp'):
  """The evidence log p(y_train) of a Gaussian process with this kernel.

  Definition in the module docstring (NNGP, or NTK-GP for get='ntk').
  Differentiable in the kernel and in `diag_reg`; jit-able. Computed in the
  kernel's dtype: pass float64 kernels (JAX x64 mode) for ill-conditioned
  ones.

  Args:
    k_train_train: the (N, N) train-train kernel: an array, or an object
      with `.nngp` / `.ntk` fields (a `Kernel`, or `kernel_fn(..., get=
      ('nngp', 'ntk'))`'s named tuple), from which `get` picks.
    y_train: targets (N,) or (N, C): C independent outputs sharing the
      kernel (e.g. one-hot classes).
    diag_reg: observation noise variance sigma^2, relative to the mean of
      the kernel's diagonal unless `diag_reg_absolute_scale`; >= 0.
    diag_reg_absolute_scale: `diag_reg` is the variance itself.
    get: 'nngp' or 'ntk': which field of a kernel object to use (and what
      the evidence means; an array is used as given).

  Returns:
    A scalar: the log evidence summed over the C outputs.

  Raises:
    ValueError: shapes that do not match, a negative or non-finite
      `diag_reg`, non-finite entries, or (for concrete inputs) a kernel that
      is not positive semidefinite even after jitter. Under `jit` the last
      two return NaN instead.
  """
  who = 'log_marginal_likelihood'
  _check_get(get, who)
  k = _kernel_matrix(k_train_train, get, who)
  y = _targets(y_train, k.shape[0], who).astype(k.dtype)
  if not isinstance(diag_reg, jax.core.Tracer):
    if not np.all(np.isfinite(diag_reg)) or np.any(np.asarray(diag_reg) < 0):
      raise ValueError(f'{who}: diag_reg must be finite and >= 0, got '
                       f'{diag_reg!r}.')
  value = _evidence(k, y, diag_reg, diag_reg_absolute_scale)
  concrete = not any(isinstance(v, jax.core.Tracer) for v in (k, y, value))
  if concrete and not np.isfinite(value):
    for name, array in (('k_train_train', k), ('y_train', y)):
      if not np.all(np.isfinite(array)):
        raise ValueError(f'{who}: {name} has NaN or infinite entries.')
    lowest = float(np.linalg.eigvalsh(np.asarray((k + k.T) / 2))[0])
    raise ValueError(
        f'{who}: the kernel is not positive semidefinite (smallest '
        f'eigenvalue {lowest:.3g}), even with jitter {_JITTERS[-1]:g} x its '
        'mean diagonal; check that it is a train-train kernel of one set of '
        'inputs (x2=None), or raise diag_reg.')
  return value


# ----------------------------------------------------------------------------
# Fitting.


class FitResult(NamedTuple):
  """What `fit` found.

  Attributes:
    hyperparameters: the best values: the builder's fitted and fixed
      hyperparameters (floats, or NumPy arrays for array-valued ones),
      `diag_reg`, and `output_scale` if it was in `init`.
    log_marginal_likelihood: the evidence there (summed over outputs).
    choice: the discrete choice (from `choices`) of the best fit; {} if none.
    kernel_fn: `builder(**hyperparameters, **choice)`'s kernel function,
      multiplied by output_scale^2 if fitted (then only get='nngp', 'ntk' or
      a tuple of them).
    runs: one dict per (choice, restart): 'choice', 'restart', 'start' (the
      starting values), 'hyperparameters' (the best values of that run),
      'log_marginal_likelihood' (there), 'history' (the evidence after each
      optimizer step, a NumPy array), 'status' ('converged', 'max steps' or
      why it stopped early).
  """
  hyperparameters: dict
  log_marginal_likelihood: float
  choice: dict
  kernel_fn: Callable
  runs: list


class _Bounded:
  """A smooth bijection from R to [lo, hi] in log space: value = exp(lo_log +
  (hi_log - lo_log) * sigmoid(u)), so the optimizer's variable u is
  unconstrained and no value leaves its bounds."""

  def __init__(self, bounds: tuple):
    self.lo, self.hi = math.log(bounds[0]), math.log(bounds[1])

  def value(self, u):
    return jnp.exp(self.lo + (self.hi - self.lo) * jax.nn.sigmoid(u))

  def variable(self, value):
    t = (np.log(value) - self.lo) / (self.hi - self.lo)
    t = np.clip(t, 1e-6, 1 - 1e-6)
    return np.log(t) - np.log1p(-t)


def _builder_parameters(builder: Callable):
  """(accepted keyword names or None for **kwargs, required names)."""
  try:
    signature = inspect.signature(builder)
  except (TypeError, ValueError):
    return None, set()
  kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD,
           inspect.Parameter.KEYWORD_ONLY)
  params = signature.parameters.values()
  accepted = {p.name for p in params if p.kind in kinds}
  if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
    accepted = None
  required = {p.name for p in params
              if p.kind in kinds and p.default is inspect.Parameter.empty}
  return accepted, required


def _check_builder(builder, names: set):
  if not callable(builder):
    raise TypeError(
        f'fit: builder must be a function of the hyperparameters returning a '
        f'kernel_fn (e.g. lambda W_std, b_std: stax.serial(...)[2]), got '
        f'{builder!r}.')
  accepted, required = _builder_parameters(builder)
  name = getattr(builder, '__name__', repr(builder))
  if accepted is not None:
    unknown = sorted(names - accepted)
    if unknown:
      raise TypeError(
          f'fit: builder {name} does not take {unknown}: its keyword '
          f'arguments are {sorted(accepted)}. init and choices name the '
          f"builder's arguments ({NOISE!r} and {SCALE!r} are handled by fit).")
  missing = sorted(required - names)
  if missing:
    raise TypeError(
        f'fit: builder {name} requires {missing}, which are in neither init '
        '(fitted) nor choices (compared); add them to one of the two.')


def _kernel_fn_of(built, builder) -> Callable:
  """The kernel function a builder returned (a stax triple's third item)."""
  if isinstance(built, tuple) and len(built) == 3 and callable(built[2]):
    return built[2]
  if callable(built):
    return built
  raise TypeError(
      f'fit: builder {getattr(builder, "__name__", builder)!r} returned '
      f'{type(built).__name__}; it must return a kernel_fn (or a stax '
      '(init_fn, apply_fn, kernel_fn) triple).')


def _scaled(kernel_fn: Callable, scale2: float) -> Callable:
  """kernel_fn with its NNGP and NTK multiplied by scale2 (= output_scale^2:
  the network's outputs multiplied by output_scale)."""
  def scaled(x1, x2=None, get=None, **kwargs):
    if get is None or (not isinstance(get, str) and
                       not set(get) <= {'nngp', 'ntk'}) or (
                           isinstance(get, str) and get not in ('nngp', 'ntk')):
      raise ValueError(
          "the fitted kernel_fn with an output_scale returns get='nngp', "
          f"'ntk' or a tuple of them, not get={get!r}.")
    out = kernel_fn(x1, x2, get=get, **kwargs)
    if isinstance(get, str):
      return out * scale2
    return out._replace(**{g: getattr(out, g) * scale2 for g in get})
  return scaled


def _check_values(init: Mapping, fixed: Sequence[str], who: str) -> dict:
  """init as float64 arrays: fitted ones finite and > 0, fixed ones >= 0."""
  values = {}
  for name, value in init.items():
    array = np.asarray(value, dtype=np.float64)
    low_ok = np.all(array >= 0) if name in fixed else np.all(array > 0)
    if array.size == 0 or not np.all(np.isfinite(array)) or not low_ok:
      raise ValueError(
          f'{who}: init[{name!r}] = {value!r}: hyperparameters are fitted in '
          'log space and must start finite and > 0 (use a small value, e.g. '
          f"1e-3, or pass {name} to the builder as a constant).")
    values[name] = array
  return values


def _data(x_train, y_train, who: str):
  x = np.asarray(x_train, dtype=np.float64)
  if x.ndim < 1 or x.shape[0] < 2:
    raise ValueError(f'{who}: x_train needs at least 2 samples (leading '
                     f'axis), got shape {x.shape}.')
  y = np.asarray(y_train, dtype=np.float64)
  if y.ndim == 0 or y.shape[0] != x.shape[0]:
    raise ValueError(f'{who}: y_train of shape {y.shape} does not match '
                     f'x_train of shape {x.shape}; one row per sample.')
  y = y.reshape(len(y), -1)
  for name, array in (('x_train', x), ('y_train', y)):
    if not np.all(np.isfinite(array)):
      raise ValueError(f'{who}: {name} has NaN or infinite entries.')
  if not np.any(y):
    raise ValueError(
        f'{who}: y_train is all zeros: the evidence grows without bound as '
        'the kernel shrinks, so there is nothing to fit.')
  return x, y


class _Problem(NamedTuple):
  builder: Callable
  x: np.ndarray
  y: np.ndarray
  get: str
  absolute: bool
  fixed: dict          # name -> value (builder's and NOISE / SCALE)
  bounds: tuple        # ((fitted name, (low, high)), ...)

  @property
  def maps(self) -> dict:
    return {name: _Bounded(b) for name, b in self.bounds}


@functools.lru_cache(maxsize=16)
def _step(builder: Callable, choice: tuple, get: str, absolute: bool,
          bounds: tuple) -> tuple:
  """(optimizer, step): the jitted L-BFGS step `(u, state, fixed, x, y) ->
  (u', state', value, grad)` of -log p(y) / (N C) at u, for one builder
  and discrete choice, and the optimizer whose state it advances.

  Cached (a bounded LRU) so that fits of the same builder -- restarts,
  cross-validation folds, refits -- compile once per shape. The data and
  fixed values are arguments, not constants closed over: XLA would
  otherwise embed the training set and recompile for every data set.
  """
  maps = {name: _Bounded(b) for name, b in bounds}
  optimizer = optax.lbfgs()

  def objective(u, fixed, x, y):
    values = dict(fixed)
    values.update({name: m.value(u[name]) for name, m in maps.items()})
    noise = values.pop(NOISE)
    scale = values.pop(SCALE, None)
    kernel_fn = _kernel_fn_of(builder(**values, **dict(choice)), builder)
    k = _kernel_matrix(kernel_fn(x, None, get=get), get, 'fit')
    if scale is not None:
      k = k * scale ** 2
    return -_evidence(k, y, noise, absolute) / y.size

  @jax.jit
  def step(u, state, fixed, x, y):
    # No run-time checks inside (traced with them suspended): the line
    # search may try values whose kernel is not finite and step back, and
    # `_run` names a hyperparameter whose gradient is NaN itself.
    with runtime_checks.suspended():
      value_fn = lambda u: objective(u, fixed, x, y)
      value, grad = optax.value_and_grad_from_state(value_fn)(u, state=state)
      updates, state = optimizer.update(grad, state, u, value=value,
                                        grad=grad, value_fn=value_fn)
      return (_strong(optax.apply_updates(u, updates)), _strong(state),
              value, grad)
  return optimizer, step


def _strong(tree):
  """The leaves without JAX's weak type. `step`'s inputs and outputs must
  have the same types, or it compiles twice (2.5 s each for a 40-point
  Erf network): Python-float starts and optax.lbfgs's initial state are
  weakly typed where its updated state is not."""
  return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.result_type(x)),
                      tree)


def _run(problem: _Problem, choice: dict, starts: list, steps: int,
         tol: float) -> list:
  """L-BFGS from each start (dict of fitted name -> value); one dict each."""
  key = (problem.builder, tuple(choice.items()), problem.get,
         problem.absolute, problem.bounds)
  try:
    optimizer, step = _step(*key)
  except TypeError:        # an unhashable builder or choice: no cache
    optimizer, step = _step.__wrapped__(*key)
  x, y = jnp.asarray(problem.x), jnp.asarray(problem.y)
  fixed = {name: jnp.asarray(v) for name, v in problem.fixed.items()}
  n_total = problem.y.size
  runs = []
  for restart, start in enumerate(starts):
    u = _strong({name: m.variable(start[name])
                 for name, m in problem.maps.items()})
    state = _strong(optimizer.init(u))
    best_u, best, history, status, quiet = u, np.inf, [], 'max steps', 0
    for iteration in range(steps):
      new_u, state, value, grad = step(u, state, fixed, x, y)  # at u
      value = float(value)
      bad = [name for name, g in grad.items() if not np.all(np.isfinite(g))]
      if iteration == 0 and restart == 0 and (not np.isfinite(value) or bad):
        shown = {k: np.asarray(v).tolist() for k, v in start.items()}
        raise ValueError(
            f'fit: at the initial hyperparameters {shown} (choice {choice}) '
            + ('the evidence is not finite: the kernel has NaN/inf entries '
               'or is not positive semidefinite' if not np.isfinite(value)
               else f'the gradient in {bad} is NaN: the kernel is not '
               'differentiable there') + '; change init, or hold the '
            'hyperparameter fixed (fixed=...).')
      if not np.isfinite(value) or bad:
        status = 'stopped: non-finite evidence or gradient'
        break
      history.append(-value * n_total)
      if value < best:
        quiet = quiet + 1 if best - value < tol * (1 + abs(value)) else 0
        best_u, best = u, value
      else:
        quiet += 1
      if quiet >= 3:
        status = 'converged'
        break
      u = new_u
    fitted = {name: np.asarray(m.value(best_u[name]))
              for name, m in problem.maps.items()}
    runs.append(dict(choice=dict(choice), restart=restart,
                     start={k: np.asarray(v) for k, v in start.items()},
                     hyperparameters=fitted,
                     log_marginal_likelihood=-best * n_total,
                     history=np.asarray(history), status=status))
  return runs


def _starts(init: dict, maps: dict, restarts: int, rng) -> list:
  """init itself, then restarts drawn around it (log-normal, one e-fold)."""
  starts = [{name: init[name] for name in maps}]
  for _ in range(restarts - 1):
    start = {}
    for name, m in maps.items():
      log = np.log(init[name]) + rng.standard_normal(np.shape(init[name]))
      margin = 1e-3 * (m.hi - m.lo)
      start[name] = np.exp(np.clip(log, m.lo + margin, m.hi - margin))
    starts.append(start)
  return starts


def _plain(value: np.ndarray):
  value = np.asarray(value, dtype=np.float64)
  return float(value) if value.ndim == 0 else value


def fit(builder: Callable, x_train, y_train, init: Mapping[str, Any], *,
        get: str = 'nngp', diag_reg: float = 1e-3,
        diag_reg_absolute_scale: bool = False, fixed: Sequence[str] = (),
        choices: Optional[Mapping[str, Sequence]] = None,
        bounds: Optional[Mapping[str, tuple]] = None, restarts: int = 3,
        steps: int = 100, tol: float = 1e-9, seed: int = 0) -> FitResult:
  """Kernel hyperparameters that maximize the evidence of the training data.

  Each hyperparameter is positive and fitted in log space by L-BFGS
  (`optax.lbfgs`) within its bounds, from `init` and from `restarts - 1`
  starts drawn around it (log-normal, one e-fold); the best run wins. With
  `choices`, every combination of the discrete values is fitted and the
  highest evidence wins (a comparison the evidence makes fair: it penalizes
  complexity by itself, MacKay 1992).

  Args:
    builder: `builder(**hyperparameters, **choice)` -> a kernel_fn (or a
      stax triple), e.g. `lambda W_std, b_std: stax.serial(...)[2]`. It is
      called inside `jax.jit` with traced values: array-valued
      hyperparameters (per-layer values: `W_std[0]`, `W_std[1]`, ...) work.
    x_train: training inputs (N, ...).
    y_train: targets (N,) or (N, C) (C outputs sharing the kernel; for
      classes, centered one-hot targets).
    init: starting values, name -> positive float or array: the builder's
      keyword arguments to fit, and optionally 'output_scale' (the outputs'
      multiplier: the kernel is multiplied by its square; it overlaps with
      the last layer's W_std, so fit one of the two).
    get: 'nngp' (NNGP evidence) or 'ntk' (NTK-GP evidence).
    diag_reg: starting (or, if fixed, the) observation noise, relative to
      the mean of the kernel's diagonal unless `diag_reg_absolute_scale`.
    diag_reg_absolute_scale: the noise is `diag_reg` itself.
    fixed: names in `init` (or 'diag_reg') held at their values.
    choices: name -> sequence of values passed to the builder as is (depth,
      activation, ...); every combination is fitted.
    bounds: name -> (low, high), positive; defaults: (1e-4, 1e4), and
      (1e-8, 1e2) for 'diag_reg'.
    restarts: optimizer runs per choice (>= 1).
    steps: L-BFGS iterations per run at most.
    tol: a run stops after 3 iterations improving the evidence per target
      by less than tol x (1 + |value|).
    seed: of the restarts' starting points.

  Returns:
    A `FitResult`.

  Raises:
    TypeError: a builder that does not take the named hyperparameters, or
      that needs one neither in init nor in choices, or returns no kernel_fn.
    ValueError: bad data (NaN, mismatched lengths, fewer than 2 samples,
      all-zero targets), a non-positive init or bound, an unknown name in
      `fixed`, a non-finite evidence or gradient at the start, or every run
      failing.
  """
  who = 'fit'
  _check_get(get, who)
  if isinstance(restarts, bool) or not isinstance(
      restarts, numbers.Integral) or restarts < 1:
    raise ValueError(f'{who}: restarts must be an integer >= 1, got '
                     f'{restarts!r}.')
  if NOISE in init:
    raise ValueError(f'{who}: pass the noise as diag_reg=..., not in init.')
  choices = dict(choices or {})
  for name, options in choices.items():
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence) \
        or not options:
      raise ValueError(f'{who}: choices[{name!r}] must be a non-empty list '
                       f'of values, got {options!r}.')
  builder_names = set(init) - {SCALE}
  overlap = builder_names & set(choices)
  if overlap:
    raise ValueError(f'{who}: {sorted(overlap)} are in both init and '
                     'choices; fit them or compare them, not both.')
  _check_builder(builder, builder_names | set(choices))
  values = _check_values(dict(init, **{NOISE: diag_reg}), fixed, who)
  unknown = sorted(set(fixed) - set(values))
  if unknown:
    raise ValueError(f'{who}: fixed names {unknown} are not in init (or '
                     f"'{NOISE}'); known: {sorted(values)}.")
  bounds = dict(bounds or {})
  fitted_bounds = []
  for name in values:
    if name in fixed:
      continue
    low, high = bounds.get(name, NOISE_BOUNDS if name == NOISE
                           else DEFAULT_BOUNDS)
    if not 0 < low < high < np.inf:
      raise ValueError(f'{who}: bounds[{name!r}] = {(low, high)} must be '
                       '0 < low < high < inf.')
    if np.any(values[name] <= low) or np.any(values[name] >= high):
      raise ValueError(f'{who}: init {name} = {values[name]} is outside its '
                       f'bounds ({low:g}, {high:g}); pass bounds={{{name!r}: '
                       '(low, high)}.')
    fitted_bounds.append((name, (float(low), float(high))))
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    x, y = _data(x_train, y_train, who)
    problem = _Problem(builder, x, y, get, bool(diag_reg_absolute_scale),
                       {n: v for n, v in values.items() if n in fixed},
                       tuple(fitted_bounds))
    runs = []
    keys = list(choices)
    for combination in itertools.product(*(choices[k] for k in keys)):
      choice = dict(zip(keys, combination))
      runs += _run(problem, choice,
                   _starts(values, problem.maps, restarts, rng),
                   steps, tol)
  usable = [r for r in runs if np.isfinite(r['log_marginal_likelihood'])]
  if not usable:
    raise ValueError(f'{who}: every run failed: '
                     + '; '.join(f"{r['choice']}: {r['status']}" for r in runs))
  best = max(usable, key=lambda r: r['log_marginal_likelihood'])
  hyperparameters = {name: _plain(v) for name, v in values.items()}
  hyperparameters.update({name: _plain(v)
                          for name, v in best['hyperparameters'].items()})
  builder_values = {name: hyperparameters[name] for name in builder_names}
  kernel_fn = _kernel_fn_of(builder(**builder_values, **best['choice']),
                            builder)
  if SCALE in hyperparameters:
    kernel_fn = _scaled(kernel_fn, hyperparameters[SCALE] ** 2)
  return FitResult(hyperparameters, float(best['log_marginal_likelihood']),
                   dict(best['choice']), kernel_fn, runs)
