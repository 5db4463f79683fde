"""Exact kernels beyond Gaussian inputs: the algebra of a layer's features.

At infinite width every channel of a layer is an independent copy of one
random variable. Right after an affine layer that variable is a Gaussian
field `z`; after nonlinearities and branches it is, in every case this module
handles, a *sum of independent terms*, each an elementwise function `f_k` of
one Gaussian field `z_k` (different affine layers draw independent weights,
so their fields are independent):

    h = sum_k f_k(z_k).

This is what lets ntkjax go where the reference library stops:

* `Relu` then `Erf`: the chain is one elementwise map `erf(relu(z))` of the
  Gaussian `z`, so E[h h'] is a 2-d Gaussian integral (quadrature).
* `x + Relu(Dense(x))` (FanInSum of non-Gaussian branches): independence gives
      E[h h'] = sum_k Cov_k + (sum_k m_k)(sum_k m'_k)^T,
  with Cov_k = E[f_k f_k'] - m_k m_k'^T and m_k = E[f_k(z_k)] the means.
  Branches of the *same* field (after `FanOut`) are merged into one map
  `f_a + f_b` of that field first.
* NTK: parameters feeding different fields contribute independently (the
  cross terms vanish as 1/sqrt(width)), so NTKs of independent terms add; for
  one map of one field it is  ntk(z) * E[f'(u) f'(v)].

Cases with no finite description in these terms (a nonlinearity applied to
the sum of several independent non-Gaussian terms, i.e. a 2k-dimensional
integral) raise a `KernelError` that names the layer and says what to write.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax.numpy as jnp

from ntkjax.kernel import Kernel, Source, Spatial, Term, new_source_id
from ntkjax.stax import _dual as dual, _quadrature as quadrature


class KernelError(ValueError):
  """A layer cannot continue from the kernel it received."""


# ----------------------------------------------------------------------------
# Elementwise maps from a Gaussian field to a term of the features. Instances
# are static (pytree metadata); kernel maps tell them apart by identity, and
# pytree structures compare them by `structure` (`ntkjax.kernel._Static`),
# which is built from the activations (created once, with their layer) and
# scales, so the maps a network builds anew on each call compare equal.


class Fn:
  """An elementwise map. Subclasses say how much of it has closed forms."""
  degree: int = dual.DEFAULT_QUADRATURE_DEGREE

  @property
  def structure(self):
    """A hashable description: equal for maps that compute the same."""
    return ('fn', id(self))

  def __call__(self, x):
    raise NotImplementedError


class Linear(Fn):
  """x -> scale * x (an identity branch, or several identity branches summed)."""

  def __init__(self, scale: float = 1.):
    self.scale = scale

  @property
  def structure(self):
    return ('linear', self.scale)

  def __call__(self, x):
    return self.scale * x


class Scaled(Fn):
  """x -> out_scale * act(in_scale * x): closed forms apply if `act` has them."""

  def __init__(self, act: dual.Activation, out_scale: float = 1.,
               in_scale: float = 1.):
    self.act, self.out_scale, self.in_scale = act, out_scale, in_scale
    self.degree = act.degree

  @property
  def structure(self):
    return ('scaled', self.act, self.out_scale, self.in_scale)

  def __call__(self, x):
    return self.out_scale * self.act.fn(self.in_scale * x)


class Composite(Fn):
  """Any other elementwise map (chains, sums, products): quadrature only."""

  def __init__(self, call: Callable, degree: int, structure=None):
    self.call, self.degree = call, degree
    self._structure = ('fn', id(self)) if structure is None else structure

  @property
  def structure(self):
    return self._structure

  def __call__(self, x):
    return self.call(x)


def compose(act: dual.Activation, inner: Fn) -> Fn:
  """The map x -> act(inner(x))."""
  if isinstance(inner, Linear):
    return Scaled(act, 1., inner.scale)
  degree = max(act.degree, inner.degree)
  return Composite(lambda x: act.fn(inner(x)), degree,
                   ('compose', act, inner.structure))


def add_maps(maps: Sequence[Fn]) -> Fn:
  """The map x -> sum_k maps[k](x) (branches of one field added)."""
  if all(isinstance(m, Linear) for m in maps):
    return Linear(sum(m.scale for m in maps))
  first = maps[0]
  if (isinstance(first, Scaled) and all(
      isinstance(m, Scaled) and m.act is first.act
      and m.in_scale == first.in_scale for m in maps)):
    return Scaled(first.act, sum(m.out_scale for m in maps), first.in_scale)
  return Composite(lambda x: sum(m(x) for m in maps),
                   max(m.degree for m in maps),
                   ('add',) + tuple(m.structure for m in maps))


@functools.lru_cache(maxsize=None)
def _monomial(degree: int) -> dual.Activation:
  """x^degree, one Activation per degree (so maps built from it compare
  equal across calls)."""
  return dual.polynomial([0.] * degree + [1.],
                         name=f'Monomial(degree={degree})')


def multiply_maps(maps: Sequence[Fn]) -> Fn:
  """The map x -> prod_k maps[k](x) (branches of one field multiplied)."""
  if all(isinstance(m, Linear) for m in maps):
    scale = 1.
    for m in maps:
      scale *= m.scale
    return Scaled(_monomial(len(maps)), scale, 1.)

  def product(x):
    out = maps[0](x)
    for m in maps[1:]:
      out = out * m(x)
    return out
  return Composite(product, max(m.degree for m in maps),
                   ('multiply',) + tuple(m.structure for m in maps))


# ----------------------------------------------------------------------------
# Moments of one term f(z).


def new_source(nngp, ntk, cov1, cov2, components: Optional[frozenset] = None,
               **kwargs) -> Source:
  """A Source with a fresh id; by default a new independent Gaussian field."""
  source_id = new_source_id()
  if components is None:
    components = frozenset([source_id])
  return Source(nngp, ntk, cov1, cov2, source_id=source_id,
                components=components, **kwargs)


def root_of(source: Source) -> Source:
  """The Gaussian field that `source` is a per-sample rescaling of (itself
  if it is none)."""
  return source if source.root is None else source.root


def rescaled_source(source: Source, scale1, scale2) -> Source:
  """The Gaussian field z_i(p) scale_i(p), z ~ `source`, per sample and
  position ((S..., N) scales, e.g. LayerNorm's 1 / s of a Gaussian field).

  Its moments are the source's times outer(scale1, scale2) (the NTK too: the
  scales are deterministic at infinite width; their parameter gradients are
  O(1/n)). It keeps the root field and the total scales, so branches
  rescaling one field differently can be summed or multiplied exactly.
  """
  if source.root is not None:
    scale1, scale2 = scale1 * source.scale1, scale2 * source.scale2
    source = source.root
  spatial = source.spatial
  outer = spatial.outer(scale1, scale2)
  cov1 = source.cov1 * spatial.self_outer(scale1)
  symmetric = source.cov2 is source.cov1 and scale2 is scale1
  cov2 = cov1 if symmetric else source.cov2 * spatial.self_outer(scale2)
  return new_source(source.nngp * outer, source.ntk * outer, cov1, cov2,
                    components=source.components, spatial=spatial,
                    root=source, scale1=scale1, scale2=scale2)


def _root_scales(term: Term):
  """(root, scale1, scale2) of a term that is a linear map c z of a
  (rescaled) Gaussian field: scales c_i(p) relative to the root."""
  source, c = term.source, term.fn.scale
  if source.root is None:
    return source, c, c
  return source.root, c * source.scale1, c * source.scale2


def _check_linear_rescalings(terms: Sequence[Term], layer: str):
  """Branches that rescale one field per sample combine exactly only while
  each is still linear in it."""
  if not all(isinstance(t.fn, Linear) for t in terms):
    raise KernelError(
        f'{layer}: its branches are one Gaussian field scaled per sample '
        '(LayerNorm of it) and one of them passed through a nonlinearity '
        'before they meet (e.g. Relu(z) * LayerNorm(z)); that product\'s '
        'kernel is not computed (the sum, Relu(z) + LayerNorm(z), is). '
        'Multiply the branches before the nonlinearity, or put a Dense '
        'layer in the branch.')


def _scaled(x, scale):
  """scale * x, without an op when scale is 1 (the common case)."""
  return x if scale == 1 else scale * x


def term_of(source: Source, fn: Fn) -> Term:
  """Moments (NNGP, NTK, diagonals) of the term fn(z), z ~ source.

  The means are left to `term_means`: only sums and products of branches
  need them, and computing them for every layer of a deep network would
  add work to every compilation.
  """
  components = source.components
  symmetric = source.cov2 is source.cov1
  if isinstance(fn, Linear):
    s2 = fn.scale**2
    cov1 = _scaled(source.cov1, s2)
    return Term(_scaled(source.nngp, s2), _scaled(source.ntk, s2), cov1,
                cov1 if symmetric else _scaled(source.cov2, s2), None, None,
                source=source, fn=fn, components=components,
                spatial=source.spatial)

  spatial = source.spatial
  var1 = spatial.variances(source.cov1)
  var2 = var1 if symmetric else spatial.variances(source.cov2)
  k12 = source.nngp
  k11, k22 = spatial.pair(var1, var2)

  def own_covariance(cov, var, pairwise, variance):
    """cov1/cov2 through the map: per-position variances, or (full spatial
    layout) covariances between positions of one sample."""
    if not spatial.full:
      return variance(cov)
    return pairwise(cov, *spatial.self_pair(var))

  if isinstance(fn, Scaled) and fn.act.has_closed_form:
    act, a2, s2 = fn.act, fn.out_scale**2, fn.in_scale**2
    pairwise = lambda c12, c11, c22: _scaled(
        act.nngp(*(_scaled(c, s2) for c in (c12, c11, c22))), a2)
    variance = lambda cov: _scaled(act.variance_or_derived()(_scaled(cov, s2)), a2)
    cov1 = own_covariance(source.cov1, var1, pairwise, variance)
    k12, k11, k22 = (_scaled(k, s2) for k in (k12, k11, k22))
    return Term(
        nngp=_scaled(act.nngp(k12, k11, k22), a2),
        ntk=source.ntk * _scaled(act.ntk_factor_or_derived()(k12, k11, k22),
                                 a2 * s2),
        cov1=cov1,
        cov2=cov1 if symmetric else own_covariance(source.cov2, var2,
                                                   pairwise, variance),
        mean1=None, mean2=None, source=source, fn=fn, components=components,
        spatial=spatial)

  d_fn = quadrature.derivative(fn)
  square = lambda x: fn(x)**2
  degree_1d = max(fn.degree, 64)  # 1-d rules are cheap: use more nodes.
  pairwise = lambda c12, c11, c22: quadrature.expect_2d(fn, fn, c12, c11, c22,
                                                  fn.degree)
  variance = lambda cov: quadrature.expect_1d(square, cov, degree_1d)
  cov1 = own_covariance(source.cov1, var1, pairwise, variance)
  return Term(
      nngp=quadrature.expect_2d(fn, fn, k12, k11, k22, fn.degree),
      ntk=source.ntk * quadrature.expect_2d(d_fn, d_fn, k12, k11, k22, fn.degree),
      cov1=cov1,
      cov2=cov1 if symmetric else own_covariance(source.cov2, var2, pairwise,
                                                 variance),
      mean1=None, mean2=None, source=source, fn=fn, components=components,
      spatial=spatial)


def term_means(term: Term):
  """Channel means (E over x1 samples, E over x2 samples) of one term."""
  if term.mean1 is not None:
    return term.mean1, term.mean2
  source, fn = term.source, term.fn
  spatial = source.spatial
  if isinstance(fn, Linear):
    if source.mean1 is None:  # a zero-mean Gaussian field
      return (jnp.zeros_like(spatial.variances(source.cov1)),
              jnp.zeros_like(spatial.variances(source.cov2)))
    return fn.scale * source.mean1, fn.scale * source.mean2
  var1, var2 = (spatial.variances(source.cov1),
                spatial.variances(source.cov2))
  if isinstance(fn, Scaled) and fn.act.mean is not None:
    a, s2 = fn.out_scale, fn.in_scale**2
    return (a * fn.act.mean(s2 * var1), a * fn.act.mean(s2 * var2))
  if isinstance(fn, Scaled) and not fn.act.has_fn:
    raise KernelError(
        f'{fn.act.name} was given nngp_fn but no fn, so its mean E[fn(u)] is '
        'unknown, and combining it with other branches needs it. Pass fn= to '
        'Elementwise as well.')
  degree_1d = max(fn.degree, 64)
  return (quadrature.expect_1d(fn, var1, degree_1d),
          quadrature.expect_1d(fn, var2, degree_1d))


def _components(items) -> frozenset:
  """All Gaussian fields that a collection of terms (or sources) depends on."""
  return frozenset().union(*(item.components for item in items))


def _is_gaussian_term(term: Term) -> bool:
  return (isinstance(term.fn, Linear) and term.source is not None
          and not term.source.is_input)


def _means(terms: Sequence[Term]):
  """Total channel means of a sum of independent terms."""
  means = [term_means(t) for t in terms]
  return sum(m[0] for m in means), sum(m[1] for m in means)


def kernel_from_terms(terms: Sequence[Term], like: Kernel, **changes) -> Kernel:
  """A Kernel whose features are the sum of the independent `terms`."""
  terms = tuple(terms)
  if len(terms) == 1:
    t = terms[0]
    nngp, ntk, cov1, cov2 = t.nngp, t.ntk, t.cov1, t.cov2
  else:
    spatial = terms[0].spatial
    means = [term_means(t) for t in terms]
    mean1, mean2 = sum(m[0] for m in means), sum(m[1] for m in means)
    nngp = sum(t.nngp - spatial.outer(m1, m2)
               for t, (m1, m2) in zip(terms, means))
    nngp = nngp + spatial.outer(mean1, mean2)
    cov1 = (sum(t.cov1 - spatial.self_outer(m1)
                for t, (m1, _) in zip(terms, means))
            + spatial.self_outer(mean1))
    cov2 = (sum(t.cov2 - spatial.self_outer(m2)
                for t, (_, m2) in zip(terms, means))
            + spatial.self_outer(mean2))
    ntk = sum(t.ntk for t in terms)
  same = like.same_sample()
  if same is not None:
    # A sample's kernel with itself is its own covariance, cov1, computed by
    # the stable 1-d formulas; the 2-d formula at correlation 1 is an
    # unstable fixed point in the chaotic phase (rounding grows like
    # chi1^depth, O(1) by depth ~50 at chi1 = 2), so copy it over.
    nngp = jnp.where(same, cov1[..., :, None], nngp)
  is_gaussian = all(_is_gaussian_term(t) for t in terms)
  return like.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, terms=terms,
                      is_gaussian=is_gaussian, **changes)


def collapse(kernel: Kernel) -> Term:
  """The whole features of `kernel` as one opaque term (no source)."""
  terms = kernel.terms
  return Term(kernel.nngp, kernel.ntk, kernel.cov1, kernel.cov2,
              *_means(terms),
              components=_components(terms), spatial=kernel.spatial)


def linear_map_kernel(k: Kernel, nngp, ntk, cov1, cov2, map_means,
                      spatial: Spatial, shape1: tuple, shape2: tuple,
                      keeps_gaussian: bool = True,
                      zero_masked_means: bool = False,
                      rescales=None) -> Kernel:
  """The Kernel of a parameter-free linear map (pooling, Flatten, taking
  the same-position entries) of `k`'s features.

  Args:
    k: the input kernel.
    nngp, ntk, cov1, cov2: the mapped moments.
    map_means: the same linear map on per-position channel means (S..., N),
      or a pair of maps for x1's and x2's means.
    spatial, shape1, shape2: the output layout and shapes.
    keeps_gaussian: whether the map takes a Gaussian field to one whose
      channels are identically distributed Gaussians (pooling), rather than
      to a mixture over positions (Flatten).
    zero_masked_means: zero the means of masked positions before the map
      (for maps that mix positions, whose masked inputs are zeros).
    rescales: None, or `(scale1, scale2)` when the map multiplies each
      sample (and position) by a number (LayerNorm): a Gaussian field in
      comes out as that field rescaled (`rescaled_source`).

  Returns:
    The output Kernel: the raw inputs stay inputs, a Gaussian field stays
    Gaussian (same components: same random weights), anything else becomes
    one opaque term (no nonlinearity may follow directly).
  """
  map1, map2 = (map_means if isinstance(map_means, tuple)
                else (map_means, map_means))
  whole = collapse(k)
  if zero_masked_means and k.mask1 is not None:
    mean1, mean2 = masked_means(k, (whole.mean1, whole.mean2))
    whole = dataclasses.replace(whole, mean1=mean1, mean2=mean2)
  single = k.terms[0] if len(k.terms) == 1 else None
  if (rescales is not None and k.is_gaussian and single is not None
      and isinstance(single.fn, Linear)):
    c = single.fn.scale
    source = rescaled_source(single.source, c * rescales[0],
                             c * rescales[1])
    term = term_of(source, Linear(1.))
  elif k.is_input or (k.is_gaussian and keeps_gaussian):
    means = {}
    if k.is_input:
      means = dict(mean1=map1(whole.mean1), mean2=map2(whole.mean2))
    source = new_source(nngp, ntk, cov1, cov2,
                                 components=whole.components,
                                 is_input=k.is_input, spatial=spatial, **means)
    term = term_of(source, Linear(1.))
  else:
    term = Term(nngp, ntk, cov1, cov2, map1(whole.mean1),
                map2(whole.mean2), components=whole.components,
                spatial=spatial)
  return kernel_from_terms([term], k, spatial=spatial, shape1=shape1,
                                    shape2=shape2, is_input=k.is_input)


def kept(mask, dtype):
  """A mask (N, S...) (True = masked) as a 0/1 factor positions first,
  (S..., N): the layout of per-position kernel arrays."""
  return jnp.moveaxis(~mask, 0, -1).astype(dtype)


def masked_arrays(k: Kernel):
  """`k`'s (nngp, ntk, cov1, cov2) with every covariance that involves a
  masked position set to 0: the moments of the features after masked
  positions are zeroed (what a layer that mixes positions sees)."""
  if k.mask1 is None:
    return k.nngp, k.ntk, k.cov1, k.cov2
  spatial, dtype = k.spatial, k.nngp.dtype
  keep1, keep2 = kept(k.mask1, dtype), kept(k.mask2, dtype)
  pair = spatial.outer(keep1, keep2)
  own1, own2 = spatial.self_outer(keep1), spatial.self_outer(keep2)
  return k.nngp * pair, k.ntk * pair, k.cov1 * own1, k.cov2 * own2


def masked_means(k: Kernel, means):
  """Per-position channel means (S..., N) with masked positions zeroed."""
  m1, m2 = means
  if k.mask1 is None:
    return m1, m2
  return m1 * kept(k.mask1, m1.dtype), m2 * kept(k.mask2, m2.dtype)


def zero_masked(k: Kernel) -> Kernel:
  """`k` with the covariances of masked positions zeroed: what a layer that
  mixes positions reads, and the network's outputs (neural-tangents zeroes
  masked outputs too)."""
  nngp, ntk, cov1, cov2 = masked_arrays(k)
  return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)


def same_positions(kernel: Kernel) -> Kernel:
  """The pixel-diagonal version of a kernel kept for all pairs of positions
  (same random variables, fewer covariances)."""
  spatial = kernel.spatial
  return linear_map_kernel(
      kernel, spatial.same_positions(kernel.nngp, 2),
      spatial.same_positions(kernel.ntk, 2),
      spatial.same_positions(kernel.cov1, 1),
      spatial.same_positions(kernel.cov2, 1), lambda m: m,
      Spatial(spatial.ndim, True), kernel.shape1, kernel.shape2)


def gaussian_kernel(nngp, ntk, cov1, cov2, like: Kernel, **changes) -> Kernel:
  """The Kernel of a fresh Gaussian field (the output of an affine layer)."""
  source = new_source(nngp, ntk, cov1, cov2,
                      spatial=changes.get('spatial', like.spatial))
  return kernel_from_terms([term_of(source, Linear(1.))], like,
                           is_input=False, **changes)


def _require_independent(groups: Sequence[Sequence[Term]], layer: str):
  """Raise unless the groups of terms depend on disjoint Gaussian fields."""
  seen: frozenset = frozenset()
  for group in groups:
    components = _components(group)
    if components & seen:
      raise KernelError(
          f'{layer}: two branches depend on the same Gaussian field through '
          'different nonlinear paths (e.g. z and Relu(z + Dense(z))), so the '
          'combined features are not a sum/product of independent terms and '
          'their kernel is not a function of the branch kernels. Combine '
          'branches of one field before any nonlinearity mixes it with another '
          'field, or put a Dense layer in the branch.')
    seen |= components


# ----------------------------------------------------------------------------
# Layers' kernel rules on features.


def apply_elementwise(kernel: Kernel, act: dual.Activation,
                      layer: str) -> Kernel:
  """Kernel of act(h) for the features h described by `kernel`."""
  terms = kernel.terms
  if any(t.source is not None and t.source.is_input for t in terms):
    raise KernelError(
        f'{layer} is applied to the raw inputs (or to a sum that contains '
        'them). Inputs are fixed vectors, not Gaussian pre-activations, so the '
        'infinite-width kernel of a nonlinearity of them is not a function of '
        'their kernel. Put a Dense (or Conv) layer before the nonlinearity.')
  if len(terms) == 1 and terms[0].source is not None:
    term = terms[0]
    return kernel_from_terms([term_of(term.source, compose(act, term.fn))],
                             kernel)
  if kernel.is_gaussian:
    # A sum of independent zero-mean Gaussian fields is one Gaussian field.
    source = new_source(
        kernel.nngp, kernel.ntk, kernel.cov1, kernel.cov2,
        components=_components(terms), spatial=kernel.spatial)
    return kernel_from_terms([term_of(source, compose(act, Linear(1.)))],
                             kernel)
  if any(t.source is None for t in terms):
    why = ('its input is a product of independent branches, a '
           'concatenation of branches with different distributions (FanInProd '
           'or FanInConcat), or pooled/flattened non-Gaussian features (a '
           'mixture over positions)')
  else:
    why = (f'its input is a sum of {len(terms)} independent fields, not all '
           'Gaussian (FanInSum of non-Gaussian branches)')
  raise KernelError(
      f'{layer}: {why}. Its infinite-width kernel would be an expectation over '
      'several independent non-Gaussian variables, which has no finite '
      'closed or quadrature form here. Put a Dense (or Conv) layer before '
      f'{layer}, e.g. a pre-activation residual block '
      'x + Dense(Relu(Dense(x))) instead of Relu(x + Relu(Dense(x))).')


def _as_map_of_root(term: Term):
  """A term of a (rescaled) Gaussian field as a map F_i(z) = fn(a_i z) of
  its root z: (root, fn, (a1, a2)), with fn None for the identity (F_i(z)
  = a_i z) and per-sample factors a (S..., N) for the x1 and x2 batches."""
  if isinstance(term.fn, Linear):
    root, c1, c2 = _root_scales(term)
    return root, None, (c1, c2)
  source = term.source
  if isinstance(term.fn, Scaled) and not term.fn.act.has_fn:
    raise KernelError(
        f'{term.fn.act.name} was given nngp_fn but no fn; its kernel beside '
        'another branch of the same field needs fn. Pass fn= to Elementwise '
        'as well.')
  if source.root is None:
    return source, term.fn, (1., 1.)
  return source.root, term.fn, (source.scale1, source.scale2)


def _cross_moments(f, a, g, b, c12, c11, c22):
  """E[F(u) G(v)] and E[F'(u) G'(v)] for F(u) = f(a u), G(v) = g(b v) (f
  or g None: the identity), (u, v) ~ N(0, [[c11, c12], [c12, c22]]), all
  entrywise. One identity map: Stein's lemma, E[f(a u) v] = a c12
  E[f'(a u)]; two nonlinear maps: the quadrature."""
  if f is None and g is None:
    return a * b * c12, a * b
  if f is None:      # E[a u g(b v)]: the same with the roles swapped
    return _cross_moments(g, b, None, a, c12, c22, c11)
  if g is None:
    slope = quadrature.expect_1d(quadrature.derivative(f), a * a * c11,
                                 max(f.degree, 64))
    return a * b * c12 * slope, a * b * slope
  degree = max(f.degree, g.degree)
  scaled = (a * b * c12, a * a * c11, b * b * c22)
  return (quadrature.expect_2d(f, g, *scaled, degree),
          a * b * quadrature.expect_2d(quadrature.derivative(f),
                                       quadrature.derivative(g), *scaled,
                                       degree))


def _sum_of_one_field(group: Sequence[Term]) -> Term:
  """The features sum_k F_k,i(z) for branches that are maps of one root
  field z, at least one nonlinear and one rescaled per sample (e.g.
  Relu(z) + LayerNorm(z)): exact, as every pair is a 2-d Gaussian
  expectation over (z_i, z_j),

      nngp_ij = sum_kl E[F_k,i(u) F_l,j(v)],
      ntk_ij  = ntk(z)_ij sum_kl E[F_k,i'(u) F_l,j'(v)]

  (the per-sample scales are deterministic at infinite width). The result
  depends on the sample through more than its variance, so it is one
  opaque term: a Dense layer may follow, a nonlinearity raises."""
  described = [_as_map_of_root(t) for t in group]
  root = described[0][0]
  spatial = root.spatial
  var1 = spatial.variances(root.cov1)
  symmetric = root.cov2 is root.cov1
  var2 = var1 if symmetric else spatial.variances(root.cov2)
  # Per-sample factors as (S..., N) arrays, for the x1 and x2 batches.
  maps = [(fn, (a1 * jnp.ones_like(var1), a2 * jnp.ones_like(var2)))
          for _, fn, (a1, a2) in described]

  def moments(c12, c11, c22, layout):
    """sum_kl of `_cross_moments`; layout(a_k, a_l) places the left and
    right maps' factors (pairs for x1, x2) on the arrays' axes."""
    nngp = ntk = 0.
    for f, a in maps:
      for g, b in maps:
        left, right = layout(a, b)
        n, t = _cross_moments(f, left, g, right, c12, c11, c22)
        nngp, ntk = nngp + n, ntk + t
    return nngp, ntk

  k11, k22 = spatial.pair(var1, var2)
  nngp, ntk_factor = moments(root.nngp, k11, k22,
                             lambda a, b: spatial.pair(a[0], b[1]))

  def own(cov, var, side):
    """cov1 / cov2 of the sum: both factors from one sample (covariances
    between its positions in the full layout)."""
    if not spatial.full:
      return moments(var, var, var, lambda a, b: (a[side], b[side]))[0]
    first, second = spatial.self_pair(var)
    return moments(cov, first, second, lambda a, b: (
        spatial.self_pair(a[side])[0], spatial.self_pair(b[side])[1]))[0]

  cov1 = own(root.cov1, var1, 0)
  cov2 = cov1 if symmetric else own(root.cov2, var2, 1)
  # Identity maps of the zero-mean field have mean 0; E[fn(a z)] otherwise.
  mean1, mean2 = jnp.zeros_like(var1), jnp.zeros_like(var2)
  for fn, (a1, a2) in maps:
    if fn is not None:
      degree = max(fn.degree, 64)
      mean1 = mean1 + quadrature.expect_1d(fn, a1 * a1 * var1, degree)
      mean2 = mean2 + quadrature.expect_1d(fn, a2 * a2 * var2, degree)
  return Term(nngp, root.ntk * ntk_factor, cov1, cov2, mean1, mean2,
              components=root.components, spatial=spatial)


def fan_in_sum(kernels: Sequence[Kernel]) -> Kernel:
  """Kernel of the sum of the branches' features."""
  groups: dict = {}
  for k in kernels:
    for t in k.terms:
      # Opaque terms cannot be merged, so each is its own group (and if one
      # appears twice, the independence check below says so). Rescalings of
      # one field (LayerNorm) group with it.
      key = (('opaque', len(groups)) if t.source is None
             else root_of(t.source).source_id)
      groups.setdefault(key, []).append(t)
  _require_independent(list(groups.values()), 'FanInSum')
  terms = []
  for group in groups.values():
    if len(group) == 1:
      terms.append(group[0])
    elif any(t.source.root is not None for t in group):
      if not all(isinstance(t.fn, Linear) for t in group):
        terms.append(_sum_of_one_field(group))
        continue
      # sum_k c_k,i z_i = (sum_k c_k,i) z_i: the root rescaled per sample.
      roots = [_root_scales(t) for t in group]
      scale1 = sum(r[1] for r in roots)
      scale2 = sum(r[2] for r in roots)
      terms.append(term_of(rescaled_source(roots[0][0], scale1, scale2),
                           Linear(1.)))
    else:
      terms.append(term_of(group[0].source, add_maps([t.fn for t in group])))
  return kernel_from_terms(terms, kernels[0],
                           is_input=all(k.is_input for k in kernels))


def fan_in_prod(kernels: Sequence[Kernel]) -> Kernel:
  """Kernel of the elementwise product of the branches' features."""
  single = all(len(k.terms) == 1 and k.terms[0].source is not None
               for k in kernels)
  if single and len({root_of(k.terms[0].source).source_id
                     for k in kernels}) == 1 and any(
                         k.terms[0].source.root is not None for k in kernels):
    return _product_of_rescalings([k.terms[0] for k in kernels], kernels[0])
  if single and len({k.terms[0].source.source_id for k in kernels}) == 1:
    source = kernels[0].terms[0].source
    if source.is_input:
      raise KernelError(
          'FanInProd multiplies the raw inputs with themselves; the kernel of '
          'such features is not a function of the input kernel. Put a Dense '
          'layer in each branch first.')
    fn = multiply_maps([k.terms[0].fn for k in kernels])
    return kernel_from_terms([term_of(source, fn)], kernels[0], is_input=False)

  _require_independent([k.terms for k in kernels], 'FanInProd')
  # Independent branches: moments multiply; NTK by the product rule.
  parts = [collapse(k) for k in kernels]
  nngp, cov1, cov2, mean1, mean2 = 1., 1., 1., 1., 1.
  for p in parts:
    nngp, cov1, cov2 = nngp * p.nngp, cov1 * p.cov1, cov2 * p.cov2
    mean1, mean2 = mean1 * p.mean1, mean2 * p.mean2
  ntk = 0.
  for i, p in enumerate(parts):
    others = 1.
    for j, q in enumerate(parts):
      if j != i:
        others = others * q.nngp
    ntk = ntk + p.ntk * others
  components = _components(parts)
  term = Term(nngp, ntk, cov1, cov2, mean1, mean2, components=components,
              spatial=kernels[0].spatial)
  return kernel_from_terms([term], kernels[0], is_input=False)


def _product_of_rescalings(terms: Sequence[Term], like: Kernel) -> Kernel:
  """prod_k c_k,i z_i = (prod_k c_k,i) z_i^K for K rescalings of one field:
  the moments of z^K scaled per sample. The result is no longer a map of
  one field with sample-independent form, so it is one opaque term (a
  nonlinearity after it raises; sums with independent branches work)."""
  _check_linear_rescalings(terms, 'FanInProd')
  roots = [_root_scales(t) for t in terms]
  scale1, scale2 = 1., 1.
  for _, c1, c2 in roots:
    scale1, scale2 = scale1 * c1, scale2 * c2
  root = roots[0][0]
  power = term_of(root, Scaled(_monomial(len(terms)), 1., 1.))
  mean1, mean2 = term_means(power)
  spatial = root.spatial
  outer = spatial.outer(scale1, scale2)
  term = Term(power.nngp * outer, power.ntk * outer,
              power.cov1 * spatial.self_outer(scale1),
              power.cov2 * spatial.self_outer(scale2),
              mean1 * scale1, mean2 * scale2, components=root.components,
              spatial=spatial)
  return kernel_from_terms([term], like, is_input=False)


def fan_in_concat(kernels: Sequence[Kernel], widths: Sequence[int]) -> Kernel:
  """Kernel of the channel-wise concatenation: a width-weighted average."""
  total = float(sum(widths))
  weights = [w / total for w in widths]
  parts = [collapse(k) for k in kernels]
  avg = lambda name: sum(w * getattr(p, name) for w, p in zip(weights, parts))
  components = _components(parts)
  term = Term(avg('nngp'), avg('ntk'), avg('cov1'), avg('cov2'),
              avg('mean1'), avg('mean2'), components=components,
              spatial=kernels[0].spatial)
  return kernel_from_terms([term], kernels[0], is_input=False)
