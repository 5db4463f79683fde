"""Quadrature for activations without closed forms: the rule of stax/_quadrature.py against the former polar rule and a closed-form floor.

`quadrature.expect_2d(f, g, k12, k11, k22, degree)` (E[f(u) g(v)] for
(u, v) ~ N(0, [[k11, k12], [k12, k22]]), entrywise) replaced the polar rule
of ntkjax/stax/dual.py at commit c0e65ce (Gauss-Legendre in the angle on
four arcs split at the kink lines, half-range Gauss in the radius). The new
rule is accurate at every variance (on the diagonal the polar rule's
E[tanh'(u)^2] was ~1e-3 off, relatively, at variance 10 and ~2e-2 at 59)
but costs more per kernel entry.
This script measures both sides of that trade. The polar rule is copied
below (`polar_expect_2d`, the former rule, kept here only as a baseline).

Timing (float32, degree 24 = dual.DEFAULT_QUADRATURE_DEGREE). Inputs: x ~
N(0, 1) of shape (N, 32) (numpy seed 0), k12 = x x^T / 32 (a Dense layer's
covariance, variances ~1), k11 = diag(k) broadcast along rows, k22 along
columns, all materialized (N, N). Cases: `nngp_tanh` (f = g = jnp.tanh),
`ntk_tanh` (f = g = quadrature.derivative(jnp.tanh), the NTK factor) and,
to separate each rule's own bookkeeping from the cost of the activation,
`nngp_square` (f = g = x * x, about the cheapest activation there is), at N
= 64 and 512 (--quick: 64, 128). Implementations, each wrapped in jax.jit
(the new rule works under an outer jit: its stages are nested jits, its
degree a Python int; `max_abs_diff_new_jit_vs_eager` checks it gives the
eager result): (a) `new`: quadrature.expect_2d; (b) `old`: the polar rule;
(c) `closed_form`: dual.erf(1., 1., 0.).nngp (the arcsin closed form;
.ntk_factor for ntk_tanh; for nngp_square the exact k11 k22 + 2 k12^2 of
dual.polynomial([0, 0, 1]).nngp), the floor of any kernel map on these
inputs. Medians of R interleaved calls (`_common.time_interleaved`, each after a
warm-up; R = 15 at N = 64, 5 at N = 512), reported in seconds and
microseconds per kernel entry, with the ratios new / old and new /
closed_form. Compile cost: the first jitted call on a fresh shape minus the
median. kernel_fn also runs op by op when the caller does not jit it, so the
new and old rules are timed un-jitted too (`*_eager_*`, R = 3): the new rule
then jits its stages per bucketed size, and its first call on a fresh
bucket is the compile cost its docstring speaks of (`new_eager_compile_s`);
`*_eager_compile_per_call_s` is the XLA compile time (jax.monitoring)
inside a *warm* eager call (nonzero: both rules' `lax.scan` over a fresh
closure is retraced and recompiled on every eager call). The rules' numpy
constants (Gauss rules, tail tables) are built before any timing
(`rule_setup_s`), so the compile costs are compilation (and, eager, XLA
programs for each primitive met the first time).

Flop floor. The closed form does O(1) work per entry (a few multiplies, two
square roots, one arcsin polynomial), so it runs at memory speed; a
quadrature rule evaluates the activation at hundreds to thousands of points
per entry, each a transcendental (tanh: one exp; tanh': tanh and a jvp),
plus the rule's own weights. Counted from the rules at degree 24 (recorded
as `evaluations_per_entry`): the new rule evaluates f at 112 points (56 on
each side of the kink x = 0: 6 Gauss-Legendre panels of 8 nodes and an
8-node half-range tail) and g at ~2070 (112 outer nodes x 2 sides x (8 tail
+ 1 gap node) = 2016, plus 2 x 26 activation-panel nodes shared by all outer
nodes), and per (outer node, side) a 14-term Horner sum and two exps for
the Gaussian weights; the polar rule evaluates f and g at 2 x 24^2 = 1152
points each (24 radii x 12 angles x 4 arcs), plus a cos per angle. So
new / old should be about (112 + 2070) / (2 x 1152) ~ 0.95 in activation
calls, but the new rule's per-node bookkeeping (gathers of tabulated tail
rules, exps of the Gaussian weight, Horner sums) is heavier, and both are
orders of magnitude above the closed form. In practice the activation is
a small part of either rule's time: with f = g = x * x (nngp_square) the
new rule costs about what it costs with tanh, so its ratio to the polar
rule there (~4-5x) is the price of its bookkeeping. The polar rule's
nngp_tanh time is an outlier, 3-4x its own ntk_tanh and nngp_square times
although tanh and tanh' cost the same per element (~0.6 ns, jitted, on
this machine) and f = tanh + 0.5 runs as fast as x * x: XLA CPU compiles
that rule's graph with plain tanh into something slower, so new / old for
nngp_tanh (~1.5x) understates the new rule's extra cost.

Accuracy (float64, in a child process with JAX_ENABLE_X64=1 so the timings
above stay float32): E[tanh(u)^2] and E[tanh'(u)^2] on the diagonal (k12 =
k11 = k22 = q) at q = 1, 10, 59, 1e3, 1e4, for both rules, against an
independent reference: scipy.integrate.quad of int f(sqrt(q) z)^2 phi(z) dz,
on each side of 0 split at breakpoints 1, 3, 9, 27 / sqrt(q) (epsrel 1e-12),
recorded as absolute and relative errors (`accuracy` in the JSON).

Output: benchmarks/results/quadrature_<backend>.json (_quick for --quick):
one record per (case, N) with the three implementations' medians and mins,
us per entry, ratios, compile costs and the eager timings;
`kernel_seconds_median` is the new rule's jitted median (what the README
table shows as "ours") and `status` summarizes the ratios. Top level:
`protocol`, `evaluations_per_entry`, `accuracy`, git state and source hash.

Usage:
    python benchmarks/bench_quadrature.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ntkjax  # noqa: E402
from ntkjax.stax import _dual as dual, _quadrature as quadrature  # noqa: E402

DEGREE = dual.DEFAULT_QUADRATURE_DEGREE
D = 32
SIZES = {False: (64, 512), True: (64, 128)}
CASES = ('nngp_tanh', 'ntk_tanh', 'nngp_square')
REPEATS = {64: 15, 128: 9, 512: 5}
EAGER_REPEATS = 3
VARIANCES = (1., 10., 59., 1e3, 1e4)
COLUMNS = ('case', 'N', 'new_us_per_entry', 'old_us_per_entry',
           'closed_form_us_per_entry', 'ratio_new_to_old',
           'ratio_new_to_closed_form', 'new_compile_s', 'new_eager_s')


# ----------------------------------------------------------------------------
# The former rule, kept here only as a baseline: ntkjax/stax/dual.py at
# commit c0e65ce (`expect_2d` and its `half_range_rule`), unchanged but for
# names. `dual._correlation` is imported: it is unchanged since then.


@functools.lru_cache(maxsize=1)
def _discretization():
  return np.polynomial.legendre.leggauss(800)


@functools.lru_cache(maxsize=64)
def polar_half_range_rule(degree: int, power: int):
  """Gauss rule for r^power exp(-r^2 / 2) on [0, inf), mass 1 (Stieltjes
  on a Gauss-Legendre discretization of [0, 14], then Golub-Welsch)."""
  x, w = _discretization()
  r = 7. * (x + 1.)
  w = 7. * w * r**power * np.exp(-r**2 / 2)
  w = w / w.sum()
  alphas, off = [], []
  p_prev, p, b = np.zeros_like(r), np.ones_like(r), 0.
  for k in range(degree):
    alpha = np.sum(w * r * p * p)
    alphas.append(alpha)
    q = (r - alpha) * p - b * p_prev
    b = np.sqrt(np.sum(w * q * q))
    if k < degree - 1:
      off.append(b)
    p_prev, p = p, q / b
  off = np.asarray(off)
  nodes, vectors = np.linalg.eigh(np.diag(alphas) + np.diag(off, 1)
                                  + np.diag(off, -1))
  return nodes, vectors[0]**2


def polar_expect_2d(f, g, k12, k11, k22, degree: int):
  """The former polar rule: `degree` radial nodes, `degree // 2` angular
  nodes on each of the four arcs between the kink lines, 2 degree^2
  evaluations of f and of g per entry; a scan over the angular nodes."""
  k12 = jnp.asarray(k12)
  dtype = jnp.result_type(k12, float)
  k11, k22 = jnp.broadcast_to(k11, k12.shape), jnp.broadcast_to(k22, k12.shape)
  _, sigma1, sigma2, theta, _ = dual._correlation(k12, k11, k22)
  radii, radial_weights = (jnp.asarray(a, dtype)
                           for a in polar_half_range_rule(degree, 1))
  nodes, weights = (jnp.asarray(a, dtype) for a in
                    np.polynomial.legendre.leggauss(max(degree // 2, 2)))
  half_pi = jnp.pi / 2
  lows = [-half_pi + 0 * theta, theta - half_pi, half_pi + 0 * theta,
          theta + half_pi]
  highs = [theta - half_pi, half_pi + 0 * theta, theta + half_pi,
           3 * half_pi + 0 * theta]
  half_lengths = jnp.stack([(h - l) / 2 for l, h in zip(lows, highs)])
  centres = jnp.stack([(h + l) / 2 for l, h in zip(lows, highs)])

  def step(total, node_weight):
    node, weight = node_weight
    angle = centres + half_lengths * node                 # (4, ...)
    u = (sigma1 * jnp.cos(angle))[..., None] * radii
    v = (sigma2 * jnp.cos(angle - theta))[..., None] * radii
    radial = jnp.tensordot(f(u) * g(v), radial_weights, axes=1)
    return total + weight * jnp.sum(half_lengths * radial, axis=0), None

  total, _ = jax.lax.scan(step, jnp.zeros(k12.shape, dtype), (nodes, weights))
  return total / (2 * jnp.pi)


# ----------------------------------------------------------------------------


def evaluations_per_entry(degree: int) -> dict:
  """Activation evaluations per kernel entry of both rules, counted from
  the rules' constants."""
  c = quadrature._rule_constants(degree)
  outer = 2 * (len(c['outer_t']) * quadrature._OUTER_PANELS
               + len(c['tail_t']))
  inner = 2 * (c['tail_nodes'].shape[0] + len(c['gap_t']))
  act = 2 * len(c['act_t'])
  polar = 4 * max(degree // 2, 2) * degree
  return {'new_f': outer, 'new_g': outer * inner + act,
          'new_g_detail': f'{outer} outer x {inner} inner + {act} panel',
          'new_horner_terms_per_outer_node_side': c['interp'].shape[1],
          'old_f': polar, 'old_g': polar}


def covariance(n: int):
  """k12, k11, k22 (float32, (n, n)) of a random Dense layer's inputs."""
  x = np.random.default_rng(0).standard_normal((n, D), dtype=np.float32)
  k = jnp.asarray(x @ x.T / D)
  diag = jnp.diag(k)
  return (k, jnp.broadcast_to(diag[:, None], k.shape) + 0.,
          jnp.broadcast_to(diag[None, :], k.shape) + 0.)


def implementations(case: str) -> dict:
  """The three maps (k12, k11, k22) -> kernel for a case, un-jitted."""
  erf = dual.erf(1., 1., 0.)
  act, closed = {
      'nngp_tanh': (jnp.tanh, erf.nngp),
      'ntk_tanh': (quadrature.derivative(jnp.tanh), erf.ntk_factor),
      'nngp_square': (lambda x: x * x, dual.polynomial([0., 0., 1.]).nngp),
  }[case]
  return {
      'new': lambda a, b, c: quadrature.expect_2d(act, act, a, b, c, DEGREE),
      'old': lambda a, b, c: polar_expect_2d(act, act, a, b, c, DEGREE),
      'closed_form': closed}


def build_rules() -> float:
  """Build both rules' numpy constants (shape-independent, cached), so
  that first calls time compilation only; returns the seconds taken."""
  start = time.perf_counter()
  quadrature._tables(DEGREE, np.dtype(np.float32))
  polar_half_range_rule(DEGREE, 1)
  np.polynomial.legendre.leggauss(max(DEGREE // 2, 2))
  return time.perf_counter() - start


def first_call(fn, args) -> tuple:
  """(seconds, output) of one call."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def max_abs_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)))


class CompileTimer:
  """Sums jax.monitoring's backend-compile durations while active."""

  def __init__(self):
    self.total, self.active = 0., False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **_):
    if self.active and event.endswith('backend_compile_duration'):
      self.total += duration

  def measure(self, fn, args) -> float:
    """Compile seconds during one call of fn(*args)."""
    self.total, self.active = 0., True
    try:
      first_call(fn, args)
    finally:
      self.active = False
    return self.total


def run_case(case: str, n: int, repeats: int, compiles: CompileTimer) -> dict:
  """Time the three implementations (jitted) and the two rules (eager)."""
  args = covariance(n)
  fns = implementations(case)
  entries = n * n
  record = {'case': case, 'N': n, 'entries': entries, 'd': D,
            'degree': DEGREE, 'repeats': repeats}
  # Eager first: the new rule's first call is then on a fresh bucket.
  eager = {k: fns[k] for k in ('new', 'old')}
  outputs = {}
  for name, fn in eager.items():
    record[f'{name}_eager_first_call_s'], outputs[name] = first_call(fn, args)
  times = _common.time_interleaved(
      [lambda fn=fn: fn(*args) for fn in eager.values()], EAGER_REPEATS)
  for name, t in zip(eager, times):
    record[f'{name}_eager_s'] = float(np.median(t))
    record[f'{name}_eager_compile_s'] = (record[f'{name}_eager_first_call_s']
                                         - record[f'{name}_eager_s'])
    # Compile time inside a warm call (nonzero: recompiles on every call).
    record[f'{name}_eager_compile_per_call_s'] = compiles.measure(
        eager[name], args)
  record['eager_repeats'] = EAGER_REPEATS
  jitted = {name: jax.jit(fn) for name, fn in fns.items()}
  for name, fn in jitted.items():
    record[f'{name}_first_call_s'], outputs[f'{name}_jit'] = first_call(
        fn, args)
  record['max_abs_diff_new_jit_vs_eager'] = max_abs_diff(
      outputs['new_jit'], outputs['new'])
  record['max_abs_diff_new_vs_old'] = max_abs_diff(outputs['new'],
                                                   outputs['old'])
  if case == 'nngp_square':  # the closed form is then the same integral
    for name in ('new', 'old'):
      record[f'max_abs_diff_{name}_vs_exact'] = max_abs_diff(
          outputs[name], outputs['closed_form_jit'])
  del outputs
  times = _common.time_interleaved(
      [lambda fn=fn: fn(*args) for fn in jitted.values()], repeats)
  for name, t in zip(jitted, times):
    median = float(np.median(t))
    record[f'{name}_seconds_median'] = median
    record[f'{name}_seconds_min'] = float(np.min(t))
    record[f'{name}_us_per_entry'] = median / entries * 1e6
    record[f'{name}_compile_s'] = record[f'{name}_first_call_s'] - median
  new, old = record['new_seconds_median'], record['old_seconds_median']
  closed = record['closed_form_seconds_median']
  record['ratio_new_to_old'] = new / old
  record['ratio_new_to_closed_form'] = new / closed
  # Per-repeat ratios (each pair of calls saw the same load).
  record['ratio_new_to_old_per_repeat_median'] = float(np.median(
      np.asarray(times[0]) / np.asarray(times[1])))
  record['kernel_seconds_median'] = new
  record['status'] = (
      f'new rule {record["new_us_per_entry"]:.3g} us/entry: '
      f'{new / old:.3g}x the former polar rule '
      f'({record["old_us_per_entry"]:.3g} us), {new / closed:.3g}x the '
      f'closed-form floor ({record["closed_form_us_per_entry"]:.3g} us); '
      f'compile {record["new_compile_s"]:.2g} s jitted, '
      f'{record["new_eager_compile_s"]:.2g} s eager')
  record['peak_rss_mib'] = _common.peak_rss_mib()
  return record


# ----------------------------------------------------------------------------
# Accuracy (float64 child process).


def reference_diagonal(fn, q: float) -> float:
  """int fn(sqrt(q) z)^2 phi(z) dz by scipy QUADPACK, both sides of 0, split
  at 1, 3, 9, 27 / sqrt(q)."""
  from scipy import integrate
  s = math.sqrt(q)
  breaks = [0.] + [b / s for b in (1., 3., 9., 27.)]

  def integrand(z):
    return fn(s * z)**2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

  total = 0.
  for sign in (1., -1.):
    side = lambda z, sign=sign: integrand(sign * z)
    for lo, hi in zip(breaks[:-1], breaks[1:]):
      total += integrate.quad(side, lo, hi, epsabs=0., epsrel=1e-12,
                              limit=200)[0]
    total += integrate.quad(side, breaks[-1], math.inf, epsabs=0.,
                            epsrel=1e-12, limit=200)[0]
  return total


def accuracy_rows() -> list:
  """Diagonal E[f^2] of tanh and tanh' by both rules and the reference."""
  assert jnp.zeros(1).dtype == jnp.float64, 'run with JAX_ENABLE_X64=1'
  def sech2(u):  # 1 / cosh(u)^2 without overflow
    e = math.exp(-2. * abs(u))
    return 4. * e / (1. + e)**2

  scalar = {'tanh': math.tanh, 'dtanh': sech2}
  act = {'tanh': jnp.tanh, 'dtanh': quadrature.derivative(jnp.tanh)}
  q = jnp.asarray(VARIANCES, jnp.float64)
  rows = []
  for name in ('tanh', 'dtanh'):
    f = act[name]
    new = np.asarray(quadrature.expect_2d(f, f, q, q, q, DEGREE))
    old = np.asarray(polar_expect_2d(f, f, q, q, q, DEGREE))
    for i, variance in enumerate(VARIANCES):
      ref = reference_diagonal(scalar[name], variance)
      rows.append({
          'quantity': f'E[{name}(u)^2]', 'q': variance, 'reference': ref,
          'new': float(new[i]), 'old': float(old[i]),
          'new_abs_error': abs(float(new[i]) - ref),
          'old_abs_error': abs(float(old[i]) - ref),
          'new_rel_error': abs(float(new[i]) - ref) / ref,
          'old_rel_error': abs(float(old[i]) - ref) / ref})
  return rows


def accuracy_in_child() -> list:
  env = dict(os.environ, JAX_ENABLE_X64='1')
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--accuracy-child'],
      env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='N = 64, 128 (instead of 64, 512)')
  parser.add_argument('--accuracy-child', action='store_true',
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.accuracy_child:
    print(json.dumps(accuracy_rows()))
    return 0
  start = time.perf_counter()
  digest = _common.ntkjax_source_digest()
  accuracy = accuracy_in_child()
  rule_setup_s = build_rules()
  compiles = CompileTimer()
  records = []
  for n in SIZES[args.quick]:
    for case in CASES:
      print(f'running {case}, N={n}', flush=True)
      records.append(run_case(case, n, REPEATS[n], compiles))
      print(f'  {records[-1]["status"]}', flush=True)
  _common.print_table(accuracy, ('quantity', 'q', 'reference',
                                 'new_abs_error', 'old_abs_error'))
  changed = _common.ntkjax_sources_changed(digest)
  _common.write_benchmark(
      'quadrature', records, 'ntkjax', ntkjax.__version__, args.quick,
      'quadrature', COLUMNS,
      protocol={'degree': DEGREE, 'd': D, 'dtype': 'float32',
                'sizes': list(SIZES[args.quick]),
                'repeats': {str(n): REPEATS[n] for n in SIZES[args.quick]},
                'eager_repeats': EAGER_REPEATS,
                'inputs': 'x ~ N(0,1) (N, 32), seed 0; k12 = x x^T / 32; '
                          'k11, k22 = diag broadcast (materialized)',
                'closed_form': 'dual.erf(1., 1., 0.).nngp / .ntk_factor; '
                               'nngp_square: dual.polynomial([0, 0, 1]).nngp',
                'accuracy': 'float64 child; scipy quad reference, '
                            'epsrel 1e-12'},
      evaluations_per_entry=evaluations_per_entry(DEGREE),
      rule_setup_s=rule_setup_s,
      accuracy=accuracy,
      total_seconds=round(time.perf_counter() - start, 1),
      **_common.ntkjax_git_state(), ntkjax_sources_sha256=digest,
      ntkjax_sources_changed_during_run=changed)
  return 0


if __name__ == '__main__':
  sys.exit(main())
