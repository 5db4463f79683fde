"""`Kernel`: the state that flows through the infinite-width kernel maps.

A `Kernel` describes the features of one layer of an infinitely wide network,
evaluated on two batches of inputs `x1` (N1 samples) and `x2` (N2 samples):

* `nngp[i, j]` — the channel-averaged second moment E[h(x1_i) h(x2_j)];
* `ntk[i, j]`  — the neural tangent kernel of those features;
* `cov1[i]`, `cov2[j]` — the diagonal second moments of each batch.

At infinite width the channels of a layer are i.i.d., but they are Gaussian
only right after an affine layer. To stay exact after a chain of
nonlinearities, or after summing branches that are not Gaussian, the kernel
also keeps `terms`: the features are a sum of independent `Term`s, each an
elementwise function of one Gaussian field (its `Source`). The moments of a
nonlinearity applied to such features are then expectations over that one
Gaussian field (see `ntkjax.stax.features`).

This module imports nothing else from ntkjax.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional

import jax

Array = jax.Array

_source_ids = itertools.count()


def new_source_id() -> int:
  """A fresh identifier for a Gaussian field created by an affine layer."""
  return next(_source_ids)


@dataclasses.dataclass(frozen=True)
class Source:
  """A Gaussian field (pre-activations) or the raw inputs.

  Attributes:
    nngp, ntk, cov1, cov2: second moments and NTK of the field.
    mean1, mean2: channel means for the raw inputs; `None` for a zero-mean
      Gaussian field.
    source_id: identifies the field: branches built from the same field (after
      `FanOut`) are functions of the same random variables, branches built from
      different fields are independent.
    is_input: whether this is the raw input (deterministic, not Gaussian).
    components: ids of the independent Gaussian fields this one is the sum
      of (just `{source_id}` for an affine layer's output). Two sources are
      independent exactly when their components are disjoint.
  """
  nngp: Array
  ntk: Array
  cov1: Array
  cov2: Array
  mean1: Optional[Array] = None
  mean2: Optional[Array] = None
  source_id: int = -1
  is_input: bool = False
  components: frozenset = frozenset()


jax.tree_util.register_dataclass(
    Source,
    data_fields=['nngp', 'ntk', 'cov1', 'cov2', 'mean1', 'mean2'],
    meta_fields=['source_id', 'is_input', 'components'])


@dataclasses.dataclass(frozen=True)
class Term:
  """One of the independent summands that make up a layer's features.

  Attributes:
    nngp, ntk, cov1, cov2: moments of this summand.
    mean1, mean2: its channel means, per sample of x1 / x2 (needed for the
      cross terms when independent summands are added); None until needed
      for a term with a source (computed from `source` and `fn`).
    source: the field this summand is an elementwise function of; `None` when
      the summand is no longer such a function (a product of independent
      branches, a concatenation), so no further nonlinearity can be applied.
    fn: the elementwise map (an `ntkjax.stax.features.Fn`) from the source to
      this summand.
    components: ids of the Gaussian fields this summand depends on; summands
      with disjoint components are independent.
  """
  nngp: Array
  ntk: Array
  cov1: Array
  cov2: Array
  mean1: Optional[Array]
  mean2: Optional[Array]
  source: Optional[Source] = None
  fn: Any = None
  components: frozenset = frozenset()


jax.tree_util.register_dataclass(
    Term,
    data_fields=['nngp', 'ntk', 'cov1', 'cov2', 'mean1', 'mean2', 'source'],
    meta_fields=['fn', 'components'])


@dataclasses.dataclass(frozen=True)
class Kernel:
  """Infinite-width kernels of one layer's features on inputs `x1`, `x2`.

  Attributes:
    nngp: `(N1, N2)` NNGP kernel (channel-averaged second moment).
    ntk: `(N1, N2)` neural tangent kernel.
    cov1: `(N1,)` diagonal of the NNGP kernel of `x1` with itself.
    cov2: `(N2,)` the same for `x2`.
    terms: the independent summands of the features (see module docstring).
    x1_is_x2: whether `x2` was `None` (the kernel is symmetric).
    is_gaussian: whether the features are a Gaussian field (pre-activations).
    is_input: whether the features are the raw inputs.
    shape1, shape2: shapes of the finite network's features on x1, x2; the
      last axis is the channel axis, whose size is the layer's width.
  """
  nngp: Array
  ntk: Array
  cov1: Array
  cov2: Array
  terms: tuple = ()
  x1_is_x2: bool = False
  is_gaussian: bool = False
  is_input: bool = False
  shape1: tuple = ()
  shape2: tuple = ()

  @property
  def channels(self) -> int:
    """Width (number of channels) of the finite layer."""
    return self.shape1[-1]

  def replace(self, **changes) -> 'Kernel':
    """A copy with the given fields replaced."""
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    Kernel,
    data_fields=['nngp', 'ntk', 'cov1', 'cov2', 'terms'],
    meta_fields=['x1_is_x2', 'is_gaussian', 'is_input', 'shape1', 'shape2'])


# Names a user may pass as `get`.
KERNEL_FIELDS = ('nngp', 'ntk', 'cov1', 'cov2')
