"""Tests of `ntkjax.predict` against independently derived mathematics.

Conventions checked (module docstring of `ntkjax.predict`, after
neural-tangents): loss |f - y|^2 / (2 |y|) with |y| = y_train.size; `t`
counts steps, absolute time is learning_rate * t, so with s = lr t / |y|

    f_train(t) = y + expm(-s K) (f_0 - y),
    f_test(t)  = f_test_0 - K_* K^{-1} (I - expm(-s K)) (f_0 - y);

kernels between outputs (N, *rest) are zipped (N1, N2, a1, a2, ...) over the
non-traced output axes and act as K (x) I on the traced ones.

How expected values are obtained (never from `ntkjax.predict` itself):

* closed forms with a matrix exponential (`scipy.linalg.expm`, Pade; the
  same algorithm as `jax.scipy.linalg.expm`, without a compile per shape)
  and dense `np.linalg.solve` / `inv` / `pinv` on the kernel as an explicit
  matrix acting on the outputs as columns (K (x) I for a traced axis is
  simply `K @ F` for F of shape (N, O));
* analytic kernels from `stax`'s kernel_fn (the architecture of the brief);
  empirical NTKs of finite two-layer networks from a hand-derived Jacobian
  (`_two_layer_ntk`, whose forward pass is checked against stax's apply_fn);
* 4-d kernels are either Kronecker products built with `np.kron` (whose
  index order is independent of the library's zipped/transposed layout) or
  random PSD matrices G reshaped by hand;
* discrete recursions (gradient descent, heavy-ball momentum) written out
  step by step, which converge to the flows as the learning rate shrinks,
  with errors O(lr);
* a fixed-step RK4 integration (step halving, Richardson-extrapolated) for
  a non-MSE loss with a hand-derived gradient (softmax - y) / |y|;
* Gaussian-process formulas written from the literature (Rasmussen &
  Williams 2006; Lee et al. 2019, eqs. 15-17) in their generic form
  Cov = K_** - A K_*^T - K_* A^T + A K A^T for f_test = f_test_0 - A
  (f_0 - y), f_0 ~ N(0, K) jointly with f_test_0;
* a Monte Carlo ensemble of wide finite networks, each trained in closed form
  with its own empirical NTK and initial outputs, against
  `gradient_descent_mse_ensemble`.

Tolerances: float64 throughout (conftest). Closed forms: 1e-11 relative to
the largest entry (the analytic kernels here have condition numbers < 100,
so two exact routes to the same number agree to ~100 cond eps; 1e-10 for
the empirical 4-d kernel, condition number < 1e4; 1e-9 for singular
kernels, where the pseudo-inverse's cutoff enters). ODE results:
100 x the ODE's rtol (1e-8), the usual global-vs-local error margin.
Monte Carlo: 5 standard errors + 8 / width of the scale.
"""

import collections
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ntkjax import predict, stax

TOL = 1e-11          # closed form vs closed form, relative to the scale
ODE_TOL = 1e-6       # 100 x the default rtol of ntkjax.ode.odeint


# ----------------------------------------------------------------------------
# Problem data and independent reference formulas.


def _network(width=512, n_out=3):
  return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
                     stax.Dense(n_out, W_std=1.5, b_std=0.1))


@functools.lru_cache(maxsize=None)
def _kernel_fn(n_out=3):
  """The architecture's kernel_fn, jitted (one compile per shapes and get)."""
  _, _, kernel_fn = _network(n_out=n_out)
  jitted = jax.jit(kernel_fn, static_argnums=2)

  def fn(x1, x2=None, get=None):
    return jitted(x1, x1 if x2 is None else x2, get)
  return fn


@functools.lru_cache(maxsize=None)
def _problem(n_train=6, n_test=4, n_out=3, seed=0):
  """Inputs, targets, initial outputs and analytic kernels (numpy arrays)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(keys[0], (n_train, 4))
  xt = jax.random.normal(keys[1], (n_test, 4))
  kernel_fn = _kernel_fn(n_out)
  both = kernel_fn(jnp.concatenate([x, xt]), None, ('nngp', 'ntk'))
  n = lambda a: np.asarray(a, np.float64)
  blocks = lambda rows, cols: type(both)(
      *(n(getattr(both, name)[rows, cols]) for name in both._fields))
  train_rows, test_rows = slice(0, n_train), slice(n_train, None)
  train = blocks(train_rows, train_rows)
  test_train = blocks(test_rows, train_rows)
  test_test = blocks(test_rows, test_rows)
  return types.SimpleNamespace(
      x=x, xt=xt, kernel_fn=kernel_fn,
      y=n(jax.random.normal(keys[2], (n_train, n_out))),
      f0=n(0.5 * jax.random.normal(keys[3], (n_train, n_out))),
      ft0=n(0.5 * jax.random.normal(keys[4], (n_test, n_out))),
      train=train, test_train=test_train, test_test=test_test,
      k=train.ntk, kt=test_train.ntk, ktt=test_test.ntk,
      nngp=train.nngp, nngp_t=test_train.nngp, nngp_tt=test_test.nngp)


def _two_layer_ntk(params, x1, x2, w_std=1.5, b_std=0.1):
  """Empirical kernels of Dense(n) -> Relu -> Dense(O) (NTK parameterization,
  h = w_std / sqrt(d) x W1 + b_std b1, f = w_std / sqrt(n) relu(h) W2 +
  b_std b2) from the hand-derived Jacobian:

    df_a/db2_c  = b_std delta_ac,
    df_a/dW2_kc = w_std / sqrt(n) relu(h_k) delta_ac,
    df_a/dW1_jk = w_std / sqrt(n) W2_ka 1[h_k > 0] w_std / sqrt(d) x_j,
    df_a/db1_k  = w_std / sqrt(n) W2_ka 1[h_k > 0] b_std.

  Returns the full NTK (N1, N2, O, O) (trace_axes=() layout), the readout
  layer's part (N1, N2) (it acts as (x) I_O), and the outputs f(x1).
  """
  (w1, b1), _, (w2, b2) = jax.tree.map(np.asarray, params)
  d, n = w1.shape

  def forward(x):
    h = w_std / np.sqrt(d) * np.asarray(x) @ w1 + b_std * b1
    return np.maximum(h, 0.), (h > 0).astype(np.float64)

  (a1, g1), (a2, g2) = forward(x1), forward(x2)
  readout = w_std**2 / n * a1 @ a2.T + b_std**2
  inner = w_std**2 / d * np.asarray(x1) @ np.asarray(x2).T + b_std**2
  hidden = w_std**2 / n * np.einsum('ik,jk,ka,kb->ijab', g1, g2, w2, w2)
  ntk = (readout[:, :, None, None] * np.eye(w2.shape[1])
         + inner[:, :, None, None] * hidden)
  outputs = w_std / np.sqrt(n) * a1 @ w2 + b_std * b2
  return ntk, readout, outputs


def _assert_close(actual, expected, tol=TOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  assert np.all(np.isfinite(actual))
  scale = max(1., float(np.max(np.abs(expected))))
  err = float(np.max(np.abs(actual - expected))) if actual.size else 0.
  assert err <= tol * scale, f'max error {err:.3g} > {tol * scale:.3g}'


def _expm(m):
  return scipy.linalg.expm(np.asarray(m))


def _flow_train(k, y, f0, s):
  """y + expm(-s K) (f0 - y): K (M, M) acting on columns of (M, T)."""
  return y + _expm(-s * k) @ (f0 - y)


def _flow_test(k, kt, y, f0, ft0, s):
  """f_test_0 - K_* K^{-1} (I - expm(-s K)) (f0 - y)."""
  e = np.eye(k.shape[0]) - _expm(-s * k)
  return ft0 - kt @ np.linalg.solve(k, e @ (f0 - y))


def _psd(m):
  """Assert a symmetric positive semi-definite matrix (up to round-off)."""
  m = np.asarray(m)
  assert np.allclose(m, m.T, rtol=0, atol=1e-12 * max(1., np.abs(m).max()))
  evals = np.linalg.eigvalsh((m + m.T) / 2)
  assert evals.min() >= -1e-10 * max(1., np.abs(evals).max()), evals


def _zip4(g, n1, a1, n2, a2):
  """Matrix G[(i, p), (j, q)] (row index i * a1 + p) -> zipped (i, j, p, q)."""
  return np.asarray(g).reshape(n1, a1, n2, a2).transpose(0, 2, 1, 3)


def _mse(f, y):
  return 0.5 * jnp.mean((f - y)**2)


# ----------------------------------------------------------------------------
# gradient_descent_mse


def test_gd_mse_t0_returns_initial_outputs():
  p = _problem()
  predict_fn = predict.gradient_descent_mse(p.k, p.y, learning_rate=0.7)
  train, test = predict_fn(0., p.f0, p.ft0, p.kt)
  _assert_close(train, p.f0, tol=1e-14)
  _assert_close(test, p.ft0, tol=1e-14)
  _assert_close(predict_fn(0., p.f0), p.f0, tol=1e-14)


@pytest.mark.parametrize('lr,t', [(1., 0.5), (1., 7.), (0.3, 40.), (2., 300.)])
def test_gd_mse_finite_time_matches_expm(lr, t):
  p = _problem()
  s = lr * t / p.y.size
  train, test = predict.gradient_descent_mse(p.k, p.y, lr)(
      t, p.f0, p.ft0, p.kt)
  _assert_close(train, _flow_train(p.k, p.y, p.f0, s))
  _assert_close(test, _flow_test(p.k, p.kt, p.y, p.f0, p.ft0, s))


def test_gd_mse_default_and_none_initial_outputs():
  """fx_train_0 defaults to 0; fx_train_0=None returns the test outputs only."""
  p = _problem()
  predict_fn = predict.gradient_descent_mse(p.k, p.y)
  s = 5. / p.y.size
  zero = np.zeros_like(p.y)
  _assert_close(predict_fn(5.), _flow_train(p.k, p.y, zero, s))
  test = predict_fn(5., None, p.ft0, p.kt)
  _assert_close(test, _flow_test(p.k, p.kt, p.y, zero, p.ft0, s))


def test_gd_mse_infinite_time_is_kernel_regression():
  p = _problem()
  predict_fn = predict.gradient_descent_mse(p.k, p.y, learning_rate=0.5)
  train, test = predict_fn(None, p.f0, p.ft0, p.kt)
  expected_test = p.kt @ np.linalg.solve(p.k, p.y - p.f0) + p.ft0
  _assert_close(train, p.y)
  _assert_close(test, expected_test)
  # Long but finite training approaches the same limit (lambda_min s ~ 1e6).
  assert np.linalg.eigvalsh(p.k).min() * 0.5 * 1e8 / p.y.size > 1e5
  train_long, test_long = predict_fn(1e8, p.f0, p.ft0, p.kt)
  _assert_close(train_long, p.y)
  _assert_close(test_long, expected_test)


def test_gd_mse_array_of_times_gives_leading_axes():
  p = _problem()
  lr = 0.8
  ts = np.array([[0., 1., 10.], [25., 100., 1000.]])
  train, test = predict.gradient_descent_mse(p.k, p.y, lr)(
      ts, p.f0, p.ft0, p.kt)
  assert train.shape == (2, 3) + p.y.shape
  assert test.shape == (2, 3) + p.ft0.shape
  for index in np.ndindex(ts.shape):
    s = lr * ts[index] / p.y.size
    _assert_close(train[index], _flow_train(p.k, p.y, p.f0, s))
    _assert_close(test[index], _flow_test(p.k, p.kt, p.y, p.f0, p.ft0, s))


@functools.lru_cache(maxsize=None)
def _empirical_problem(n_out=3, width=16):
  """A small finite network's (N, N, O, O) empirical NTK (trace_axes=()).

  Parameters drawn as stax's NTK-parameterized init does (standard normal);
  the Monte Carlo test below checks `_two_layer_ntk`'s forward pass against
  stax's apply_fn.
  """
  p = _problem(n_out=n_out)
  rng = np.random.default_rng(11)
  params = ((rng.standard_normal((4, width)), rng.standard_normal(width)), (),
            (rng.standard_normal((width, n_out)), rng.standard_normal(n_out)))
  k4, _, f0 = _two_layer_ntk(params, p.x, p.x)
  kt4, _, ft0 = _two_layer_ntk(params, p.xt, p.x)
  return p, k4, kt4, f0, ft0


def _flat(k4):
  """(N1, N2, O1, O2) -> the (N1 O1, N2 O2) matrix acting on f.reshape(-1)."""
  n1, n2, o1, o2 = k4.shape
  return k4.transpose(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)


@pytest.mark.parametrize('t', [3., 60., None])
def test_gd_mse_no_trace_axes_with_empirical_ntk(t):
  p, k4, kt4, f0, ft0 = _empirical_problem()
  n, o = p.y.shape
  assert k4.shape == (n, n, o, o) and kt4.shape == (4, n, o, o)
  k, kt = _flat(k4), _flat(kt4)
  assert np.linalg.cond(k) < 1e4          # a genuinely coupled, regular kernel
  lr = 1.3
  train, test = predict.gradient_descent_mse(k4, p.y, lr, trace_axes=())(
      t, f0, ft0, kt4)
  y, f0v, ft0v = p.y.reshape(-1, 1), f0.reshape(-1, 1), ft0.reshape(-1, 1)
  if t is None:
    expected_train = y
    expected_test = ft0v + kt @ np.linalg.solve(k, y - f0v)
  else:
    s = lr * t / p.y.size
    expected_train = _flow_train(k, y, f0v, s)
    expected_test = _flow_test(k, kt, y, f0v, ft0v, s)
  _assert_close(train, expected_train.reshape(p.y.shape), tol=1e-10)
  _assert_close(test, expected_test.reshape(ft0.shape), tol=1e-10)


@pytest.mark.parametrize('t', [2., None])
def test_gd_mse_kronecker_kernel_without_trace_equals_traced(t):
  """K (x) I_O with trace_axes=() is the (N, N) kernel with trace_axes=(-1,)."""
  p = _problem()
  n, o = p.y.shape
  k4 = _zip4(np.kron(p.k, np.eye(o)), n, o, n, o)
  kt4 = _zip4(np.kron(p.kt, np.eye(o)), 4, o, n, o)
  traced = predict.gradient_descent_mse(p.k, p.y)(t, p.f0, p.ft0, p.kt)
  full = predict.gradient_descent_mse(k4, p.y, trace_axes=())(
      t, p.f0, p.ft0, kt4)
  for a, b in zip(full, traced):
    _assert_close(a, b)


@pytest.mark.parametrize('t', [4., None])
def test_gd_mse_outputs_with_extra_axis(t):
  """Outputs (N, a, O), trace_axes=(-1,): kernel (N, N, a, a) acts on (i, p)."""
  n, a, o, nt = 5, 2, 3, 3
  rng = np.random.default_rng(3)
  m = rng.standard_normal(((n + nt) * a, (n + nt) * a))
  g = m @ m.T / m.shape[0] + 0.1 * np.eye(m.shape[0])  # joint PSD kernel
  k = g[:n * a, :n * a]                  # row (i, p) -> i * a + p
  kt = g[n * a:, :n * a]
  y, f0 = rng.standard_normal((2, n, a, o))
  ft0 = rng.standard_normal((nt, a, o))
  lr = 0.9
  train, test = predict.gradient_descent_mse(_zip4(k, n, a, n, a), y, lr)(
      t, f0, ft0, _zip4(kt, nt, a, n, a))
  as_cols = lambda f: f.reshape(-1, o)    # rows (i, p), columns the traced O
  if t is None:
    expected_train = as_cols(y)
    expected_test = as_cols(ft0) + kt @ np.linalg.solve(k, as_cols(y - f0))
  else:
    s = lr * t / y.size
    expected_train = _flow_train(k, as_cols(y), as_cols(f0), s)
    expected_test = _flow_test(k, kt, as_cols(y), as_cols(f0), as_cols(ft0), s)
  _assert_close(train, expected_train.reshape(y.shape))
  _assert_close(test, expected_test.reshape(ft0.shape))


def test_gd_mse_middle_trace_axis():
  """Outputs (N, a, O), trace_axes=(1,): a kernel (N, N, O, O) per a-slice."""
  n, a, o = 5, 2, 3
  rng = np.random.default_rng(4)
  m = rng.standard_normal((n * o, n * o))
  k = m @ m.T / m.shape[0] + 0.2 * np.eye(n * o)
  y, f0 = rng.standard_normal((2, n, a, o))
  t, lr = 6., 1.
  train = predict.gradient_descent_mse(_zip4(k, n, o, n, o), y, lr,
                                       trace_axes=(1,))(t, f0)
  s = lr * t / y.size
  for slice_ in range(a):
    expected = _flow_train(k, y[:, slice_].reshape(-1),
                           f0[:, slice_].reshape(-1), s)
    _assert_close(train[:, slice_], expected.reshape(n, o))


@pytest.mark.parametrize('t', [5., None])
def test_gd_mse_diag_reg_relative_and_absolute(t):
  p = _problem()
  reg = 0.3
  mean_diag = np.mean(np.diag(p.k))
  for absolute, added in [(False, reg * mean_diag), (True, reg)]:
    k = p.k + added * np.eye(p.k.shape[0])
    train, test = predict.gradient_descent_mse(
        p.k, p.y, diag_reg=reg, diag_reg_absolute_scale=absolute)(
            t, p.f0, p.ft0, p.kt)
    if t is None:
      expected_train = p.y
      expected_test = p.ft0 + p.kt @ np.linalg.solve(k, p.y - p.f0)
    else:
      s = t / p.y.size
      expected_train = _flow_train(k, p.y, p.f0, s)
      expected_test = _flow_test(k, p.kt, p.y, p.f0, p.ft0, s)
    _assert_close(train, expected_train)
    _assert_close(test, expected_test)


def test_gd_mse_diag_reg_relative_scale_with_4d_kernel():
  """Relative scale = mean of the diagonal of the flattened (N O) matrix."""
  p, k4, kt4, f0, ft0 = _empirical_problem()
  reg, t = 0.05, 8.
  k = _flat(k4)
  k_reg = k + reg * np.mean(np.diag(k)) * np.eye(k.shape[0])
  train, test = predict.gradient_descent_mse(k4, p.y, diag_reg=reg,
                                             trace_axes=())(t, f0, ft0, kt4)
  s = t / p.y.size
  y, f0v, ft0v = p.y.reshape(-1, 1), f0.reshape(-1, 1), ft0.reshape(-1, 1)
  _assert_close(train, _flow_train(k_reg, y, f0v, s).reshape(p.y.shape),
                tol=1e-10)
  _assert_close(test, _flow_test(k_reg, _flat(kt4), y, f0v, ft0v, s)
                .reshape(ft0.shape), tol=1e-10)


def _discrete_gd(k, kt, y, f0, ft0, lr, steps):
  """f_{k+1} = f_k - (lr / |y|) K (f_k - y); test side with K_*."""
  f, ft = f0.copy(), ft0.copy()
  for _ in range(steps):
    residual = (f - y) / y.size
    f, ft = f - lr * k @ residual, ft - lr * kt @ residual
  return f, ft


def test_gd_mse_is_small_learning_rate_limit_of_discrete_gd():
  """Discrete GD at fixed lr * t converges to the flow with error O(lr).

  Per eigenmode (mu = lr lambda / |y|, x = mu t): (1 - mu)^t = e^{-x}
  (1 - x mu / 2 + O(mu^2)), so the training error is at most
  max_x x e^{-x} mu_max / 2 = mu_max / (2 e) times |f_0 - y| per column.
  """
  p = _problem()
  total = 30.                                   # lr * t
  train_errors, test_errors = [], []
  for lr in [0.2, 0.1, 0.05]:
    steps = int(round(total / lr))
    f, ft = _discrete_gd(p.k, p.kt, p.y, p.f0, p.ft0, lr, steps)
    train, test = predict.gradient_descent_mse(p.k, p.y, lr)(
        float(steps), p.f0, p.ft0, p.kt)
    train_errors.append(np.abs(f - train).max())
    test_errors.append(np.abs(ft - test).max())
  for errors in (np.array(train_errors), np.array(test_errors)):
    ratios = errors[:-1] / errors[1:]
    assert np.all((ratios > 1.8) & (ratios < 2.2)), (errors, ratios)
  mu_max = 0.05 * np.linalg.eigvalsh(p.k).max() / p.y.size
  bound = mu_max / (2 * np.e) * np.linalg.norm(p.f0 - p.y, axis=0).max()
  assert train_errors[-1] <= bound, (train_errors, bound)


# ----------------------------------------------------------------------------
# max_learning_rate


def _run_gd(k, y, f0, lr, size, momentum, steps=2000):
  f, v = f0.copy(), np.zeros_like(f0)
  for _ in range(steps):
    v = momentum * v - lr * k @ (f - y) / size
    f = f + v
  return np.abs(f - y).max()


@pytest.mark.parametrize('momentum', [0., 0.9])
def test_max_learning_rate_separates_convergence_from_divergence(momentum):
  p = _problem()
  lr_max = float(predict.max_learning_rate(p.k, y_train_size=p.y.size,
                                           momentum=momentum))
  assert _run_gd(p.k, p.y, p.f0, 0.99 * lr_max, p.y.size, momentum) < 1e-10
  assert _run_gd(p.k, p.y, p.f0, 1.01 * lr_max, p.y.size, momentum) > 1e6


def test_max_learning_rate_default_size_with_4d_kernel():
  """Default |y| = the flattened matrix size (right for trace_axes=())."""
  p, k4, _, f0, _ = _empirical_problem()
  k = _flat(k4)
  lr_max = float(predict.max_learning_rate(k4))
  y, f0 = p.y.reshape(-1), f0.reshape(-1)
  assert _run_gd(k, y, f0, 0.99 * lr_max, y.size, 0., steps=5000) < 1e-8
  assert _run_gd(k, y, f0, 1.01 * lr_max, y.size, 0., steps=5000) > 1e6


# ----------------------------------------------------------------------------
# gradient_descent (ODE)


def test_gradient_descent_mse_loss_equals_closed_form():
  p = _problem()
  lr = 0.7
  ts = np.array([0., 0.5, 10., 100., 1000.])
  ode_train, ode_test = predict.gradient_descent(_mse, p.k, p.y, lr)(
      ts, p.f0, p.ft0, p.kt)
  train, test = predict.gradient_descent_mse(p.k, p.y, lr)(
      ts, p.f0, p.ft0, p.kt)
  assert ode_train.shape == (5,) + p.y.shape
  _assert_close(ode_train, train, tol=ODE_TOL)
  _assert_close(ode_test, test, tol=ODE_TOL)


def test_gradient_descent_mse_loss_no_trace_axes_scalar_time():
  """A 4-d empirical NTK, trace_axes=(); a scalar t gives no time axis."""
  p, k4, kt4, f0, ft0 = _empirical_problem()
  lr, t = 1.1, 30.
  ode_train, ode_test = predict.gradient_descent(
      _mse, k4, p.y, lr, trace_axes=())(t, f0, ft0, kt4)
  k, kt = _flat(k4), _flat(kt4)
  y, f0v, ft0v = p.y.reshape(-1, 1), f0.reshape(-1, 1), ft0.reshape(-1, 1)
  s = lr * t / p.y.size
  _assert_close(ode_train, _flow_train(k, y, f0v, s).reshape(p.y.shape),
                tol=ODE_TOL)
  _assert_close(ode_test, _flow_test(k, kt, y, f0v, ft0v, s)
                .reshape(ft0.shape), tol=ODE_TOL)


def _rk4(rhs, state, t_end, n_steps):
  h = t_end / n_steps
  for _ in range(n_steps):
    k1 = rhs(state)
    k2 = rhs([a + h / 2 * b for a, b in zip(state, k1)])
    k3 = rhs([a + h / 2 * b for a, b in zip(state, k2)])
    k4 = rhs([a + h * b for a, b in zip(state, k3)])
    state = [a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4)
             for a, b1, b2, b3, b4 in zip(state, k1, k2, k3, k4)]
  return state


def test_gradient_descent_cross_entropy_matches_rk4():
  """L = -mean(y log softmax f), y one-hot: grad_f L = (softmax f - y) / |y|.

  In steps, df/dt = -lr K grad L(f), df_test/dt = -lr K_* grad L(f).
  """
  p = _problem()
  labels = np.array([0, 2, 1, 1, 0, 2])
  y = np.eye(3)[labels]
  lr = 2.

  def loss(f, y):
    return -jnp.mean(jax.nn.log_softmax(f) * y)

  def rhs(state):
    f = state[0]
    z = np.exp(f - f.max(axis=1, keepdims=True))
    grad = (z / z.sum(axis=1, keepdims=True) - y) / y.size
    return [-lr * p.k @ grad, -lr * p.kt @ grad]

  ts = [5., 40., 150.]
  ode_train, ode_test = predict.gradient_descent(loss, p.k, y, lr)(
      np.array(ts), p.f0, p.ft0, p.kt)
  # Two RK4 trajectories, steps h and 2h; Richardson extrapolation
  # fine + (fine - coarse) / 15 removes RK4's h^4 error term.
  fine, coarse, t_prev = [p.f0, p.ft0], [p.f0, p.ft0], 0.
  for i, t in enumerate(ts):
    n_steps = 2 * int(round((t - t_prev) / 0.08))
    fine = _rk4(rhs, fine, t - t_prev, n_steps)
    coarse = _rk4(rhs, coarse, t - t_prev, n_steps // 2)
    t_prev = t
    # In the asymptotic regime: the step-halving difference is small.
    assert max(np.abs(a - b).max() for a, b in zip(fine, coarse)) < 1e-7
    reference = [a + (a - b) / 15 for a, b in zip(fine, coarse)]
    assert np.abs(reference[0] - p.f0).max() > 0.3       # it really moved
    _assert_close(ode_train[i], reference[0], tol=ODE_TOL)
    _assert_close(ode_test[i], reference[1], tol=ODE_TOL)


def _heavy_ball(k, kt, y, f0, ft0, lr, momentum, steps):
  """Heavy ball on the linear model, in function space.

  theta_{k+1} = theta_k + v_{k+1}, v_{k+1} = mu v_k - lr grad_theta L; with
  f = f_0 + J (theta - theta_0): J v_{k+1} = mu J v_k - lr J J^T grad_f L, so
  the function-space velocity u = J v obeys u <- mu u - lr K grad_f L and
  f <- f + u, exactly (K = J J^T; test rows use K_* = J_* J^T).
  """
  f, ft = f0.copy(), ft0.copy()
  u, ut = np.zeros_like(f0), np.zeros_like(ft0)
  for _ in range(steps):
    grad = (f - y) / y.size
    u, ut = momentum * u - lr * k @ grad, momentum * ut - lr * kt @ grad
    f, ft = f + u, ft + ut
  return f, ft


def test_gradient_descent_momentum_is_limit_of_heavy_ball():
  """At t = the number of steps, the ODE is the lr -> 0 limit (error O(lr)).

  The learning rates are small enough that every mode is overdamped
  (lr lambda / |y| < (1 - mu)^2 / 4), where the discretization error is first
  order in lr.
  """
  p = _problem()
  momentum, lrs = 0.9, [0.005, 0.0025, 0.00125]
  lam = np.linalg.eigvalsh(p.k).max() / p.y.size
  errors, moved = [], []
  for lr in lrs:
    # Enough steps that the slow flow (effective rate lr / (1 - mu)) moves O(1).
    steps = int(round(0.2 * (1 - momentum) * p.y.size / lr))
    f, ft = _heavy_ball(p.k, p.kt, p.y, p.f0, p.ft0, lr, momentum, steps)
    train, test = predict.gradient_descent(_mse, p.k, p.y, lr,
                                           momentum=momentum)(
                                               float(steps), p.f0, p.ft0, p.kt)
    errors.append(max(np.abs(f - train).max(), np.abs(ft - test).max()))
    moved.append(np.abs(f - p.f0).max())
  errors = np.array(errors)
  assert min(moved) > 0.5
  assert lrs[-1] * lam < (1 - momentum)**2 / 4
  # Halving lr halves the error (last pair: well inside the asymptotic regime).
  assert 1.8 < errors[-2] / errors[-1] < 2.3, errors
  assert np.all(errors[1:] < errors[:-1]), errors
  # First-order size: from rest, the discrete iterate lags the flow's
  # displacement by about one step of the terminal velocity
  # lr K grad L / (1 - mu) (discrete lag mu u_inf / (1 - mu), continuous
  # u_inf / (1 - mu)); bounded by lr lambda_max |f_0 - y| / (|y| (1 - mu)),
  # with a factor 2 for the test rows' K_*.
  bound = (2 * lrs[-1] * lam * np.linalg.norm(p.f0 - p.y, axis=0).max()
           / (1 - momentum))
  assert errors[-1] < bound, (errors, bound)


def test_gradient_descent_rejects_bad_arguments():
  p = _problem()
  predict_fn = predict.gradient_descent(_mse, p.k, p.y)
  with pytest.raises(ValueError, match='t=None'):
    predict_fn(None, p.f0)
  with pytest.raises(ValueError, match='k_test_train'):
    predict_fn(1., p.f0, p.ft0)
  with pytest.raises(ValueError, match='momentum'):
    predict.gradient_descent(_mse, p.k, p.y, momentum=1.)
  with pytest.raises(ValueError, match='trace_axes'):
    predict.gradient_descent(_mse, p.k, p.y, trace_axes=(0,))
  with pytest.raises(ValueError, match='k_train_train'):
    predict.gradient_descent(_mse, p.k[:5, :5], p.y)


# ----------------------------------------------------------------------------
# gp_inference


def _gp_expected(p, get):
  """Posterior mean and covariance from the formulas, with dense inverses."""
  k_inv = np.linalg.inv(p.nngp)
  theta_inv = np.linalg.inv(p.k)
  if get == 'nngp':
    mean = p.nngp_t @ k_inv @ p.y
    cov = p.nngp_tt - p.nngp_t @ k_inv @ p.nngp_t.T
  elif get == 'ntkgp':
    mean = p.kt @ theta_inv @ p.y
    cov = p.ktt - p.kt @ theta_inv @ p.kt.T
  else:
    mean = p.kt @ theta_inv @ p.y
    a = p.kt @ theta_inv
    cov = (p.nngp_tt + a @ p.nngp @ a.T - a @ p.nngp_t.T - p.nngp_t @ a.T)
  return mean, cov


@pytest.mark.parametrize('get', ['nngp', 'ntk', 'ntkgp'])
def test_gp_inference_matches_dense_formulas(get):
  p = _problem()
  predict_fn = predict.gp_inference(p.train, p.y)
  out = predict_fn(get, p.test_train, p.test_test)
  mean, cov = _gp_expected(p, get)
  assert isinstance(out, predict.Gaussian)
  _assert_close(out.mean, mean)
  _assert_close(out.covariance, cov)
  _psd(out.covariance)
  # Without k_test_test only the mean.
  _assert_close(predict_fn(get, p.test_train), mean)


def test_gp_inference_ntk_covariance_is_the_t_inf_ensemble_covariance():
  """f_test = f_test_0 - Theta_* Theta^-1 (f_0 - y) with (f_0, f_test_0) from
  the NNGP prior: sample it, and compare the sample moments (exact MC check
  of the formula's structure with 20000 draws)."""
  p = _problem()
  joint = np.block([[p.nngp, p.nngp_t.T], [p.nngp_t, p.nngp_tt]])
  n = p.nngp.shape[0]
  rng = np.random.default_rng(0)
  chol = np.linalg.cholesky(joint + 1e-12 * np.eye(joint.shape[0]))
  draws = chol @ rng.standard_normal((joint.shape[0], 20000))
  f0, ft0 = draws[:n], draws[n:]
  a = p.kt @ np.linalg.inv(p.k)
  ft = ft0 - a @ f0                        # one output column, y = 0 part
  cov_mc = np.cov(ft)
  out = predict.gp_inference(p.train, p.y)('ntk', p.test_train, p.test_test)
  products = (ft - ft.mean(1, keepdims=True))
  se = np.std(products[:, None] * products[None], axis=-1) / np.sqrt(20000)
  assert np.all(np.abs(cov_mc - np.asarray(out.covariance)) < 5 * se + 1e-12)


def test_gp_inference_kronecker_kernels_without_trace():
  """With K (x) I_O kernels and trace_axes=(), covariances are cov (x) I_O."""
  p = _problem()
  n, o = p.y.shape
  nt = p.kt.shape[0]
  kron = lambda m, n1, n2: _zip4(np.kron(m, np.eye(o)), n1, o, n2, o)
  Both = collections.namedtuple('Both', 'nngp ntk')
  train = Both(kron(p.nngp, n, n), kron(p.k, n, n))
  test_train = Both(kron(p.nngp_t, nt, n), kron(p.kt, nt, n))
  test_test = Both(kron(p.nngp_tt, nt, nt), kron(p.ktt, nt, nt))
  out = predict.gp_inference(train, p.y, trace_axes=())(
      ('nngp', 'ntk', 'ntkgp'), test_train, test_test)
  for get in ('nngp', 'ntk', 'ntkgp'):
    mean, cov = _gp_expected(p, get)
    gaussian = getattr(out, get)
    _assert_close(gaussian.mean, mean)
    assert gaussian.covariance.shape == (nt, nt, o, o)
    _assert_close(gaussian.covariance, kron(cov, nt, nt))


def test_gp_inference_diag_reg():
  p = _problem()
  reg = 0.2
  predict_fn = predict.gp_inference(p.train, p.y, diag_reg=reg)
  out = predict_fn(('nngp', 'ntkgp'), p.test_train, p.test_test)
  k = p.nngp + reg * np.mean(np.diag(p.nngp)) * np.eye(6)
  theta = p.k + reg * np.mean(np.diag(p.k)) * np.eye(6)
  _assert_close(out.nngp.mean, p.nngp_t @ np.linalg.solve(k, p.y))
  _assert_close(out.nngp.covariance,
                p.nngp_tt - p.nngp_t @ np.linalg.solve(k, p.nngp_t.T))
  _assert_close(out.ntkgp.mean, p.kt @ np.linalg.solve(theta, p.y))
  absolute = predict.gp_inference(p.train, p.y, diag_reg=reg,
                                  diag_reg_absolute_scale=True)
  _assert_close(absolute('nngp', p.test_train),
                p.nngp_t @ np.linalg.solve(p.nngp + reg * np.eye(6), p.y))


def test_gp_inference_on_training_set():
  p = _problem()
  out = predict.gp_inference(p.train, p.y)(None, None, p.train)
  for gaussian in (out.nngp, out.ntk):
    _assert_close(gaussian.mean, p.y, tol=0.)
    np.testing.assert_array_equal(gaussian.covariance, np.zeros((6, 6)))
  means = predict.gp_inference(p.train, p.y)('ntk')
  _assert_close(means, p.y, tol=0.)


def test_gp_inference_return_types():
  p = _problem()
  predict_fn = predict.gp_inference(p.train, p.y)
  # A string: that mode alone (an array, or a Gaussian with k_test_test).
  assert isinstance(predict_fn('nngp', p.test_train), jax.Array)
  assert isinstance(predict_fn('ntk', p.test_train, p.test_test),
                    predict.Gaussian)
  # A tuple: a named tuple in the requested order.
  out = predict_fn(('ntkgp', 'nngp'), p.test_train)
  assert out._fields == ('ntkgp', 'nngp')
  _assert_close(out.nngp, _gp_expected(p, 'nngp')[0])
  _assert_close(out.ntkgp, _gp_expected(p, 'ntkgp')[0])
  single = predict_fn(('ntk',), p.test_train, p.test_test)
  assert single._fields == ('ntk',)
  assert isinstance(single.ntk, predict.Gaussian)
  # None: ('nngp', 'ntk').
  out = predict_fn(None, p.test_train)
  assert out._fields == ('nngp', 'ntk')
  _assert_close(out.ntk, _gp_expected(p, 'ntk')[0])
  with pytest.raises(ValueError, match='get'):
    predict_fn('bogus', p.test_train)


def test_gp_inference_bad_shapes_name_the_argument():
  p = _problem()
  with pytest.raises(ValueError, match='k_train_train'):
    predict.gp_inference(p.train.ntk[:5, :5], p.y)('ntk', p.kt)
  with pytest.raises(ValueError, match='k_test_train'):
    predict.gp_inference(p.k, p.y)('ntk', p.kt[:, :5])
  with pytest.raises(ValueError, match='k_test_test'):
    predict.gp_inference(p.train, p.y)('nngp', p.test_train,
                                       p.test_test.nngp[:3, :4])
  with pytest.raises(ValueError, match='trace_axes'):
    predict.gp_inference(p.train, p.y, trace_axes=(0,))


# ----------------------------------------------------------------------------
# gradient_descent_mse_ensemble


def _ensemble_expected(k, kt, k_nngp, kt_nngp, ktt_nngp, y, s):
  """Mean and covariance of f_test(t) = f_test_0 - A (f_0 - y) over
  f_0, f_test_0 ~ N(0, NNGP), A = K_* K^{-1} (I - expm(-s K)) (K the kernel
  of the dynamics; s = None: A = K_* K^{-1})."""
  if s is None:
    a = kt @ np.linalg.inv(k)
  else:
    a = kt @ np.linalg.solve(k, np.eye(k.shape[0]) - _expm(-s * k))
  mean = a @ y
  cov = ktt_nngp - a @ kt_nngp.T - kt_nngp @ a.T + a @ k_nngp @ a.T
  return mean, cov


@pytest.mark.parametrize('t', [None, 0., 2., 30.])
def test_ensemble_matches_formulas(t):
  p = _problem()
  lr = 0.9
  predict_fn = predict.gradient_descent_mse_ensemble(p.kernel_fn, p.x, p.y,
                                                     learning_rate=lr)
  out = predict_fn(t, p.xt, ('nngp', 'ntk'), compute_cov=True)
  s = None if t is None else lr * t / p.y.size
  for get, (k, kt) in [('ntk', (p.k, p.kt)), ('nngp', (p.nngp, p.nngp_t))]:
    mean, cov = _ensemble_expected(k, kt, p.nngp, p.nngp_t, p.nngp_tt, p.y, s)
    _assert_close(getattr(out, get).mean, mean)
    _assert_close(getattr(out, get).covariance, cov)
    _psd(getattr(out, get).covariance)


def test_ensemble_at_infinite_time_is_gp_inference():
  p = _problem()
  ens = predict.gradient_descent_mse_ensemble(p.kernel_fn, p.x, p.y)(
      None, p.xt, None, compute_cov=True)
  gp = predict.gp_inference(p.train, p.y)(None, p.test_train, p.test_test)
  for get in ('nngp', 'ntk'):
    _assert_close(getattr(ens, get).mean, getattr(gp, get).mean)
    _assert_close(getattr(ens, get).covariance, getattr(gp, get).covariance)


def test_ensemble_mean_is_gd_mse_from_zero_initial_outputs():
  p = _problem()
  lr, ts = 1.5, np.array([0.5, 4., 50.])
  mean = predict.gradient_descent_mse_ensemble(p.kernel_fn, p.x, p.y, lr)(
      ts, p.xt, 'ntk')
  assert mean.shape == (3,) + p.ft0.shape
  gd = predict.gradient_descent_mse(p.k, p.y, lr)(ts, None, 0., p.kt)
  _assert_close(mean, gd)
  zero = np.zeros_like(p.y)
  for i, t in enumerate(ts):
    _assert_close(mean[i], _flow_test(p.k, p.kt, p.y, zero,
                                      np.zeros_like(p.ft0), lr * t / p.y.size))


@pytest.mark.parametrize('t', [6., None])
def test_ensemble_diag_reg_mean_is_regularized_gd_mse(t):
  """With diag_reg the dynamics use Theta + reg mean(diag Theta) I, as in
  gradient_descent_mse (f_0 = 0 gives the ensemble mean)."""
  p = _problem()
  reg, lr = 0.1, 0.8
  mean = predict.gradient_descent_mse_ensemble(
      p.kernel_fn, p.x, p.y, lr, diag_reg=reg)(t, p.xt, 'ntk')
  theta = p.k + reg * np.mean(np.diag(p.k)) * np.eye(6)
  zero = np.zeros_like(p.ft0)
  if t is None:
    expected = p.kt @ np.linalg.solve(theta, p.y)
  else:
    expected = _flow_test(theta, p.kt, p.y, np.zeros_like(p.y), zero,
                          lr * t / p.y.size)
  _assert_close(mean, expected)


def test_ensemble_array_of_times_covariances():
  p = _problem()
  ts = np.array([1., 10.])
  out = predict.gradient_descent_mse_ensemble(p.kernel_fn, p.x, p.y)(
      ts, p.xt, 'ntk', compute_cov=True)
  assert out.mean.shape == (2,) + p.ft0.shape
  assert out.covariance.shape == (2, 4, 4)
  for i, t in enumerate(ts):
    mean, cov = _ensemble_expected(p.k, p.kt, p.nngp, p.nngp_t, p.nngp_tt,
                                   p.y, t / p.y.size)
    _assert_close(out.mean[i], mean)
    _assert_close(out.covariance[i], cov)


@pytest.mark.parametrize('t', [0., 3., 40., None])
def test_ensemble_on_training_set(t):
  """x_test=None: f_train(t) = E f_0 + (I - E) y with E = expm(-s K), so
  mean (I - E) y and covariance E K_nngp E (K the dynamics' kernel): the
  prior at t = 0, N(y, 0) at t = inf."""
  p = _problem()
  lr = 1.2
  out = predict.gradient_descent_mse_ensemble(p.kernel_fn, p.x, p.y, lr)(
      t, None, ('nngp', 'ntk'), compute_cov=True)
  for get, k in [('ntk', p.k), ('nngp', p.nngp)]:
    e = np.zeros_like(k) if t is None else _expm(-lr * t / p.y.size * k)
    gaussian = getattr(out, get)
    _assert_close(gaussian.mean, p.y - e @ p.y)
    _assert_close(gaussian.covariance, e @ p.nngp @ e)
    _psd(gaussian.covariance)


def test_ensemble_rejects_bad_arguments():
  p = _problem()
  with pytest.raises(ValueError, match='ntkgp'):
    predict.gradient_descent_mse_ensemble(p.kernel_fn, p.x, p.y)(
        None, p.xt, 'ntkgp')
  with pytest.raises(ValueError, match='trace_axes'):
    predict.gradient_descent_mse_ensemble(p.kernel_fn, p.x, p.y,
                                          trace_axes=(-2,))
  with pytest.raises(ValueError, match='kernel_fn'):
    # y_train with a mismatched number of examples.
    predict.gradient_descent_mse_ensemble(p.kernel_fn, p.x, p.y[:5])(
        None, p.xt, 'ntk')


def test_ensemble_matches_monte_carlo_over_wide_networks():
  """Train each of 128 width-2048 networks in closed form (linearized, its
  own empirical NTK and initial outputs) and compare the sample mean and
  covariance of f_test(t) with the ensemble prediction.

  'ntk': all parameters trained (kernel = empirical NTK).
  'nngp': only the readout layer trained (kernel = the readout's NTK,
  h h^T W_std^2 / n + b_std^2, whose mean is the output NNGP).
  Tolerance: 5 standard errors (for a covariance entry, of the products of
  centred outputs) + 8 / width of the scale, for the O(1/width) bias.
  """
  width, n_seeds, lr = 2048, 128, 1.
  init_fn, apply_fn, _ = _network(width=width, n_out=1)
  p = _problem()
  # The infinite-width kernels (traced over outputs) do not depend on the
  # number of outputs: reuse the 3-output architecture's kernel_fn.
  kernel_fn, x, xt, y = p.kernel_fn, p.x, p.xt, p.y[:, :1]

  # stax's NTK-parameterized init: all weights and biases standard normal.
  rng = np.random.default_rng(21)
  params = ((rng.standard_normal((n_seeds, 4, width)),
             rng.standard_normal((n_seeds, width))), (),
            (rng.standard_normal((n_seeds, width, 1)),
             rng.standard_normal((n_seeds, 1))))
  # The hand-derived network is stax's network (checked on one draw).
  first = jax.tree.map(lambda a: a[0], params)
  np.testing.assert_allclose(_two_layer_ntk(first, x, x)[2],
                             apply_fn(first, x), rtol=1e-10, atol=1e-12)
  _, shapes = jax.eval_shape(lambda key: init_fn(key, (-1, 4)),
                             jax.random.PRNGKey(0))
  assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, first)
  f0, ft0, kernels = [], [], {'ntk': ([], []), 'nngp': ([], [])}
  for i in range(n_seeds):
    params_i = jax.tree.map(lambda a: a[i], params)
    ntk, readout, f = _two_layer_ntk(params_i, x, x)
    ntk_t, readout_t, f_t = _two_layer_ntk(params_i, xt, x)
    f0.append(f)
    ft0.append(f_t)
    for name, train, test in [('ntk', ntk[..., 0, 0], ntk_t[..., 0, 0]),
                              ('nngp', readout, readout_t)]:
      kernels[name][0].append(train)
      kernels[name][1].append(test)
  f0, ft0 = np.stack(f0), np.stack(ft0)
  kernels = {name: tuple(map(np.stack, pair)) for name, pair in kernels.items()}
  zero_train, zero_test = np.zeros_like(y), np.zeros((xt.shape[0], 1))
  predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, x, y, lr)
  for t in [0., 3., None]:
    exact = predict_fn(t, xt, ('nngp', 'ntk'), compute_cov=True)
    for get in ('nngp', 'ntk'):
      k, kt = kernels[get]
      outs, driven = [], []            # f_test(t), and its part A_i y
      for i in range(n_seeds):
        if t is None:
          outs.append(ft0[i] - kt[i] @ np.linalg.solve(k[i], f0[i] - y))
          driven.append(kt[i] @ np.linalg.solve(k[i], y))
        else:
          s = lr * t / y.size
          outs.append(_flow_test(k[i], kt[i], y, f0[i], ft0[i], s))
          driven.append(_flow_test(k[i], kt[i], y, zero_train, zero_test, s))
      outs, driven = np.stack(outs)[..., 0], np.stack(driven)[..., 0]
      gaussian = getattr(exact, get)
      exact_mean = np.asarray(gaussian.mean)[:, 0]
      exact_cov = np.asarray(gaussian.covariance)
      scale = max(np.abs(exact_mean).max(), np.sqrt(np.diag(exact_cov).max()))
      # The mean, directly ...
      mean = outs.mean(0)
      mean_se = outs.std(0, ddof=1) / np.sqrt(n_seeds)
      assert np.all(np.abs(mean - exact_mean)
                    <= 5 * mean_se + 8 / width * scale), (
                        get, t, mean, exact_mean, mean_se)
      # ... and with far less noise: f_test = A_i y + (f_test_0 - A_i f_0),
      # and flipping the readout's sign flips (f_0, f_test_0) but leaves the
      # kernels (so A_i) unchanged, so the bracket has mean exactly 0 and
      # E f_test = E A_i y, whose seed-to-seed spread is only O(width^-1/2).
      driven_se = driven.std(0, ddof=1) / np.sqrt(n_seeds)
      assert np.all(np.abs(driven.mean(0) - exact_mean)
                    <= 5 * driven_se + 8 / width * scale), (
                        get, t, driven.mean(0), exact_mean, driven_se)
      # The covariance.
      centred = outs - mean
      products = centred[:, :, None] * centred[:, None, :]
      cov = products.sum(0) / (n_seeds - 1)
      cov_se = products.std(0, ddof=1) / np.sqrt(n_seeds)
      assert np.all(np.abs(cov - exact_cov) <= 5 * cov_se
                    + 8 / width * np.abs(exact_cov).max()), (
                        get, t, cov, exact_cov, cov_se)


# ----------------------------------------------------------------------------
# Rank-deficient kernels and bad input.


def _duplicated_problem(seed, consistent):
  """Training set with two points repeated: the kernels are exactly singular.

  Exact expectations: on the null space of K (spanned by e_i - e_j for
  duplicates i, j) K_* vanishes, so gradient flow gives, for all t,
  f_test(t) = f_test_0 - K_* K^+ (I - expm(-s K)) (f_0 - y) and as t -> inf
  f_test = f_test_0 + K_* K^+ (y - f_0),
  f_train = y + (I - K K^+) (f_0 - y)   (the null-space part never moves).
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((5, 4))
  x = np.concatenate([x, x[:2]])
  xt = rng.standard_normal((3, 4))
  y = rng.standard_normal((7, 3))
  if consistent:
    y[5:] = y[:2]
  kernel_fn = _kernel_fn()
  both = kernel_fn(np.concatenate([x, xt]), None, ('nngp', 'ntk'))
  # (one call on all 10 inputs: the same compiled shapes as _problem's)
  train = type(both)(*(np.asarray(k)[:7, :7] for k in both))
  test_train = type(both)(*(np.asarray(k)[7:, :7] for k in both))
  assert np.array_equal(train.ntk[5:], train.ntk[:2])   # exactly singular
  f0 = 0.3 * rng.standard_normal((7, 3))
  f0[5:] = f0[:2]                          # a network's outputs on duplicates
  return train, test_train, y, f0, np.zeros((3, 3))


@pytest.mark.parametrize('seed,consistent',
                         [(seed, False) for seed in range(12)]
                         + [(seed, True) for seed in (0, 4, 10)])
def test_rank_deficient_kernel_infinite_time_is_pseudo_inverse_solution(
    seed, consistent):
  train, test_train, y, f0, ft0 = _duplicated_problem(seed, consistent)
  k, kt = np.asarray(train.ntk), np.asarray(test_train.ntk)
  assert np.linalg.matrix_rank(k) == 5
  pinv = np.linalg.pinv(k)
  train_inf, test_inf = predict.gradient_descent_mse(k, y)(None, f0, ft0, kt)
  _assert_close(test_inf, ft0 + kt @ pinv @ (y - f0), tol=1e-9)
  gp = predict.gp_inference(train, y)(('nngp', 'ntk'), test_train)
  _assert_close(gp.ntk, kt @ pinv @ y, tol=1e-9)
  _assert_close(gp.nngp, np.asarray(test_train.nngp)
                @ np.linalg.pinv(np.asarray(train.nngp)) @ y, tol=1e-9)


def _two_copies():
  """Two copies of one input with targets +1 and -1, and a test input equal
  to them: the joint kernel is c * ones((3, 3)), exactly singular."""
  c = 0.7
  return c * np.ones((2, 2)), c * np.ones((1, 2)), np.array([[1.], [-1.]])


def test_singular_kernel_minimal_example_test_prediction():
  """Gradient flow (= the pseudo-inverse solution) predicts the average
  target, 0, at a test input equal to the two training inputs."""
  k, kt, y = _two_copies()
  np.testing.assert_allclose(kt @ np.linalg.pinv(k) @ y, 0., atol=1e-15)
  # Long finite training agrees with that limit.
  _, test = predict.gradient_descent_mse(k, y)(1e3, 0., np.zeros((1, 1)), kt)
  assert np.all(np.abs(test) < 1e-12)
  _, test = predict.gradient_descent_mse(k, y)(None, 0., np.zeros((1, 1)), kt)
  assert np.all(np.abs(test) < 1e-12), test
  assert np.all(np.abs(predict.gp_inference(k, y)('nngp', kt)) < 1e-12)


def test_singular_kernel_minimal_example_training_prediction():
  """The two identical training inputs always have equal outputs; the flow
  takes them to the average target 0, not to y = (1, -1)."""
  k, _, y = _two_copies()
  train = predict.gradient_descent_mse(k, y)(1e3)
  assert np.all(np.abs(train) < 1e-12)
  train = predict.gradient_descent_mse(k, y)(None)
  assert np.all(np.abs(train) < 1e-12), train


@pytest.mark.parametrize('seed', [0, 1])
def test_rank_deficient_kernel_infinite_time_training_outputs(seed):
  """Duplicated inputs with different targets: the flow cannot fit both, and
  f_train(inf) = y + (I - K K^+)(f_0 - y) (equal outputs on equal inputs),
  which is also what long finite training approaches."""
  train, _, y, f0, _ = _duplicated_problem(seed, consistent=False)
  k = np.asarray(train.ntk)
  expected = y + (np.eye(7) - k @ np.linalg.pinv(k)) @ (f0 - y)
  predict_fn = predict.gradient_descent_mse(k, y)
  # Sanity of the derivation: very long training reaches it.
  assert np.linalg.eigvalsh(k)[2] * 1e8 / y.size > 1e5
  _assert_close(predict_fn(1e8, f0), expected, tol=1e-8)
  train_inf = predict_fn(None, f0)
  np.testing.assert_allclose(train_inf[5:], train_inf[:2], rtol=1e-9)
  _assert_close(train_inf, expected, tol=1e-9)


@pytest.mark.parametrize('t', [1., 50., 1e6])
def test_rank_deficient_kernel_finite_time(t):
  train, test_train, y, f0, ft0 = _duplicated_problem(0, consistent=False)
  k, kt = np.asarray(train.ntk), np.asarray(test_train.ntk)
  s = t / y.size
  train_t, test_t = predict.gradient_descent_mse(k, y)(t, f0, ft0, kt)
  e = np.eye(7) - _expm(-s * k)
  _assert_close(train_t, _flow_train(k, y, f0, s), tol=1e-9)
  _assert_close(test_t, ft0 - kt @ np.linalg.pinv(k) @ e @ (f0 - y), tol=1e-9)


def test_gd_mse_bad_shapes_and_axes_name_the_argument():
  p = _problem()
  with pytest.raises(ValueError, match='k_train_train'):
    predict.gradient_descent_mse(p.k[:5, :5], p.y)
  with pytest.raises(ValueError, match='k_train_train'):
    # A 4-d kernel where trace_axes=(-1,) expects (N, N).
    predict.gradient_descent_mse(_zip4(np.kron(p.k, np.eye(3)), 6, 3, 6, 3),
                                 p.y)
  with pytest.raises(ValueError, match='k_train_train'):
    predict.gradient_descent_mse(p.k, p.y, trace_axes=())
  predict_fn = predict.gradient_descent_mse(p.k, p.y)
  with pytest.raises(ValueError, match='k_test_train'):
    predict_fn(1., p.f0, p.ft0, p.kt[:, :5])
  with pytest.raises(ValueError, match='k_test_train'):
    predict_fn(1., p.f0, p.ft0)
  with pytest.raises(ValueError, match='fx_test_0'):
    predict_fn(None, p.f0, p.ft0)
  for axes in [(0,), (-2,), 0, (1, 0), (2,), (-3,)]:
    with pytest.raises(ValueError, match='trace_axes'):
      predict.gradient_descent_mse(p.k, p.y, trace_axes=axes)
