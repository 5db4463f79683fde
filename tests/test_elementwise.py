"""Every activation layer: kernel_fn against wide finite networks (Monte Carlo),
closed forms against the quadrature path through the whole layer, and errors."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_monte_carlo_close, backend_compiles, monte_carlo
from ntkjax import stax
from ntkjax.stax import _dual as dual, _quadrature as quadrature

WIDTH = 512

LAYERS = {
    'Relu': stax.Relu,
    'LeakyRelu': lambda: stax.LeakyRelu(0.2),
    'ABRelu': lambda: stax.ABRelu(-0.5, 1.5),
    'Abs': stax.Abs,
    'Erf': lambda: stax.Erf(1.2, 0.7, 0.1),
    'Sigmoid_like': stax.Sigmoid_like,
    'Gelu': stax.Gelu,
    'GeluApproximate': lambda: stax.Gelu(approximate=True),
    'Sin': lambda: stax.Sin(1.0, 1.3, 0.3),
    'Cos': stax.Cos,
    'Rbf': lambda: stax.Rbf(0.5),
    'Exp': lambda: stax.Exp(0.5, 0.6),
    'Gaussian': lambda: stax.Gaussian(1.0, -0.5),
    'Sign': stax.Sign,
    'Monomial': lambda: stax.Monomial(3),
    'RectifiedMonomial': lambda: stax.RectifiedMonomial(2),
    'Polynomial': lambda: stax.Polynomial([0.1, 1.0, -0.3]),
    'Hermite': lambda: stax.Hermite(3),
    'Tanh': stax.Tanh,
    'Sigmoid': stax.Sigmoid,
    'Softplus': stax.Softplus,
    'Silu': stax.Silu,
    'Elu': stax.Elu,
    'Selu': stax.Selu,
    'Elementwise': lambda: stax.Elementwise(
        jnp.sin, nngp_fn=lambda c, v1, v2: 0.5 * (
            jnp.exp(-(v1 + v2 - 2 * c) / 2) - jnp.exp(-(v1 + v2 + 2 * c) / 2))),
    'ElementwiseNumerical': lambda: stax.ElementwiseNumerical(
        lambda x: x * jnp.tanh(x), deg=40),
}


def _network(activation, readout):
  return stax.serial(stax.Dense(WIDTH, W_std=1.3, b_std=0.2), activation,
                     stax.Dense(readout, W_std=1.1, b_std=0.1))


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_activation_matches_monte_carlo(name, inputs):
  x1, x2 = inputs
  # crc32, not hash(): str hashes change per process, so a failure could not
  # be reproduced.
  key = jax.random.PRNGKey(zlib.crc32(name.encode()))
  wide_out = _network(LAYERS[name](), WIDTH)
  narrow_out = _network(LAYERS[name](), 2)
  nngp_mc = monte_carlo(wide_out, x1, x2, key, 24, ('nngp',))['nngp']
  ntk_mc = monte_carlo(narrow_out, x1, x2, key, 96, ('ntk',))['ntk']
  assert_monte_carlo_close(nngp_mc, wide_out.kernel_fn(x1, x2, 'nngp'), WIDTH,
                           f'{name} nngp')
  assert_monte_carlo_close(ntk_mc, narrow_out.kernel_fn(x1, x2, 'ntk'), WIDTH,
                           f'{name} ntk')


SMOOTH_CLOSED = {
    'Erf': (lambda: stax.Erf(1.2, 0.7, 0.1),
            lambda x: 1.2 * jax.scipy.special.erf(0.7 * x) + 0.1),
    'Gelu': (stax.Gelu, lambda x: jax.nn.gelu(x, approximate=False)),
    'Sin': (lambda: stax.Sin(1.0, 1.3, 0.3), lambda x: jnp.sin(1.3 * x + 0.3)),
    'Exp': (lambda: stax.Exp(0.5, 0.6), lambda x: 0.5 * jnp.exp(0.6 * x)),
    'Gaussian': (lambda: stax.Gaussian(1.0, -0.5), lambda x: jnp.exp(-0.5 * x**2)),
    'Hermite': (lambda: stax.Hermite(3), lambda x: (x**3 - 3 * x) / jnp.sqrt(6.)),
    'Rbf': (lambda: stax.Rbf(0.5),
            lambda x: jnp.sqrt(2.) * jnp.sin(x + jnp.pi / 4)),
}


@pytest.mark.parametrize('name', sorted(SMOOTH_CLOSED))
def test_closed_form_layer_equals_quadrature_layer(name, inputs):
  """Through Dense -> act -> Dense, closed form == ElementwiseNumerical(deg=200).

  The quadrature converges spectrally for these entire functions, more slowly
  as the pre-activation variance grows (here up to ~4, where degree 200 is
  converged to ~1e-14), so 1e-8 relative is a strict check of the closed
  forms in context.
  """
  x1, x2 = inputs
  closed, fn = SMOOTH_CLOSED[name]
  exact = _network(closed(), 1).kernel_fn(x1, x2)
  numeric = _network(stax.ElementwiseNumerical(fn, deg=200), 1).kernel_fn(x1, x2)
  for field in ('nngp', 'ntk', 'cov1', 'cov2'):
    np.testing.assert_allclose(getattr(exact, field), getattr(numeric, field),
                               rtol=1e-8, atol=1e-12, err_msg=field)


def test_hermite_is_exact_for_any_variance(inputs):
  """He_3/sqrt(6) at pre-activation variance ~4 (W_std=2): the kernel's
  diagonal equals quadrature of phi^2 (40 nodes integrate this degree-6
  polynomial exactly); the reference library is exact only at variance 1."""
  x1, _ = inputs
  net = stax.serial(stax.Dense(1, W_std=2.0), stax.Hermite(3))
  fn = lambda x: (x**3 - 3 * x) / jnp.sqrt(6.)
  q = net.kernel_fn(x1, None, 'cov1')
  cov_pre = stax.Dense(1, W_std=2.0).kernel_fn(x1, None, 'cov1')
  np.testing.assert_allclose(q, quadrature.expect_1d(lambda x: fn(x)**2, cov_pre, 40),
                             rtol=1e-10)


def test_activation_on_raw_inputs_is_an_error(inputs):
  x1, x2 = inputs
  with pytest.raises(stax.KernelError, match='raw inputs'):
    stax.serial(stax.Relu(), stax.Dense(1)).kernel_fn(x1, x2)


def test_elementwise_with_only_nngp_fn(inputs):
  """Kernel-only Elementwise works; combining it needs its mean, so a clear
  error asks for fn; apply_fn says it needs fn."""
  x1, x2 = inputs
  relu_nngp = dual.ab_relu(0., 1.).nngp
  kernel_only = lambda: stax.Elementwise(nngp_fn=relu_nngp)
  got = stax.serial(stax.Dense(4), kernel_only()).kernel_fn(x1, x2)
  want = stax.serial(stax.Dense(4), stax.Relu()).kernel_fn(x1, x2)
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-9)
  summed = stax.serial(stax.Dense(4), stax.FanOut(2),
                       stax.parallel(kernel_only(), stax.Dense(4)),
                       stax.FanInSum())
  with pytest.raises(stax.KernelError, match='Pass fn='):
    summed.kernel_fn(x1, x2)
  init_fn, apply_fn, _ = stax.serial(stax.Dense(4), kernel_only())
  _, params = init_fn(jax.random.PRNGKey(0), (-1, 6))
  with pytest.raises(NotImplementedError, match='fn'):
    apply_fn(params, x1)


def test_elementwise_requires_something():
  with pytest.raises(ValueError, match='Elementwise'):
    stax.Elementwise()


@pytest.mark.parametrize('bad', [-1, 2.5])
def test_bad_degrees_are_errors(bad):
  with pytest.raises(ValueError, match='degree'):
    stax.Monomial(bad)


def test_quadrature_kernels_compile_once_when_called_eagerly():
  """kernel_fn runs op by op unless the user jits it. The quadrature's
  large-kernel stage is jitted with the activation as a static argument;
  the kernel maps build their elementwise maps anew on each call, so equal
  maps must be one object (`_quadrature._canonical`), or every call would
  compile again (it cost 0.5 s per quadrature layer per call)."""
  with backend_compiles() as compiles:
    net = stax.serial(stax.Dense(8, W_std=1.3), stax.Tanh(), stax.Dense(8),
                      stax.Tanh(), stax.Dense(1))
    # 64 x 64 entries: past the small-kernel path, into the chunked stage.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 5)),
                    jnp.float32)
    first = net.kernel_fn(x, None, ('nngp', 'ntk'))
    compiles.clear()
    again = net.kernel_fn(x, None, ('nngp', 'ntk'))
    assert compiles == []
    np.testing.assert_array_equal(again.ntk, first.ntk)
    # A different scale in front of the same activation is another map.
    other = stax.serial(stax.Dense(8, W_std=2.), stax.Tanh(), stax.Dense(8),
                        stax.Tanh(), stax.Dense(1)).kernel_fn(x, None, 'ntk')
    assert np.max(np.abs(other - first.ntk)) > 1e-3
