"""The maximal-update parameterization (muP) of a stax network.

muP (Yang & Hu 2021, "Feature learning in infinite-width neural networks";
Yang et al. 2022, "Tensor Programs V", Table 3) scales initializations and
per-layer learning rates with width so that every layer's features move by
O(1) in training at any width, where the NTK and standard parameterizations
train lazily as width grows. Its practical use: a learning rate tuned on a
narrow network transfers to a wide one (muTransfer).

Widths are measured relative to a base width, as in Tensor Programs V and
microsoft/mup: with m = fan_in / base_fan_in (m_out likewise) a layer's
parameters are scaled as below, so at the base width muP *is* the standard
parameterization, and hyperparameters tuned there carry over. Which axes
are "infinite" (grow with width) is read off the parameter shapes of the
network built at the base width and at twice it (`network_fn(width)`);
weights are (..., fan_in, fan_out) arrays (Dense (in, out); Conv (filter...,
in, out): fan_in the product of all but the last axis), biases 1-d.

The network must be built in the standard parameterization
(`parameterization='standard'`: W ~ N(0, W_std^2 / fan_in), no multiplier).
Then, Tensor Programs V Table 3, relative to the base width:

    weights            init std       SGD lr        Adam lr
    input  (in finite)  x 1            x m_out       x 1
    hidden (in, out)    x 1            x 1           x 1 / m_in
    output (out finite) x 1/sqrt(m_in) x 1 / m_in    x 1 / m_in
    biases              x 1            x m_out       x 1

(the output layer's init variance W_std^2 / (fan_in m_in), i.e.
~ 1 / fan_in^2). `MuP.init_fn` does the init column; `MuP.scale_updates`
is an optax transformation for the learning-rate column, chained after the
optimizer (`optax.chain(optax.sgd(lr), mup.scale_updates(params, 'sgd'))`).

Mean field: for one hidden layer, muP relative to base width 1 is the
mean-field parameterization (Mei, Montanari & Nguyen 2018; Chizat & Bach
2018), f(x) = (1/n) sum_i a_i phi(w_i . x) with a_i, sqrt(d) w_i ~ N(0, 1)
and learning rate eta n on every parameter (tested step for step). Other
base widths differ from it by width-independent constants only.

There is no kernel limit to compare with: in muP the output at
initialization vanishes as width grows (its variance falls like 1 / m_in)
and the hidden features move O(1), so no fixed kernel describes training;
`MuP.kernel_fn` says so instead of returning a number.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from ntkjax.stax import KernelError, Layer

OPTIMIZERS = ('sgd', 'adam')


@dataclasses.dataclass(frozen=True)
class _Scaling:
  """One parameter's place in the width scaling (a pytree leaf).

  Attributes:
    kind: 'weight' (..., fan_in, fan_out) or 'bias' (fan_out,).
    infinite_in, infinite_out: whether fan-in / fan-out grow with width.
    m_in, m_out: fan-in / fan-out relative to the base width (1 if finite).
  """
  kind: str
  infinite_in: bool
  infinite_out: bool
  m_in: float = 1.
  m_out: float = 1.


def _role(base_shape: tuple, delta_shape: tuple) -> _Scaling:
  """A parameter's kind and growing axes, from its shapes at the base width
  and at twice it."""
  if len(base_shape) != len(delta_shape):
    raise ValueError('MuP: the network has different parameter structures '
                     'at different widths.')
  grows = [b != d for b, d in zip(base_shape, delta_shape)]
  if len(base_shape) == 1:
    return _Scaling('bias', False, grows[0])
  return _Scaling('weight', any(grows[:-1]), grows[-1])


class MuP:
  """muP for a family of stax networks `network_fn(width)` (module
  docstring).

  Args:
    network_fn: width -> `Layer` (stax; or any (init_fn, apply_fn,
      kernel_fn) triple), built with `parameterization='standard'` affine
      layers.
    base_width: the width at which muP equals the standard parameterization
      (where learning rates are tuned).
    input_shape: the input shape `init_fn` is called with, e.g. (N, d).
  """

  def __init__(self, network_fn: Callable[[int], Layer], base_width: int,
               input_shape: Sequence[int]):
    if not isinstance(base_width, int) or base_width < 1:
      raise ValueError(f'MuP: base_width must be a positive int, got '
                       f'{base_width!r}.')
    self.network_fn, self.base_width = network_fn, base_width
    self.input_shape = tuple(input_shape)
    key = jax.random.PRNGKey(0)
    self._base = jax.eval_shape(
        lambda: self._init(base_width)(key, self.input_shape)[1])
    delta = jax.eval_shape(
        lambda: self._init(2 * base_width)(key, self.input_shape)[1])
    if jax.tree.structure(self._base) != jax.tree.structure(delta):
      raise ValueError('MuP: network_fn(width) builds different parameter '
                       'structures at different widths.')
    self._roles = jax.tree.map(lambda b, d: _role(b.shape, d.shape),
                               self._base, delta)

  def _init(self, width: int) -> Callable:
    # A Layer or any (init_fn, apply_fn, kernel_fn) triple.
    init_fn, _, _ = self.network_fn(width)
    return init_fn

  def _multipliers(self, params):
    """A `_Scaling` per parameter of `params` (some width)."""
    def one(role, base, leaf):
      m_in = (math.prod(leaf.shape[:-1]) / math.prod(base.shape[:-1])
              if role.kind == 'weight' else 1.)
      return dataclasses.replace(role, m_in=m_in,
                                 m_out=leaf.shape[-1] / base.shape[-1])
    return jax.tree.map(one, self._roles, self._base, params)

  def init_fn(self, key, width: int):
    """(output shape, parameters) of `network_fn(width)` in muP: the
    standard initialization with output-layer weights scaled by
    1 / sqrt(m_in)."""
    shape, params = self._init(width)(key, self.input_shape)
    scales = jax.tree.map(
        lambda m: (1. / math.sqrt(m.m_in) if m.kind == 'weight'
                   and m.infinite_in and not m.infinite_out else 1.),
        self._multipliers(params))
    return shape, jax.tree.map(lambda p, s: p * s, params, scales)

  def learning_rate_scales(self, params, optimizer: str = 'sgd'):
    """Per-parameter learning-rate factors (module docstring's table) for
    parameters of some width, as a pytree of floats like `params`."""
    if optimizer not in OPTIMIZERS:
      raise ValueError(f"MuP: optimizer={optimizer!r}; use 'sgd' or 'adam' "
                       '(the two columns of Tensor Programs V, Table 3).')

    def factor(m):
      if m.kind == 'bias' or not m.infinite_in:      # biases, input layer
        return m.m_out if optimizer == 'sgd' and m.infinite_out else 1.
      if m.infinite_out:                             # hidden layer
        return 1. if optimizer == 'sgd' else 1. / m.m_in
      return 1. / m.m_in                             # output layer
    return jax.tree.map(factor, self._multipliers(params))

  def scale_updates(self, params, optimizer: str = 'sgd'
                    ) -> optax.GradientTransformation:
    """An optax transformation multiplying each parameter's update by its
    muP learning-rate factor; chain it after the optimizer.

    Args:
      params: parameters of the width being trained (their shapes give the
        width multipliers).
      optimizer: 'sgd' (any optimizer whose update is linear in the
        gradient) or 'adam' (Adam-like: scale-invariant updates).

    Returns:
      An `optax.GradientTransformation`.
    """
    scales = self.learning_rate_scales(params, optimizer)

    def update_fn(updates, state, params=None):
      del params
      return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates,
                          scales), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(),
                                        update_fn)

  def effective_ntk_fn(self, width: int, **ntk_kwargs) -> Callable:
    """The empirical NTK that SGD follows in muP: J diag(s) J^T.

    One step of `optax.chain(optax.sgd(lr), self.scale_updates(params))`
    moves the outputs by -lr J diag(s) J^T dL/df to first order (s: the
    learning-rate factors, `learning_rate_scales`), so this kernel, not
    J J^T, sets muP's function-space dynamics and its largest stable
    learning rate (`predict.max_learning_rate`). It is computed as the plain
    empirical NTK of the reparameterized network p -> f(sqrt(s) p) at
    p = params / sqrt(s), whose Jacobian is J diag(sqrt(s)).

    Args:
      width: the width of `network_fn(width)` the parameters belong to.
      **ntk_kwargs: `empirical.empirical_ntk_fn` keywords (trace_axes,
        vmap_axes, implementation, ...).

    Returns:
      `ntk_fn(x1, x2, params)`, like `empirical.empirical_ntk_fn`'s.
    """
    from ntkjax.empirical import empirical_ntk_fn
    _, apply_fn, _ = self.network_fn(width)
    shapes = jax.eval_shape(lambda: self.init_fn(jax.random.PRNGKey(0),
                                                 width)[1])
    root = jax.tree.map(math.sqrt, self.learning_rate_scales(shapes, 'sgd'))
    scaled = lambda p, r: p * jnp.asarray(r, p.dtype)
    unscaled = lambda p, r: p / jnp.asarray(r, p.dtype)

    def reparameterized(p, x, **kwargs):
      return apply_fn(jax.tree.map(scaled, p, root), x, **kwargs)
    ntk = empirical_ntk_fn(reparameterized, **ntk_kwargs)

    def ntk_fn(x1, x2, params, **kwargs):
      return ntk(x1, x2, jax.tree.map(unscaled, params, root), **kwargs)
    return ntk_fn

  @property
  def kernel_fn(self):
    """muP has no kernel limit (module docstring): raises, saying why."""
    raise KernelError(
        'MuP: a muP network has no infinite-width kernel to compare with. '
        'Its output at initialization vanishes as width grows (the output '
        'layer\'s variance falls like base_width / width) and its hidden '
        'features move O(1) in training, so no fixed kernel describes it. '
        'Use network_fn(width).kernel_fn for the standard/NTK '
        'parameterization\'s limit, MuP.effective_ntk_fn(width) for the '
        'finite-width kernel SGD follows under muP, and '
        'ntkjax.feature_learning to measure how far training moves it.')
