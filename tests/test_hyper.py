"""ntkjax.hyper: the GP evidence against its dense formula and central
differences, and fitted hyperparameters against the ones that generated the
data (within the Fisher-information error, which shrinks with N)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax import hyper, stax

from conftest import backend_compiles


def builder(W_std, b_std, activation='erf'):
  """A one-hidden-layer network; `activation` is a discrete choice."""
  nonlinearity = stax.Erf() if activation == 'erf' else stax.Relu()
  return stax.serial(stax.Dense(64, W_std, b_std), nonlinearity,
                     stax.Dense(1, W_std, b_std))[2]


def dense_evidence(k, y, noise):
  """log N(Y; 0, K + noise I) column by column, with NumPy's LU solve and
  slogdet (independent of hyper's Cholesky path)."""
  k, y = np.asarray(k, np.float64), np.asarray(y, np.float64).reshape(
      len(k), -1)
  a = k + noise * np.eye(len(k))
  sign, logdet = np.linalg.slogdet(a)
  assert sign > 0
  n, c = y.shape
  return (-0.5 * np.sum(y * np.linalg.solve(a, y)) - 0.5 * c * logdet
          - 0.5 * n * c * math.log(2 * math.pi))


def sample_targets(kernel, noise, columns, seed):
  """Y ~ N(0, K + noise I), `columns` independent draws."""
  a = np.asarray(kernel) + noise * np.eye(len(kernel))
  z = np.random.default_rng(seed).standard_normal((len(kernel), columns))
  return np.linalg.cholesky(a) @ z


def inputs(n, seed=0, d=3):
  return np.random.default_rng(seed).standard_normal((n, d)) / math.sqrt(d)


# ----------------------------------------------------------------------------
# The evidence.


@pytest.mark.parametrize('absolute', [False, True])
def test_evidence_equals_the_dense_formula(absolute):
  x = inputs(30, seed=1)
  k = builder(1.2, 0.3)(x, None, get='nngp')
  y = sample_targets(k, 0.1, 3, seed=2)
  diag_reg = 0.05
  noise = diag_reg if absolute else diag_reg * np.trace(k) / len(k)
  value = hyper.log_marginal_likelihood(k, y, diag_reg, absolute)
  np.testing.assert_allclose(value, dense_evidence(k, y, noise), rtol=1e-12)
  # One output given as (N,) is the same as (N, 1).
  np.testing.assert_allclose(
      hyper.log_marginal_likelihood(k, y[:, 0], diag_reg, absolute),
      dense_evidence(k, y[:, :1], noise), rtol=1e-12)


def test_ntk_evidence_is_the_ntk_gp_evidence():
  x = inputs(20, seed=3)
  kernels = builder(1.1, 0.2)(x, None, get=('nngp', 'ntk'))
  y = sample_targets(kernels.ntk, 0.1, 2, seed=4)
  np.testing.assert_allclose(
      hyper.log_marginal_likelihood(kernels, y, 0.01, get='ntk'),
      dense_evidence(kernels.ntk, y, 0.01 * np.trace(kernels.ntk) / 20),
      rtol=1e-12)
  np.testing.assert_allclose(
      hyper.log_marginal_likelihood(kernels, y, 0.01),
      dense_evidence(kernels.nngp, y, 0.01 * np.trace(kernels.nngp) / 20),
      rtol=1e-12)


def test_gradient_equals_central_differences():
  x = inputs(25, seed=5)
  y = sample_targets(builder(1.3, 0.4)(x, None, get='nngp'), 0.05, 2, seed=6)

  def evidence(theta):
    w, b, noise = theta
    return hyper.log_marginal_likelihood(
        builder(w, b)(x, None, get='nngp'), y, noise, True)
  theta = jnp.array([1.1, 0.3, 0.08])
  grad = jax.grad(evidence)(theta)
  h = 1e-5
  for i in range(3):
    e = jnp.zeros(3).at[i].set(h)
    central = (evidence(theta + e) - evidence(theta - e)) / (2 * h)
    # Central differences err by O(h^2 f''') ~ 1e-9 relative here.
    np.testing.assert_allclose(grad[i], central, rtol=1e-7)
  # Jitted, the same value and gradient.
  np.testing.assert_allclose(jax.jit(jax.grad(evidence))(theta), grad,
                             rtol=1e-12)


def test_jitter_is_added_only_when_the_factorization_fails():
  x = inputs(12, seed=7)
  x = np.concatenate([x, x[:3]])          # duplicated inputs: singular K
  k = np.asarray(builder(1.0, 0.1)(x, None, get='nngp'))
  # Targets in K's range keep y^T (K + j I)^{-1} y well conditioned, so the
  # two computations agree to rounding; log det(K + j I) carries log j for
  # each of the 3 null directions, which tells the rungs apart.
  y = k @ np.random.default_rng(8).standard_normal((15, 1))
  value = float(hyper.log_marginal_likelihood(k, y))
  assert np.isfinite(value)
  mean_diag = np.trace(k) / len(k)
  candidates = [dense_evidence(k, y, j * mean_diag)
                for j in hyper._JITTERS[1:]]
  # The value is the evidence of K + j I for one rung j of the ladder (rungs
  # differ by 3 log(100) / 2 ~ 7 here). Tolerance: at j = 1e-12 rounding of
  # K (~1e-16 relative) moves the null eigenvalues by ~1e-4 relative, so
  # log det by ~1e-4.
  assert any(abs(value - c) < 1e-3 for c in candidates), (value, candidates)
  # A regular kernel gets no jitter: exactly the formula (test above).


def test_evidence_bad_input_raises():
  k = np.eye(4)
  with pytest.raises(ValueError, match='square'):
    hyper.log_marginal_likelihood(np.ones((4, 3)), np.ones(4))
  with pytest.raises(ValueError, match='does not match'):
    hyper.log_marginal_likelihood(k, np.ones(5))
  with pytest.raises(ValueError, match='diag_reg'):
    hyper.log_marginal_likelihood(k, np.ones(4), diag_reg=-1.)
  with pytest.raises(ValueError, match="get must be 'nngp'"):
    hyper.log_marginal_likelihood(k, np.ones(4), get='cov1')
  nan_kernel = np.eye(4)
  nan_kernel[0, 0] = np.nan
  with pytest.raises(ValueError, match='k_train_train has NaN'):
    hyper.log_marginal_likelihood(nan_kernel, np.ones(4))
  with pytest.raises(ValueError, match='positive semidefinite'):
    hyper.log_marginal_likelihood(-np.eye(4), np.ones(4))


# ----------------------------------------------------------------------------
# Fitting recovers the generating hyperparameters.


TRUE = {'W_std': 1.3, 'b_std': 0.4, 'diag_reg': 0.05}


def fisher_std(x, columns):
  """Asymptotic standard deviations of the maximum-evidence estimates of
  (log W_std, log b_std, log noise): sqrt(diag(I^{-1})), with the Fisher
  information of C Gaussian columns I_ij = C/2 tr(A^-1 dA_i A^-1 dA_j)
  (Rasmussen & Williams 2006, eq. 5.9's expectation)."""
  def a_of(log_theta):
    w, b, noise = jnp.exp(log_theta)
    k = builder(w, b)(x, None, get='nngp')
    return k + noise * jnp.eye(len(x))
  log_theta = jnp.log(jnp.array([TRUE['W_std'], TRUE['b_std'],
                                 TRUE['diag_reg']]))
  a = a_of(log_theta)
  # Jitted: run op by op, the forward-mode kernel took ~10 s per call.
  da = jax.jit(jax.jacfwd(a_of))(log_theta)         # (N, N, 3)
  solved = [jnp.linalg.solve(a, da[..., i]) for i in range(3)]
  info = np.array([[columns / 2 * jnp.trace(solved[i] @ solved[j])
                    for j in range(3)] for i in range(3)])
  return np.sqrt(np.diag(np.linalg.inv(info)))


def test_fit_recovers_the_generating_hyperparameters():
  columns, errors, stds = 6, [], []
  for n in (40, 160):
    x = inputs(n, seed=n)
    k = builder(TRUE['W_std'], TRUE['b_std'])(x, None, get='nngp')
    y = sample_targets(k, TRUE['diag_reg'], columns, seed=n + 1)
    result = hyper.fit(builder, x, y, init={'W_std': 1.0, 'b_std': 0.1},
                       diag_reg=0.2, diag_reg_absolute_scale=True,
                       restarts=1)
    fitted = result.hyperparameters
    error = np.abs([math.log(fitted[name] / TRUE[name])
                    for name in ('W_std', 'b_std', 'diag_reg')])
    std = fisher_std(x, columns)
    errors.append(error)
    stds.append(std)
    assert np.all(error < 4 * std), (n, fitted, error, std)
    # The optimum is a stationary point of the evidence: the start was worse.
    start = hyper.log_marginal_likelihood(
        builder(1.0, 0.1)(x, None, get='nngp'), y, 0.2, True)
    assert result.log_marginal_likelihood > start
    np.testing.assert_allclose(
        result.log_marginal_likelihood,
        hyper.log_marginal_likelihood(result.kernel_fn(x, None, get='nngp'),
                                      y, fitted['diag_reg'], True),
        rtol=1e-10)
  # The expected error shrinks as N grows (about 1/sqrt(N)).
  assert np.all(stds[1] < 0.75 * stds[0]), stds


def test_choices_pick_the_generating_activation():
  x = inputs(80, seed=11)
  k = builder(1.3, 0.4, activation='relu')(x, None, get='nngp')
  y = sample_targets(k, 0.01, 4, seed=12)
  result = hyper.fit(builder, x, y, init={'W_std': 1.0, 'b_std': 0.2},
                     diag_reg=0.05, diag_reg_absolute_scale=True,
                     choices={'activation': ['erf', 'relu']}, restarts=1)
  assert result.choice == {'activation': 'relu'}
  by_choice = {r['choice']['activation']: r['log_marginal_likelihood']
               for r in result.runs}
  assert by_choice['relu'] > by_choice['erf']
  assert result.log_marginal_likelihood == by_choice['relu']
  assert len(result.runs) == 2 and all(len(r['history']) for r in result.runs)


def test_fixed_bounds_and_output_scale():
  x = inputs(30, seed=13)
  y = sample_targets(builder(1.3, 0.4)(x, None, get='nngp'), 0.5, 2, seed=14)
  # The noise held fixed stays; a bound holds the fitted W_std below 1.05.
  result = hyper.fit(builder, x, y, init={'W_std': 1.0, 'b_std': 0.4},
                     diag_reg=0.3, fixed=('diag_reg', 'b_std'),
                     bounds={'W_std': (0.5, 1.05)}, restarts=2)
  assert result.hyperparameters['diag_reg'] == 0.3
  assert result.hyperparameters['b_std'] == 0.4
  assert 0.5 < result.hyperparameters['W_std'] < 1.05
  assert len(result.runs) == 2
  # The output scale multiplies the kernel by its square.
  result = hyper.fit(lambda b_std: builder(1.0, b_std), x, y,
                     init={'b_std': 0.4, 'output_scale': 1.0}, restarts=1)
  s = result.hyperparameters['output_scale']
  assert s != 1.0
  np.testing.assert_allclose(
      result.kernel_fn(x, None, get='nngp'),
      s ** 2 * builder(1.0, result.hyperparameters['b_std'])(
          x, None, get='nngp'), rtol=1e-12)
  with pytest.raises(ValueError, match="get='nngp'"):
    result.kernel_fn(x, None, get=None)


# ----------------------------------------------------------------------------
# Bad input to fit.


def test_fit_bad_builder_raises():
  x, y = inputs(10), np.ones(10)
  with pytest.raises(TypeError, match=r"does not take \['depth'\]"):
    hyper.fit(lambda W_std: builder(W_std, 0.1), x, y,
              init={'W_std': 1.0}, choices={'depth': [1, 2]})
  with pytest.raises(TypeError, match=r"requires \['b_std'\]"):
    hyper.fit(builder, x, y, init={'W_std': 1.0})
  with pytest.raises(TypeError, match='must return a kernel_fn'):
    hyper.fit(lambda W_std: 3.0, x, y, init={'W_std': 1.0})
  with pytest.raises(TypeError, match='builder must be a function'):
    hyper.fit(None, x, y, init={'W_std': 1.0})


def test_fit_nan_gradient_names_the_hyperparameter():
  x, y = inputs(10), np.linspace(-1, 1, 10)

  @jax.custom_jvp
  def nan_derivative(w):        # the identity, with a NaN derivative
    return w
  nan_derivative.defjvp(lambda w, t: (w[0], t[0] * jnp.nan))
  broken = lambda W_std, b_std: builder(nan_derivative(W_std), b_std)
  with pytest.raises(ValueError, match=r"gradient in \['W_std'\] is NaN"):
    hyper.fit(broken, x, y, init={'W_std': 1.0, 'b_std': 0.1})


@pytest.mark.parametrize('x, y, match', [
    (np.full((5, 2), np.nan), np.ones(5), 'x_train has NaN'),
    (np.ones((5, 2)), np.ones(4), 'does not match'),
    (np.ones((1, 2)), np.ones(1), 'at least 2 samples'),
    (np.ones((5, 2)), np.zeros(5), 'all zeros'),
])
def test_fit_bad_data_raises(x, y, match):
  with pytest.raises(ValueError, match=match):
    hyper.fit(builder, x, y, init={'W_std': 1.0, 'b_std': 0.1})


@pytest.mark.parametrize('kwargs, match', [
    ({'init': {'W_std': 0.0, 'b_std': 0.1}}, 'must start finite and > 0'),
    ({'init': {'W_std': 1.0, 'b_std': 0.1, 'diag_reg': 1.}},
     'diag_reg=...'),
    ({'init': {'W_std': 1.0, 'b_std': 0.1}, 'fixed': ('depth',)},
     'fixed names'),
    ({'init': {'W_std': 1.0, 'b_std': 0.1}, 'bounds': {'W_std': (2., 3.)}},
     'outside its bounds'),
    ({'init': {'W_std': 1.0, 'b_std': 0.1}, 'restarts': 0}, 'restarts'),
    ({'init': {'W_std': 1.0, 'b_std': 0.1}, 'get': 'cov1'}, 'get must'),
    ({'init': {'W_std': 1.0, 'b_std': 0.1}, 'choices': {'activation': 'erf'}},
     'non-empty list'),
    ({'init': {'W_std': 1.0, 'b_std': 0.1},
      'choices': {'W_std': [1.0, 2.0]}}, 'both init and choices'),
])
def test_fit_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    hyper.fit(builder, inputs(6), np.ones(6), **kwargs)


def test_per_layer_hyperparameters_as_arrays():
  """An array-valued hyperparameter (one W_std per layer) is fitted as an
  array, and the shared-value fit is its special case: the per-layer
  optimum's evidence is at least the shared one's."""
  x = inputs(40, seed=15)
  per_layer = lambda W_std, b_std: stax.serial(
      stax.Dense(64, W_std[0], b_std), stax.Erf(),
      stax.Dense(1, W_std[1], b_std))[2]
  k = per_layer(np.array([0.8, 2.0]), 0.3)(x, None, get='nngp')
  y = sample_targets(k, 0.02, 4, seed=16)
  result = hyper.fit(per_layer, x, y,
                     init={'W_std': np.array([1.2, 1.2]), 'b_std': 0.2},
                     diag_reg=0.05, diag_reg_absolute_scale=True, restarts=1)
  w = result.hyperparameters['W_std']
  assert isinstance(w, np.ndarray) and w.shape == (2,)
  shared = hyper.fit(builder, x, y, init={'W_std': 1.2, 'b_std': 0.2},
                     diag_reg=0.05, diag_reg_absolute_scale=True, restarts=1)
  assert result.log_marginal_likelihood >= shared.log_marginal_likelihood - 1e-6
  np.testing.assert_allclose(
      result.log_marginal_likelihood,
      hyper.log_marginal_likelihood(
          per_layer(w, result.hyperparameters['b_std'])(x, None, get='nngp'),
          y, result.hyperparameters['diag_reg'], True), rtol=1e-10)


def test_fit_compiles_its_step_once():
  """L-BFGS's first step and the later ones have the same argument types,
  so a fit compiles as much in 5 steps as in 1 (optax.lbfgs's initial
  state and Python-float starts are weakly typed, its updated state is
  not: the step compiled twice, 2.5 s each for this network, before
  `hyper._strong`). Fresh builders, so nothing comes from earlier fits."""
  x = inputs(20, seed=21)
  y = sample_targets(builder(1.2, 0.3)(x, None, get='nngp'), 0.1, 2, seed=22)
  with backend_compiles() as compiles:
    counts = []
    # The first of the three warms the eager helpers up (shared by all).
    for steps in (2, 1, 5):
      fresh = lambda W_std, b_std: builder(W_std, b_std)
      compiles.clear()
      result = hyper.fit(fresh, x, y, init={'W_std': 1.0, 'b_std': 0.1},
                         restarts=1, steps=steps)
      counts.append(len(compiles))
      assert len(result.runs[0]['history']) >= min(steps, 2)
  assert counts[2] == counts[1], counts
