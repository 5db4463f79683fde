"""Shared test helpers: float64, and Monte Carlo estimates of kernels.

The Monte Carlo estimates are independent of ntkjax's kernel code: they
average, over random initializations, the empirical kernels of the *finite*
network built from the same definition,

    NNGP_emp(x, y) = f(x) . f(y) / n_out,
    NTK_emp(x, y)  = sum_p df(x)/dp . df(y)/dp / n_out   (autodiff Jacobians),

which converge to the infinite-width kernels as the hidden widths grow.
"""

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import ntkjax
from ntkjax import stax

jax.config.update('jax_enable_x64', True)


@contextlib.contextmanager
def backend_compiles():
  """Collects one entry per XLA backend compilation inside the block."""
  compiles = []

  def listener(name, duration, **kwargs):
    if 'backend_compile' in name:
      compiles.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def empirical_nngp(apply_fn, params, x1, x2):
  """Channel-averaged f(x1) f(x2)^T of one finite network."""
  f1, f2 = apply_fn(params, x1), apply_fn(params, x2)
  return f1 @ f2.T / f1.shape[-1]


def empirical_ntk(apply_fn, params, x1, x2):
  """J(x1) J(x2)^T averaged over output channels, with autodiff Jacobians."""
  def jac(x):
    return jax.jacrev(lambda p: apply_fn(p, x))(params)
  j1, j2 = jac(x1), jac(x2)

  def contract(a, b):
    a = a.reshape(a.shape[0] * a.shape[1], -1)
    b = b.reshape(b.shape[0] * b.shape[1], -1)
    return a @ b.T
  leaves1, leaves2 = jax.tree.leaves(j1), jax.tree.leaves(j2)
  n1, n_out = x1.shape[0], leaves1[0].shape[1]
  n2 = x2.shape[0]
  total = sum(contract(a, b) for a, b in zip(leaves1, leaves2))
  total = total.reshape(n1, n_out, n2, n_out)
  return jnp.einsum('iaja->ij', total) / n_out


def monte_carlo(network, x1, x2, key, n_seeds, get=('nngp',)):
  """Mean and standard error over `n_seeds` initializations.

  Args:
    network: a `Layer` (init_fn, apply_fn, kernel_fn).
    x1, x2: inputs.
    key: PRNG key.
    n_seeds: number of independent initializations.
    get: which of 'nngp', 'ntk' to estimate.

  Returns:
    dict name -> (mean, standard_error), arrays of shape (N1, N2).
  """
  init_fn, apply_fn, _ = network
  estimators = {'nngp': empirical_nngp, 'ntk': empirical_ntk}
  samples = {name: [] for name in get}
  jitted = {name: jax.jit(lambda p, a, b, f=estimators[name]: f(apply_fn, p, a, b))
            for name in get}
  for seed_key in jax.random.split(key, n_seeds):
    _, params = init_fn(seed_key, (-1, x1.shape[-1]))
    for name in get:
      samples[name].append(np.asarray(jitted[name](params, x1, x2)))
  out = {}
  for name, values in samples.items():
    values = np.stack(values)
    out[name] = (values.mean(0), values.std(0, ddof=1) / np.sqrt(n_seeds))
  return out


def assert_monte_carlo_close(estimate, exact, width, label=''):
  """Monte Carlo mean within its statistical error of the exact kernel.

  Tolerance: 5 standard errors (the seed-to-seed spread; a false alarm at 5
  sigma is ~1e-6 per entry) plus the finite-width bias of the empirical
  kernel, which is O(1/width) (Yaida 2020; Hanin & Nica 2020); we allow
  8 / width relative to the kernel's scale.
  """
  mean, stderr = estimate
  exact = np.asarray(exact)
  scale = np.max(np.abs(exact))
  tolerance = 5 * stderr + 8 / width * scale
  error = np.abs(mean - exact)
  worst = np.max(error - tolerance)
  assert worst <= 0, (
      f'{label}: Monte Carlo disagrees with kernel_fn: max error '
      f'{np.max(error):.4g}, tolerance {np.min(tolerance):.4g}..'
      f'{np.max(tolerance):.4g}\nexact=\n{exact}\nmc=\n{mean}')


def check_layers_against_monte_carlo(body, inputs, name, width, seeds_nngp=24,
                                    seeds_ntk=96, key=0):
  """`body()` followed by a Dense readout: the NNGP with a wide readout and
  the NTK with a narrow one (2 outputs, cheaper Jacobians), each within
  `assert_monte_carlo_close` of kernel_fn.

  Args:
    body: builds the layers under test (called once per readout).
    inputs: (x1, x2).
    name: label for failures.
    width: the hidden width of `body` (for the finite-width bias allowance).
    seeds_nngp, seeds_ntk: Monte Carlo samples.
    key: PRNG seed.
  """
  x1, x2 = inputs
  key = jax.random.PRNGKey(key)
  wide = stax.serial(body(), stax.Dense(width, W_std=1.2, b_std=0.1))
  narrow = stax.serial(body(), stax.Dense(2, W_std=1.2, b_std=0.1))
  nngp = monte_carlo(wide, x1, x2, key, seeds_nngp, ('nngp',))['nngp']
  ntk = monte_carlo(narrow, x1, x2, key, seeds_ntk, ('ntk',))['ntk']
  assert_monte_carlo_close(nngp, wide.kernel_fn(x1, x2, 'nngp'), width,
                           f'{name} nngp')
  assert_monte_carlo_close(ntk, narrow.kernel_fn(x1, x2, 'ntk'), width,
                           f'{name} ntk')


def direct_empirical_kernel(f, params, x1, x2, trace, diagonal, kind):
  """The empirical kernel from its definition, with explicit loops.

  Full Jacobians of the flattened parameters by forward mode (`jacfwd`),
  T[a, b] = sum_p J1[a, p] J2[b, p] over all output index pairs (or the
  outer product of outputs for the NNGP), then traced axes averaged,
  diagonal axes kept once and other axes interleaved (x1, x2) by Python
  loops over the result's indices.

  Args:
    f: `f(params, x)`.
    params: parameters (any pytree).
    x1, x2: inputs.
    trace, diagonal: output axes (ints, may be negative).
    kind: 'ntk' or 'nngp'.

  Returns:
    numpy array with neural-tangents' axis conventions.
  """
  if kind == 'ntk':
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jit(jax.jacfwd(lambda q, x: f(unravel(q), x)),
                       compiler_options={'xla_backend_optimization_level': 0})
    jac = lambda x: np.asarray(jacobian(flat, x))
    j1, j2 = jac(x1), jac(x2)
    full = np.tensordot(j1, j2, axes=([-1], [-1]))
  else:
    full = np.multiply.outer(np.asarray(f(params, x1)), np.asarray(f(params, x2)))
  ndim = full.ndim // 2
  shape1, shape2 = full.shape[:ndim], full.shape[ndim:]
  trace = {a % ndim for a in trace}
  diagonal = {a % ndim for a in diagonal}
  out_dims = []
  for axis in range(ndim):
    if axis in trace:
      continue
    out_dims += [shape1[axis]] if axis in diagonal else [shape1[axis], shape2[axis]]
  out = np.zeros(out_dims)
  size = np.prod([shape1[a] for a in trace]) if trace else 1
  for index in itertools.product(*(range(n) for n in out_dims)):
    pos, i1, i2 = 0, [], []
    free = []
    for axis in range(ndim):
      if axis in trace:
        i1.append(None)
        i2.append(None)
        free.append(axis)
      elif axis in diagonal:
        i1.append(index[pos])
        i2.append(index[pos])
        pos += 1
      else:
        i1.append(index[pos])
        i2.append(index[pos + 1])
        pos += 2
    total = 0.
    for t in itertools.product(*(range(shape1[a]) for a in free)):
      a1, a2 = list(i1), list(i2)
      for axis, value in zip(free, t):
        a1[axis] = a2[axis] = value
      total += full[tuple(a1) + tuple(a2)]
    out[index] = total / size
  return out


@pytest.fixture
def inputs():
  """Two small batches of inputs with different norms (float64)."""
  key1, key2 = jax.random.split(jax.random.PRNGKey(7))
  x1 = jax.random.normal(key1, (4, 6))
  x2 = 1.5 * jax.random.normal(key2, (3, 6))
  return x1, x2


def relative_error(a, b):
  """max |a - b| / max |b| (shapes must agree)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def monte_carlo_structured(network, x1, x2, n, seed, get):
  """Mean and standard error of `n` empirical kernels of the finite network
  (`monte_carlo_kernel_fn` with running estimates, structured derivatives):
  the running means m_k at every k give the samples k m_k - (k-1) m_{k-1}."""
  init_fn, apply_fn, _ = network
  kernel_fn = ntkjax.monte_carlo_kernel_fn(
      init_fn, apply_fn, jax.random.PRNGKey(seed), range(1, n + 1),
      vmap_axes=0,
      implementation=ntkjax.NtkImplementation.STRUCTURED_DERIVATIVES)
  means = [np.asarray(m) for m in kernel_fn(x1, x2, get)]
  samples = np.stack([means[0]] + [(k + 1) * means[k] - k * means[k - 1]
                                   for k in range(1, n)])
  return means[-1], samples.std(0, ddof=1) / np.sqrt(n)


def ntk_from_jacobians(j1, j2, trace_axes):
  """The NTK from raveled-parameter Jacobians of shape (N, O, P).

  Returns (N1, N2) averaged over the outputs for trace_axes=(-1,), else
  (N1, N2, O1, O2).
  """
  full = np.tensordot(j1, j2, axes=([-1], [-1]))   # (N1, O, N2, O)
  if trace_axes:
    return np.einsum('iaja->ij', full) / full.shape[-1]
  return np.einsum('iajb->ijab', full)
