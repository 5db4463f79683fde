"""Self-attention: `GlobalSelfAttention` (Hron et al. 2020, "Infinite
attention: NNGP and NTK for deep attention networks", ICML 2020).

Finite network (NTK parameterization and neural-tangents' conventions). The
input x (N, S_1, ..., S_s, C), 1 <= s <= 3, is flattened to P = prod(S)
positions. With positional embeddings e (shared by all samples, trainable),
    'SUM':    x~ = x + W_pos e                      (C channels),
    'CONCAT': x~ = [x, W_pos e]                     (C + C_e channels),
e = L z, z ~ N(0, 1) per position and channel, L L^T = R, where R(p, p') =
decay(sum_axes |p_a - p'_a|^p_norm) (identity if `pos_emb_decay_fn` is None).
Keys and queries read x~; values read x~ if `val_pos_emb`, else x (C_v
channels). Per head h = 1..H, with all weights i.i.d. N(0, 1),
    K_h = x~ W^K_h,  Q_h = x~ W^Q_h  (Q_h = K_h if linear_scaling: tied),
    G_h = W_Q_std W_K_std / (C~ d_k^r) Q_h K_h^T,   r = 1 (linear_scaling)
                                                       or 1/2,
    A_h = mechanism(G_h)   (softmax over keys, or elementwise identity, |.|,
                            relu),
    f = W_O_std W_V_std / sqrt(d_v H C_v) [A_1 x_v W^V_1, ..., A_H x_v W^V_H]
        W^O + b_std b.
Only the products QK = W_Q_std W_K_std and OV = W_O_std W_V_std enter.

Kernel. Write k~, t~ for the NNGP and NTK of x~ (channel averages), k_v, t_v
for those of the values' input, and k~_i(p, q) for sample i's own covariance
between positions (cov1). With pos_emb_type 'SUM', k~ = k + W_pos^2 R; with
'CONCAT', k~ = (C k + C_e W_pos^2 R) / (C + C_e); the same for t~ (the
embeddings are parameters with NTK W_pos^2 R); R enters between different
samples too, since the embeddings are shared.

linear_scaling=True (Hron et al., section on d^-1 scaling). The logits are
an average of d_k C~ products, so at infinite width they concentrate on
    G_i(p, q) -> QK k~_i(p, q),
a deterministic function of each sample's own covariance between positions
(with independent Q and K the limit would be 0: hence the tying). So every
head has the same deterministic attention A_i = mechanism(QK k~_i), and the
output, an affine map of the heads with fresh weights W^O, is a Gaussian
field with
    nngp'_ij(p, p') = OV^2 sum_{q,q'} A_i(p, q) A_j(p', q') k_v,ij(q, q')
                      + b_std^2,
    ntk'_ij(p, p')  = OV^2 sum_{q,q'} A_i(p, q) A_j(p', q')
                      (2 k_v,ij + t_v,ij)(q, q') + b_std^2.
The NTK collects W^O and b (nngp'), W^V (nngp' - b_std^2) and the earlier
parameters through the values (t_v). The gradients through the logits
vanish: one key weight moves G_h by O(1 / (sqrt(C~) d_k)) and the output
by O(1 / (sqrt(H C~) d_k)), so the H C~ d_k key weights add O(1 / d_k) to
the NTK; a parameter feeding one input channel moves the channel average
k~ by O(1 / C~), all of them together adding O(1 / C~). (The Monte Carlo
tests check the limit, key weights and all.)

linear_scaling=False (Hron et al., d^-1/2 scaling, H -> infinity). Q and K
are independent, so G_h is a sum of d_k independent products scaled by
d_k^-1/2: a centred Gaussian field, independent across heads, with
    E[G_i(p, q) G_j(p', q')] = QK^2 k~_ij(p, p') k~_ij(q, q').
Averaging over infinitely many heads,
    nngp' = OV^2 sum_{q,q'} E[phi(G_i(p,q)) phi(G_j(p',q'))] k_v,ij(q,q')
            + b_std^2,
    ntk'  = OV^2 sum_{q,q'} E[phi phi] (2 k_v + t_v)(q, q') + b_std^2
            + OV^2 QK^2 sum_{q,q'} E[phi'(G_i(p,q)) phi'(G_j(p',q'))]
              k_v(q, q') [(k~ + t~)(p, p') k~(q, q')
                          + k~(p, p') (k~ + t~)(q, q')].
The last term is the query path and the key path: dG_h(p, q) / dW^Q_h[c, a]
= QK x~(p, c) K_h(q, a) / (C~ sqrt(d_k)), and summing the products of two
samples' derivatives over c, a gives QK^2 k~(p, p') k~(q, q') per head and
pair of keys, times phi'(G) phi'(G') and the values' k_v; the earlier
parameters through the queries add t~(p, p') in place of k~(p, p'), and
symmetrically for the keys at (q, q'). Cross terms between paths average
out (independent weights). For an elementwise phi the expectations are 2-d
Gaussian integrals: IDENTITY E[phi phi] = cov, E[phi' phi'] = 1 (then the
sums over key pairs factorize; neural-tangents implements this case);
RELU and ABS have arc-cosine closed forms (`dual.ab_relu`; not in
neural-tangents). SOFTMAX couples all keys (a P-dimensional Gaussian
integral with no closed form) and raises NotImplementedError. The output
is Gaussian only as H -> infinity: at finite H it is a mixture over the
heads' random logits (Hron et al.), so a nonlinearity right after this
layer converges more slowly in H than the NNGP/NTK of the layer itself.

The output is Gaussian (it comes out of W^O; with linear_scaling=True for
any number of heads, the attention being deterministic), so nonlinearities
may follow.
Attention mixes positions: the layer needs the covariances between all
pairs of positions at its input (`input_diagonal` is False) and raises a
`KernelError` for a pixel-diagonal kernel.

Masking (not wired yet): the attention weights of both the finite network
and the d^-1 kernel come from `attention_weights` (logits and an optional
key mask, True = masked as in neural-tangents), and the Gaussian
expectations of the d^-1/2 kernel from `_gaussian_logit_sums` (which takes
key masks too), so masks only need to be passed through to them.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax.stax import _dual as dual, _features as features
from ntkjax.stax._features import KernelError
from ntkjax.stax._layer import (Layer, check_nonnegative, layer, single_kernel,
                               zero_masked_outputs)

MECHANISMS = ('SOFTMAX', 'IDENTITY', 'ABS', 'RELU')
POSITIONAL_EMBEDDINGS = ('NONE', 'SUM', 'CONCAT')
_MAX_SPATIAL_AXES = 3

# E[phi(u) phi(v)] and E[phi'(u) phi'(v)] of the elementwise mechanisms with
# Gaussian logits (linear_scaling=False): relu = ab_relu(0, 1), |x| =
# ab_relu(-1, 1). IDENTITY is handled in closed form in `_gaussian_logit_sums`.
_GAUSSIAN_DUALS = {'RELU': dual.ab_relu(0., 1.), 'ABS': dual.ab_relu(-1., 1.)}


# ----------------------------------------------------------------------------
# Attention weights: the one place where logits become weights.


def attention_weights(logits, mechanism: str, key_mask=None):
  """Attention weights from logits, for the finite network and the kernel.

  Args:
    logits: `(..., N, P_query, P_key)` (the finite network has a leading
      heads axis; the kernel has none).
    mechanism: one of `MECHANISMS` (canonical upper case).
    key_mask: None (no mask), or a boolean `(N, P_key)` array, True where a
      key position is masked out (neural-tangents' convention). Masked keys
      get weight 0: they are left out of the softmax normalization, and the
      elementwise mechanisms see a logit of 0 there (phi(0) = 0).

  Returns:
    The weights, shaped like `logits`.
  """
  keep = None if key_mask is None else ~key_mask[..., None, :]
  if mechanism == 'SOFTMAX':
    if keep is None:
      return jax.nn.softmax(logits, axis=-1)
    shifted = jnp.where(keep, logits, -jnp.inf)
    top = jnp.max(shifted, axis=-1, keepdims=True)
    # A query whose keys are all masked gets no weights (not NaN).
    top = jnp.where(jnp.isfinite(top), top, 0.)
    weights = jnp.where(keep, jnp.exp(shifted - top), 0.)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.)
  if keep is not None:
    logits = jnp.where(keep, logits, 0.)
  if mechanism == 'IDENTITY':
    return logits
  if mechanism == 'ABS':
    return jnp.abs(logits)
  return jnp.maximum(logits, 0.)


# ----------------------------------------------------------------------------
# Layout helpers: kernels with positions first, (S1, S1', ..., Ss, Ss',
# batch...) <-> (P, P', batch...), positions flattened row-major as the
# finite network's reshape does.


def _flatten_positions(a, ndim: int):
  sizes = a.shape[:2 * ndim:2]
  perm = (tuple(range(0, 2 * ndim, 2)) + tuple(range(1, 2 * ndim, 2))
          + tuple(range(2 * ndim, a.ndim)))
  positions = math.prod(sizes)
  return a.transpose(perm).reshape((positions, positions) + a.shape[2 * ndim:])


def _unflatten_positions(a, sizes: tuple):
  ndim = len(sizes)
  a = a.reshape(sizes + sizes + a.shape[2:])
  perm = sum(((d, ndim + d) for d in range(ndim)), ()) + tuple(
      range(2 * ndim, a.ndim))
  return a.transpose(perm)


def _diagonal(cov):
  """Per-position variances (P, N) of a flattened own covariance (P, P, N)."""
  return jnp.einsum('ppn->pn', cov)


def _positional_covariance(sizes: tuple, p_norm, decay_fn: Optional[Callable],
                           name: str) -> np.ndarray:
  """R (P, P) over the flattened positions: decay(sum_a |p_a - p'_a|^p_norm),
  or the identity for decay_fn None; checked to be a covariance matrix."""
  positions = math.prod(sizes)
  if decay_fn is None:
    return np.eye(positions)
  grids = np.meshgrid(*[np.arange(s) for s in sizes], indexing='ij')
  coords = np.stack([g.ravel() for g in grids], axis=-1).astype(float)
  distance = np.sum(np.abs(coords[:, None] - coords[None]) ** p_norm, axis=-1)
  # Positions are static; evaluate a jnp decay function now, even under jit.
  with jax.ensure_compile_time_eval():
    r = np.asarray(decay_fn(distance), dtype=float)
  if r.shape != distance.shape or not np.all(np.isfinite(r)):
    raise ValueError(
        f'{name}: pos_emb_decay_fn must map the array of distances '
        f'elementwise to finite numbers; got shape {r.shape} for input '
        f'{distance.shape}.')
  eigenvalues = np.linalg.eigvalsh((r + r.T) / 2)
  if (not np.allclose(r, r.T, rtol=1e-12, atol=1e-12)
      or eigenvalues[0] < -1e-10 * max(1., np.max(np.abs(eigenvalues)))):
    raise ValueError(
        f'{name}: pos_emb_decay_fn gives a matrix of position covariances '
        f'that is not positive semi-definite (smallest eigenvalue '
        f'{eigenvalues[0]:.3g} for spatial shape {sizes}), so no positional '
        'embedding has it as covariance. Use a positive-definite decay, e.g. '
        'lambda d: jnp.exp(-d) with pos_emb_p_norm=1 or 2.')
  return r


# ----------------------------------------------------------------------------
# Kernel pieces.


def _weighted_by_attention(a1, a2, k):
  """sum_{q,q'} a1[i, p, q] a2[j, p', q'] k[q, q', i, j] -> (p, p', i, j);
  with `k` (q, q', i) and a2 = a1 of the same samples -> (p, p', i)."""
  precision = jax.lax.Precision.HIGHEST
  if k.ndim == 3:
    half = jnp.einsum('irs,qsi->qri', a1, k, precision=precision)
    return jnp.einsum('ipq,qri->pri', a1, half, precision=precision)
  half = jnp.einsum('jrs,qsij->qrij', a2, k, precision=precision)
  return jnp.einsum('ipq,qrij->prij', a1, half, precision=precision)


def _gaussian_logit_sums(mechanism: str, qk2, c, var_a, var_b, k_v,
                         ntk_parts=None, key_mask_a=None, key_mask_b=None):
  """Sums over key pairs of the Gaussian-logit expectations
  (linear_scaling=False; see the module docstring).

  The logits (G_a(p, q), G_b(p', q')) are centred Gaussians with covariance
  qk2 c(p, p') c(q, q') and variances qk2 var_a(p) var_a(q),
  qk2 var_b(p') var_b(q').

  Args:
    mechanism: 'IDENTITY', 'RELU' or 'ABS'.
    qk2: (W_query_std W_key_std)^2.
    c: (P, P', B...) the keys' input kernel between the two sides.
    var_a, var_b: (P, B...) per-position variances of each side,
      broadcastable against c's batch axes.
    k_v: (P, P', B...) the values' input kernel.
    ntk_parts: None for the NNGP only, or (t_v, t~): the NTKs of the values'
      and of the keys' inputs, laid out like c.
    key_mask_a, key_mask_b: None, or boolean (P, B...) masks (True: masked
      key position), broadcastable like var_a / var_b. A masked key has
      logit 0 and no gradient through it, so it contributes nothing.

  Returns:
    (S, T): S(p, p') = sum_{q,q'} E[phi phi] k_v(q, q') and, if ntk_parts,
    T = sum E[phi phi] (2 k_v + t_v) + qk2 sum E[phi' phi'] k_v
        [(c + t~)(p, p') c(q, q') + c(p, p') (c + t~)(q, q')]  (else None).
  """
  keep = None
  if key_mask_a is not None or key_mask_b is not None:
    ones = jnp.ones_like(var_a[:, None] * var_b[None])
    keep_a = 1. if key_mask_a is None else (~key_mask_a)[:, None]
    keep_b = 1. if key_mask_b is None else (~key_mask_b)[None]
    keep = ones * keep_a * keep_b                      # (Q, Q', B...)
  masked = (lambda a: a) if keep is None else (lambda a: a * keep)
  both = lambda a, b: jnp.sum(masked(a * b), axis=(0, 1))
  if ntk_parts is not None:
    t_v, t_k = ntk_parts
    values_ntk = 2 * k_v + t_v

  if mechanism == 'IDENTITY':
    # E[G_a G_b] = qk2 c(p, p') c(q, q') and phi' = 1: the sums over key
    # pairs factorize.
    s = qk2 * c * both(c, k_v)
    if ntk_parts is None:
      return s, None
    t = qk2 * (c * both(c, values_ntk) + (c + t_k) * both(k_v, c)
               + c * both(k_v, c + t_k))
    return s, t

  act = _GAUSSIAN_DUALS[mechanism]
  ntk_factor = act.ntk_factor_or_derived()
  key_axes = (1, 2)

  def per_query(args):
    """All p' and key pairs for one query position p of side a: memory
    P^3 B instead of P^4 B."""
    c_p, var_p = args                                  # (P', B...), (B...)
    expand = lambda a: a[(slice(None),) + (None,) * 2]  # (P', 1, 1, B...)
    cov = qk2 * expand(c_p) * c[None]                  # (P', Q, Q', B...)
    var1 = qk2 * var_p * var_a[None, :, None]          # (1, Q, 1, B...)
    var2 = qk2 * expand(var_b) * var_b[None, None]     # (P', 1, Q', B...)
    mean_product = masked(act.nngp(cov, var1, var2))
    s = jnp.sum(mean_product * k_v[None], axis=key_axes)
    if ntk_parts is None:
      return s, jnp.zeros_like(s)
    slope_product = masked(ntk_factor(cov, var1, var2))
    t = jnp.sum(mean_product * values_ntk[None], axis=key_axes)
    query_path = jnp.sum(slope_product * (k_v * c)[None], axis=key_axes)
    key_path = jnp.sum(slope_product * (k_v * (c + t_k))[None],
                       axis=key_axes)
    return s, (t, query_path, key_path)

  if ntk_parts is None:
    s, _ = jax.lax.map(per_query, (c, var_a))
    return s, None
  s, (t, query_path, key_path) = jax.lax.map(per_query, (c, var_a))
  t = t + qk2 * ((c + t_k) * query_path + c * key_path)
  return s, t


# ----------------------------------------------------------------------------
# The layer.


def _choice(value, choices: tuple, argument: str, name: str) -> str:
  """Canonical upper-case name of a string option (or of a neural-tangents
  enum member, which carries it as `.name`)."""
  label = getattr(value, 'name', value)
  if not isinstance(label, str) or label.upper() not in choices:
    raise ValueError(f'{name}: {argument}={value!r} must be one of {choices} '
                     '(case-insensitive).')
  return label.upper()


def _positive_int(value, argument: str, name: str):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or (
      value < 1):
    raise ValueError(f'{name}: {argument} must be a positive int, got '
                     f'{value!r}.')


def GlobalSelfAttention(
    n_chan_out: int, n_chan_key: int, n_chan_val: int, n_heads: int,
    linear_scaling: bool = True, W_key_std=1.0, W_value_std=1.0,
    W_query_std=1.0, W_out_std=1.0, b_std=None,
    attention_mechanism: str = 'SOFTMAX', pos_emb_type: str = 'NONE',
    pos_emb_p_norm: float = 2, pos_emb_decay_fn: Optional[Callable] = None,
    n_chan_pos_emb: Optional[int] = None, W_pos_emb_std=1.0,
    val_pos_emb: bool = False, batch_axis: int = 0,
    channel_axis: int = -1) -> Layer:
  """Global scaled dot-product self-attention over all positions.

  See the module docstring for the finite network and its kernel.

  Args:
    n_chan_out: output channels.
    n_chan_key: channels d_k of keys and queries per head.
    n_chan_val: channels d_v of values per head.
    n_heads: number of heads H.
    linear_scaling: True: logits scaled by 1 / d_k and query weights tied to
      the key weights (deterministic attention at infinite width); False:
      1 / sqrt(d_k) and independent queries (Gaussian logits; the kernel is
      implemented for IDENTITY, RELU and ABS, not SOFTMAX).
    W_key_std: weight standard deviation of the keys; only its product
      with `W_query_std` enters.
    W_query_std: weight standard deviation of the queries.
    W_value_std: weight standard deviation of the values; only its product
      with `W_out_std` enters.
    W_out_std: weight standard deviation of the output.
    b_std: bias standard deviation; None means no bias.
    attention_mechanism: 'SOFTMAX' (over key positions), 'IDENTITY', 'ABS' or
      'RELU' (case-insensitive; neural-tangents' AttentionMechanism members
      are accepted too).
    pos_emb_type: 'NONE', 'SUM' or 'CONCAT' (case-insensitive).
    pos_emb_p_norm: p of the distance sum_a |p_a - p'_a|^p between positions
      passed to `pos_emb_decay_fn`.
    pos_emb_decay_fn: elementwise map from distances to the embeddings'
      covariance between positions (must give a positive semi-definite
      matrix); None: independent embeddings per position (identity).
    n_chan_pos_emb: embedding channels for 'CONCAT' (None: as many as the
      input); for 'SUM' it must be None or the input's channel count.
    W_pos_emb_std: standard deviation of the embeddings.
    val_pos_emb: whether the values read the embeddings too (keys and
      queries always do).
    batch_axis: only 0.
    channel_axis: only -1.

  Returns:
    A `Layer`. Parameters are neural-tangents' tuple (query matrices or
    None, key matrices (H, C~, d_k), value matrices (H, C_v, d_v), W_out
    (d_v H, n_chan_out), bias or None, positional embeddings or None).
  """
  name = (f'GlobalSelfAttention({n_chan_out}, {n_chan_key}, {n_chan_val}, '
          f'{n_heads})')
  for value, argument in ((n_chan_out, 'n_chan_out'),
                          (n_chan_key, 'n_chan_key'),
                          (n_chan_val, 'n_chan_val'), (n_heads, 'n_heads')):
    _positive_int(value, argument, name)
  mechanism = _choice(attention_mechanism, MECHANISMS, 'attention_mechanism',
                      name)
  pos_emb = _choice(pos_emb_type, POSITIONAL_EMBEDDINGS, 'pos_emb_type', name)
  for value, argument in ((W_key_std, 'W_key_std'),
                          (W_value_std, 'W_value_std'),
                          (W_query_std, 'W_query_std'),
                          (W_out_std, 'W_out_std'), (b_std, 'b_std'),
                          (W_pos_emb_std, 'W_pos_emb_std')):
    check_nonnegative(value, argument, name)
  if (batch_axis, channel_axis) != (0, -1):
    raise NotImplementedError(
        f'{name}: only batch_axis=0, channel_axis=-1 are supported; transpose '
        'your inputs to (batch, spatial..., channels).')
  if pos_emb_decay_fn is not None and not callable(pos_emb_decay_fn):
    raise ValueError(f'{name}: pos_emb_decay_fn must be callable or None.')
  if not (isinstance(pos_emb_p_norm, (int, float, np.number))
          and np.isfinite(pos_emb_p_norm) and pos_emb_p_norm > 0):
    raise ValueError(f'{name}: pos_emb_p_norm must be a finite number > 0, '
                     f'got {pos_emb_p_norm!r}.')
  if n_chan_pos_emb is not None:
    _positive_int(n_chan_pos_emb, 'n_chan_pos_emb', name)
  linear_scaling = bool(linear_scaling)
  qk_std = W_query_std * W_key_std
  ov_std = W_out_std * W_value_std
  b2 = 0. if b_std is None else b_std**2

  positional = functools.lru_cache(maxsize=8)(
      lambda sizes: _positional_covariance(sizes, pos_emb_p_norm,
                                           pos_emb_decay_fn, name))

  @functools.lru_cache(maxsize=8)
  def embedding_map(sizes):
    """L with L L^T = R: the symmetric square root (robust where R is
    singular, e.g. fast decays; any L with L L^T = R gives the same
    distribution)."""
    eigenvalues, vectors = np.linalg.eigh(positional(sizes))
    return (vectors * np.sqrt(np.maximum(eigenvalues, 0.))) @ vectors.T

  def embedding_channels(n_in: int, error=ValueError) -> int:
    if pos_emb == 'SUM' and n_chan_pos_emb not in (None, n_in):
      raise error(
          f"{name}: pos_emb_type='SUM' adds the embeddings to the inputs, so "
          f'n_chan_pos_emb must be None or the input channel count {n_in}; '
          f"got {n_chan_pos_emb}. Use pos_emb_type='CONCAT' for another "
          'count.')
    return n_in if n_chan_pos_emb is None else n_chan_pos_emb

  def check_shape(shape, error=ValueError):
    if not 3 <= len(shape) <= _MAX_SPATIAL_AXES + 2:
      raise error(
          f'{name} needs inputs (batch, spatial..., channels) with 1 to '
          f'{_MAX_SPATIAL_AXES} spatial axes (positions to attend over); got '
          f'shape {tuple(shape)}. For one token per sample add a spatial '
          'axis of size 1.')

  def init_fn(key, input_shape):
    check_shape(input_shape)
    n_in = input_shape[-1]
    keys_in = values_in = n_in
    key_q, key_k, key_v, key_o, key_b, key_e = jax.random.split(key, 6)
    embeddings = None
    if pos_emb != 'NONE':
      n_pe = embedding_channels(n_in)
      positional(tuple(input_shape[1:-1]))  # a bad decay fails here, early
      embeddings = jax.random.normal(
          key_e, (1,) + tuple(input_shape[1:-1]) + (n_pe,))
      if pos_emb == 'CONCAT':
        keys_in += n_pe
        values_in += n_pe if val_pos_emb else 0
    w_k = jax.random.normal(key_k, (n_heads, keys_in, n_chan_key))
    w_q = None if linear_scaling else jax.random.normal(
        key_q, (n_heads, keys_in, n_chan_key))
    w_v = jax.random.normal(key_v, (n_heads, values_in, n_chan_val))
    w_o = jax.random.normal(key_o, (n_chan_val * n_heads, n_chan_out))
    b = None if b_std is None else jax.random.normal(
        key_b, (1,) * (len(input_shape) - 1) + (n_chan_out,))
    output_shape = tuple(input_shape[:-1]) + (n_chan_out,)
    return output_shape, (w_q, w_k, w_v, w_o, b, embeddings)

  def apply_fn(params, x, mask=None, **kwargs):
    w_q, w_k, w_v, w_o, b, embeddings = params
    check_shape(x.shape)
    n, sizes = x.shape[0], tuple(x.shape[1:-1])
    # Masked positions (mask_constant) send zero values and are no keys.
    x = zero_masked_outputs(x, mask)
    key_mask = None if mask is None else mask.reshape(n, -1)
    keys_in = values_in = x
    if embeddings is not None:
      if pos_emb_decay_fn is not None:
        flat = embeddings.reshape(math.prod(sizes), -1)
        mixed = jnp.asarray(embedding_map(sizes), flat.dtype) @ flat
        embeddings = mixed.reshape(embeddings.shape)
      embeddings = W_pos_emb_std * embeddings
      if pos_emb == 'SUM':
        keys_in = x + embeddings
      else:
        keys_in = jnp.concatenate(
            [x, jnp.broadcast_to(embeddings, x.shape[:-1]
                                 + embeddings.shape[-1:])], axis=-1)
      if val_pos_emb:
        values_in = keys_in
    if keys_in.shape[-1] != w_k.shape[1] or values_in.shape[-1] != (
        w_v.shape[1]):
      raise ValueError(
          f'{name}: input of shape {x.shape} does not fit parameters '
          'initialized for another channel count; call init_fn with the '
          'input shape you apply to.')
    keys_in = keys_in.reshape(n, -1, keys_in.shape[-1])
    values_in = values_in.reshape(n, -1, values_in.shape[-1])
    keys = jnp.einsum('npc,hck->hnpk', keys_in, w_k)
    queries = keys if linear_scaling else jnp.einsum('npc,hck->hnpk',
                                                     keys_in, w_q)
    scale = keys_in.shape[-1] * (n_chan_key if linear_scaling
                                 else math.sqrt(n_chan_key))
    logits = (qk_std / scale) * jnp.einsum('hnpk,hnqk->hnpq', queries, keys)
    weights = attention_weights(logits, mechanism, key_mask)
    values = jnp.einsum('npc,hcv->hnpv', values_in, w_v)
    heads = jnp.einsum('hnpq,hnqv->npvh', weights, values)
    heads = heads.reshape(heads.shape[:2] + (-1,))      # channel v H + h
    out = heads @ w_o * (ov_std / math.sqrt(n_chan_val * n_heads
                                            * values_in.shape[-1]))
    out = out.reshape((n,) + sizes + (n_chan_out,))
    return out if b is None else out + b_std * b

  def kernel_map(k):
    k = single_kernel(k, name)
    check_shape(k.shape1, KernelError)
    if k.spatial.diagonal:
      raise KernelError(
          f'{name} attends between different positions, so it needs the '
          'covariances between all pairs of positions, but the kernel it '
          'received keeps only same-position ones (diagonal_spatial=True). '
          'Call kernel_fn with diagonal_spatial=False (the default).')
    if not linear_scaling and mechanism == 'SOFTMAX':
      raise NotImplementedError(
          f"{name}: linear_scaling=False with attention_mechanism='SOFTMAX' "
          'has Gaussian logits whose softmax couples all key positions; its '
          'infinite-width kernel is a P-dimensional Gaussian integral with no '
          "closed form. Use linear_scaling=True, or 'IDENTITY', 'RELU' or "
          "'ABS'.")
    ndim = k.spatial.ndim
    sizes = tuple(k.shape1[1:-1])
    symmetric = k.cov2 is k.cov1
    flat = lambda a: _flatten_positions(a, ndim)
    # Masked positions (mask_constant) are zeros and no keys: (N, P) masks.
    k_nngp, k_ntk, k_cov1, k_cov2 = features.masked_arrays(k)
    nngp, ntk, cov1 = flat(k_nngp), flat(k_ntk), flat(k_cov1)
    cov2 = cov1 if symmetric else flat(k_cov2)
    key_mask1 = None if k.mask1 is None else k.mask1.reshape(
        k.mask1.shape[0], -1)
    key_mask2 = None if k.mask2 is None else k.mask2.reshape(
        k.mask2.shape[0], -1)

    # Inputs of keys/queries (x~) and of values, as kernels.
    n_in = k.channels
    if pos_emb == 'NONE':
      mix = lambda a: a
    else:
      n_pe = embedding_channels(n_in, KernelError)
      w_in, w_pe = 1., W_pos_emb_std**2
      if pos_emb == 'CONCAT':
        w_in, w_pe = n_in / (n_in + n_pe), w_pe * n_pe / (n_in + n_pe)
      r = jnp.asarray(positional(sizes), nngp.dtype)
      mix = lambda a: w_in * a + w_pe * r.reshape(r.shape + (1,) * (a.ndim - 2))
    nngp_k, ntk_k, cov1_k = mix(nngp), mix(ntk), mix(cov1)
    cov2_k = cov1_k if symmetric else mix(cov2)
    if val_pos_emb:
      nngp_v, ntk_v, cov1_v, cov2_v = nngp_k, ntk_k, cov1_k, cov2_k
    else:
      nngp_v, ntk_v, cov1_v, cov2_v = nngp, ntk, cov1, cov2
    ov2 = ov_std**2

    if linear_scaling:
      # Deterministic logits QK k~_i(p, q) of each sample's own covariance.
      weights = lambda cov, key_mask: attention_weights(
          qk_std * jnp.moveaxis(cov, -1, 0), mechanism, key_mask)
      a1 = weights(cov1_k, key_mask1)
      a2 = a1 if symmetric else weights(cov2_k, key_mask2)
      new_nngp = ov2 * _weighted_by_attention(a1, a2, nngp_v) + b2
      new_ntk = ov2 * _weighted_by_attention(a1, a2, 2 * nngp_v + ntk_v) + b2
      new_cov1 = ov2 * _weighted_by_attention(a1, a1, cov1_v) + b2
      new_cov2 = new_cov1 if symmetric else (
          ov2 * _weighted_by_attention(a2, a2, cov2_v) + b2)
    else:
      qk2 = qk_std**2
      var1, var2 = _diagonal(cov1_k), _diagonal(cov2_k)
      # Key masks positions first, (P, N), broadcast like the variances.
      pf1 = None if key_mask1 is None else key_mask1.T
      pf2 = None if key_mask2 is None else key_mask2.T
      s, t = _gaussian_logit_sums(
          mechanism, qk2, nngp_k, var1[:, :, None], var2[:, None, :], nngp_v,
          (ntk_v, ntk_k), None if pf1 is None else pf1[:, :, None],
          None if pf2 is None else pf2[:, None, :])
      new_nngp, new_ntk = ov2 * s + b2, ov2 * t + b2
      own = lambda cov_k, var, cov_v, pf: ov2 * _gaussian_logit_sums(
          mechanism, qk2, cov_k, var, var, cov_v, None, pf, pf)[0] + b2
      new_cov1 = own(cov1_k, var1, cov1_v, pf1)
      new_cov2 = new_cov1 if symmetric else own(cov2_k, var2, cov2_v, pf2)

    unflat = lambda a: _unflatten_positions(a, sizes)
    new_cov1 = unflat(new_cov1)
    return features.gaussian_kernel(
        unflat(new_nngp), unflat(new_ntk), new_cov1,
        new_cov1 if symmetric else unflat(new_cov2), k,
        shape1=tuple(k.shape1[:-1]) + (n_chan_out,),
        shape2=tuple(k.shape2[:-1]) + (n_chan_out,))

  def input_diagonal(output_diagonal: bool) -> bool:
    del output_diagonal  # attention mixes positions, whatever follows
    return False

  return layer(name, init_fn, apply_fn, kernel_map, input_diagonal)
