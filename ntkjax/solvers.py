"""Iterative solvers for kernels too large to factorize densely.

`predict` needs two things of a train-train kernel A = K + sigma I (M x M):
solutions of A X = B (t = inf, GP posteriors) and the action of a matrix
function on vectors, f(A) B (finite training times: f(lambda) =
expm1(-lambda s), expm1(-lambda s) / lambda). A dense Cholesky costs
M^3 / 3 flops and several M x M arrays (at M = 60,000 one float32 copy is
14 GB). Here both come from products K V only, so K can be an array in
memory, an array sharded over devices, or a lazy on-disk kernel (a
`StoredKernel` of `ntkjax.batch(..., store=)`) streamed block by block:

* `cg`: preconditioned conjugate gradients for all columns of B at once
  (one product K V per iteration serves every column). Preconditioner: a
  rank-r randomly pivoted Cholesky approximation K ~ F F^T (Chen, Epperly,
  Tropp & Webber 2023, "Randomly pivoted Cholesky", block version), used as
  P = F F^T + (sigma + tau) I with tau the mean of the diagonal F F^T
  misses (GPyTorch uses F F^T + sigma I, Gardner et al. 2018; the tau term
  keeps P close to A when K has an identity-like part, as wide-network
  kernels of high-dimensional data do). P^{-1} by the Woodbury identity.
* `lanczos_functions`: f(A) b ~ |b| Q_m f(T_m) e_1 after m Lanczos steps
  with full reorthogonalization (Saad 1992; Higham 2008, ch. 13), every
  column and every function (e.g. every time t) at once, stopped when two
  successive approximations agree to `tol`.

A float32 kernel stays float32 in memory and on disk (half the traffic);
its entries are converted to float64 a column chunk at a time inside the
products, so products and sums are float64, as are all the recurrences
(NumPy on the host). Without JAX's float64 the in-memory products run in
float32 with the vector split in two float32 parts (v = hi + lo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_COLUMN_CHUNK = 4096     # float32 sums run over at most this many terms


class NotPositiveDefiniteError(ValueError):
  """The kernel plus diag_reg is not positive definite (CG met a direction of
  non-positive curvature)."""


# ----------------------------------------------------------------------------
# Operators: K V for K in memory, sharded, or on disk.


def _split(v: np.ndarray, dtype) -> np.ndarray:
  """v (M, T) float64 as [hi, lo] (M, 2T) in `dtype` with hi + lo = v to
  about dtype eps^2 (no split when dtype is float64)."""
  if np.dtype(dtype) == np.float64:
    return v
  hi = v.astype(dtype)
  return np.concatenate([hi, (v - hi).astype(dtype)], axis=1)


def _unsplit(kv: np.ndarray, dtype, columns: int) -> np.ndarray:
  kv = np.asarray(kv, np.float64)
  if np.dtype(dtype) == np.float64:
    return kv
  return kv[..., :columns] + kv[..., columns:]


@functools.partial(jax.jit, static_argnums=2)
def _chunked_products(k, v, chunk: int):
  """[K[:, c] @ v[c] for each column chunk c], stacked: (chunks, M, T), in
  v's dtype (K's entries converted chunk by chunk: a float32 kernel times a
  float64 vector is summed in float64)."""
  m = k.shape[1]
  return jnp.stack([jnp.matmul(k[:, a:a + chunk].astype(v.dtype),
                               v[a:a + chunk],
                               precision=jax.lax.Precision.HIGHEST)
                    for a in range(0, m, chunk)])


@functools.partial(jax.jit, static_argnums=(2, 3))
def _row_block_products(k, v, rows: int, chunk: int):
  """K v (M, T) in v's dtype, one block of `rows` rows at a time (a
  `fori_loop`; the last block is clamped to end at M and overlaps the one
  before, recomputing the same rows): temporaries are rows x chunk, not
  M x chunk (K converted to float64 chunk by chunk)."""
  m, n = k.shape
  rows = min(rows, m)

  def block(i, out):
    start = jnp.minimum(i * rows, m - rows)
    kb = jax.lax.dynamic_slice_in_dim(k, start, rows, axis=0)
    acc = sum(jnp.matmul(kb[:, a:a + chunk].astype(v.dtype), v[a:a + chunk],
                         precision=jax.lax.Precision.HIGHEST)
              for a in range(0, n, chunk))
    return jax.lax.dynamic_update_slice_in_dim(out, acc, start, axis=0)
  return jax.lax.fori_loop(0, -(-m // rows), block,
                           jnp.zeros((m, v.shape[1]), v.dtype))


@jax.jit
def _float32_product(k, v):
  # HIGHEST: no TF32 on GPUs (3 digits lost).
  return jnp.matmul(k, v, precision=jax.lax.Precision.HIGHEST)


def _product_dtype(dtype) -> np.dtype:
  """Products in float64 when JAX has it (float32 entries times float64
  vectors are exact, and the sums then keep float64 accuracy; a float32
  sum over M terms of a vector with cancelling entries, as A^{-1} y has,
  loses digits: measured 1e-5 true residual where CG reported 1e-9); else
  in the kernel's dtype with the vector split in two parts."""
  return np.dtype(np.float64) if jax.config.jax_enable_x64 else np.dtype(dtype)


class DenseOperator:
  """A kernel held as an (M, M) array: NumPy, JAX, or a JAX array sharded
  over devices (the product then runs sharded).

  Args:
    k: the symmetric kernel matrix.
  """

  def __init__(self, k):
    self.k = k if isinstance(k, jax.Array) else jnp.asarray(k)
    self.size = int(self.k.shape[0])
    self.dtype = np.dtype(self.k.dtype)
    # One pass over K, so that NaN is reported even where no product is
    # needed (e.g. training outputs at t = inf).
    if not bool(jnp.isfinite(self.k).all()):
      raise ValueError('solver: the kernel contains NaN or infinite values; '
                       'check how it was computed.')

  def matmul(self, v: np.ndarray) -> np.ndarray:
    """K v for v (M, T); float64."""
    dtype = _product_dtype(self.dtype)
    w = jnp.asarray(_split(v, dtype))
    if len(self.k.sharding.device_set) > 1:
      # Sharded: whole columns chunks, so each device keeps its rows.
      kv = np.asarray(_chunked_products(self.k, w, _COLUMN_CHUNK),
                      np.float64).sum(0)
    else:
      kv = np.asarray(_row_block_products(self.k, w, 1024, _COLUMN_CHUNK),
                      np.float64)
    return _unsplit(kv, dtype, v.shape[1])

  @property
  def fast_matmul(self) -> Optional[Callable]:
    """K v with float32 products and sums, for a float32 kernel when the
    exact products are float64 (CG then refines in mixed precision); None
    otherwise."""
    if self.dtype != np.float32 or _product_dtype(self.dtype) == self.dtype:
      return None
    return lambda v: np.asarray(_float32_product(
        self.k, jnp.asarray(v, jnp.float32)), np.float64)

  def diagonal(self) -> np.ndarray:
    return np.asarray(jnp.diagonal(self.k), np.float64)

  def columns(self, index: np.ndarray) -> np.ndarray:
    return np.asarray(self.k[:, jnp.asarray(index)], np.float64)


def _block_product(block: np.ndarray, v: np.ndarray) -> np.ndarray:
  """block @ v in float64 (the block converted a column chunk at a time:
  exact products, float64 sums, bounded temporary memory)."""
  out = np.zeros((block.shape[0], v.shape[1]))
  for a in range(0, block.shape[1], _COLUMN_CHUNK):
    out += block[:, a:a + _COLUMN_CHUNK].astype(np.float64) @ v[
        a:a + _COLUMN_CHUNK]
  return out


class StoredOperator:
  """A kernel on disk (any 2-d lazy array with NumPy slicing, e.g. a
  `StoredKernel`), read one strip of rows at a time: memory is one strip
  (rows x M), never the kernel.

  For a symmetric store (x2=None) each stored block is read once per
  product: strip i holds blocks (i, j >= i), which give rows i and, by
  transposition, the rows of blocks j > i.

  Args:
    k: the lazy (M, M) kernel.
  """

  def __init__(self, k, client=None):
    if len(k.shape) != 2 or k.shape[0] != k.shape[1]:
      raise ValueError(
          f'solver: a stored train-train kernel must be square (M, M), got '
          f'{tuple(k.shape)}; store it with trace_axes covering the output '
          'axes (e.g. get="ntk" of a network with one output).')
    self.k = k
    self.size = int(k.shape[0])
    self.dtype = np.dtype(k.dtype)
    store = getattr(k, 'store', None)
    plan = getattr(store, 'plan', None)
    self.rows = plan.size1 if plan is not None else 1024
    self.symmetric = bool(plan is not None and plan.symmetric)
    self.client = client

  def _strips(self):
    for r0 in range(0, self.size, self.rows):
      yield r0, min(r0 + self.rows, self.size)

  def matmul(self, v: np.ndarray) -> np.ndarray:
    w = np.asarray(v, np.float64)
    if self.client is not None:
      return self._matmul_on_cluster(w)
    out = np.zeros((self.size, w.shape[1]))
    for r0, r1 in self._strips():
      if self.symmetric:
        strip = np.asarray(self.k[r0:r1, r0:])        # blocks (i, j >= i)
        out[r0:r1] += _block_product(strip, w[r0:])
        if r1 < self.size:                           # blocks (j > i, i)
          out[r1:] += _block_product(strip[:, r1 - r0:].T, w[r0:r1])
      else:
        out[r0:r1] += _block_product(np.asarray(self.k[r0:r1, :]), w)
    return out

  def _matmul_on_cluster(self, w: np.ndarray) -> np.ndarray:
    """K w with one Dask task per strip of rows: each worker reads its
    strip from the store (mirrored blocks included) and returns only its
    rows of the product; w is scattered once per product."""
    w_future, = self.client.scatter([w], broadcast=True, hash=False)
    if getattr(self, '_k_future', None) is None:   # the store, once
      self._k_future, = self.client.scatter([self.k], broadcast=True,
                                            hash=False)
    tasks = [self.client.submit(_strip_product, self._k_future, r0, r1,
                                w_future,
                                pure=False, retries=2)
             for r0, r1 in self._strips()]
    return np.concatenate(self.client.gather(tasks))

  def diagonal(self) -> np.ndarray:
    return np.concatenate([np.diagonal(np.asarray(self.k[r0:r1, r0:r1]))
                           for r0, r1 in self._strips()]).astype(np.float64)

  def columns(self, index: np.ndarray) -> np.ndarray:
    # K symmetric: columns are rows, read in ascending order.
    order = np.argsort(index)
    rows = np.asarray(self.k[np.asarray(index)[order], :], np.float64)
    out = np.empty((self.size, len(index)))
    out[:, order] = rows.T
    return out


def _strip_product(k, r0: int, r1: int, w: np.ndarray) -> np.ndarray:
  """Rows r0:r1 of K w (a Dask task)."""
  return _block_product(np.asarray(k[r0:r1, :]), w)


def operator(k, client=None):
  """The kernel's operator: `DenseOperator` for an array (in memory or
  sharded), `StoredOperator` for a lazy 2-d array on disk (its products as
  Dask tasks of `client` if given)."""
  if isinstance(k, (DenseOperator, StoredOperator)):
    return k
  if isinstance(k, (np.ndarray, jax.Array)):
    return DenseOperator(k)
  if hasattr(k, 'shape') and hasattr(k, '__getitem__'):
    return StoredOperator(k, client)
  return DenseOperator(jnp.asarray(k))


def is_lazy(k) -> bool:
  """Whether `k` is a lazy (e.g. stored) kernel rather than an array."""
  return (not isinstance(k, (np.ndarray, jax.Array)) and hasattr(k, 'shape')
          and hasattr(k, '__getitem__') and not hasattr(k, 'nngp')
          and not hasattr(k, 'ntk'))


# ----------------------------------------------------------------------------
# The preconditioner.


def rp_cholesky(op, rank: int, block: int = 64, seed: int = 0,
                tol: float = 1e-12) -> tuple:
  """Randomly pivoted (block) Cholesky: K ~ F F^T with F (M, <= rank).

  Pivots are drawn with probability proportional to the diagonal of
  K - F F^T (without replacement within a block); each block of columns
  G = K[:, S] - F F[S]^T is added as G H^{-1/2} with H = G[S] (eigenvalues
  below 1e-10 max dropped, so nearly repeated points add nothing).

  Args:
    op: the kernel's operator (`operator(k)`).
    rank: at most this many columns.
    block: pivots per step (columns read together).
    seed: random seed (fixed: the preconditioner, hence the iteration
      count, is reproducible).
    tol: stop when the residual trace falls below tol x trace(K).

  Returns:
    (F, residual diagonal of K - F F^T).
  """
  rng = np.random.default_rng(seed)
  d = np.maximum(op.diagonal(), 0.)
  trace = d.sum()
  columns = []
  f = np.zeros((op.size, 0))
  while f.shape[1] < rank and d.sum() > tol * trace:
    b = min(block, rank - f.shape[1], int(np.count_nonzero(d)))
    pivots = np.sort(rng.choice(op.size, size=b, replace=False, p=d / d.sum()))
    g = op.columns(pivots) - f @ f[pivots].T
    h = (g[pivots] + g[pivots].T) / 2
    w, u = np.linalg.eigh(h)
    if w.min() < -1e-8 * max(np.abs(w).max(), 1e-300):
      raise NotPositiveDefiniteError(
          'solver: the kernel is not positive semi-definite (a principal '
          f'submatrix has eigenvalue {w.min():.3g}); check how it was built, '
          "or pass diag_reg > 0 / solver='eigh'.")
    keep = w > 1e-10 * max(w.max(), 0.)
    if not keep.any():
      break
    new = g @ (u[:, keep] / np.sqrt(w[keep]))
    columns.append(new)
    f = np.concatenate(columns, axis=1)
    d = np.maximum(d - (new ** 2).sum(1), 0.)
  return f, d


class Preconditioner:
  """P^{-1} for P = F F^T + c I (Woodbury): (v - F (c I + F^T F)^{-1} F^T v)
  / c.

  Args:
    f: (M, r) low-rank factor.
    shift: c > 0.
  """

  def __init__(self, f: np.ndarray, shift: float, diagonal_max: float = 0.):
    self.f = f
    self.shift = shift
    self.diagonal_max = diagonal_max
    inner = shift * np.eye(f.shape[1]) + f.T @ f
    self.chol = np.linalg.cholesky(inner) if f.shape[1] else None

  @classmethod
  def of(cls, op, shift: float, rank: Optional[int] = None):
    """The preconditioner of K + shift I: rank-`rank` (default min(M, 300))
    randomly pivoted Cholesky plus (shift + mean residual diagonal) I."""
    rank = min(op.size, 300) if rank is None else min(rank, op.size)
    diagonal = op.diagonal()
    _check_finite(diagonal, 'kernel')
    if diagonal.min() < -1e-12 * np.abs(diagonal).max() - shift:
      raise NotPositiveDefiniteError(
          f'solver: the kernel has a negative diagonal entry '
          f'({diagonal.min():.3g}): it is not a covariance (kernels of '
          'ntkjax have variances on the diagonal); check how it was built.')
    f, residual = rp_cholesky(op, rank) if rank else (
        np.zeros((op.size, 0)), np.maximum(diagonal, 0.))
    _check_finite(f, 'kernel')
    return cls(f, max(shift + residual.mean(), 1e-300),
               float(np.abs(diagonal).max()))

  def __call__(self, v: np.ndarray) -> np.ndarray:
    if self.chol is None:
      return v / self.shift
    x = np.linalg.solve(self.chol.T, np.linalg.solve(self.chol, self.f.T @ v))
    return (v - self.f @ x) / self.shift


# ----------------------------------------------------------------------------
# Conjugate gradients.


@dataclasses.dataclass
class SolveInfo:
  """What an iterative solve did.

  Attributes:
    method: 'cg' or 'lanczos'.
    iterations: products with K.
    residuals: per iteration, the largest relative residual |b - A x| / |b|
      over columns (CG), or the largest relative change of the result
      (Lanczos).
    converged: whether `tol` was reached.
    rank: columns of the preconditioner (CG).
  """
  method: str
  iterations: int = 0
  residuals: list = dataclasses.field(default_factory=list)
  converged: bool = False
  rank: int = 0


def _bar(enabled: bool, description: str, total: int):
  from tqdm import tqdm
  return tqdm(total=total, desc=description, disable=not enabled, delay=1.,
              file=sys.stderr, dynamic_ncols=True)


def _check_finite(values: np.ndarray, what: str):
  if not np.all(np.isfinite(values)):
    raise ValueError(f'solver: the {what} contains NaN or infinite values; '
                     'check the kernel and the targets.')


def _one_thread(fn):
  """Run `fn` under `one_blas_thread` (see there)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with one_blas_thread():
      return fn(*args, **kwargs)
  return wrapped


@_one_thread
def cg(op, b: np.ndarray, shift: float = 0., tol: float = 1e-6,
       max_iterations: Optional[int] = None, rank: Optional[int] = None,
       progress: bool = False, info: Optional[SolveInfo] = None,
       preconditioner: Optional['Preconditioner'] = None) -> np.ndarray:
  """Solve (K + shift I) X = B by preconditioned CG, all columns at once.

  Args:
    op: the kernel's operator (`operator(k)`).
    b: (M, T) right-hand sides.
    shift: sigma >= 0 (diag_reg, absolute).
    tol: stop when every column's |b - A x| / |b| <= tol.
    max_iterations: default 10 sqrt(M) + 100.
    rank: preconditioner rank (default min(M, 300); 0 for none).
    progress: a progress bar of iterations and the residual.
    info: a `SolveInfo` filled in (history, iterations, convergence).
    preconditioner: a `Preconditioner.of(op, shift, rank)` to reuse.

  Returns:
    X (M, T), float64. Raises `NotPositiveDefiniteError` on a direction of
    non-positive curvature; warns if not converged.
  """
  info = SolveInfo('cg') if info is None else info
  b = np.asarray(b, np.float64)
  b = b[:, None] if b.ndim == 1 else b
  _check_finite(b, 'right-hand side (targets)')
  max_iterations = (int(10 * math.sqrt(op.size)) + 100
                    if max_iterations is None else max_iterations)
  if preconditioner is None:
    preconditioner = Preconditioner.of(op, shift, rank)
  info.rank = preconditioner.f.shape[1]
  exact = lambda v: op.matmul(v) + shift * v
  fast_matmul = getattr(op, 'fast_matmul', None)
  bar = _bar(progress, 'cg', max_iterations)
  try:
    if fast_matmul is None:
      x = _pcg(exact, b, tol, max_iterations, preconditioner, shift, info,
               bar)
    else:
      x = _refined(exact, lambda v: fast_matmul(v) + shift * v, b, tol,
                   max_iterations, preconditioner, shift, info, bar)
  finally:
    bar.close()
  if not info.converged:
    import warnings
    warnings.warn(
        f'solver: conjugate gradients did not reach tol={tol} in '
        f'{info.iterations} iterations (relative residual '
        f'{info.residuals[-1] if info.residuals else float("nan"):.2e}); '
        'raise max_iterations or the preconditioner rank, or add diag_reg.',
        RuntimeWarning, stacklevel=3)
  return x


# Inner tolerance of mixed-precision refinement: float32 products are good
# to ~1e-6 of |K| |v|, so each inner solve reliably gains 1e-4.
_INNER_TOL = 1e-4


def _refined(exact, fast, b, tol, max_iterations, preconditioner, shift,
             info, bar) -> np.ndarray:
  """Mixed-precision iterative refinement (e.g. Carson & Higham 2018): CG
  with fast float32 products solves for the correction to tolerance 1e-4,
  the residual b - A x is recomputed with the exact float64 products, and
  this repeats until it is below `tol`. A float32 product is 4.5x faster
  than the converted float64 one (8000 x 8000, 10 columns), so the solve
  costs ~1.3x the iterations at a third of the price each. If a round
  gains less than a factor 2 (float32 too coarse for this kernel), the
  rest is solved with exact products."""
  norms = np.linalg.norm(b, axis=0)
  norms = np.where(norms > 0, norms, 1.)
  x = np.zeros_like(b)
  r = b
  relative = np.linalg.norm(r, axis=0) / norms
  while relative.max() > tol and info.iterations < max_iterations:
    inner = max(_INNER_TOL, tol / relative.max())
    x = x + _pcg(fast, r, inner, max_iterations, preconditioner, shift, info,
                 bar, scale=relative.max())
    r = b - exact(x)
    info.iterations += 1
    previous, relative = relative, np.linalg.norm(r, axis=0) / norms
    info.residuals.append(float(relative.max()))
    if relative.max() > previous.max() / 2 and relative.max() > tol:
      x = x + _pcg(exact, r, tol / relative.max(), max_iterations,
                   preconditioner, shift, info, bar, scale=relative.max())
      relative = np.linalg.norm(b - exact(x), axis=0) / norms
      info.iterations += 1
      info.residuals.append(float(relative.max()))
      break
  info.converged = bool(relative.max() <= tol)
  return x


def _pcg(apply, b, tol, max_iterations, preconditioner, shift, info, bar,
         scale: float = 1.) -> np.ndarray:
  """Preconditioned CG for apply(X) = b, every column to relative residual
  `tol`; `info` counts products and records residuals (times `scale`, the
  size of b relative to the original right-hand side). Sets
  info.converged."""
  norms = np.linalg.norm(b, axis=0)
  norms = np.where(norms > 0, norms, 1.)
  x = np.zeros_like(b)
  r = b.copy()
  z = preconditioner(r)
  p = z.copy()
  rz = (r * z).sum(0)
  active = np.linalg.norm(r, axis=0) / norms > tol
  while active.any() and info.iterations < max_iterations:
    ap = apply(p)
    info.iterations += 1
    _check_finite(ap, 'kernel')
    curvature = (p * ap).sum(0)
    size = (p * p).sum(0) * (abs(shift) + preconditioner.diagonal_max
                             + 1e-300)
    bad = active & (curvature <= 1e-14 * size)
    if bad.any():
      raise NotPositiveDefiniteError(
          'solver: the kernel plus diag_reg is not positive definite '
          f'(conjugate gradients met curvature {curvature[bad].min():.3g} '
          f'<= 0 at iteration {info.iterations}); pass diag_reg > 0 (e.g. '
          "1e-4), or solver='eigh' for the minimum-norm solution.")
    alpha = np.where(active, rz / np.where(active, curvature, 1.), 0.)
    x += alpha * p
    r -= alpha * ap
    relative = np.linalg.norm(r, axis=0) / norms
    info.residuals.append(float(relative.max() * scale))
    active = relative > tol
    z = preconditioner(r)
    rz_new = (r * z).sum(0)
    beta = np.where(active, rz_new / np.where(rz != 0, rz, 1.), 0.)
    p = z + beta * p
    rz = rz_new
    bar.update(1)
    bar.set_postfix_str(f'residual {relative.max() * scale:.2e}',
                        refresh=False)
  info.converged = not active.any()
  return x


# ----------------------------------------------------------------------------
# Matrix functions by Lanczos.


@_one_thread
def lanczos_functions(op, b: np.ndarray, functions: Sequence[Callable],
                      shift: float = 0., tol: float = 1e-8,
                      max_iterations: Optional[int] = None,
                      check_every: int = 5, progress: bool = False,
                      info: Optional[SolveInfo] = None) -> np.ndarray:
  """f(A) B for A = K + shift I and each f in `functions`.

  Every column runs its own Lanczos recurrence (products batched over
  columns), with full reorthogonalization; every `check_every` steps the
  approximations |b| Q_m V f(theta) V^T e_1 are formed and the run stops
  once each changed by less than `tol` relative to its norm.

  Args:
    op: the kernel's operator.
    b: (M, T) vectors.
    functions: vectorized scalar functions of the eigenvalues (e.g.
      `lambda l: np.expm1(-l * s)`).
    shift: sigma >= 0.
    tol: relative change between checks that counts as converged.
    max_iterations: default min(M, 10 sqrt(M) + 100).
    check_every: steps between convergence checks.
    progress: as in `cg`.
    info: as in `cg`.

  Returns:
    (len(functions), M, T) float64.
  """
  info = SolveInfo('lanczos') if info is None else info
  b = np.asarray(b, np.float64)
  _check_finite(b, 'right-hand side (targets)')
  m, t = b.shape
  max_iterations = min(m, int(10 * math.sqrt(m)) + 100 if max_iterations
                       is None else max_iterations)
  beta0 = np.linalg.norm(b, axis=0)
  # The basis grows in chunks (not max_iterations x M x T up front).
  q = np.zeros((min(max_iterations, 32) + 1, m, t))
  q[0] = b / np.where(beta0 > 0, beta0, 1.)
  alphas = np.zeros((max_iterations, t))
  betas = np.zeros((max_iterations, t))
  done = beta0 == 0           # a column with an invariant subspace found
  previous = None
  bar = _bar(progress, 'lanczos', max_iterations)
  result = np.zeros((len(functions), m, t))
  steps = np.full(t, max_iterations)
  try:
    for k in range(max_iterations):
      w = op.matmul(q[k]) + shift * q[k]
      info.iterations += 1
      _check_finite(w, 'kernel')
      alphas[k] = (q[k] * w).sum(0)
      for _ in range(2):       # full reorthogonalization, twice
        w -= np.einsum('kmt,kt->mt', q[:k + 1],
                       np.einsum('kmt,mt->kt', q[:k + 1], w))
      betas[k] = np.linalg.norm(w, axis=0)
      ended = (betas[k] <= 1e-12 * np.abs(alphas[:k + 1]).max(0)) & ~done
      steps = np.where(ended, k + 1, steps)
      done |= ended
      if k + 1 >= len(q):
        q = np.concatenate([q, np.zeros((min(len(q), max_iterations + 1 -
                                                len(q)),) + q.shape[1:])])
      q[k + 1] = np.where(done, 0., w / np.where(betas[k] > 0, betas[k], 1.))
      bar.update(1)
      if (k + 1) % check_every and not done.all() and k + 1 < max_iterations:
        continue
      result = _lanczos_result(q, alphas, betas, beta0, np.minimum(steps, k + 1),
                               functions)
      if previous is not None:
        change = np.abs(result - previous).max(axis=1) / np.maximum(
            np.abs(result).max(axis=1), 1e-300)
        info.residuals.append(float(change.max()))
        bar.set_postfix_str(f'change {change.max():.2e}', refresh=False)
        if change.max() <= tol or done.all():
          info.converged = True
          break
      elif done.all():
        info.converged = True
        break
      previous = result
  finally:
    bar.close()
  if not info.converged:
    import warnings
    warnings.warn(
        f'solver: Lanczos did not converge to tol={tol} in '
        f'{info.iterations} iterations; raise max_iterations, or add diag_reg.',
        RuntimeWarning, stacklevel=3)
  return result


def _lanczos_result(q, alphas, betas, beta0, steps, functions) -> np.ndarray:
  """|b| Q_m V f(theta) V^T e_1 for each column (its own m) and f."""
  n_functions, (m, t) = len(functions), q.shape[1:]
  out = np.zeros((n_functions, m, t))
  for c in range(t):
    s = int(steps[c])
    tridiagonal = (np.diag(alphas[:s, c]) + np.diag(betas[:s - 1, c], 1)
                   + np.diag(betas[:s - 1, c], -1))
    theta, v = np.linalg.eigh(tridiagonal)
    for n, fn in enumerate(functions):
      coefficients = v @ (fn(theta) * v[0]) * beta0[c]
      out[n, :, c] = coefficients @ q[:s, :, c]
  return out


# ----------------------------------------------------------------------------
# Settings, as `predict`'s `solver=` argument.


@dataclasses.dataclass
class CG:
  """`solver=CG(...)` in `predict`: iterative solves with these settings.

  Attributes:
    tol: relative residual of CG (per column).
    max_iterations: CG / Lanczos steps (default 10 sqrt(M) + 100).
    rank: preconditioner rank (default min(M, 300); 0 for none).
    lanczos_tol: relative change at which Lanczos stops (finite times).
    progress: progress bars on long solves.
    client: a Dask `Client`: products with a stored kernel run as tasks on
      its workers (one strip of rows each), which must reach the store.
    history: a `SolveInfo` per solve (iterations, residual history,
      convergence), appended as solves run.
  """
  tol: float = 1e-6
  max_iterations: Optional[int] = None
  rank: Optional[int] = None
  lanczos_tol: float = 1e-8
  progress: bool = False
  client: object = None
  history: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self._preconditioners = {}

  def solve(self, op, b, shift: float) -> np.ndarray:
    """(K + shift I)^{-1} b."""
    key = (id(op), shift)
    if key not in self._preconditioners:
      with one_blas_thread():
        self._preconditioners[key] = (op, Preconditioner.of(op, shift,
                                                            self.rank))
    info = SolveInfo('cg')
    self.history.append(info)
    return cg(op, b, shift, self.tol, self.max_iterations,
              progress=self.progress, info=info,
              preconditioner=self._preconditioners[key][1])

  def functions(self, op, b, functions: Sequence[Callable],
                shift: float) -> np.ndarray:
    """f(K + shift I) b for each f."""
    info = SolveInfo('lanczos')
    self.history.append(info)
    return lanczos_functions(op, b, functions, shift, self.lanczos_tol,
                             self.max_iterations, progress=self.progress,
                             info=info)


def product(k, v: np.ndarray) -> np.ndarray:
  """k @ v (float64) for a rectangular kernel in memory or on disk (read
  1024 rows at a time)."""
  v = np.asarray(v, np.float64)
  if not is_lazy(k):
    return DenseOperator(k).matmul(v)
  return np.concatenate([_block_product(np.asarray(k[r0:r0 + 1024, :]), v)
                         for r0 in range(0, k.shape[0], 1024)])


@contextlib.contextmanager
def one_blas_thread():
  """One BLAS/LAPACK thread while inside (where threadpoolctl is installed).

  jax's CPU LAPACK and NumPy share OpenBLAS, whose threads spin while
  waiting: on a 2-core machine with XLA's own threads busy, a 1000 x 1000
  Cholesky took 0.67 s with its default threads and 0.006 s with one, and
  the preconditioner of a 2000 x 2000 kernel 11 s instead of 0.3 s.
  """
  try:
    import threadpoolctl
  except ImportError:  # optional: without it, OpenBLAS decides
    yield
    return
  with threadpoolctl.threadpool_limits(1, user_api='blas'):
    yield
