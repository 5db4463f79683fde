"""muP (ntkjax/mup.py): the coordinate check of Tensor Programs V, and the
parameter scalings of its Table 3.

Coordinate check: after one step of training, the typical change of each
layer's pre-activations must stay O(1) across widths under muP (fitted
log-log slope ~ 0), while in the standard parameterization with the same,
width-independent learning rate the hidden and output changes blow up and
the input layer's vanish. Widths 256..2048 with base width 64: far enough
from the base that the output at initialization (variance ~ 64 / width in
muP) no longer dominates the first gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkjax import stax
from ntkjax.mup import MuP

WIDTHS = (256, 512, 1024, 2048)


def _layers(width):
  return [stax.Dense(width, W_std=1.4, b_std=0.1, parameterization='standard'),
          stax.Relu(),
          stax.Dense(width, W_std=1.4, b_std=0.1, parameterization='standard'),
          stax.Relu(),
          stax.Dense(1, W_std=1., b_std=0.1, parameterization='standard')]


def _network(width):
  return stax.serial(*_layers(width))


X = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)))
Y = jnp.sin(X[:, :1])
MUP = MuP(_network, 64, X.shape)


def _pre_activations(width, params):
  h, out = X, []
  for layer, p in zip(_layers(width), params):
    h = layer.apply_fn(p, h)
    out.append(h)
  return out[0], out[2], out[4]


def _update_sizes(width, parameterization, optimizer, lr, seed):
  """RMS change of the three Dense layers' outputs after one step."""
  key = jax.random.PRNGKey(seed)
  base = optax.sgd(lr) if optimizer == 'sgd' else optax.adam(lr)
  if parameterization == 'mup':
    _, params = MUP.init_fn(key, width)
    opt = optax.chain(base, MUP.scale_updates(params, optimizer))
  else:
    _, params = _network(width).init_fn(key, X.shape)
    opt = base
  apply_fn = _network(width).apply_fn
  loss = lambda p: 0.5 * jnp.mean((apply_fn(p, X) - Y)**2)
  updates, _ = opt.update(jax.grad(loss)(params), opt.init(params), params)
  after = optax.apply_updates(params, updates)
  return [float(jnp.sqrt(jnp.mean((a - b)**2))) for a, b in
          zip(_pre_activations(width, after), _pre_activations(width, params))]


def _slopes(parameterization, optimizer, lr):
  sizes = np.array([np.mean([_update_sizes(w, parameterization, optimizer, lr,
                                           seed) for seed in range(4)], 0)
                    for w in WIDTHS])
  return [np.polyfit(np.log(WIDTHS), np.log(sizes[:, i]), 1)[0]
          for i in range(3)]


def test_coordinate_check_sgd():
  """SGD, lr 0.05. Measured slopes (input, hidden, output): muP 0.00,
  -0.06, -0.10; standard -0.33, +0.64, +1.13."""
  mup = _slopes('mup', 'sgd', 0.05)
  assert all(abs(s) < 0.2 for s in mup), mup
  standard = _slopes('standard', 'sgd', 0.05)
  assert standard[0] < -0.2 and standard[1] > 0.4 and standard[2] > 0.8, (
      standard)


def test_coordinate_check_adam():
  """Adam, lr 1e-3 (its first step moves every parameter by ~lr, so in the
  standard parameterization the hidden and output changes grow with
  width). Measured slopes: muP 0.01, -0.03, -0.04; standard 0.01, +0.98,
  +1.39."""
  mup = _slopes('mup', 'adam', 1e-3)
  assert all(abs(s) < 0.2 for s in mup), mup
  standard = _slopes('standard', 'adam', 1e-3)
  assert standard[1] > 0.4 and standard[2] > 0.4, standard


def test_table_3_scalings():
  """Tensor Programs V, Table 3, relative to the base width 64, at width
  256 (m = 4): init std x 1/sqrt(m) for the output weights only; SGD
  learning rates x m (input weights, hidden biases, input biases), x 1
  (hidden weights, output bias), x 1/m (output weights); Adam x 1 except
  hidden and output weights, x 1/m."""
  key = jax.random.PRNGKey(3)
  _, mup = MUP.init_fn(key, 256)
  _, standard = _network(256).init_fn(key, X.shape)
  ratios = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), mup,
                        standard)
  assert ratios[0] == (0., 0.) and ratios[2] == (0., 0.)
  np.testing.assert_allclose(mup[4][0], standard[4][0] / 2., rtol=1e-12)
  assert MUP.learning_rate_scales(mup, 'sgd') == (
      (4., 4.), (), (1., 4.), (), (0.25, 1.))
  assert MUP.learning_rate_scales(mup, 'adam') == (
      (1., 1.), (), (0.25, 1.), (), (0.25, 1.))
  # At the base width muP is the standard parameterization.
  _, at_base = MUP.init_fn(key, 64)
  _, standard_base = _network(64).init_fn(key, X.shape)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                   at_base, standard_base))


def test_convolutions_are_classified_by_their_channel_axes():
  """Conv weights (filter..., in, out): fan-in is the filter times the input
  channels; only the channel axes grow with width."""
  network = lambda width: stax.serial(
      stax.Conv(width, (3, 3), padding='SAME', parameterization='standard'),
      stax.Relu(),
      stax.Conv(width, (3, 3), padding='SAME', parameterization='standard'),
      stax.Relu(), stax.Flatten(),
      stax.Dense(2, parameterization='standard'))
  mup = MuP(network, 8, (2, 4, 4, 3))
  _, params = mup.init_fn(jax.random.PRNGKey(0), 32)
  # m = 32 / 8 = 4 for the channel axes; the readout's fan-in is 16 x width.
  assert mup.learning_rate_scales(params, 'sgd') == (
      (4., None), (), (1., None), (), (), (0.25, None))


def test_no_kernel_limit_and_bad_input():
  with pytest.raises(stax.KernelError, match='no infinite-width kernel'):
    MUP.kernel_fn
  with pytest.raises(ValueError, match="optimizer='rmsprop'"):
    MUP.learning_rate_scales(MUP.init_fn(jax.random.PRNGKey(0), 64)[1],
                             'rmsprop')
  with pytest.raises(ValueError, match='base_width must be a positive int'):
    MuP(_network, 0, X.shape)


def test_one_hidden_layer_with_base_width_one_is_mean_field():
  """Mean field (Mei, Montanari & Nguyen 2018; Chizat & Bach 2018): f(x) =
  (1/n) sum_i a_i relu(w_i . x), a_i ~ N(0, 1), w_i ~ N(0, I / d), gradient
  descent with learning rate eta n on each parameter. muP relative to base
  width 1 is exactly that network: the output weights a_i / n (std 1/n),
  their learning rate eta / n (= eta n on a_i), the input weights' eta n.
  Five SGD steps of both, written independently, agree to rounding."""
  d, n, eta = 5, 512, 0.3
  network = lambda width: stax.serial(
      stax.Dense(width, parameterization='standard'), stax.Relu(),
      stax.Dense(1, parameterization='standard'))
  x = X[:, :d]
  mean_field = MuP(network, 1, x.shape)
  _, params = mean_field.init_fn(jax.random.PRNGKey(0), n)
  w, a = params[0][0], params[2][0][:, 0] * n          # (d, n), (n,)
  assert abs(float(jnp.std(a)) - 1.) < 0.1

  def f(w, a):
    return jnp.maximum(x @ w, 0.) @ a / n

  loss = lambda w, a: 0.5 * jnp.mean((f(w, a)[:, None] - Y)**2)
  for _ in range(5):
    gw, ga = jax.grad(loss, (0, 1))(w, a)
    w, a = w - eta * n * gw, a - eta * n * ga
  opt = optax.chain(optax.sgd(eta), mean_field.scale_updates(params, 'sgd'))
  apply_fn = network(n).apply_fn
  mup_loss = lambda p: 0.5 * jnp.mean((apply_fn(p, x) - Y)**2)
  state = opt.init(params)
  for _ in range(5):
    updates, state = opt.update(jax.grad(mup_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(apply_fn(params, x)[:, 0], f(w, a), rtol=1e-10)


def test_effective_ntk_is_the_kernel_sgd_follows():
  """`effective_ntk_fn` is sum_l s_l J_l J_l^T (J_l: the Jacobian of the
  outputs in parameter l, s_l its SGD learning-rate factor), to rounding;
  and one muP SGD step on L = 0.5 |f - y|^2 moves the outputs by
  -lr J diag(s) J^T (f - y) + O(lr^2): at lr 1e-4 the remainder is 5e-4 of
  the move (measured), where with the plain J J^T it is 2.2 of it."""
  from ntkjax.empirical import empirical_ntk_fn
  width = 256
  _, params = MUP.init_fn(jax.random.PRNGKey(5), width)
  apply_fn = _network(width).apply_fn
  effective = MUP.effective_ntk_fn(width, trace_axes=(-1,))(X, None, params)
  jacobian = jax.jacobian(lambda p: apply_fn(p, X)[:, 0])(params)
  scales = MUP.learning_rate_scales(params, 'sgd')
  direct = sum(s * jnp.einsum('a...,b...->ab', j, j) for j, s in
               zip(jax.tree.leaves(jacobian), jax.tree.leaves(scales)))
  np.testing.assert_allclose(effective, direct, rtol=1e-12, atol=1e-12)

  lr = 1e-4
  loss = lambda p: 0.5 * jnp.sum((apply_fn(p, X) - Y)**2)
  opt = optax.chain(optax.sgd(lr), MUP.scale_updates(params, 'sgd'))
  updates, _ = opt.update(jax.grad(loss)(params), opt.init(params), params)
  moved = (apply_fn(optax.apply_updates(params, updates), X)
           - apply_fn(params, X))[:, 0]
  residual = (apply_fn(params, X) - Y)[:, 0]
  plain = empirical_ntk_fn(apply_fn, trace_axes=(-1,))(X, None, params)
  relative = lambda k: float(jnp.linalg.norm(moved + lr * k @ residual)
                             / jnp.linalg.norm(moved))
  assert relative(effective) < 1e-2 and relative(plain) > 0.5, (
      relative(effective), relative(plain))


def _one_hidden_layer(width, parameterization):
  return stax.serial(
      stax.Dense(width, W_std=1.4, b_std=0.1,
                 parameterization=parameterization),
      stax.Relu(),
      stax.Dense(1, W_std=1., b_std=0.1, parameterization=parameterization))


def test_kernel_drift_vanishes_with_width_under_ntk_not_under_mup():
  """Issue 18's test: 100 full-batch SGD steps (lr half the largest stable
  one, set at the smallest width) of a one-hidden-layer ReLU network at
  widths 256, 1024, 4096. Under the NTK parameterization the relative drift
  of the empirical NTK and the network's gap to its linearization fall
  with width (measured slopes -0.71 and -0.60); under muP (base 64) the
  drift of the kernel SGD follows, J diag(s) J^T, and the gap stay put
  (+0.06 and +0.02), and at width 4096 the muP drift is 4x the NTK one
  (0.018 vs 0.0044): the features keep moving at every width."""
  from ntkjax import predict, train
  from ntkjax.empirical import empirical_ntk_fn
  widths = (256, 1024, 4096)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 8)))
  y = jnp.sin(2 * x[:, :1])
  mup = MuP(lambda w: _one_hidden_layer(w, 'standard'), 64, x.shape)
  slopes, at_widest = {}, {}
  for parameterization in ('ntk', 'mup'):
    lr, drifts, gaps = None, [], []
    for width in widths:
      drift, gap = [], []
      for seed in range(2):
        key = jax.random.PRNGKey(seed)
        if parameterization == 'mup':
          layer = _one_hidden_layer(width, 'standard')
          _, params = mup.init_fn(key, width)
          ntk_fn = mup.effective_ntk_fn(width, trace_axes=(-1,), vmap_axes=0)
        else:
          layer = _one_hidden_layer(width, 'ntk')
          _, params = layer.init_fn(key, x.shape)
          ntk_fn = empirical_ntk_fn(layer.apply_fn, trace_axes=(-1,),
                                    vmap_axes=0)
        theta0 = ntk_fn(x, None, params)
        if lr is None:
          lr = 0.5 * float(predict.max_learning_rate(theta0, y.size))
        opt = optax.sgd(lr)
        if parameterization == 'mup':
          opt = optax.chain(opt, mup.scale_updates(params, 'sgd'))
        net = train(layer.apply_fn, params, x, y, opt, 100)
        lin = train(layer.apply_fn, params, x, y, opt, 100, linearized=True)
        theta1 = ntk_fn(x, None, net.params)
        drift.append(float(jnp.linalg.norm(theta1 - theta0)
                           / jnp.linalg.norm(theta0)))
        gap.append(float(jnp.sqrt(jnp.mean((net.fx_train[-1]
                                            - lin.fx_train[-1])**2))))
      drifts.append(np.mean(drift))
      gaps.append(np.mean(gap))
    slopes[parameterization] = [np.polyfit(np.log(widths), np.log(v), 1)[0]
                                for v in (drifts, gaps)]
    at_widest[parameterization] = drifts[-1]
  assert slopes['ntk'][0] < -0.5 and slopes['ntk'][1] < -0.4, slopes
  assert all(abs(s) < 0.2 for s in slopes['mup']), slopes
  assert at_widest['mup'] > 3 * at_widest['ntk'], at_widest
