"""Finite-width corrections to the infinite-width limit, by Monte Carlo.

Each function builds wide-but-finite networks from a `stax` definition,
measures a quantity over random initializations, and returns it beside the
prediction of theory:

* `kernel_fluctuations`: ||Theta_n - Theta_inf||_F / ||Theta_inf||_F
  against width n. Each entry of the empirical NTK is an average over n
  channels, so its fluctuation is O(n^-1/2) (its mean has an O(1/n) bias:
  Yaida 2020; Hanin & Nica 2020): slope -1/2 on a log-log plot.
* `jacobian_norms`: the input-output Jacobian of a deep net at width n.
  For a deep linear net (W_std = 1) and a critical ReLU net (W_std^2 = 2,
  He) the squared norm G = (|J u|^2 / n) / (|u|^2 / d) of the Jacobian
  applied to a direction u is exactly a product of independent per-layer
  factors (Hanin 2018; Hanin & Nica 2019, "Products of many large random
  matrices and gradients in deep neural networks"):

      linear:  G = prod_l chi2_n / n,
      ReLU:    G = prod_l 2 chi2_{K_l} / n,  K_l ~ Binomial(n, 1/2),

  (the ReLU mask of a unit is independent of the unit's Jacobian entry,
  because flipping the sign of the unit's incoming weights flips the first
  and not the square of the second). So E[G] = 1 but log G is a sum of L
  i.i.d. terms with mean ~ -1/n (linear) or ~ -5/(2n) (ReLU): the typical
  Jacobian norm factor is exp(E log G / 2) ~ exp(-L / (2n)) (linear) and
  exp(-5 L / (4n)) (ReLU), with exact means from digamma functions.
* `ntk_diagonal_spread`: for ReLU nets (He init, no biases) Hanin & Nica
  2020 ("Finite depth and width corrections to the neural tangent kernel",
  Theorem 1) show E[Theta(x, x)^2] / E[Theta(x, x)]^2 ~ exp(5 L / n) (up to
  factors bounded in L / n); the 5 is the per-layer normalized second moment
  E[(2 chi2_K / n)^2] = 1 + 5 / n.
* `kernel_drift`: ||Theta_T - Theta_0||_F / ||Theta_0||_F after T steps of
  gradient descent. In the NTK parameterization it vanishes as n grows
  (the lazy regime): Lee et al. 2019 (Theorem 2.1) bound it by O(n^-1/2);
  for smooth activations it is O(1/n) (Dyer & Gur-Ari 2020, "Asymptotics
  of wide networks from Feynman diagrams"; Huang & Yau 2020), measured
  slope ~ -0.98 for erf. For ReLU the measured slope drifts from ~-0.9
  towards -1/2 at large n: a fraction ~n^-1/2 of units sit within the
  O(n^-1/2) weight change of the kink and flip their activation pattern,
  each changing Theta by O(1/n) (our heuristic, consistent with the bound).

Width scalings come with a fitted log-log slope and its standard error
(`fit_power_law`); every result has a `plot_*` function (matplotlib,
imported only there).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax import _plotting, stax
from ntkjax.empirical import empirical_nngp_fn, empirical_ntk_fn


class WidthScaling(NamedTuple):
  """A Monte Carlo quantity against width, with its fitted power law.

  Attributes:
    widths: (W,) widths.
    values: (W, S) the quantity for each width and seed.
    mean: (W,) mean over seeds.
    stderr: (W,) standard error of the mean.
    slope: fitted d log(mean) / d log(width).
    slope_stderr: its standard error (from the per-width standard errors).
    intercept: fitted log(mean) at width 1.
  """
  widths: np.ndarray
  values: np.ndarray
  mean: np.ndarray
  stderr: np.ndarray
  slope: float
  slope_stderr: float
  intercept: float


class JacobianNorms(NamedTuple):
  """Measured and predicted log squared Jacobian norms, one entry per (L, n).

  Attributes:
    depths, widths: (C,) the configurations.
    log_gain_mean: (C,) mean over seeds of log G (module docstring).
    log_gain_stderr: (C,) its standard error.
    log_gain_exact: (C,) the exact E[log G].
    log_gain_leading: (C,) its leading order, -L / n (linear) or
      -5 L / (2 n) (ReLU).
    factor_measured, factor_exact, factor_leading: exp(half of the above):
      the typical factor by which the Jacobian scales a vector's norm,
      ~ exp(-L / (2n)) for a linear net.
  """
  depths: np.ndarray
  widths: np.ndarray
  log_gain_mean: np.ndarray
  log_gain_stderr: np.ndarray
  log_gain_exact: np.ndarray
  log_gain_leading: np.ndarray
  factor_measured: np.ndarray
  factor_exact: np.ndarray
  factor_leading: np.ndarray


class NtkSpread(NamedTuple):
  """Spread of the NTK diagonal of ReLU nets, one entry per (L, n).

  Attributes:
    depths, widths: (C,) the configurations.
    ratio: (C,) measured E[Theta(x,x)^2] / E[Theta(x,x)]^2.
    ratio_stderr: (C,) its standard error (delta method).
    predicted: (C,) exp(5 L / n) (Hanin & Nica 2020).
    layer_product: (C,) (1 + 5 / n)^L, the exact normalized second moment
      of one path's product of layer factors, whose limit is exp(5 L / n).
    mean: (C,) measured E[Theta(x, x)].
    mean_stderr: (C,) its standard error.
    infinite_width: (C,) Theta_inf(x, x) from `kernel_fn`.
  """
  depths: np.ndarray
  widths: np.ndarray
  ratio: np.ndarray
  ratio_stderr: np.ndarray
  predicted: np.ndarray
  layer_product: np.ndarray
  mean: np.ndarray
  mean_stderr: np.ndarray
  infinite_width: np.ndarray


# ----------------------------------------------------------------------------
# Fitting.


def fit_power_law(widths, values):
  """Least-squares slope of log(mean) against log(width).

  Weighted by the inverse variance of log(mean) at each width, estimated
  as (stderr / mean)^2 (delta method) from the seeds, so the slope's
  standard error reflects the Monte Carlo noise.

  Args:
    widths: (W,) widths (>= 2 distinct).
    values: (W, S) positive values, S >= 2 seeds per width.

  Returns:
    (slope, slope_stderr, intercept, mean, stderr).
  """
  widths = np.asarray(widths, float)
  values = np.asarray(values, float)
  if values.ndim != 2 or values.shape[0] != len(widths) or values.shape[1] < 2:
    raise ValueError(f'values must be (len(widths), seeds >= 2); got '
                     f'{values.shape} for {len(widths)} widths.')
  mean = values.mean(1)
  stderr = values.std(1, ddof=1) / np.sqrt(values.shape[1])
  x, y = np.log(widths), np.log(mean)
  weights = 1. / np.maximum((stderr / mean)**2, 1e-300)
  x_bar = np.sum(weights * x) / np.sum(weights)
  y_bar = np.sum(weights * y) / np.sum(weights)
  sxx = np.sum(weights * (x - x_bar)**2)
  slope = np.sum(weights * (x - x_bar) * (y - y_bar)) / sxx
  return (float(slope), float(1. / np.sqrt(sxx)), float(y_bar - slope * x_bar),
          mean, stderr)


def _width_scaling(widths, values) -> WidthScaling:
  slope, slope_stderr, intercept, mean, stderr = fit_power_law(widths, values)
  return WidthScaling(np.asarray(widths), np.asarray(values), mean, stderr,
                      slope, slope_stderr, intercept)


def _check_sizes(widths, n_seeds):
  widths = [int(w) for w in widths]
  if len(widths) < 2 or min(widths) < 1:
    raise ValueError(f'widths={widths!r}: need at least two positive widths.')
  if not isinstance(n_seeds, (int, np.integer)) or n_seeds < 2:
    raise ValueError(f'n_seeds={n_seeds!r} must be an int >= 2.')
  return widths


def _relative_frobenius(a, b):
  return jnp.linalg.norm(a - b) / jnp.linalg.norm(b)


def _over_seeds(one_seed: Callable, keys) -> np.ndarray:
  """`one_seed(key)` for each key, compiled once, run one seed at a time
  (memory of one network, not of all seeds)."""
  return np.asarray(jax.jit(lambda k: jax.lax.map(one_seed, k))(keys))


# ----------------------------------------------------------------------------
# Kernel fluctuations and drift.


def kernel_fluctuations(network_fn: Callable[[int], stax.Layer], x,
                        widths: Sequence[int], n_seeds: int, key,
                        get: str = 'ntk') -> WidthScaling:
  """||K_n - K_inf||_F / ||K_inf||_F for networks of each width.

  K_n is the empirical kernel of one initialization (`empirical_ntk_fn`,
  or `empirical_nngp_fn` averaged over the output channels), K_inf the
  `kernel_fn` of the same definition. Theory: slope -1/2 in the width (a
  channel average of n terms), with an O(1/n) bias that steepens it
  slightly at small n.

  Args:
    network_fn: width -> Layer. For get='nngp' its output should be the
      wide layer itself (the channel average then converges); for 'ntk' any
      output width works (outputs are averaged).
    x: (N, d) inputs.
    widths: widths to measure (e.g. 64 .. 1024).
    n_seeds: initializations per width.
    key: PRNG key.
    get: 'ntk' or 'nngp'.

  Returns:
    A `WidthScaling` of the relative errors.
  """
  widths = _check_sizes(widths, n_seeds)
  if get not in ('ntk', 'nngp'):
    raise ValueError(f"get={get!r}: choose 'ntk' or 'nngp'.")
  x = jnp.asarray(x)
  exact = network_fn(widths[0]).kernel_fn(x, None, get)
  values = []
  for width in widths:
    init_fn, apply_fn, _ = network_fn(width)
    if get == 'ntk':
      kernel = empirical_ntk_fn(apply_fn, vmap_axes=0)
    else:
      kernel = empirical_nngp_fn(apply_fn)

    def one_seed(seed_key, init_fn=init_fn, kernel=kernel):
      _, params = init_fn(seed_key, x.shape)
      return _relative_frobenius(kernel(x, None, params), exact)

    keys = jax.random.split(jax.random.fold_in(key, width), n_seeds)
    values.append(_over_seeds(one_seed, keys))
  return _width_scaling(widths, np.stack(values))


def kernel_drift(network_fn: Callable[[int], stax.Layer], x, y,
                 widths: Sequence[int], n_seeds: int, key,
                 steps: int = 100,
                 learning_rate: Optional[float] = None) -> WidthScaling:
  """||Theta_T - Theta_0||_F / ||Theta_0||_F after T steps of gradient descent.

  Full-batch gradient descent on |f(x) - y|^2 / 2 from each initialization;
  Theta is the empirical NTK on x before and after. Theory: O(1/n) for
  smooth activations, O(n^-1/2) at most (module docstring): wide networks
  train lazily.

  Args:
    network_fn: width -> Layer with outputs shaped like y.
    x: (N, d) training inputs.
    y: (N, k) targets.
    widths: widths to measure.
    n_seeds: initializations per width.
    key: PRNG key.
    steps: gradient-descent steps T.
    learning_rate: default 1 / lambda_max of the infinite-width NTK on x,
      half the largest stable rate (`spectrum.Spectrum.max_learning_rate`;
      the NTK of k outputs is Theta (x) I_k, with the same eigenvalues).

  Returns:
    A `WidthScaling` of the relative drifts.
  """
  widths = _check_sizes(widths, n_seeds)
  x, y = jnp.asarray(x), jnp.asarray(y)
  if learning_rate is None:
    theta = network_fn(widths[0]).kernel_fn(x, None, 'ntk')
    learning_rate = 1. / float(jnp.linalg.eigvalsh(theta)[-1])
  if not learning_rate > 0:
    raise ValueError(f'learning_rate={learning_rate!r} must be > 0.')
  values = []
  for width in widths:
    init_fn, apply_fn, _ = network_fn(width)
    ntk_fn = empirical_ntk_fn(apply_fn, vmap_axes=0)
    loss = lambda p, apply_fn=apply_fn: 0.5 * jnp.sum((apply_fn(p, x) - y)**2)

    def one_seed(seed_key, init_fn=init_fn, ntk_fn=ntk_fn, loss=loss):
      _, params = init_fn(seed_key, x.shape)
      before = ntk_fn(x, None, params)
      step = lambda _, p: jax.tree.map(lambda a, g: a - learning_rate * g, p,
                                       jax.grad(loss)(p))
      params = jax.lax.fori_loop(0, steps, step, params)
      return _relative_frobenius(ntk_fn(x, None, params), before)

    keys = jax.random.split(jax.random.fold_in(key, width), n_seeds)
    values.append(_over_seeds(one_seed, keys))
  return _width_scaling(widths, np.stack(values))


# ----------------------------------------------------------------------------
# Jacobian norms of deep networks.


def _config_keys(key, depth: int, width: int, n_seeds: int):
  return jax.random.split(jax.random.fold_in(key, 1000 * depth + width),
                          n_seeds)


def _binomial_half_pmf(n: int) -> np.ndarray:
  k = np.arange(n + 1)
  log_pmf = np.array([math.lgamma(n + 1) - math.lgamma(i + 1)
                      - math.lgamma(n - i + 1) for i in k]) - n * math.log(2)
  return np.exp(log_pmf)


def _digamma(x):
  """psi(x) for x > 0 in float64 numpy (whatever JAX's precision setting):
  the recurrence psi(x) = psi(x + 12) - sum_{k<12} 1 / (x + k), then the
  asymptotic series at x + 12 > 12 to y^-10 (next term < 2e-15)."""
  x = np.asarray(x, np.float64)
  shift = sum(1. / (x + k) for k in range(12))
  y = x + 12.
  inv2 = 1. / (y * y)
  series = inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (
      1 / 252 - inv2 * (1 / 240 - inv2 / 132))))
  return np.log(y) - 0.5 / y - series - shift


def exact_log_gain(depth: int, width: int, activation: str) -> float:
  """E[log G] for the product laws in the module docstring.

  linear: L (psi(n/2) + log(2/n))   (E log chi2_n = psi(n/2) + log 2);
  relu:   L E_K[psi(K/2) + log 2 + log(2/n)], K ~ Binomial(n, 1/2) given
          K >= 1 (K = 0, probability 2^-n, makes G = 0).
  """
  if activation not in _ACTIVATIONS:
    raise ValueError(f"activation={activation!r}: choose 'linear' or 'relu'.")
  n = int(width)
  if activation == 'linear':
    return float(depth * (_digamma(n / 2) + math.log(2. / n)))
  pmf = _binomial_half_pmf(n)[1:]
  k = np.arange(1, n + 1)
  per_layer = np.sum(pmf * (_digamma(k / 2) + math.log(2) + math.log(2. / n)))
  return float(depth * per_layer / np.sum(pmf))


# Critical weight scales: chi1 = W_std^2 E[phi'^2] = 1.
_ACTIVATIONS = {'linear': (1., stax.Identity),
                'relu': (math.sqrt(2.), stax.Relu)}


def _deep_chain(block: stax.Layer, depth: int, input_dim: int, width: int):
  """`serial(*[block] * depth)` with its hidden blocks under `lax.scan`.

  The same function and the same initialization distribution as the
  unrolled `stax.serial` (the block's own init_fn and apply_fn), but
  compiled once per block rather than once per layer, so compile time does
  not grow with depth.

  Returns:
    init(key) -> params, apply(params, x) -> features.
  """
  def init(key):
    first_key, rest_key = jax.random.split(key)
    _, first = block.init_fn(first_key, (1, input_dim))
    rest = jax.vmap(lambda k: block.init_fn(k, (1, width))[1])(
        jax.random.split(rest_key, depth - 1))
    return first, rest

  def apply(params, x):
    first, rest = params
    h = block.apply_fn(first, x)
    h, _ = jax.lax.scan(lambda h, p: (block.apply_fn(p, h), None), h, rest)
    return h
  return init, apply


def jacobian_norms(depths: Sequence[int], widths: Sequence[int], key,
                   activation: str = 'linear', n_seeds: int = 200,
                   input_dim: Optional[int] = None) -> JacobianNorms:
  """log of the squared Jacobian norm gain G of deep nets, measured vs exact.

  The network is `serial(*[Dense(n, W_std), act] * L)` without biases
  (its hidden blocks run under `lax.scan`, see `_deep_chain`),
  with W_std = 1 (linear) or sqrt(2) (ReLU, He): both critical. For a
  random input x and direction u, G = (|J u|^2 / n) / (|u|^2 / d), with
  J u from `jax.jvp` of the finite network's `apply_fn`.

  Args:
    depths: the configurations' depths (zipped with `widths`, same length).
    widths: the configurations' widths.
    key: PRNG key.
    activation: 'linear' or 'relu'.
    n_seeds: initializations per configuration.
    input_dim: d (default: the width).

  Returns:
    A `JacobianNorms`.
  """
  if activation not in _ACTIVATIONS:
    raise ValueError(f"activation={activation!r}: choose 'linear' or 'relu'.")
  depths, widths = [int(d) for d in depths], [int(w) for w in widths]
  if len(depths) != len(widths) or not depths:
    raise ValueError('depths and widths must be non-empty and equally long.')
  if not isinstance(n_seeds, (int, np.integer)) or n_seeds < 2:
    raise ValueError(f'n_seeds={n_seeds!r} must be an int >= 2.')
  w_std, act = _ACTIVATIONS[activation]
  means, errors = [], []
  for depth, width in zip(depths, widths):
    d = input_dim or width
    init, apply_fn = _deep_chain(stax.serial(stax.Dense(width, w_std), act()),
                                 depth, d, width)

    def one_seed(seed_key, init=init, apply_fn=apply_fn, d=d, width=width):
      key_init, key_x, key_u = jax.random.split(seed_key, 3)
      params = init(key_init)
      x0 = jax.random.normal(key_x, (1, d))
      u = jax.random.normal(key_u, (1, d))
      _, ju = jax.jvp(lambda z: apply_fn(params, z), (x0,), (u,))
      return jnp.log(jnp.sum(ju**2) / width) - jnp.log(jnp.sum(u**2) / d)

    logs = _over_seeds(one_seed, _config_keys(key, depth, width, n_seeds))
    means.append(logs.mean())
    errors.append(logs.std(ddof=1) / math.sqrt(n_seeds))
  depths_a, widths_a = np.asarray(depths), np.asarray(widths)
  exact = np.array([exact_log_gain(L, n, activation)
                    for L, n in zip(depths, widths)])
  per_layer = 1. if activation == 'linear' else 2.5
  leading = -per_layer * depths_a / widths_a
  means, errors = np.asarray(means), np.asarray(errors)
  return JacobianNorms(depths_a, widths_a, means, errors, exact, leading,
                       *(np.exp(a / 2) for a in (means, exact, leading)))


# ----------------------------------------------------------------------------
# Spread of the ReLU NTK diagonal.


def ntk_diagonal_spread(depths: Sequence[int], widths: Sequence[int], key,
                        n_seeds: int = 400,
                        input_dim: Optional[int] = None) -> NtkSpread:
  """E[Theta(x,x)^2] / E[Theta(x,x)]^2 of ReLU nets against exp(5 L / n).

  Network: `serial(*[Dense(n, sqrt(2)), Relu()] * L, Dense(1))`, no biases
  (Hanin & Nica's setting), NTK parameterization; Theta(x, x) =
  |d f(x) / d params|^2 for one input x with |x|^2 = d.

  Args:
    depths: the configurations' depths (zipped with `widths`).
    widths: the configurations' widths.
    key: PRNG key.
    n_seeds: initializations per configuration. The ratio's estimator is
      heavy-tailed (log Theta has variance ~ 5 L / n), so keep 5 L / n
      below ~2 or raise n_seeds.
    input_dim: d (default: the width).

  Returns:
    An `NtkSpread`.
  """
  depths, widths = [int(d) for d in depths], [int(w) for w in widths]
  if len(depths) != len(widths) or not depths:
    raise ValueError('depths and widths must be non-empty and equally long.')
  if not isinstance(n_seeds, (int, np.integer)) or n_seeds < 2:
    raise ValueError(f'n_seeds={n_seeds!r} must be an int >= 2.')
  rows = []
  for depth, width in zip(depths, widths):
    d = input_dim or width
    block = stax.serial(stax.Dense(width, math.sqrt(2.)), stax.Relu())
    readout = stax.Dense(1)
    init, hidden = _deep_chain(block, depth, d, width)
    kernel_fn = stax.serial(*[block] * depth, readout).kernel_fn
    x0 = jax.random.normal(jax.random.fold_in(key, 2**31 - 1), (1, d))
    x0 = x0 / jnp.linalg.norm(x0) * math.sqrt(d)

    def one_seed(seed_key, init=init, hidden=hidden, x0=x0, width=width):
      key_hidden, key_out = jax.random.split(seed_key)
      params = (init(key_hidden), readout.init_fn(key_out, (1, width))[1])
      f = lambda p: readout.apply_fn(p[1], hidden(p[0], x0))[0, 0]
      grads = jax.grad(f)(params)
      return sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))

    theta = _over_seeds(one_seed, _config_keys(key, depth, width, n_seeds))
    m1, m2 = theta.mean(), (theta**2).mean()
    ratio = m2 / m1**2
    # Delta method: gradient of m2 / m1^2 w.r.t. (m1, m2), sample covariance.
    cov = np.cov(np.stack([theta, theta**2])) / n_seeds
    grad = np.array([-2 * m2 / m1**3, 1 / m1**2])
    rows.append((ratio, math.sqrt(grad @ cov @ grad), m1,
                 theta.std(ddof=1) / math.sqrt(n_seeds),
                 float(kernel_fn(x0, None, 'ntk')[0, 0])))
  depths_a, widths_a = np.asarray(depths), np.asarray(widths)
  ratio, ratio_err, mean, mean_err, infinite = (np.asarray(c)
                                                 for c in zip(*rows))
  return NtkSpread(depths_a, widths_a, ratio, ratio_err,
                   np.exp(5. * depths_a / widths_a),
                   (1. + 5. / widths_a)**depths_a, mean, mean_err, infinite)


# ----------------------------------------------------------------------------
# Plots.



def plot_width_scaling(result: WidthScaling, ax=None,
                       reference_slope: float = -0.5, label: str = ''):
  """Log-log plot of a `WidthScaling` with its fit and a reference slope.

  Args:
    result: from `kernel_fluctuations` or `kernel_drift`.
    ax: a matplotlib Axes (default: a new figure's).
    reference_slope: slope of the dashed theory line (through the first mean).
    label: legend label of the measurements.

  Returns:
    The Axes.
  """
  ax = _plotting.axes(ax)
  w = np.asarray(result.widths, float)
  ax.errorbar(w, result.mean, yerr=2 * result.stderr, fmt='o', capsize=3,
              label=label or 'Monte Carlo (+-2 s.e.)')
  ax.plot(w, np.exp(result.intercept) * w**result.slope, '-',
          label=f'fit: slope {result.slope:.3f} +- {result.slope_stderr:.3f}')
  ax.plot(w, result.mean[0] * (w / w[0])**reference_slope, 'k--',
          label=f'theory: slope {reference_slope:g}')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('width n')
  ax.legend(fontsize='small')
  return ax


def plot_jacobian_norms(result: JacobianNorms, ax=None):
  """Measured typical Jacobian factor exp(E log G / 2) against L / n.

  Args:
    result: from `jacobian_norms`.
    ax: a matplotlib Axes.

  Returns:
    The Axes.
  """
  ax = _plotting.axes(ax)
  ratio = result.depths / result.widths
  order = np.argsort(ratio)
  ax.errorbar(ratio, result.factor_measured,
              yerr=result.factor_measured * result.log_gain_stderr,
              fmt='o', capsize=3, label='measured (+-2 s.e.)')
  ax.plot(ratio[order], result.factor_exact[order], 'x', label='exact')
  ax.plot(ratio[order], result.factor_leading[order], 'k--',
          label='leading order exp(-c L / n)')
  ax.set_yscale('log')
  ax.set_xlabel('L / n')
  ax.set_ylabel('typical |J u| / |u| factor')
  ax.legend(fontsize='small')
  return ax


def plot_ntk_spread(result: NtkSpread, ax=None):
  """Measured E[Theta^2] / E[Theta]^2 against L / n, with exp(5 L / n).

  Args:
    result: from `ntk_diagonal_spread`.
    ax: a matplotlib Axes.

  Returns:
    The Axes.
  """
  ax = _plotting.axes(ax)
  ratio = result.depths / result.widths
  order = np.argsort(ratio)
  ax.errorbar(ratio, result.ratio, yerr=2 * result.ratio_stderr, fmt='o',
              capsize=3, label='measured (+-2 s.e.)')
  ax.plot(ratio[order], result.predicted[order], 'k--',
          label='exp(5 L / n) (Hanin & Nica)')
  ax.set_yscale('log')
  ax.set_xlabel('L / n')
  ax.set_ylabel('E[Theta(x,x)^2] / E[Theta(x,x)]^2')
  ax.legend(fontsize='small')
  return ax
