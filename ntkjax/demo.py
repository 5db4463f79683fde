"""`make demo`: a fully connected network beside its infinite-width limit.

One definition gives the finite network and its exact NNGP/NTK. The demo
(1) measures how the finite network's kernel approaches the analytic one as
the width grows (theory: error ~ width^-1/2), and (2) trains finite networks
with gradient descent on a small regression task and compares them with the
infinite-width NTK prediction f_0(x) + Theta(x, X) Theta(X, X)^-1 (y - f_0(X)),
which each network should approach as its width grows. A later issue grows
this into `ntkjax compare` on real data.

Run: `python -m ntkjax.demo` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkjax import stax

WIDTHS = (64, 128, 256, 512, 1024)


def network(width: int, readout: int = 1):
  """The issue's example network, two different nonlinearities."""
  return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.05), stax.Relu(),
                     stax.Dense(width, W_std=1.5, b_std=0.05), stax.Erf(),
                     stax.Dense(readout, W_std=1.5, b_std=0.05))


def make_data(key, n_train=48, n_test=64, dim=8):
  """y = sin(3 <x, w>) + noise on the unit sphere in `dim` dimensions."""
  kx, kt, kw, kn = jax.random.split(key, 4)
  w = jax.random.normal(kw, (dim,)) / jnp.sqrt(dim)

  def sample(k, n):
    x = jax.random.normal(k, (n, dim))
    return x / jnp.linalg.norm(x, axis=1, keepdims=True) * jnp.sqrt(dim)
  x_train, x_test = sample(kx, n_train), sample(kt, n_test)
  target = lambda x: jnp.sin(3 * x @ w / jnp.sqrt(dim))[:, None]
  y_train = target(x_train) + 0.05 * jax.random.normal(kn, (n_train, 1))
  return x_train, y_train, x_test, target(x_test)


def kernel_distance(width, x, key, seeds=4):
  """||Theta_emp - Theta||_F / ||Theta||_F at init, averaged over seeds."""
  init_fn, apply_fn, kernel_fn = network(width)
  exact = kernel_fn(x, None, 'ntk')

  @jax.jit
  def empirical(params):
    jac = jax.jacrev(lambda p: apply_fn(p, x)[:, 0])(params)
    flat = jnp.concatenate([j.reshape(x.shape[0], -1)
                            for j in jax.tree.leaves(jac)], axis=1)
    return flat @ flat.T
  errors = []
  for k in jax.random.split(key, seeds):
    _, params = init_fn(k, x.shape)
    errors.append(float(jnp.linalg.norm(empirical(params) - exact)
                        / jnp.linalg.norm(exact)))
  return float(np.mean(errors))


def train(width, data, key, steps=2000, learning_rate=None):
  """Full-batch gradient descent on MSE; returns test predictions, and f_0."""
  x_train, y_train, x_test, _ = data
  init_fn, apply_fn, kernel_fn = network(width)
  _, params = init_fn(key, x_train.shape)
  if learning_rate is None:
    # Stable for gradient descent on 0.5 * mean squared error: 2 n / lambda_max.
    ntk = kernel_fn(x_train, None, 'ntk')
    learning_rate = float(x_train.shape[0] / jnp.linalg.eigvalsh(ntk)[-1])
  optimizer = optax.sgd(learning_rate)
  state = optimizer.init(params)
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((apply_fn(p, x_train) - y_train)**2, 1))

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(params, updates), state
  f0_train, f0_test = apply_fn(params, x_train), apply_fn(params, x_test)
  for _ in range(steps):
    params, state = step(params, state)
  return apply_fn(params, x_test), f0_train, f0_test


def ntk_prediction(width, data, f0_train, f0_test):
  """Infinite-width NTK prediction at t = inf for a network starting at f_0."""
  x_train, y_train, x_test, _ = data
  kernel_fn = network(width)[2]
  k_train = kernel_fn(x_train, None, 'ntk')
  k_test = kernel_fn(x_test, x_train, 'ntk')
  return f0_test + k_test @ jnp.linalg.solve(k_train, y_train - f0_train)


def main():
  jax.config.update('jax_enable_x64', True)
  start = time.time()
  key = jax.random.PRNGKey(0)
  data = make_data(key)
  x_train, y_train, x_test, y_test = data
  print('ntkjax demo: one definition, finite and infinite width')
  print('network: Dense-Relu-Dense-Erf-Dense, W_std=1.5, b_std=0.05\n')

  print('1. Finite-width NTK at initialization vs the analytic kernel')
  print(f'   {"width":>6}  {"|Theta_n - Theta|/|Theta|":>26}')
  distances = [kernel_distance(w, x_train[:16], jax.random.PRNGKey(w))
               for w in WIDTHS]
  for w, d in zip(WIDTHS, distances):
    print(f'   {w:>6}  {d:>26.4f}')
  slope = np.polyfit(np.log(WIDTHS), np.log(distances), 1)[0]
  print(f'   log-log slope {slope:.2f} (theory: -0.50)\n')

  print('2. Infinite-width predictions (kernel regression, f_0 = 0)')
  kernel_fn = network(1)[2]
  for get in ('nngp', 'ntk'):
    k_train = kernel_fn(x_train, None, get)
    k_test = kernel_fn(x_test, x_train, get)
    mean = k_test @ jnp.linalg.solve(k_train + 1e-6 * jnp.eye(len(k_train)),
                                     y_train)
    print(f'   {get.upper():>4}: test MSE {float(jnp.mean((mean - y_test)**2)):.4f}')
  print()

  print('3. Finite networks trained by gradient descent vs the NTK prediction')
  print(f'   {"width":>6}  {"test MSE":>9}  {"|f_net - f_NTK| / |f_NTK|":>26}')
  for width in (64, 256, 1024):
    f_test, f0_train, f0_test = train(width, data, jax.random.PRNGKey(width + 1))
    f_ntk = ntk_prediction(width, data, f0_train, f0_test)
    gap = float(jnp.linalg.norm(f_test - f_ntk) / jnp.linalg.norm(f_ntk))
    mse = float(jnp.mean((f_test - y_test)**2))
    print(f'   {width:>6}  {mse:>9.4f}  {gap:>26.4f}')
  print(f'\ndone in {time.time() - start:.0f} s')


if __name__ == '__main__':
  main()
