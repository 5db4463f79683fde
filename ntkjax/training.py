"""Finite training with optax, beside the closed-form kernel dynamics.

`train(apply_fn, params, x_train, y_train, optimizer, steps)` trains a
network (or, with `linearized=True`, its first-order Taylor expansion
`linearize(apply_fn, params)` around the initial parameters) with any optax
optimizer, full-batch or on minibatches, in one jit-compiled loop, and
records the training (and test) outputs and the training loss at chosen
steps.

Losses (neural-tangents' normalization, the one `ntkjax.predict` assumes):

    'mse':            L(f) = |f - y|^2 / (2 |y|) = 0.5 * mean((f - y)**2),
                      the mean over *all* entries of y (|y| = y.size);
    'cross_entropy':  L(f) = mean over examples (and any axes but the last)
                      of -sum_c y_c log softmax(f)_c, with one-hot (or
                      probability) targets y on the last axis
                      (`optax.softmax_cross_entropy`);
    a callable:       L(f) = loss(f, y) -> scalar.

Time: one step of `optax.sgd(learning_rate)` on the linearized network with
the 'mse' loss is exactly

    f_{k+1} = f_k - (learning_rate / |y|) Theta (f_k - y),

the explicit Euler step (of size 1) of the gradient flow
df/dt = -(learning_rate / |y|) Theta (f - y) that
`predict.gradient_descent_mse(Theta, y_train, learning_rate)` solves, with
`t` counted in steps (absolute time learning_rate * t). So the outputs
recorded at step k sit beside `predict_fn(t=k, ...)`, and approach them as
learning_rate -> 0 at fixed learning_rate * k (the gap is O(learning_rate)).
For another loss the same holds for `predict.gradient_descent(loss, ...)`.

The lazy-rich dial (`output_scale=alpha`; Chizat, Oyallon & Bach 2019,
"On lazy training in differentiable programming"): the trained model is
the centered, scaled network

    g(params, x) = alpha (f(params, x) - f(params_0, x)),

minimizing L(g) / alpha^2, so that the function-space step is independent
of alpha to first order: for the linearized network it is exactly the same
for every alpha (g = alpha J dp, and the gradient of L(g) / alpha^2 is
J^T dL / alpha). As alpha -> infinity the network's parameters move
O(1/alpha) and it trains like its linearization (the kernel regime); small
alpha is the rich, feature-learning regime. The recorded outputs are g;
g = 0 at step 0, so targets are fit from zero.

Minibatches (`batch_size`): each epoch draws a fresh permutation of the
training set from `key` (without replacement; `batch_size` must divide the
number of examples), and the loss of a step is the same loss on the batch
(so 'mse' divides by the batch's y.size, an unbiased estimate of the full
loss and its gradient). The recorded loss is always on the full training
set.

The loop is one `lax.scan` over the segments between recorded steps, each a
`lax.fori_loop` over its steps, inside one `jax.jit`: compiled once per
(apply_fn, optimizer, loss, batch_size, linearized) and input shapes, for
any `steps` and any `record_steps` of the same length. `apply_fn(params, x)`
is called with two arguments; bind keyword arguments (e.g. with
`functools.partial`) beforehand.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ntkjax.linearize import linearize

PyTree = Any


class TrainResult(NamedTuple):
  """What `train` returns.

  Attributes:
    params: the final parameters (of the linearized model if `linearized`:
      evaluate them with `linearize(apply_fn, initial_params)`).
    opt_state: the final optimizer state.
    steps: (R,) int array, the recorded steps.
    fx_train: (R, *outputs on x_train), the training outputs at those steps.
    fx_test: (R, *outputs on x_test), or None without `x_test`.
    loss: (R,), the loss on the full training set at those steps.
  """
  params: PyTree
  opt_state: PyTree
  steps: jax.Array
  fx_train: jax.Array
  fx_test: Optional[jax.Array]
  loss: jax.Array


def mse_loss(fx, y):
  """|f - y|^2 / (2 |y|): half the mean squared error over all entries."""
  return 0.5 * jnp.mean((fx - y)**2)


def cross_entropy_loss(fx, y):
  """Softmax cross-entropy on the last axis, averaged over the other axes."""
  return jnp.mean(optax.softmax_cross_entropy(fx, y))


_LOSSES = {'mse': mse_loss, 'cross_entropy': cross_entropy_loss}


class _Static:
  """A static jit argument hashed by identity (works for unhashable objects)."""

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, _Static) and other.value is self.value


# ----------------------------------------------------------------------------
# Validation.


def _int(value, name: str, low: int = 0) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < low):
    raise ValueError(f'train: {name} must be an int >= {low}, got {value!r}.')
  return int(value)


def _loss_fn(loss) -> Callable:
  if isinstance(loss, str):
    if loss not in _LOSSES:
      raise ValueError(f'train: unknown loss={loss!r}; use one of '
                       f'{sorted(_LOSSES)} or a callable loss(fx, y) -> '
                       'scalar.')
    return _LOSSES[loss]
  if not callable(loss):
    raise ValueError(f'train: loss must be a string or a callable '
                     f'loss(fx, y) -> scalar, got {loss!r}.')
  return loss


def _record_steps(record_steps, steps: int) -> tuple:
  if record_steps is None:
    return (0, steps) if steps > 0 else (0,)
  if isinstance(record_steps, numbers.Integral):
    record_steps = (record_steps,)
  record = tuple(np.asarray(record_steps).reshape(-1).tolist())
  for k in record:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
      raise ValueError('train: record_steps must be ints, got '
                       f'{record_steps!r}.')
    if not 0 <= k <= steps:
      raise ValueError(f'train: record_steps={record_steps!r} has step {k}, '
                       f'outside [0, steps={steps}].')
  if any(b <= a for a, b in zip(record, record[1:])):
    raise ValueError(f'train: record_steps={record_steps!r} must be strictly '
                     'increasing.')
  return record


def _check_data(x_train, y_train, x_test, batch_size, key):
  for name, a in (('x_train', x_train), ('y_train', y_train)):
    if a.ndim < 1:
      raise ValueError(f'train: {name} needs a leading example axis, got '
                       f'shape {a.shape}.')
  n = x_train.shape[0]
  if y_train.shape[0] != n:
    raise ValueError(f'train: x_train has {n} examples (shape '
                     f'{x_train.shape}) but y_train has {y_train.shape[0]} '
                     f'(shape {y_train.shape}).')
  if x_test is not None and x_test.shape[1:] != x_train.shape[1:]:
    raise ValueError(f'train: x_test has shape {x_test.shape}, but examples '
                     f'of x_train have shape {x_train.shape[1:]}.')
  if batch_size is not None:
    batch_size = _int(batch_size, 'batch_size', low=1)
    if batch_size > n or n % batch_size:
      raise ValueError(f'train: batch_size={batch_size} must divide the number '
                       f'of training examples {n} (and not exceed it).')
    if key is None:
      raise ValueError('train: minibatch training (batch_size set) needs a '
                       'PRNG key, key=jax.random.key(seed).')
  return batch_size


def _check_shapes(model, params, x_train, y_train, loss, loss_fn):
  """Calls the model and loss abstractly, for clear errors before tracing."""
  try:
    fx = jax.eval_shape(model, params, x_train)
  except (TypeError, ValueError) as error:
    raise ValueError(f'train: calling apply_fn(params, x_train) on x_train of '
                     f'shape {x_train.shape} failed ({error}); check params '
                     'and the input shape.') from error
  if not hasattr(fx, 'shape'):
    raise ValueError('train: apply_fn(params, x) must return one array, got '
                     f'{jax.tree.structure(fx)}.')
  if isinstance(loss, str) and fx.shape != y_train.shape:
    hint = (' (one-hot targets: jax.nn.one_hot(labels, classes))'
            if loss == 'cross_entropy' else '')
    raise ValueError(f'train: apply_fn(params, x_train) has shape {fx.shape} '
                     f'but y_train has shape {y_train.shape}; loss={loss!r} '
                     f'needs them equal{hint}.')
  value = jax.eval_shape(loss_fn, fx, y_train)
  if getattr(value, 'shape', None) != ():
    raise ValueError(f'train: loss(fx, y) must return a scalar, got '
                     f'{getattr(value, "shape", value)}.')


# ----------------------------------------------------------------------------
# The compiled loop.


@functools.partial(jax.jit, static_argnames=('apply_fn', 'optimizer', 'loss_fn',
                                             'batch_size', 'linearized',
                                             'n_records'))
def _run(params, x_train, y_train, x_test, key, lengths, output_scale, *,
         apply_fn, optimizer, loss_fn, batch_size, linearized, n_records):
  """Trains for sum(lengths) steps, recording after each of the first
  `n_records` segments of `lengths` steps. `output_scale` None: the model
  itself; else alpha (an array, so every alpha shares one compilation):
  alpha (f - f_0) with the loss divided by alpha^2."""
  apply_fn, loss_fn = apply_fn.value, loss_fn.value
  optimizer = optax.with_extra_args_support(optimizer.value)
  network = linearize(apply_fn, params) if linearized else apply_fn
  n = x_train.shape[0]
  if output_scale is None:
    model = lambda p, x, f0: network(p, x)
    scale_loss = lambda value: value
    f0_train = f0_test = None
  else:
    model = lambda p, x, f0: output_scale * (network(p, x) - f0)
    scale_loss = lambda value: value / output_scale**2
    f0_train = network(params, x_train)
    f0_test = None if x_test is None else network(params, x_test)

  def batch_loss(p, xb, yb, f0b):
    return scale_loss(loss_fn(model(p, xb, f0b), yb))

  def step(_, carry):
    p, state, k, perm = carry
    if batch_size is None:
      xb, yb = x_train, y_train
    else:
      batches = n // batch_size
      epoch, index = k // batches, k % batches
      perm = lax.cond(index == 0,
                      lambda: jax.random.permutation(
                          jax.random.fold_in(key, epoch), n),
                      lambda: perm)
      rows = lax.dynamic_slice_in_dim(perm, index * batch_size, batch_size)
      xb, yb = x_train[rows], y_train[rows]
    f0b = f0_train if f0_train is None or batch_size is None else f0_train[
        rows]
    value, grads = jax.value_and_grad(batch_loss)(p, xb, yb, f0b)
    updates, state = optimizer.update(
        grads, state, p, value=value, grad=grads,
        value_fn=lambda q: batch_loss(q, xb, yb, f0b))
    return optax.apply_updates(p, updates), state, k + 1, perm

  def segment(carry, length):
    carry = lax.fori_loop(0, length, step, carry)
    fx = model(carry[0], x_train, f0_train)
    fx_test = None if x_test is None else model(carry[0], x_test, f0_test)
    return carry, (fx, fx_test, loss_fn(fx, y_train))

  perm = jnp.arange(n)
  carry = (params, optimizer.init(params), jnp.zeros((), jnp.int32), perm)
  (p, state, _, _), (fx, fx_test, loss) = lax.scan(segment, carry, lengths)
  keep = lambda a: None if a is None else a[:n_records]
  return p, state, keep(fx), keep(fx_test), keep(loss)


def train(apply_fn: Callable, params: PyTree, x_train, y_train,
          optimizer: optax.GradientTransformation, steps: int,
          loss: Union[str, Callable] = 'mse',
          batch_size: Optional[int] = None,
          record_steps: Optional[Sequence[int]] = None,
          x_test=None, linearized: bool = False,
          key: Optional[jax.Array] = None,
          output_scale: Optional[float] = None) -> TrainResult:
  """Trains `apply_fn` (or its linearization) with an optax optimizer.

  Args:
    apply_fn: `apply_fn(params, x) -> outputs` (e.g. from `stax.serial`).
    params: initial parameters (any pytree); with `linearized`, also the
      expansion point.
    x_train: training inputs, (N, ...).
    y_train: targets, (N, ...), shaped like the outputs for the built-in
      losses.
    optimizer: any optax `GradientTransformation`; the loss value, gradient
      and a `value_fn` of the step's batch are passed as extra arguments, so
      line-search optimizers (`optax.lbfgs`) and `reduce_on_plateau` work.
    steps: number of optimizer steps.
    loss: 'mse', 'cross_entropy' (module docstring) or `loss(fx, y) -> scalar`.
    batch_size: None for full-batch steps; an int dividing N for minibatches
      drawn without replacement each epoch (needs `key`).
    record_steps: strictly increasing steps in [0, steps] after which the
      outputs and the loss are recorded (0: before training); default
      (0, steps).
    x_test: optional test inputs, recorded at the same steps.
    linearized: train `linearize(apply_fn, params)` instead of `apply_fn`.
    key: PRNG key for the minibatch order.
    output_scale: alpha > 0 of the lazy-rich dial (module docstring): train
      alpha (f - f_0) on loss / alpha^2; large alpha is the kernel regime,
      small alpha the feature-learning one. None (default): f itself.

  Returns:
    A `TrainResult(params, opt_state, steps, fx_train, fx_test, loss)`;
    the recorded arrays have a leading axis over `record_steps` (with
    `output_scale`, fx are alpha (f - f_0) and loss is L of them, not
    divided by alpha^2). For
    `optax.sgd(lr)` and the 'mse' loss, lay them beside
    `predict.gradient_descent_mse(ntk, y_train, lr)(t=result.steps, ...)`.
  """
  steps = _int(steps, 'steps')
  record = _record_steps(record_steps, steps)
  loss_fn = _loss_fn(loss)
  if not (hasattr(optimizer, 'init') and hasattr(optimizer, 'update')):
    raise ValueError('train: optimizer must be an optax GradientTransformation '
                     f'(with init and update), got {optimizer!r}.')
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  x_test = None if x_test is None else jnp.asarray(x_test)
  batch_size = _check_data(x_train, y_train, x_test, batch_size, key)
  model = linearize(apply_fn, params) if linearized else apply_fn
  _check_shapes(model, params, x_train, y_train, loss, loss_fn)
  if output_scale is not None:
    alpha = np.asarray(output_scale, dtype=float)
    if alpha.shape != () or not np.isfinite(alpha) or alpha <= 0:
      raise ValueError(f'train: output_scale={output_scale!r} must be a '
                       'finite number > 0 (alpha of the lazy-rich dial), or '
                       'None.')
    output_scale = jnp.asarray(output_scale,
                               jnp.result_type(*jax.tree.leaves(params)))

  # Segments end at each recorded step, then at `steps` (its record dropped),
  # so the compiled loop depends on len(record) only.
  lengths = jnp.asarray(np.diff((0,) + record + (steps,)), jnp.int32)
  if key is None:
    key = jax.random.key(0)  # unused without minibatches
  p, state, fx, fx_test, values = _run(
      params, x_train, y_train, x_test, key, lengths, output_scale,
      apply_fn=_Static(apply_fn),
      optimizer=_Static(optimizer),
      loss_fn=_Static(loss_fn), batch_size=batch_size,
      linearized=bool(linearized), n_records=len(record))
  return TrainResult(p, state, jnp.asarray(record, jnp.int32), fx, fx_test,
                     values)
