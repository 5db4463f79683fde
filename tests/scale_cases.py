"""Kernels that `batch` must reproduce exactly, shared by tests/test_scale.py
and the subprocess checks (multiple devices, Dask workers).

Each case is a function returning `(kernel_fn, x1, x2, args, kwargs)` with
`kernel_fn(x1, x2, *args, **kwargs)` the unblocked computation. They cover
every kind of per-call context a block must cut correctly: plain FC, CNN
with global pooling (full spatial layout inside), CNN with Flatten
(pixel-diagonal layout), Dropout (same-sample entries scaled: diagonal
blocks must be computed with x2=None), masks (`mask_constant`), graph
patterns (per-sample, cut with the inputs), and an empirical NTK with two
outputs (a non-stax function whose mirrored blocks need the output axes
swapped too).
"""

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax import empirical_ntk_fn, stax
from ntkjax.stax._dropout import Dropout
from ntkjax.stax._graph import Aggregate

FIELDS = ('nngp', 'ntk', 'cov1', 'cov2')
PAD = -7.


def _rng(seed):
  return np.random.default_rng(seed)


def fc(n1=7, n2=5):
  kernel_fn = stax.serial(stax.Dense(8, 1.4, 0.1), stax.Erf(),
                          stax.Dense(8, 1.2, 0.2), stax.Relu(),
                          stax.Dense(1, 1.1, 0.05)).kernel_fn
  x1, x2 = _rng(0).standard_normal((n1, 6)), _rng(1).standard_normal((n2, 6))
  return kernel_fn, x1, x2, (FIELDS,), {}


def cnn_pool(n1=5, n2=3):
  kernel_fn = stax.serial(
      stax.Conv(4, (3, 2), padding='SAME', W_std=1.5, b_std=0.1), stax.Erf(),
      stax.AvgPool((2, 2), padding='SAME'), stax.GlobalAvgPool(),
      stax.Dense(1)).kernel_fn
  x1 = _rng(2).standard_normal((n1, 4, 3, 2))
  x2 = _rng(3).standard_normal((n2, 4, 3, 2))
  return kernel_fn, x1, x2, (FIELDS,), {}


def cnn_flatten(n1=5, n2=3):
  kernel_fn = stax.serial(
      stax.Conv(4, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Relu(),
      stax.Conv(4, (2, 2), padding='CIRCULAR'), stax.Flatten(),
      stax.Dense(1, W_std=1.1, b_std=0.2)).kernel_fn
  x1 = _rng(4).standard_normal((n1, 4, 3, 2))
  x2 = _rng(5).standard_normal((n2, 4, 3, 2))
  return kernel_fn, x1, x2, (FIELDS,), {}


def conv_output(n1=5, n2=3):
  """A network ending in a Conv: nngp/ntk of shape (N1, N2, H, H', W, W'),
  whose mirrored blocks swap the position axes too."""
  kernel_fn = stax.serial(
      stax.Conv(4, (3, 3), padding='SAME', W_std=1.5, b_std=0.1), stax.Erf(),
      stax.Conv(4, (2, 2), strides=(2, 1), padding='CIRCULAR',
                W_std=1.2)).kernel_fn
  x1 = _rng(6).standard_normal((n1, 4, 3, 2))
  x2 = _rng(7).standard_normal((n2, 4, 3, 2))
  return kernel_fn, x1, x2, (FIELDS,), {}


def dropout(n1=7, n2=5):
  kernel_fn = stax.serial(stax.Dense(8, 1.3, 0.2), stax.Relu(), Dropout(0.6),
                          stax.Dense(1, 1.2, 0.1)).kernel_fn
  x1, x2 = _rng(8).standard_normal((n1, 4)), _rng(9).standard_normal((n2, 4))
  return kernel_fn, x1, x2, (FIELDS,), {}


def masked(n1=5, n2=4):
  """Sequences of different lengths padded with PAD, GlobalAvgPool over the
  unmasked positions."""
  kernel_fn = stax.serial(
      stax.Conv(4, (3,), padding='SAME', b_std=0.1), stax.Relu(),
      stax.GlobalAvgPool(), stax.Dense(1, b_std=0.2)).kernel_fn

  def padded(n, seed):
    x = _rng(seed).standard_normal((n, 6, 2))
    for i, length in enumerate(_rng(seed + 1).integers(2, 7, n)):
      x[i, length:] = PAD
    return x
  return (kernel_fn, padded(n1, 10), padded(n2, 20), (FIELDS,),
          {'mask_constant': PAD})


def graph(n1=5, n2=3):
  """A GNN with a different directed graph per sample (`pattern`)."""
  kernel_fn = stax.serial(
      stax.Dense(6, W_std=1.4, b_std=0.2), Aggregate(), stax.Relu(),
      stax.Dense(6, W_std=1.3, b_std=0.1), Aggregate(), stax.GlobalSumPool(),
      stax.Dense(1, W_std=1.1, b_std=0.3)).kernel_fn
  rng = _rng(11)
  x1, x2 = rng.standard_normal((n1, 4, 3)), rng.standard_normal((n2, 4, 3))
  graphs = (rng.random((n1 + n2, 4, 4)) < 0.5) * rng.uniform(
      0.3, 1.2, (n1 + n2, 4, 4))
  return (kernel_fn, x1, x2, (FIELDS,),
          {'pattern': (graphs[:n1], graphs[n1:])})


def empirical(n1=7, n2=5):
  """Empirical NTK of a 2-output MLP, trace_axes=(): (N1, N2, 2, 2)."""
  init_fn, apply_fn, _ = stax.serial(stax.Dense(16), stax.Relu(),
                                     stax.Dense(2))
  _, params = init_fn(jax.random.PRNGKey(0), (1, 3))
  ntk_fn = empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0)
  x1, x2 = _rng(12).standard_normal((n1, 3)), _rng(13).standard_normal((n2, 3))
  return ntk_fn, x1, x2, (params,), {}


CASES = {f.__name__: f for f in (fc, cnn_pool, cnn_flatten, conv_output,
                                 dropout, masked, graph, empirical)}


def symmetric_kwargs(kwargs: dict) -> dict:
  """The keyword arguments for x2=None (one pattern, not a pair)."""
  if 'pattern' in kwargs:
    return dict(kwargs, pattern=kwargs['pattern'][0])
  return kwargs


def unblocked(name: str, symmetric: bool):
  """The kernel computed in one piece, as {field: numpy array}."""
  kernel_fn, x1, x2, args, kwargs = CASES[name]()
  if symmetric:
    x2, kwargs = None, symmetric_kwargs(kwargs)
  return unblocked_of(kernel_fn, x1, x2, args, kwargs)


def unblocked_of(kernel_fn, x1, x2, args, kwargs) -> dict:
  out = kernel_fn(jnp.asarray(x1), None if x2 is None else jnp.asarray(x2),
                  *args, **kwargs)
  return as_fields(out)


def as_fields(out) -> dict:
  """{field: numpy array} of a kernel function's or batch's output (a
  named tuple, or one array named 'kernel')."""
  if hasattr(out, '_asdict'):
    return {k: np.asarray(v) for k, v in out._asdict().items()}
  return {'kernel': np.asarray(out)}


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
