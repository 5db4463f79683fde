"""One block of a kernel: the unit of work of every executor.

A kernel of (x1, x2) is a grid of blocks: rows `i` of x1 by columns `j` of
x2, `batch_size` samples each. Every entry of a kernel depends only on its
own pair of inputs (and on each input's own variances), so a block is a pure
function of the two input slices and the architecture: computing it twice is
harmless, which is what makes retry and resume simple. For a symmetric
kernel (x2 = None) only the blocks with i <= j are computed; block (j, i) is
the transpose of (i, j). Diagonal blocks are computed with x2 = None, so the
layers know which pairs are a sample with itself (Dropout).

A `BlockJob` holds everything a block needs (the kernel function, its
arguments, the inputs, the plan, what each output field looks like) and is
picklable, so a Dask worker receives it once and computes any block. Its
jit-compiled function is made on first use in each process; jit compiles
once per device the inputs are placed on.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib
import itertools
import re
import threading
import zlib
from typing import Callable, Optional

import jax
import numpy as np

from ntkjax.kernel import KERNEL_FIELDS
from ntkjax.stax._layer import KernelFn

# How a field's leading axes follow the block grid: 'pair' fields (nngp,
# ntk, empirical kernels) have (rows, columns) first, 'row' fields (cov1)
# only rows, 'column' fields (cov2) only columns.
PAIR, ROW, COLUMN = 'pair', 'row', 'column'


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """The grid of blocks of an (n1 x n2) kernel.

  Attributes:
    n1, n2: samples of x1 and x2 (n2 = n1 when symmetric).
    size1, size2: samples per block along rows and columns (the last block
      of each is padded); equal when symmetric.
    symmetric: x2 is x1 (x2=None): only blocks i <= j are computed.
  """
  n1: int
  n2: int
  size1: int
  size2: int
  symmetric: bool

  @classmethod
  def of(cls, n1: int, n2: int, batch_size: int, symmetric: bool):
    """Blocks of `batch_size` samples (0: one block), never larger than
    the batches themselves (no padding of a small x2 up to a large block)."""
    if batch_size <= 0:
      return cls(n1, n2, n1, n2, symmetric)
    return cls(n1, n2, min(batch_size, n1), min(batch_size, n2), symmetric)

  @property
  def grid(self) -> tuple:
    """(row blocks, column blocks)."""
    return -(-self.n1 // self.size1), -(-self.n2 // self.size2)

  def rows(self, i: int) -> tuple:
    """(start, stop) of row block i."""
    return i * self.size1, min((i + 1) * self.size1, self.n1)

  def columns(self, j: int) -> tuple:
    """(start, stop) of column block j."""
    return j * self.size2, min((j + 1) * self.size2, self.n2)

  def blocks(self) -> list:
    """The blocks to compute, row by row (i <= j when symmetric)."""
    rows, cols = self.grid
    return [(i, j) for i, j in itertools.product(range(rows), range(cols))
            if not (self.symmetric and j < i)]

  def entries(self, i: int, j: int) -> int:
    """Kernel entries of block (i, j) (both triangles when mirrored)."""
    r0, r1 = self.rows(i)
    c0, c1 = self.columns(j)
    return (r1 - r0) * (c1 - c0) * (2 if self.symmetric and i != j else 1)

  def writes(self, kind: str, i: int, j: int) -> bool:
    """Whether block (i, j) is the one that provides a 'row' or 'column'
    field's slice: the diagonal block when symmetric, else the first block
    of its row (for cov1) or column (for cov2)."""
    if kind == PAIR:
      return True
    if self.symmetric:
      return kind == ROW and i == j
    return j == 0 if kind == ROW else i == 0


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """One output of the kernel function, at full size.

  Attributes:
    name: field name ('nngp', 'ntk', 'cov1', 'cov2', or 'kernel' for a
      function returning one array).
    kind: PAIR, ROW or COLUMN.
    shape: the full shape, e.g. (N1, N2, ...) for a pair field.
    dtype: numpy dtype name.
    swap: for a symmetric pair field, the axis permutation turning block
      (i, j) into block (j, i); None if not mirrored.
  """
  name: str
  kind: str
  shape: tuple
  dtype: str
  swap: Optional[tuple] = None


def optional_module(name: str, feature: str):
  """Import an optional dependency of the `scale` extra, or say how to
  install it."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ImportError(f"{feature} needs {name}: pip install 'ntkjax[scale]'"
                      ) from e


def _padded(x: np.ndarray, start: int, stop: int, size: int) -> np.ndarray:
  """Rows start:stop of x, padded to `size` rows by repeating the last row
  (the padding's results are dropped)."""
  block = x[start:stop]
  missing = size - (stop - start)
  if missing:
    block = np.concatenate([block, np.repeat(block[-1:], missing, 0)])
  return block


def _is_array(leaf) -> bool:
  return isinstance(leaf, (np.ndarray, jax.Array))


def _structure(out, single_name: str) -> tuple:
  """How to rebuild the kernel function's output from fields (picklable):
  ('array', name), ('namedtuple', type name, names) or ('dict', names)."""
  if hasattr(out, '_fields'):
    return ('namedtuple', type(out).__name__, tuple(out._fields))
  if isinstance(out, dict):
    return ('dict', tuple(out))
  return ('array', single_name)


def _as_dict(out, single_name: str) -> dict:
  """A kernel function's output as {field name: array}."""
  if hasattr(out, '_asdict'):
    return dict(out._asdict())
  if isinstance(out, dict):
    return dict(out)
  if hasattr(out, 'shape'):
    return {single_name: out}
  raise TypeError(
      'batch: kernel_fn returned a ' f'{type(out).__name__}; batch handles '
      'one array, a named tuple or a dict of arrays (a network ending in '
      'parallel branches returns one kernel per branch: batch each branch '
      'with its own kernel_fn).')


class BlockJob:
  """Everything needed to compute any block of one kernel.

  Args:
    kernel_fn: an ntkjax `kernel_fn` (stax) or any function
      `f(x1, x2, *args, **kwargs)` whose result per pair depends only on the
      pair (empirical kernels included).
    x1: the first inputs.
    x2: the second inputs (None for a symmetric kernel).
    args: the remaining positional arguments of `kernel_fn`; arrays among
      them (parameters, `pattern`) are traced, everything else is static.
    kwargs: the remaining keyword arguments of `kernel_fn`; arrays among
      them are traced, everything else (get, diagonal_spatial) is static.
    batch_size: samples per block (0: one block).
    get: for a stax kernel_fn, the field names to compute.
  """

  def __init__(self, kernel_fn: Callable, x1, x2, args: tuple, kwargs: dict,
               batch_size: int, get: Optional[tuple] = None):
    self.kernel_fn = kernel_fn
    self.is_stax = isinstance(kernel_fn, KernelFn)
    self.x1 = np.asarray(x1)
    self.x2 = None if x2 is None else np.asarray(x2)
    kwargs = dict(kwargs)
    self.patterns = (None, None)
    if self.is_stax:
      pattern = kwargs.pop('pattern', None)
      if isinstance(pattern, (tuple, list)):
        self.patterns = tuple(None if p is None else np.asarray(p)
                              for p in pattern)
      elif pattern is not None:
        self.patterns = (np.asarray(pattern), None)
      if self.x2 is None and self.patterns[1] is None:
        self.patterns = (self.patterns[0], self.patterns[0])
    leaves, self._treedef = jax.tree.flatten((tuple(args), kwargs))
    self._dynamic = tuple(np.asarray(leaf) if _is_array(leaf) else None
                          for leaf in leaves)
    self._static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
    self.get = KERNEL_FIELDS if self.is_stax and get is None else get
    n1 = self.x1.shape[0]
    n2 = n1 if self.x2 is None else self.x2.shape[0]
    self.plan = BlockPlan.of(n1, n2, batch_size, self.x2 is None)
    self._jitted = None
    self._programs = None
    self.fields = self._field_specs()

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_jitted'] = None   # compiled again in each process
    state['_programs'] = None
    return state

  # --------------------------------------------------------------------------
  # The block function.

  def _standalone(self, get='as asked') -> Callable:
    """The block function `(xi, xj, dynamic, pattern) -> outputs`, holding
    no reference to the job (its inputs), so it can be cached."""
    return functools.partial(_block_call, self.kernel_fn, self.is_stax,
                             self.get if get == 'as asked' else get,
                             self._static, self._treedef)

  def _call(self, xi, xj, dynamic, pattern):
    return self._standalone()(xi, xj, dynamic, pattern)

  def _function(self):
    """The jit-compiled block function, shared by every job whose program
    (jaxprs and constants) is the same, in this process: calling `batch`
    again, or a Dask worker receiving a new job, compiles nothing."""
    # One lock for all: device threads call this together on a new job,
    # and must neither trace it twice nor read a half-made key.
    with _COMPILED_LOCK:
      if self._jitted is None:
        key = self.program_key()
        function = _COMPILED.pop(key, None) or jax.jit(self._standalone())
        _COMPILED[key] = function
        while len(_COMPILED) > _COMPILED_MAX:
          _COMPILED.popitem(last=False)
        self._jitted = function
    return self._jitted

  def _forms(self) -> list:
    """The distinct block programs: a diagonal block of a symmetric kernel
    (x2=None) and/or an off-diagonal one."""
    rows, cols = self.plan.grid
    forms = []
    if self.x2 is None:
      forms.append((0, 0))
    if self.x2 is not None or cols > 1:
      forms.append((0, 1) if self.x2 is None else (0, 0))
    return forms

  def _traced(self) -> list:
    """(jaxpr text, constants) of each form, traced once."""
    if self._programs is None:
      programs = []     # assigned whole: never seen half made
      for i, j in self._forms():
        closed = jax.make_jaxpr(self._call)(*self._inputs(i, j))
        text = re.sub(r'0x[0-9a-f]+', '0x', str(closed.jaxpr))
        programs.append((text, closed.consts))
      self._programs = programs
    return self._programs

  def program_key(self) -> str:
    """SHA-256 of every form's jaxpr text and exact constants."""
    digest = hashlib.sha256()
    for text, consts in self._traced():
      digest.update(text.encode())
      for c in consts:
        digest.update(_array_digest(c).encode())
    return digest.hexdigest()

  def _inputs(self, i: int, j: int, device=None) -> tuple:
    """The padded input slices (and patterns) of block (i, j); xj is None
    for a diagonal block of a symmetric kernel."""
    plan = self.plan
    (r0, r1), (c0, c1) = plan.rows(i), plan.columns(j)
    x2 = self.x1 if self.x2 is None else self.x2
    xi = _padded(self.x1, r0, r1, plan.size1)
    xj = (None if self.x2 is None and i == j
          else _padded(x2, c0, c1, plan.size2))
    p1, p2 = self.patterns
    pattern = None
    if p1 is not None:
      pi = _padded(p1, r0, r1, plan.size1)
      pattern = pi if xj is None else (pi, _padded(p2, c0, c1, plan.size2))
    put = (lambda a: a) if device is None else (
        lambda a: None if a is None else jax.device_put(a, device))
    return (put(xi), put(xj), jax.tree.map(put, self._dynamic),
            jax.tree.map(put, pattern))

  def compute(self, i: int, j: int, device=None) -> dict:
    """Block (i, j) as {field: numpy array}, padding cropped; only the
    fields this block provides (`BlockPlan.writes`)."""
    out = _as_dict(self._function()(*self._inputs(i, j, device)),
                   self._single_name)
    (r0, r1), (c0, c1) = self.plan.rows(i), self.plan.columns(j)
    result = {}
    for field in self.fields:
      if not self.plan.writes(field.kind, i, j):
        continue
      # To the host first (a view on CPU), then crop as a NumPy view: a
      # JAX slice would copy the whole block.
      a = np.asarray(out[field.name])
      if np.dtype(a.dtype) != np.dtype(field.dtype):
        # E.g. a Dask worker without jax_enable_x64 for a float64 kernel:
        # never store silently rounded values.
        raise TypeError(
            f'batch: block ({i}, {j}) of {field.name!r} came out as '
            f'{np.dtype(a.dtype).name} but the kernel is {field.dtype}; '
            'computing processes must agree on precision (set '
            'JAX_ENABLE_X64=1 in the environment of every worker, or '
            'neither).')
      a = (a[:r1 - r0, :c1 - c0] if field.kind == PAIR
           else a[:r1 - r0] if field.kind == ROW else a[:c1 - c0])
      result[field.name] = a
    return result

  # --------------------------------------------------------------------------
  # What the outputs look like.

  @property
  def _single_name(self) -> str:
    return self.get if isinstance(self.get, str) else 'kernel'

  def _abstract(self, i: int, j: int):
    xi, xj, dynamic, pattern = self._inputs(i, j)
    return jax.eval_shape(self._call, xi, xj, dynamic, pattern)

  def _field_specs(self) -> tuple:
    plan = self.plan
    # An off-diagonal block shows which axes follow rows and columns.
    rows, cols = plan.grid
    probe = (0, 1) if cols > 1 else (0, 0)
    abstract = self._abstract(*probe)
    out = _as_dict(abstract, self._single_name)
    self.output = _structure(abstract, self._single_name)
    swaps = self._swaps(out) if plan.symmetric and cols > 1 else {}
    specs = []
    for name, a in out.items():
      if name == 'cov1' or (self.is_stax and name == 'cov2' and plan.symmetric):
        kind, full = ROW, (plan.n1,)
      elif name == 'cov2':
        kind, full = COLUMN, (plan.n2,)
      elif a.shape[:2] == (plan.size1, plan.size2):
        kind, full = PAIR, (plan.n1, plan.n2)
      else:
        raise ValueError(
            f'batch: kernel_fn output {name!r} has shape {a.shape} for a '
            f'block of {plan.size1} x {plan.size2} samples; batch needs '
            'outputs with both batch axes first (N1, N2, ...).')
      specs.append(FieldSpec(name, kind, full + tuple(a.shape[len(full):]),
                             np.dtype(a.dtype).name, swaps.get(name)))
    return tuple(specs)

  def _swaps(self, out: dict) -> dict:
    """For a symmetric kernel, how to turn block (i, j) into (j, i)."""
    if self.is_stax:
      spatial = jax.eval_shape(self._call_kernel, *self._inputs(0, 1)).spatial
      perm = spatial.swap_public_axes()
      return {name: perm for name in out if name in ('nngp', 'ntk')}
    # Any other function: the layout of its output axes is unknown. Its
    # trailing axes are read as consecutive groups of one axis (diagonal)
    # or two (one per input, swapped); the grouping is decided once, in
    # `check_swaps`, against the computed block (1, 0).
    return {name: None for name in out}

  def _call_kernel(self, xi, xj, dynamic, pattern):
    """The stax kernel_fn's whole Kernel (for its spatial layout)."""
    return self._standalone(get=None)(xi, xj, dynamic, pattern)

  def check_swaps(self, device=None) -> dict:
    """Decide, for a function other than stax's, the permutation mapping
    block (0, 1) to block (1, 0), by computing both; if some field is not a
    transpose under any grouping of its axes, mirroring is off and every
    block is computed.

    Returns:
      The blocks computed here that belong to the plan ({(i, j): block}).
    """
    pending = [f for f in self.fields if f.kind == PAIR and f.swap is None]
    if not (self.plan.symmetric and pending):
      return {}
    upper = self.compute(0, 1, device)
    plan = self.plan
    self.plan = dataclasses.replace(plan, symmetric=False)
    lower = self.compute(1, 0, device)
    found = {}
    for field in pending:
      a, b = upper[field.name], lower[field.name]
      for perm in _candidate_swaps(a.shape):
        if a.transpose(perm).shape == b.shape and np.allclose(
            a.transpose(perm), b, rtol=1e-5, atol=0):
          found[field.name] = perm
          break
    if len(found) < len(pending):   # no mirroring: plan stays full
      return {(0, 1): upper, (1, 0): lower}
    self.plan = plan
    self.fields = tuple(dataclasses.replace(f, swap=found.get(f.name, f.swap))
                        for f in self.fields)
    return {(0, 1): upper}

  # --------------------------------------------------------------------------
  # Fingerprints (what a store records, to refuse mixing computations).

  def fingerprint(self) -> dict:
    """What this job computes, as JSON-able values: the program (jaxpr text
    of the block function and a digest of its constants), the inputs
    (SHA-256 of x1, x2, array arguments and patterns), the static
    arguments, the fields and the block plan."""
    text, consts = self._traced()[0]
    constants = [_moments(c) for c in consts]
    data = hashlib.sha256()
    for a in (self.x1, self.x2) + tuple(self._dynamic) + self.patterns:
      data.update(_array_digest(a).encode())
    return {
        'program': hashlib.sha256(text.encode()).hexdigest(),
        'constants': constants,
        'inputs': data.hexdigest(),
        'static': repr([s for s in self._static if s is not None]),
        'get': repr(self.get),
        'plan': dataclasses.asdict(self.plan),
        'fields': [dataclasses.asdict(f) | {'shape': list(f.shape),
                                            'swap': None if f.swap is None
                                            else list(f.swap)}
                   for f in self.fields],
        'jax': jax.__version__,
    }


# Jit-compiled block functions by program key, most recently used last.
_COMPILED = collections.OrderedDict()
_COMPILED_MAX = 8
_COMPILED_LOCK = threading.RLock()


def _block_call(kernel_fn, is_stax: bool, get, static: tuple, treedef,
                xi, xj, dynamic, pattern):
  """kernel_fn on one block: static and traced arguments merged back."""
  leaves = [d if s is None else s for d, s in zip(dynamic, static)]
  args, kwargs = jax.tree.unflatten(treedef, leaves)
  if is_stax:
    if pattern is not None:
      kwargs = dict(kwargs, pattern=pattern)
    return kernel_fn(xi, xj, get, *args, **kwargs)
  return kernel_fn(xi, xj, *args, **kwargs)


def _candidate_swaps(shape: tuple) -> list:
  """Permutations of a pair field's axes that swap the two batch axes and,
  after them, each group of two equal-sized axes (groups of one stay):
  every split of the trailing axes into consecutive groups of 1 or 2."""
  rest = shape[2:]

  def splits(start):
    if start == len(rest):
      yield []
      return
    for tail in splits(start + 1):
      yield [(start,)] + tail
    if start + 1 < len(rest) and rest[start] == rest[start + 1]:
      for tail in splits(start + 2):
        yield [(start + 1, start)] + tail

  perms = []
  for groups in splits(0):
    perms.append((1, 0) + tuple(2 + a for g in groups for a in g))
  # Most pairs swapped first: the usual layout (N1, N2, O1, O2, ...).
  return sorted(perms, key=lambda p: sum(a != b for a, b in
                                         zip(p, range(len(p)))), reverse=True)


def _array_digest(a) -> str:
  if a is None:
    return 'None'
  a = np.ascontiguousarray(a)
  return f'{a.shape}{a.dtype}' + hashlib.sha256(a.tobytes()).hexdigest()


def _moments(c) -> list:
  """A rounding-tolerant digest of a constant of the program: its shape and
  three moments (constants computed on another machine may differ in the
  last bits, e.g. quadrature rules from an eigensolver)."""
  a = np.asarray(c)
  if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
    return [list(a.shape), str(a.dtype)]
  a = a.astype(np.float64).ravel()
  weights = np.cos(np.arange(a.size))
  return [list(np.shape(c)), float(a.sum()), float((a * a).sum()),
          float((weights * a).sum())]


def checksum(block: dict) -> int:
  """CRC-32 of a block's arrays (in field order), as a non-negative int."""
  crc = 0
  for name in sorted(block):
    crc = zlib.crc32(np.ascontiguousarray(block[name]), crc)   # no copy
  return crc
