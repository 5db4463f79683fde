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
