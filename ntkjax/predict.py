"""Training dynamics in closed form, and Gaussian-process inference.

Under gradient flow on the MSE loss L(f) = |f - y|^2 / (2 |y|) (|y| = number
of entries of y_train, neural-tangents' normalization) a linearized network's
outputs obey, with Theta the NTK and eta the learning rate,

    df_train/dt = -(eta / |y|) Theta (f_train - y),

so on the training set and on a test set (Jacot et al. 2018; Lee et al.
2019, "Wide neural networks of any depth evolve as linear models"):

    f_train(t) = y + exp(-eta t Theta / |y|) (f_train(0) - y),
    f_test(t)  = f_test(0) - Theta_*  Theta^{-1} (I - exp(-eta t Theta / |y|))
                                                   (f_train(0) - y).

`t` counts steps (time in units of the learning rate, as in the reference);
`t = None` is the t -> inf limit. With `diag_reg`, Theta is replaced by
Theta + diag_reg * I (times mean(diag Theta) unless
`diag_reg_absolute_scale`).

Kernel layout (neural-tangents'): for outputs of shape (N, *rest) and
`trace_axes` (axes of the outputs, never the batch axis 0), a kernel between
two sets has one pair of axes (x1, x2) for each non-traced output axis,
zipped: (N1, N2, a1, a2, ...); traced axes are absent and the kernel acts as
Theta (x) I on them. Kernels may be arrays or objects with `.nngp` / `.ntk`
(an `ntkjax.Kernel`, or the named tuples of `kernel_fn`).

Numerics: the t = inf solve uses a Cholesky factorization; if it fails
(a singular or indefinite kernel), the solve falls back to the
eigendecomposition with eigenvalues below `max_eigenvalue * size * eps`
treated as zero, i.e. the minimum-norm solution, which is the t -> inf limit
of gradient flow on the kernel's range. Finite times use the
eigendecomposition with negative round-off eigenvalues clipped to 0, and
expm1(-lambda s) / lambda evaluated stably (its limit -s at lambda = 0), so no
NaNs arise from a rank-deficient kernel. Use float64 for ill-conditioned
kernels.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ntkjax import _get
from ntkjax import _predict_checks as checks
from ntkjax import _predict_iterative as iterative_predict
from ntkjax import ode, solvers

Axes = Union[int, Sequence[int]]
Gaussian = collections.namedtuple('Gaussian', 'mean covariance')
"""A Gaussian over outputs: `mean` like the outputs, `covariance` like a
kernel between the test set and itself."""

_GETS = ('nngp', 'ntk', 'ntkgp')


# ----------------------------------------------------------------------------
# Layout: kernels and outputs as matrices.


class _Layout:
  """Maps outputs and zipped kernels to matrices and back.

  Outputs (N, *rest) -> (N * prod(non-traced rest), prod(traced)) matrices;
  kernels (N1, N2, a1, a2, ...) -> (N1 * a1 * ..., N2 * a2 * ...).
  """

  def __init__(self, y_train, trace_axes: Axes, who: str):
    y_train = jnp.asarray(y_train)
    if y_train.ndim < 1:
      raise ValueError(f'{who}: y_train must have a batch axis, got shape '
                       f'{y_train.shape}.')
    ndim = y_train.ndim
    axes = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
    for a in axes:
      if not -ndim <= a < ndim:
        raise ValueError(f'{who}: trace_axes={trace_axes} is out of range for '
                         f'y_train of shape {y_train.shape}.')
    self.trace = tuple(sorted({a % ndim for a in axes}))
    if 0 in self.trace:
      raise ValueError(f'{who}: trace_axes={trace_axes} includes the batch '
                       'axis 0; kernels must keep the example axis.')
    self.kept = tuple(a for a in range(ndim) if a not in self.trace)
    self.ndim = ndim
    self.shape = y_train.shape
    self.who = who

  def outputs_to_matrix(self, f):
    """(N, *rest) -> (N * kept sizes, traced sizes)."""
    f = jnp.moveaxis(f, self.trace, range(self.ndim - len(self.trace),
                                           self.ndim))
    kept = f.shape[:len(self.kept)]
    return f.reshape(math.prod(kept), math.prod(f.shape[len(self.kept):])), kept

  def matrix_to_outputs(self, m, kept_shape):
    """Inverse of `outputs_to_matrix` (leading batch-of-times axes allowed)."""
    lead = m.shape[:-2]
    traced = tuple(self.shape[a] for a in self.trace)
    f = m.reshape(lead + tuple(kept_shape) + traced)
    n = len(lead)
    return jnp.moveaxis(f, range(n + len(self.kept), n + self.ndim),
                        [n + a for a in self.trace])

  @property
  def train_rows(self) -> tuple:
    """The non-traced shape of the training outputs (a train-train
    kernel's rows)."""
    return tuple(self.shape[a] for a in self.kept)

  def kernel_to_matrix(self, k, name: str, rows=None, cols=None):
    """Zipped kernel -> matrix; checks its shape against the outputs.

    `cols` defaults to the training outputs' non-traced shape; `rows`, if
    given, is checked too.
    """
    m = len(self.kept)
    if solvers.is_lazy(k):
      return self._lazy_matrix(k, name, rows, cols)
    k = jnp.asarray(k)
    expect_cols = (tuple(self.shape[a] for a in self.kept) if cols is None
                   else tuple(cols))
    rows_ok = k.ndim == 2 * m and (
        rows is None or tuple(k.shape[0::2]) == tuple(rows))
    if not rows_ok or tuple(k.shape[1::2]) != expect_cols:
      rows_text = ('rows' if rows is None else str(tuple(rows)))
      raise ValueError(
          f'{self.who}: {name} has shape {k.shape}; for y_train of shape '
          f'{self.shape} with trace_axes={self.trace} its axes must pair '
          f'{rows_text} with {expect_cols}, zipped (row_0, col_0, row_1, '
          'col_1, ...): one pair per non-traced output axis.')
    k = jnp.transpose(k, tuple(range(0, 2 * m, 2)) + tuple(range(1, 2 * m, 2)))
    rows_shape = k.shape[:m]
    return k.reshape(math.prod(rows_shape), math.prod(k.shape[m:])), rows_shape

  def _lazy_matrix(self, k, name: str, rows, cols):
    """A stored (lazy) kernel is used as it is: (N1, N2) for outputs whose
    other axes are all traced."""
    expect = (tuple(rows) if rows is not None else (k.shape[0],)) + (
        (self.shape[0],) if cols is None else tuple(cols))
    if len(self.kept) != 1 or tuple(k.shape) != expect:
      raise ValueError(
          f'{self.who}: {name} is a stored kernel of shape {tuple(k.shape)}; '
          f'for y_train of shape {self.shape} a stored kernel must be '
          f'{expect}, with every output axis but the batch traced '
          f'(trace_axes={tuple(range(1, self.ndim)) or "()"}).')
    return k, (k.shape[0],)

  def zip_covariance(self, c, rows_shape):
    """(..., R, R) matrices -> zipped (..., r1, r1', r2, r2', ...)."""
    lead, m = c.shape[:-2], len(rows_shape)
    c = c.reshape(lead + tuple(rows_shape) * 2)
    n = len(lead)
    order = list(range(n)) + [n + i for pair in zip(range(m), range(m, 2 * m))
                              for i in pair]
    return jnp.transpose(c, order)


def _field(k, name: str, who: str):
  """`k.nngp` / `k.ntk` of a Kernel or named tuple; an array as is."""
  if hasattr(k, 'nngp') or hasattr(k, 'ntk'):
    value = getattr(k, name, None)
    if value is None:
      raise ValueError(f'{who}: the kernel passed has no {name!r} field; '
                       f"compute it with get=('nngp', 'ntk').")
    return value
  return k


def _regularized(k, diag_reg, absolute: bool):
  scale = diag_reg if absolute else diag_reg * jnp.trace(k) / k.shape[0]
  return k + scale * jnp.eye(k.shape[0], dtype=k.dtype)


def _one_blas_thread(fn: Callable) -> Callable:
  """Runs jitted `fn` with one BLAS/LAPACK thread (`solvers.one_blas_thread`:
  OpenBLAS's spinning threads made jax's CPU LAPACK 10-50x slower on a busy
  2-core machine) and waits for its result. Under an outer jit (tracers)
  it is called as is."""
  def wrapped(*args):
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
      return fn(*args)
    with solvers.one_blas_thread():
      return jax.block_until_ready(fn(*args))
  return wrapped


@_one_blas_thread
@jax.jit
def _eigh(k):
  evals, evecs = jnp.linalg.eigh(k)
  return jnp.maximum(evals, 0.), evecs


@_one_blas_thread
@jax.jit
def _cholesky(k):
  return jnp.linalg.cholesky(k)


def _factor_failed(chol):
  """Whether a Cholesky factor is unusable: non-finite, or a pivot so small
  (pivot^2 <= 100 eps max pivot^2) that the matrix is singular to working
  precision: an exactly singular kernel leaves a pivot of rounding size
  (a few eps), while pivot^2 >= lambda_min for a regular one, so a kernel
  regularized by diag_reg >> 100 eps keeps its (fast, accurate) Cholesky
  solve. (n eps, tried first, sent float32 kernels of n = 1000 with
  condition numbers ~1e4 to the 5x slower eigen-solve.)"""
  pivots = jnp.abs(jnp.diagonal(chol))
  tiny = (jnp.min(pivots) ** 2 <=
          100 * jnp.finfo(chol.dtype).eps * jnp.max(pivots) ** 2)
  return ~jnp.all(jnp.isfinite(chol)) | tiny


def _min_norm_solve(k, b):
  """k^+ b by eigendecomposition, dropping eigenvalues below n eps max|ev|."""
  evals, evecs = jnp.linalg.eigh(k)
  cutoff = jnp.max(jnp.abs(evals)) * k.shape[0] * jnp.finfo(k.dtype).eps
  keep = evals > cutoff
  inv = jnp.where(keep, 1. / jnp.where(keep, evals, 1.), 0.)
  return evecs @ (inv[:, None] * (evecs.T @ b))


@_one_blas_thread
@jax.jit
def _solve_factored(chol, k, b):
  """k^{-1} b from its Cholesky factor; min-norm eigen-solve if that failed.

  Module-level and jitted, so repeated solves of one shape compile once (a
  `lax.cond` built per call outside `jit` would recompile every time).
  """
  return jax.lax.cond(_factor_failed(chol), lambda b: _min_norm_solve(k, b),
                      lambda b: jsl.cho_solve((chol, True), b), b)


@_one_blas_thread
@jax.jit
def _train_limit(chol, k, y, f0):
  """The t -> inf training outputs f0 + k k^+ (y - f0) of gradient flow.

  For a regular kernel that is y exactly (returned as is, free of rounding);
  for a singular one the flow cannot move f0 off k's range, and the limit
  is y's part in the range plus f0's part outside it.
  """
  return jax.lax.cond(_factor_failed(chol),
                      lambda: f0 + k @ _min_norm_solve(k, y - f0),
                      lambda: y)


def _solver(k, solver: str = 'cholesky'):
  """b -> k^{-1} b, factorizing k once (see `_solve_factored`);
  solver='eigh' takes the min-norm eigen-solve directly."""
  chol = _cholesky(k) if solver != 'eigh' else jnp.full_like(k, jnp.nan)
  return lambda b: _solve_factored(chol, k, b)


def _mul(a, b):
  """a @ b, where `a` may be a stored (lazy) kernel and `b` an iterative
  `System` (standing for its kernel K)."""
  if isinstance(b, iterative_predict.System):
    return jnp.asarray(b.op.matmul(np.asarray(a, np.float64).T).T)
  if solvers.is_lazy(a):
    return jnp.asarray(solvers.product(a, np.asarray(b)))
  return a @ b


def _expm1_over(evals, s):
  """expm1(-evals s) / evals, with its limit -s where evals ~ 0."""
  small = evals * s < 1e-8
  safe = jnp.where(small, 1., evals)
  return jnp.where(small, -s * (1 - evals * s / 2),
                   jnp.expm1(-safe * s) / safe)


class _Eigen:
  """A lazily computed, cached eigendecomposition of a (regularized) kernel."""

  def __init__(self, k):
    self.k = k
    self.value = None

  def get(self):
    if self.value is None:
      value = _eigh(self.k)
      if isinstance(value[0], jax.core.Tracer):
        return value          # do not cache tracers across transformations
      self.value = value
    return self.value


# ----------------------------------------------------------------------------
# Choosing a solver.

SOLVERS = ('auto', 'cholesky', 'eigh', 'cg')
# 'auto': dense factorizations up to this size (a float64 Cholesky of
# 8192 x 8192 takes seconds and 0.5 GB) and while three float64 copies fit
# in half the free memory; conjugate gradients beyond.
AUTO_DENSE_LIMIT = 8192


def _checked_solver(solver, who: str):
  if not isinstance(solver, solvers.CG) and solver not in SOLVERS:
    raise ValueError(f'{who}: solver={solver!r}; choose from {SOLVERS} or '
                     'pass solvers.CG(...).')
  return solver


def _iterative(solver, k, who: str):
  """The `solvers.CG` settings if `solver` (for this kernel) means an
  iterative solve, else None ('cholesky', 'eigh')."""
  if isinstance(_checked_solver(solver, who), solvers.CG):
    return solver
  lazy = solvers.is_lazy(k)
  if lazy and solver in ('cholesky', 'eigh'):
    raise ValueError(f"{who}: the kernel is stored on disk; solve it with "
                     f"solver='cg' (solver={solver!r} would need it whole in "
                     'memory).')
  if solver == 'cg' or (solver == 'auto' and (
      lazy or k.shape[0] > AUTO_DENSE_LIMIT
      or 3 * 8 * k.shape[0] ** 2 > _free_memory() / 2)):
    return solvers.CG()
  return None


def _free_memory() -> float:
  """Bytes of memory available now (inf where unknown). A dense solve
  holds about three float64 N x N arrays (kernel, factor, eigenvectors)."""
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return math.inf


# ----------------------------------------------------------------------------
# Gradient descent on MSE, in closed form.


def gradient_descent_mse(k_train_train, y_train, learning_rate: float = 1.,
                         diag_reg: float = 0.,
                         diag_reg_absolute_scale: bool = False,
                         trace_axes: Axes = (-1,), *,
                         solver='auto') -> Callable:
  """Outputs of a linearized network trained by gradient flow on MSE.

  Args:
    k_train_train: NTK (for the network's dynamics; the NNGP gives the
      dynamics of training only the last layer) on the training set, an
      array or an object with `.ntk`; zipped layout (module docstring).
    y_train: training targets, (N, *rest).
    learning_rate: eta; times are in units of steps (absolute time eta t).
    diag_reg: diagonal regularization of the kernel.
    diag_reg_absolute_scale: True: add `diag_reg * I`; False: add
      `diag_reg * mean(diag(K)) * I`.
    trace_axes: output axes the kernel lacks (it acts as K (x) I on them).
    solver: 'cholesky' (t = inf by Cholesky, finite t by eigendecomposition),
      'eigh' (eigendecomposition for both), 'cg' (conjugate gradients for
      t = inf, Lanczos for finite t: never a dense factorization; the
      kernel may be stored on disk), 'auto' (dense up to
      `AUTO_DENSE_LIMIT` examples, else 'cg'), or `solvers.CG(...)` with
      settings (its `history` records each solve).

  Returns:
    `predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)`
    -> `fx_train_t`, or `(fx_train_t, fx_test_t)` when `fx_test_0` is given
    (only `fx_test_t` if `fx_train_0` is None); `t` a scalar or an array of
    times (its shape is prepended), `None` for t -> inf. `k_test_train` has
    the zipped layout between test and train outputs.
  """
  who = 'gradient_descent_mse'
  checks.check_nonnegative(who, learning_rate=learning_rate, diag_reg=diag_reg)
  layout = _Layout(y_train, trace_axes, who)
  y_train = jnp.asarray(y_train)
  k, kept = layout.kernel_to_matrix(_field(k_train_train, 'ntk', who),
                                    'k_train_train',
                                    rows=layout.train_rows)
  k = checks.check_kernel(k, 'k_train_train', who)
  y_train = checks.check_targets(y_train, who)
  iterative = _iterative(solver, k, who)
  if iterative is not None:
    return iterative_predict.gradient_descent_mse(
        iterative, k, kept, layout, y_train, learning_rate, diag_reg,
        diag_reg_absolute_scale,
        lambda kt: layout.kernel_to_matrix(_field(kt, 'ntk', who),
                                           'k_test_train'))
  k = _regularized(k, diag_reg, diag_reg_absolute_scale)
  y, _ = layout.outputs_to_matrix(y_train.astype(k.dtype))
  eigen = _Eigen(k)
  size = y_train.size
  factor = _cholesky if solver != 'eigh' else (
      lambda k: jnp.full_like(k, jnp.nan))   # 'eigh': the min-norm path

  def predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None):
    t = checks.check_times(t, who)
    if fx_test_0 is not None and k_test_train is None:
      raise ValueError(f'{who}: fx_test_0 was given without k_test_train; '
                       'pass the test-train kernel too.')
    f0 = 0. if fx_train_0 is None else fx_train_0
    f0, _ = layout.outputs_to_matrix(
        jnp.broadcast_to(jnp.asarray(f0, k.dtype), y_train.shape))
    if k_test_train is not None:
      kt, rows = layout.kernel_to_matrix(_field(k_test_train, 'ntk', who),
                                         'k_test_train')
    if t is None:
      chol = factor(k)
      train = _train_limit(chol, k, y, f0)
      if fx_test_0 is not None:
        test_delta = kt @ _solve_factored(chol, k, y - f0)
    else:
      s = learning_rate * jnp.asarray(t, k.dtype)[..., None] / size
      evals, evecs = eigen.get()
      coeffs = evecs.T @ (f0 - y)                            # (M, T)
      decay = jnp.expm1(-evals * s)                          # (..., M)
      train = f0 + jnp.einsum('mk,...k,kt->...mt', evecs, decay, coeffs)
      if fx_test_0 is not None:
        test_delta = jnp.einsum('rm,mk,...k,kt->...rt', kt, evecs,
                                _expm1_over(evals, s), coeffs)
    outs = []
    if fx_train_0 is not None:
      outs.append(layout.matrix_to_outputs(train, kept))
    if fx_test_0 is not None:
      delta = layout.matrix_to_outputs(test_delta, rows)
      outs.append(jnp.asarray(fx_test_0, k.dtype) + delta)
    return outs[0] if len(outs) == 1 else tuple(outs)
  return predict_fn


def max_learning_rate(ntk_train_train, y_train_size: Optional[int] = None,
                      momentum: float = 0., eps: float = 1e-12) -> float:
  """Largest stable learning rate of (momentum) gradient descent on MSE.

  With the loss |f - y|^2 / (2 |y|), a step is f <- f - (eta / |y|) Theta
  (f - y), stable while eta < 2 |y| / lambda_max(Theta); heavy-ball momentum
  m stretches the bound by (1 + m) (Goh 2017, "Why momentum really works").

  Args:
    ntk_train_train: NTK on the training set; zipped layout, made a matrix.
    y_train_size: |y|; default the matrix size (right for trace_axes=()).
    momentum: heavy-ball momentum.
    eps: guards the division.

  Returns:
    2 (1 + momentum) |y| / lambda_max.
  """
  k = jnp.asarray(_field(ntk_train_train, 'ntk', 'max_learning_rate'))
  m = k.ndim // 2
  k = jnp.transpose(k, tuple(range(0, 2 * m, 2)) + tuple(range(1, 2 * m, 2)))
  k = k.reshape(math.prod(k.shape[:m]), -1)
  size = k.shape[0] if y_train_size is None else y_train_size
  return 2 * (1 + momentum) * size / (jnp.linalg.eigvalsh(k)[-1] + eps)


# ----------------------------------------------------------------------------
# Gaussian-process inference.


def _gets(get) -> tuple:
  return _get.requested(get, _GETS, 'predict_fn', default=('nngp', 'ntk'))


def gp_inference(k_train_train, y_train, diag_reg: float = 0.,
                 diag_reg_absolute_scale: bool = False,
                 trace_axes: Axes = (-1,), *, solver='auto') -> Callable:
  """Posterior of the NNGP, of the infinite NTK ensemble, and of the NTK-GP.

  With K the NNGP and Theta the NTK (train-train unstarred, test-train *):
    nngp:  mean K_* K^{-1} y,  cov K_** - K_* K^{-1} K_*^T  (Bayesian network);
    ntk:   mean Theta_* Theta^{-1} y,  cov K_** + Theta_* Theta^{-1} K
           Theta^{-1} Theta_*^T - (Theta_* Theta^{-1} K_*^T + transpose)
           (gradient flow to t = inf, over initializations; Lee et al. 2019);
    ntkgp: the GP with covariance Theta (He et al. 2020).

  Args:
    k_train_train: train-train kernel(s): an array, or an object with the
      `.nngp` / `.ntk` fields the requested `get` needs.
    y_train: targets (N, *rest).
    diag_reg: as in `gradient_descent_mse`.
    diag_reg_absolute_scale: as in `gradient_descent_mse`.
    trace_axes: as in `gradient_descent_mse`.
    solver: as in `gradient_descent_mse` (with 'cg', covariances solve one
      system per test point: at most `iterative_predict.MAX_COV_ROWS`).

  Returns:
    `predict_fn(get=None, k_test_train=None, k_test_test=None)`: for each
    requested mode the posterior mean (test outputs) or, with
    `k_test_test`, a `Gaussian(mean, covariance)`. `k_test_train=None`
    means predictions on the training set, `N(y_train, 0)`.
  """
  who = 'gp_inference'
  checks.check_nonnegative(who, diag_reg=diag_reg)
  _checked_solver(solver, who)
  layout = _Layout(y_train, trace_axes, who)
  y_train = checks.check_targets(jnp.asarray(y_train), who)
  solves, matrices = {}, {}

  def matrix(name):
    """(K or its iterative `System`, b -> (K + sigma I)^{-1} b)."""
    if name not in matrices:
      k, _ = layout.kernel_to_matrix(_field(k_train_train, name, who),
                                     f'k_train_train.{name}',
                                     rows=layout.train_rows)
      k = checks.check_kernel(k, f'k_train_train.{name}', who)
      settings = _iterative(solver, k, who)
      if settings is None:
        matrices[name] = k
        solves[name] = _solver(_regularized(k, diag_reg,
                                            diag_reg_absolute_scale), solver)
      else:
        system = iterative_predict.System(settings, k, diag_reg,
                                          diag_reg_absolute_scale)
        matrices[name], solves[name] = system, system.solve
    return matrices[name], solves[name]

  def predict_fn(get=None, k_test_train=None, k_test_test=None):
    values = {}
    for g in _gets(get):
      name = 'nngp' if g == 'nngp' else 'ntk'
      k, solve = matrix(name)
      y, kept = layout.outputs_to_matrix(y_train.astype(k.dtype))
      if k_test_train is None:
        mean = layout.matrix_to_outputs(y, kept)
        cov = None if k_test_test is None else layout.zip_covariance(
            jnp.zeros(k.shape, k.dtype), kept)
      else:
        kt, rows = layout.kernel_to_matrix(
            _field(k_test_train, name, who), f'k_test_train.{name}')
        mean = layout.matrix_to_outputs(_mul(kt, solve(y)), rows)
        cov = None
        if k_test_test is not None:
          prior = 'ntk' if g == 'ntkgp' else 'nngp'
          ktt, _ = layout.kernel_to_matrix(
              _field(k_test_test, prior, who), f'k_test_test.{prior}',
              rows=rows, cols=rows)
          ktt, kt_t = iterative_predict.dense(ktt), iterative_predict.dense(
              kt, who, covariance=isinstance(k, iterative_predict.System)).T
          if g in ('nngp', 'ntkgp'):
            cov = ktt - _mul(kt, solve(kt_t))
          else:
            nngp, _ = matrix('nngp')
            nngp_t, _ = layout.kernel_to_matrix(
                _field(k_test_train, 'nngp', who), 'k_test_train.nngp')
            a = solve(kt_t).T                        # Theta_* Theta^{-1}
            cross = _mul(nngp_t, a.T).T
            cov = ktt + _mul(a, nngp) @ a.T - cross - cross.T
          cov = layout.zip_covariance(cov, rows)
      values[g] = mean if cov is None else Gaussian(mean, cov)
    return _get.pick(get if isinstance(get, str) else tuple(values), values,
                     'Gaussians')
  return predict_fn


# ----------------------------------------------------------------------------
# Ensembles of infinitely wide networks trained for time t.


def gradient_descent_mse_ensemble(kernel_fn: Callable, x_train, y_train,
                                  learning_rate: float = 1.,
                                  diag_reg: float = 0.,
                                  diag_reg_absolute_scale: bool = False,
                                  trace_axes: Axes = (-1,), *,
                                  solver='auto',
                                  **kernel_fn_train_train_kwargs) -> Callable:
  """Mean and covariance over initializations of infinitely wide networks
  trained by gradient flow on MSE for time t (Lee et al. 2019, eqs. 15-17).

  With E = I - exp(-eta t Theta / |y|) and A = Theta_* Theta^{-1} E:
    ntk:  mean A y,   cov K_** + A K A^T - (A K_*^T + K_* A^T);
  and for 'nngp' (training only the readout; a Bayesian posterior at
  t = inf), with E_2 = I - exp(-2 eta t K / |y|):
    nngp: mean K_* K^{-1} E y,   cov K_** - K_* K^{-1} E_2 K_*^T.

  Args:
    kernel_fn: `kernel_fn(x1, x2, get, **kwargs)` of the architecture.
    x_train: training inputs.
    y_train: training targets.
    learning_rate: as in `gradient_descent_mse`.
    diag_reg: as in `gradient_descent_mse`.
    diag_reg_absolute_scale: as in `gradient_descent_mse`.
    trace_axes: as in `gradient_descent_mse`.
    solver: as in `gradient_descent_mse` (with 'cg', `compute_cov` solves
      one system per test point: at most `iterative_predict.MAX_COV_ROWS`).
    **kernel_fn_train_train_kwargs: passed to `kernel_fn` on the train set.

  Returns:
    `predict_fn(t=None, x_test=None, get=None, compute_cov=False,
    **kernel_fn_test_test_kwargs)`: per requested `get` ('nngp', 'ntk')
    the mean test outputs, or `Gaussian(mean, covariance)` with
    `compute_cov`; `x_test=None` predicts the training set; `t` a scalar or
    array of times (prepended), None for t -> inf.
  """
  who = 'gradient_descent_mse_ensemble'
  checks.check_nonnegative(who, learning_rate=learning_rate, diag_reg=diag_reg)
  _checked_solver(solver, who)
  layout = _Layout(y_train, trace_axes, who)
  y_train = checks.check_targets(jnp.asarray(y_train), who)
  size = y_train.size
  cache = {}

  def train_kernels():
    if 'kernels' not in cache:
      both = kernel_fn(x_train, None, ('nngp', 'ntk'),
                       **kernel_fn_train_train_kwargs)
      mats = {}
      for name in ('nngp', 'ntk'):
        mats[name], _ = layout.kernel_to_matrix(getattr(both, name),
                                                f'kernel_fn(x_train).{name}',
                                                rows=layout.train_rows)
        mats[name] = checks.check_kernel(
            mats[name], f'kernel_fn(x_train).{name}', who)
      cache['kernels'] = mats
    return cache['kernels']

  def dynamics(name):
    """(eigendecomposition, solver) of the regularized kernel, or (None,
    its iterative `System`)."""
    if name not in cache:
      k = train_kernels()[name]
      settings = _iterative(solver, k, who)
      if settings is not None:
        cache[name] = (None, iterative_predict.System(
            settings, k, diag_reg, diag_reg_absolute_scale))
      else:
        k = _regularized(k, diag_reg, diag_reg_absolute_scale)
        cache[name] = (_Eigen(k), _solver(k, solver))
    return cache[name]

  def predict_fn(t=None, x_test=None, get=None, compute_cov: bool = False,
                 **kernel_fn_test_test_kwargs):
    t = checks.check_times(t, who)
    gets = _gets(get)
    if 'ntkgp' in gets:
      raise ValueError(f"{who}: get='ntkgp' is not a training dynamics; use "
                       'gp_inference.')
    train = train_kernels()
    if x_test is None:
      test_train, test_test = train, train
      rows = tuple(layout.shape[a] for a in layout.kept)
    else:
      both = kernel_fn(x_test, x_train, ('nngp', 'ntk'),
                       **kernel_fn_test_test_kwargs)
      test_train = {}
      for name in ('nngp', 'ntk'):
        test_train[name], rows = layout.kernel_to_matrix(
            getattr(both, name), f'kernel_fn(x_test, x_train).{name}')
      if compute_cov:
        tt = kernel_fn(x_test, None, 'nngp', **kernel_fn_test_test_kwargs)
        test_test = {'nngp': layout.kernel_to_matrix(
            tt, 'kernel_fn(x_test).nngp', rows=rows, cols=rows)[0]}
    y, _ = layout.outputs_to_matrix(y_train.astype(train['ntk'].dtype))
    values = {}
    for g in gets:
      eigen, solve = dynamics(g)
      kt = test_train[g]
      if eigen is None:   # iterative: K_* f(K) products, no factorization
        a, a2, mean = iterative_predict.ensemble_terms(
            solve, kt, y, None if t is None else learning_rate * np.asarray(
                t, np.float64) / size, compute_cov, g == 'nngp', who)
        if not compute_cov:
          values[g] = layout.matrix_to_outputs(mean, rows)
          continue
      elif t is None:
        a = solve(kt.T).T                                  # K_* K^{-1}
        a2 = a
      else:
        s = learning_rate * jnp.asarray(t, kt.dtype)[..., None] / size
        evals, evecs = eigen.get()
        # K^{-1} (I - exp(-lambda s)) = -V diag(expm1(-lambda s) / lambda) V^T;
        # K_* V is shared by both products (each ~ N_test N^2 flops).
        ktv = kt @ evecs
        a = -jnp.einsum('rk,...k,nk->...rn', ktv, _expm1_over(evals, s), evecs)
        # Only the NNGP covariance needs the doubled time.
        a2 = (-jnp.einsum('rk,...k,nk->...rn', ktv,
                          _expm1_over(evals, 2 * s), evecs)
              if compute_cov and g == 'nngp' else None)
      mean = layout.matrix_to_outputs(a @ y.astype(a.dtype), rows)
      if not compute_cov:
        values[g] = mean
        continue
      if g == 'nngp':
        cov = test_test['nngp'] - a2 @ kt.T
      else:
        cross = a @ test_train['nngp'].T
        cov = (test_test['nngp'] + _mul(a, train['nngp'])
               @ jnp.swapaxes(a, -1, -2) - cross - jnp.swapaxes(cross, -1, -2))
      values[g] = Gaussian(mean, layout.zip_covariance(cov, rows))
    return _get.pick(get if isinstance(get, str) else tuple(values), values,
                     'Gaussians')
  return predict_fn


# ----------------------------------------------------------------------------
# Gradient descent on any loss, by integrating the function-space ODE.


def gradient_descent(loss: Callable, k_train_train, y_train,
                     learning_rate: float = 1.,
                     momentum: Optional[float] = None,
                     trace_axes: Axes = (-1,)) -> Callable:
  """Outputs of a linearized network trained by gradient flow on any loss.

  Integrates (with `ntkjax.ode.odeint`, adaptive Dormand–Prince)

      df_train/dtau = -Theta grad_f L(f_train, y),
      df_test/dtau  = -Theta_* grad_f L(f_train, y),

  in tau = learning_rate * t. With heavy-ball `momentum` mu the continuous
  limit of v <- mu v - eta grad, theta <- theta + v at step size
  h = sqrt(eta) is  f'' = -((1 - mu) / h) f' - Theta grad_f L  in tau = h t.
  For L = |f - y|^2 / (2 |y|) this is `gradient_descent_mse`.

  Args:
    loss: `loss(fx_train, y_train) -> scalar`.
    k_train_train: NTK on the training set (array or `.ntk`), zipped.
    y_train: targets.
    learning_rate: eta; `t` counts steps.
    momentum: None (plain gradient flow) or mu in [0, 1).
    trace_axes: as in `gradient_descent_mse`.

  Returns:
    `predict_fn(t, fx_train_0=0., fx_test_0=None, k_test_train=None)`:
    outputs at the times `t` (a scalar, or a 1-d non-decreasing array
    starting at t >= 0; its shape is prepended), as in
    `gradient_descent_mse`.
  """
  who = 'gradient_descent'
  layout = _Layout(y_train, trace_axes, who)
  y_train = jnp.asarray(y_train)
  k, kept = layout.kernel_to_matrix(_field(k_train_train, 'ntk', who),
                                    'k_train_train',
                                    rows=layout.train_rows)
  if momentum is not None and not 0 <= momentum < 1:
    raise ValueError(f'{who}: momentum={momentum} must be in [0, 1).')
  grad_loss = jax.grad(lambda f: loss(f, y_train))

  def apply(kernel, g):
    gm, _ = layout.outputs_to_matrix(g)
    return kernel @ gm

  def predict_fn(t, fx_train_0=0., fx_test_0=None, k_test_train=None):
    if t is None:
      raise ValueError(f'{who}: t=None (infinite time) has no general '
                       'solution; pass finite times, or use '
                       'gradient_descent_mse for MSE.')
    if fx_test_0 is not None and k_test_train is None:
      raise ValueError(f'{who}: fx_test_0 was given without k_test_train.')
    ts = jnp.asarray(t, k.dtype)
    if ts.ndim > 1:
      raise ValueError(f'{who}: t must be a scalar or a 1-d array of times.')
    scale = (learning_rate if momentum is None else learning_rate**0.5)
    times = jnp.concatenate([jnp.zeros(1, k.dtype), jnp.atleast_1d(ts)])
    f0 = jnp.broadcast_to(jnp.asarray(
        0. if fx_train_0 is None else fx_train_0, k.dtype), y_train.shape)
    f0m, _ = layout.outputs_to_matrix(f0)
    state = {'train': f0m}
    if fx_test_0 is not None:
      kt, rows = layout.kernel_to_matrix(_field(k_test_train, 'ntk', who),
                                         'k_test_train')
      test_shape = layout.matrix_to_outputs(
          jnp.zeros((math.prod(rows), f0m.shape[1])), rows).shape
      state['test'], _ = layout.outputs_to_matrix(jnp.broadcast_to(
          jnp.asarray(fx_test_0, k.dtype), test_shape))

    def force(s):
      g = grad_loss(layout.matrix_to_outputs(s['train'], kept))
      out = {'train': -apply(k, g)}
      if 'test' in s:
        out['test'] = -apply(kt, g)
      return out

    if momentum is None:
      rhs = lambda s, _: force(s)
      y0 = state
    else:
      friction = (1 - momentum) / scale
      rhs = lambda s, _: {'f': s['v'], 'v': jax.tree.map(
          lambda a, b: a - friction * b, force(s['f']), s['v'])}
      y0 = {'f': state, 'v': jax.tree.map(jnp.zeros_like, state)}
    path = ode.odeint(rhs, y0, scale * times)
    path = path if momentum is None else path['f']
    path = jax.tree.map(lambda p: p[1:] if ts.ndim else p[1], path)
    outs = []
    if fx_train_0 is not None:
      outs.append(layout.matrix_to_outputs(path['train'], kept))
    if fx_test_0 is not None:
      outs.append(layout.matrix_to_outputs(path['test'], rows))
    return outs[0] if len(outs) == 1 else tuple(outs)
  return predict_fn
