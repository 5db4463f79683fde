"""LayerNorm: its kernel against Monte Carlo of the finite networks and an
independent NumPy reference (over channels, and over spatial axes and
channels of images), exact identities, and clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (assert_monte_carlo_close,
                      check_layers_against_monte_carlo,
                      monte_carlo_structured, relative_error)

from ntkjax import stax

WIDTH = 512


def _dense():
  return stax.Dense(WIDTH, W_std=1.4, b_std=0.3)


def test_layer_norm_after_relu_matches_monte_carlo(inputs):
  """ReLU features have a non-zero channel mean: the kernel must center
  them (nngp - m m') before scaling, as the finite layer does."""
  check_layers_against_monte_carlo(
      lambda: stax.serial(_dense(), stax.Relu(), stax.LayerNorm(), _dense(),
                          stax.Erf()),
      inputs, 'relu_norm', WIDTH, key=len('relu_norm'))


def test_nonlinearity_after_layer_norm_of_gaussian_matches_monte_carlo(
    inputs):
  """LayerNorm of pre-activations is a per-sample rescaled Gaussian field,
  so a nonlinearity may follow it directly."""
  check_layers_against_monte_carlo(
      lambda: stax.serial(_dense(), stax.LayerNorm(), stax.Relu()),
      inputs, 'norm_relu', WIDTH, key=len('norm_relu'))


def test_layer_norm_of_gaussian_is_the_correlation(inputs):
  """For zero-mean Gaussian features, nngp' = nngp / sqrt(q1 q2): the
  correlation (eps = 0), whose diagonal on x with itself is 1."""
  x1, _ = inputs
  base = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2))
  net = stax.serial(base, stax.LayerNorm(eps=0.))
  k = base.kernel_fn(x1, None, ('nngp', 'cov1'))
  expected = np.asarray(k.nngp) / np.sqrt(np.outer(k.cov1, k.cov1))
  normed = net.kernel_fn(x1, None, ('nngp', 'ntk'))
  np.testing.assert_allclose(normed.nngp, expected, rtol=1e-12)
  np.testing.assert_allclose(np.diagonal(normed.nngp), 1., rtol=1e-12)
  ntk = base.kernel_fn(x1, None, 'ntk')
  np.testing.assert_allclose(
      normed.ntk, np.asarray(ntk) / np.sqrt(np.outer(k.cov1, k.cov1)),
      rtol=1e-12)


def test_layer_norm_acts_per_position_on_images():
  """On images LayerNorm normalizes each position over channels; with 1x1
  images the kernel is the fully connected one."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5))
  body = lambda conv: stax.serial(
      conv, stax.Relu(), stax.LayerNorm(), stax.Dense(4), stax.Erf())
  flat = body(stax.Dense(6, W_std=1.5, b_std=0.2)).kernel_fn(x, None, 'ntk')
  image = body(stax.Conv(6, (1, 1), W_std=1.5, b_std=0.2)).kernel_fn(
      x.reshape(3, 1, 1, 5), None, 'ntk')
  np.testing.assert_allclose(image[:, :, 0, 0, 0, 0], flat, rtol=1e-12)


def test_finite_layer_norm_normalizes_channels():
  """The finite layer: zero mean and unit variance over the channel axis."""
  _, apply_fn, _ = stax.LayerNorm(eps=0.)
  x = np.random.default_rng(1).standard_normal((2, 3, 7)) * 3 + 1
  y = np.asarray(apply_fn((), x))
  np.testing.assert_allclose(y.mean(-1), 0., atol=1e-12)
  np.testing.assert_allclose(y.var(-1), 1., rtol=1e-12)




# ----------------------------------------------------------------------------
# Normalization over spatial axes and channels (images).


FIELDS = ('nngp', 'ntk', 'cov1', 'cov2')


def _images(n1=3, n2=2, sizes=(4, 3), channels=2, seed=0):
  rng = np.random.default_rng(seed)
  x1 = rng.standard_normal((n1,) + sizes + (channels,))
  x2 = 0.7 * rng.standard_normal((n2,) + sizes + (channels,))
  return jnp.asarray(x1), jnp.asarray(x2)


def _jit(network):
  return jax.jit(network.kernel_fn,
                 static_argnames=('get', 'diagonal_spatial'))




def _conv(width, W_std=1.5, b_std=0.3):
  return stax.Conv(width, (3, 3), padding='SAME', W_std=W_std, b_std=b_std)


def _diagonal(a):
  """Same-position entries (N, H, W) of a public cov1 (N, H, H', W, W')."""
  return np.einsum('nhhww->nhw', np.asarray(a))


def _relu_layer_norm_reference(conv, x1, x2, dims, eps, center=True):
  """The kernel of Relu(conv(x)) normalized over the spatial axes `dims`
  (0: H, 1: W) and channels, from the module docstring's formula in NumPy,
  in the public layout. Inputs taken from kernel_fn: the ReLU features'
  kernels and the pre-activation variances v(p), whose ReLU channel means
  are m(p) = E[relu(z)] = sqrt(v(p) / (2 pi)).

  center=False drops the centering (M = m = 0): a negative control. dims=()
  normalizes each position on its own.

  Returns:
    dict field -> array, plus 'mean1', 'mean2': the output channel means
    (N, H, W).
  """
  pre = _jit(conv)(x1, x2, ('cov1', 'cov2'))
  relu = _jit(stax.serial(conv, stax.Relu()))(x1, x2, FIELDS)
  out = {}
  stats = []
  for cov_pre, cov in ((pre.cov1, relu.cov1), (pre.cov2, relu.cov2)):
    m = np.sqrt(_diagonal(cov_pre) / (2 * np.pi))           # (N, H, W)
    q = _diagonal(cov)
    if not center:
      m = np.zeros_like(m)
    group = lambda a: np.broadcast_to(
        a.mean(tuple(1 + d for d in dims), keepdims=True), a.shape)
    big_m = group(m)
    s = np.sqrt(group(q) - big_m**2 + eps)
    stats.append((m, big_m, s))
  (m1, b1, s1), (m2, b2, s2) = stats

  def pair(k, ma, ba, sa, mb, bb, sb, lead):
    """(k - m_a M_b - M_a m_b + M_a M_b) / (s_a s_b), k (lead, H, H', W,
    W') with the first factor indexed (.., h, w), the second (.., h', w')."""
    a = lambda t: t[(slice(None),) + (None,) * (lead - 1) + (slice(None), None,
                                                            slice(None), None)]
    b = lambda t: t[(None,) * (lead - 1) + (slice(None), None, slice(None),
                                             None, slice(None))]
    if lead == 1:  # own covariance: both factors of the same sample
      a = lambda t: t[:, :, None, :, None]
      b = lambda t: t[:, None, :, None, :]
    k = np.asarray(k)
    centered = k - a(ma) * b(bb) - a(ba) * b(mb) + a(ba) * b(bb)
    return centered / (a(sa) * b(sb))

  out['nngp'] = pair(relu.nngp, m1, b1, s1, m2, b2, s2, 2)
  out['ntk'] = np.asarray(relu.ntk) / (s1[:, None, :, None, :, None]
                                       * s2[None, :, None, :, None, :])
  out['cov1'] = pair(relu.cov1, m1, b1, s1, m1, b1, s1, 1)
  out['cov2'] = pair(relu.cov2, m2, b2, s2, m2, b2, s2, 1)
  out['mean1'], out['mean2'] = (m1 - b1) / s1, (m2 - b2) / s2
  return out


@pytest.mark.parametrize('axis,dims,eps', [
    ((1, 2, 3), (0, 1), 1e-12), ((-3, -2, -1), (0, 1), 0.3),
    ((2, 3), (1,), 0.3), (-1, (), 0.3)], ids=['HWC', 'negative', 'WC', 'C'])
def test_spatial_layer_norm_matches_numpy_reference(axis, dims, eps):
  """Conv, ReLU, LayerNorm over (spatial axes, channels): nngp, ntk, cov1,
  cov2 (all pairs of positions) equal the docstring's formula in NumPy,
  with the group means M and variances V averaged over the normalized
  positions of each sample (all of them, or each row's for axis (2, 3))."""
  x1, x2 = _images()
  conv = _conv(8)
  ref = _relu_layer_norm_reference(conv, x1, x2, dims, eps)
  net = stax.serial(conv, stax.Relu(), stax.LayerNorm(axis, eps=eps))
  got = _jit(net)(x1, x2, FIELDS)
  for field in FIELDS:
    assert relative_error(getattr(got, field), ref[field]) < 1e-12, field


def test_spatial_layer_norm_output_means():
  """The normalized ReLU features keep non-zero channel means
  (m(p) - M) / s, which a sum with an independent non-Gaussian branch
  needs: nngp = nngp_a + nngp_b + m_a m_b' + m_b m_a' (independent branches,
  feature means from the reference) equals kernel_fn of the FanInSum."""
  x1, x2 = _images()
  conv_a, conv_b = _conv(8), _conv(8, W_std=1.1, b_std=0.5)
  ref = _relu_layer_norm_reference(conv_a, x1, x2, (0, 1), 0.1)
  branch_b = stax.serial(conv_b, stax.Relu())
  kb = _jit(branch_b)(x1, x2, FIELDS)
  vb = [_diagonal(c) for c in _jit(conv_b)(x1, x2, ('cov1', 'cov2'))]
  mb1, mb2 = (np.sqrt(v / (2 * np.pi)) for v in vb)
  net = stax.serial(
      stax.FanOut(2),
      stax.parallel(stax.serial(conv_a, stax.Relu(),
                                stax.LayerNorm((1, 2, 3), eps=0.1)),
                    branch_b), stax.FanInSum())
  got = _jit(net)(x1, x2, FIELDS)
  ma1, ma2 = ref['mean1'], ref['mean2']
  assert np.max(np.abs(ma1)) > 0.05   # the test has something to check
  cross = (ma1[:, None, :, None, :, None] * mb2[None, :, None, :, None, :]
           + mb1[:, None, :, None, :, None] * ma2[None, :, None, :, None, :])
  expected = ref['nngp'] + np.asarray(kb.nngp) + cross
  assert relative_error(got.nngp, expected) < 1e-12
  assert relative_error(got.ntk, ref['ntk'] + np.asarray(kb.ntk)) < 1e-12
  own = (ma1[:, :, None, :, None] * mb1[:, None, :, None, :]
         + mb1[:, :, None, :, None] * ma1[:, None, :, None, :])
  assert relative_error(got.cov1, ref['cov1'] + np.asarray(kb.cov1) + own) < 1e-12


def test_spatial_layer_norm_normalizes_the_kernel():
  """With eps = 0 the normalized features have, per sample, mean square 1
  averaged over the normalized positions: mean_p cov1'(p, p) = 1 (per row
  for axis (2, 3)), whatever the input (ReLU features, Gaussian ones)."""
  x1, _ = _images()
  for body in (stax.serial(_conv(4), stax.Relu()), _conv(4)):
    for axis, over in (((1, 2, 3), (1, 2)), ((2, 3), (2,))):
      net = stax.serial(body, stax.LayerNorm(axis, eps=0.))
      own = _diagonal(_jit(net)(x1, None, 'cov1'))
      np.testing.assert_allclose(own.mean(over), 1., rtol=1e-12)


def test_spatial_layer_norm_of_raw_inputs_is_the_normalized_inputs_kernel():
  """On the raw inputs the channel statistics are exact, so the kernel of
  LayerNorm(x) (and of a network after it) is the kernel of the finite
  layer's output apply_fn(x)."""
  x1, x2 = _images()
  norm = stax.LayerNorm((1, 2, 3), eps=0.2)
  y1, y2 = norm.apply_fn((), x1), norm.apply_fn((), x2)
  after = lambda: stax.serial(_conv(4), stax.Relu(), stax.Conv(3, (2, 2)))
  pairs = ((stax.serial(norm), stax.Identity()),
           (stax.serial(norm, after()), after()))
  for with_norm, without in pairs:
    got = _jit(with_norm)(x1, x2, FIELDS)
    expected = _jit(stax.serial(without))(y1, y2, FIELDS)
    for field in FIELDS:
      expected_field = np.asarray(getattr(expected, field))
      # (the NTK of the inputs themselves is 0)
      np.testing.assert_allclose(getattr(got, field), expected_field,
                                 rtol=1e-12, atol=1e-14)


def test_spatial_layer_norm_keeps_the_pixel_diagonal_layout():
  """M and V need only per-position means and same-position variances, so
  the layer runs pixel-diagonal: diagonal_spatial=True gives the
  same-position entries of the full result, and before a Flatten the
  network runs pixel-diagonal and agrees with Flatten of the full kernel."""
  x1, x2 = _images()
  body = stax.serial(_conv(4), stax.Relu(), stax.LayerNorm((1, 2, 3)),
                     stax.Conv(4, (2, 2), padding='SAME'))
  assert body.kernel_fn.input_diagonal(True)
  full = _jit(body)(x1, x2, ('nngp', 'ntk'))
  diagonal = _jit(body)(x1, x2, ('nngp', 'ntk'), diagonal_spatial=True)
  for field in ('nngp', 'ntk'):
    same = np.einsum('nmhhww->nmhw', np.asarray(getattr(full, field)))
    assert relative_error(getattr(diagonal, field), same) < 1e-12
  flat = _jit(stax.serial(body, stax.Flatten()))(x1, x2, FIELDS)
  kernel = jax.jit(body.kernel_fn)(x1, x2)
  assert not kernel.spatial.diagonal
  expected = stax.Flatten().kernel_fn(kernel, get=FIELDS)
  for field in FIELDS:
    assert relative_error(getattr(flat, field), getattr(expected, field)) < 1e-12


@pytest.mark.parametrize('axis', [(1, 2, 3), (2, 3), -1])
def test_finite_layer_norm_over_spatial_axes(axis):
  """apply_fn: each sample (and row, for axis (2, 3)) minus its mean over
  the normalized entries, divided by sqrt(their variance + eps), by
  explicit loops."""
  x = np.random.default_rng(2).standard_normal((2, 3, 4, 5)) * 2 + 0.5
  eps = 0.3
  expected = np.empty_like(x)
  for n in range(2):
    if axis == (1, 2, 3):
      blocks = [(n,)]
    elif axis == (2, 3):
      blocks = [(n, h) for h in range(3)]
    else:
      blocks = [(n, h, w) for h in range(3) for w in range(4)]
    for index in blocks:
      values = x[index]
      expected[index] = (values - values.mean()) / np.sqrt(values.var() + eps)
  got = stax.LayerNorm(axis, eps=eps).apply_fn((), jnp.asarray(x))
  np.testing.assert_allclose(got, expected, atol=1e-12)




MC_WIDTH = 256
MC_SAMPLES = 32


def test_spatial_layer_norm_nngp_matches_monte_carlo():
  """Conv(256), ReLU, LayerNorm over (H, W, C), a 1x1 Conv readout as wide:
  the finite network's covariance between every pair of output positions
  (N1, N2, H, H', W, W') is W_std^2 nngp_LN + b_std^2, against kernel_fn
  and the NumPy reference. Negative controls, from the same reference: the
  kernel without centering, and the kernel normalized per position (the
  spatial averaging dropped), are rejected."""
  x1, x2 = _images()
  conv = _conv(MC_WIDTH)
  net = stax.serial(conv, stax.Relu(), stax.LayerNorm((1, 2, 3)),
                    stax.Conv(MC_WIDTH, (1, 1), W_std=1.2, b_std=0.1))
  estimate = monte_carlo_structured(net, x1, x2, MC_SAMPLES, 11, 'nngp')
  readout = lambda k: 1.2**2 * k + 0.1**2
  exact = _jit(net)(x1, x2, 'nngp')
  reference = readout(_relu_layer_norm_reference(conv, x1, x2, (0, 1),
                                                 1e-12)['nngp'])
  assert relative_error(exact, reference) < 1e-12
  assert_monte_carlo_close(estimate, exact, MC_WIDTH, 'nngp')
  wrong = {
      'uncentered': _relu_layer_norm_reference(conv, x1, x2, (0, 1), 1e-12,
                                               center=False),
      'per position': _relu_layer_norm_reference(conv, x1, x2, (), 1e-12)}
  for label, kernel in wrong.items():
    with pytest.raises(AssertionError):
      assert_monte_carlo_close(estimate, readout(kernel['nngp']), MC_WIDTH,
                               label)


def test_spatial_layer_norm_ntk_matches_monte_carlo():
  """NTK of Conv(256), ReLU, LayerNorm over (H, W, C) and a 1x1 Conv with
  one output channel, between every pair of output positions: the
  gradients of the group mean and variance (averages over channels) do not
  contribute at infinite width. Negative control: the kernel of the same
  network normalized per position is rejected."""
  x1, x2 = _images()

  def net(axis):
    return stax.serial(_conv(MC_WIDTH), stax.Relu(), stax.LayerNorm(axis),
                       stax.Conv(1, (1, 1), W_std=1.2, b_std=0.1))
  estimate = monte_carlo_structured(net((1, 2, 3)), x1, x2, MC_SAMPLES, 12, 'ntk')
  assert_monte_carlo_close(estimate, _jit(net((1, 2, 3)))(x1, x2, 'ntk'),
                           MC_WIDTH, 'ntk')
  with pytest.raises(AssertionError):
    assert_monte_carlo_close(estimate, _jit(net(-1))(x1, x2, 'ntk'),
                             MC_WIDTH, 'per position')


def test_layer_norm_errors(inputs):
  x1, x2 = inputs
  net = stax.serial(_dense(), stax.Relu(), stax.LayerNorm(), stax.Relu())
  with pytest.raises(stax.KernelError, match='Dense'):
    net.kernel_fn(x1, x2)
  with pytest.raises(ValueError, match='eps'):
    stax.LayerNorm(eps=-1.)
  images, _ = _images()
  # Spatial axes without channels: the finite layer works, the kernel has
  # no infinite-width limit of this kind (a ValueError, as neural-tangents).
  spatial_only = stax.LayerNorm(axis=(1, 2))
  assert spatial_only.apply_fn((), images).shape == images.shape
  with pytest.raises(stax.KernelError, match='channel axis'):
    spatial_only.kernel_fn(images)
  with pytest.raises(NotImplementedError, match='batch axis'):
    stax.LayerNorm(axis=(0, 3)).kernel_fn(images)
  with pytest.raises(ValueError, match='out of range'):
    stax.LayerNorm(axis=(1, 4)).kernel_fn(images)
  with pytest.raises(ValueError, match='non-empty'):
    stax.LayerNorm(axis=())
  with pytest.raises(NotImplementedError, match='batch_axis'):
    stax.LayerNorm(batch_axis=1)


# ---- Same-field combinations of per-sample scalings (issue 17, item 8). ----
#
# LayerNorm of a Gaussian field z is z_i / s_i per sample (s_i = sqrt(q_i +
# eps), deterministic at infinite width), so x + LayerNorm(x) = (1 + 1/s_i)
# z_i is again a Gaussian field scaled per sample, and x * LayerNorm(x) =
# z_i^2 / s_i has the moments of z^2 scaled per sample. Each kernel is
# checked against Monte Carlo of the finite networks.

RESIDUALS = {
    'x + LayerNorm(x), then Relu': lambda: stax.serial(
        _dense(), stax.FanOut(2), stax.parallel(stax.Identity(),
                                                stax.LayerNorm()),
        stax.FanInSum(), stax.Relu()),
    'x + LayerNorm(x) + LayerNorm(LayerNorm(x)), then Erf': lambda: stax.serial(
        _dense(), stax.FanOut(3),
        stax.parallel(stax.Identity(), stax.LayerNorm(),
                      stax.serial(stax.LayerNorm(), stax.LayerNorm())),
        stax.FanInSum(), stax.Erf()),
    'x * LayerNorm(x)': lambda: stax.serial(
        _dense(), stax.FanOut(2), stax.parallel(stax.Identity(),
                                                stax.LayerNorm()),
        stax.FanInProd()),
    'pre-LN transformer-style block: x + Dense(Relu(LayerNorm(x)))':
        lambda: stax.serial(
            _dense(), stax.FanOut(2),
            stax.parallel(stax.Identity(), stax.serial(
                stax.LayerNorm(), stax.Relu(), _dense())),
            stax.FanInSum(), stax.LayerNorm(), stax.Gelu()),
    # A nonlinear branch beside a rescaling of the same field: every pair
    # of branches is a 2-d Gaussian expectation over (z_i, z_j).
    'Relu(z) + LayerNorm(z), then Dense': lambda: stax.serial(
        _dense(), stax.FanOut(2), stax.parallel(stax.Relu(),
                                                stax.LayerNorm()),
        stax.FanInSum(), _dense()),
    'Erf(z) + Relu(LayerNorm(z)) + LayerNorm(z), then Dense': lambda: stax.serial(
        _dense(), stax.FanOut(3), stax.parallel(
            stax.Erf(), stax.serial(stax.LayerNorm(eps=0.3), stax.Relu()),
            stax.LayerNorm()),
        stax.FanInSum(), _dense()),
}


@pytest.mark.parametrize('name', sorted(RESIDUALS))
def test_same_field_rescalings_match_monte_carlo(name, inputs):
  """These raised 'two branches depend on the same Gaussian field' before."""
  check_layers_against_monte_carlo(RESIDUALS[name], inputs, name, WIDTH,
                                   key=len(name))


def test_sum_of_rescalings_is_the_field_scaled_per_sample(inputs):
  """Exact identity: the NNGP of z + LayerNorm(z) is
  nngp_ij (1 + 1/s_i)(1 + 1/s_j) with s_i = sqrt(cov1_i + eps)."""
  x1, x2 = inputs
  _, _, base = stax.serial(_dense())
  _, _, residual = stax.serial(_dense(), stax.FanOut(2), stax.parallel(
      stax.Identity(), stax.LayerNorm(eps=0.1)), stax.FanInSum())
  k = base(x1, x2)
  c1 = 1 + 1 / np.sqrt(np.asarray(k.cov1) + 0.1)
  c2 = 1 + 1 / np.sqrt(np.asarray(k.cov2) + 0.1)
  got = residual(x1, x2)
  np.testing.assert_allclose(got.nngp, np.outer(c1, c2) * k.nngp, rtol=1e-12)
  np.testing.assert_allclose(got.ntk, np.outer(c1, c2) * k.ntk, rtol=1e-12)
  np.testing.assert_allclose(got.cov1, c1**2 * k.cov1, rtol=1e-12)


def test_a_nonlinear_branch_beside_a_rescaling_is_exact(inputs):
  """Relu(z) + c_i z (c_i = 1/s_i: LayerNorm of z) against the closed
  forms: E[relu(u) relu(v)] is the arc-cosine kernel, E[relu(u) v] =
  k12 E[relu'(u)] = k12 / 2 (Stein), and E[u v] = k12, so
      nngp_ij = arccos_ij + (c_i + c_j) k12 / 2 + c_i c_j k12,
      ntk_ij  = ntk(z)_ij (E[relu' relu'] + (c_i + c_j) / 2 + c_i c_j)."""
  x1, x2 = inputs
  _, _, base = stax.serial(_dense())
  _, _, relu = stax.serial(_dense(), stax.Relu())
  _, _, kernel_fn = stax.serial(_dense(), stax.FanOut(2), stax.parallel(
      stax.Relu(), stax.LayerNorm(eps=0.2)), stax.FanInSum())
  k, r, got = base(x1, x2), relu(x1, x2), kernel_fn(x1, x2)
  c1 = 1 / np.sqrt(np.asarray(k.cov1) + 0.2)
  c2 = 1 / np.sqrt(np.asarray(k.cov2) + 0.2)
  k12 = np.asarray(k.nngp)
  cross = (c1[:, None] + c2[None, :]) / 2 + np.outer(c1, c2)
  np.testing.assert_allclose(got.nngp, r.nngp + cross * k12, rtol=1e-6)
  # relu's NTK factor E[relu' relu'] = (ntk of relu) / ntk(z).
  np.testing.assert_allclose(got.ntk, r.ntk + k.ntk * cross, rtol=1e-6)
  np.testing.assert_allclose(got.cov1, r.cov1 + (c1 + c1**2) * k.cov1,
                             rtol=1e-6)
  with pytest.raises(ValueError, match='scaled per sample.*Relu'):
    stax.serial(_dense(), stax.FanOut(2), stax.parallel(
        stax.Relu(), stax.LayerNorm()), stax.FanInProd()).kernel_fn(*inputs)
