"""Architectures for `ntkjax compare`: presets, or any `stax` network.

Presets (`--arch NAME`; `--depth` hidden layers, default 1):

* `fc-relu`: [Dense(width, W_std=1.5, b_std=0.05), Relu] x depth, then
  Dense(outputs, W_std=1.5, b_std=0.05);
* `fc-erf`: the same with Erf;
* `cnn`: [Conv(width, (3, 3), padding='SAME'), Relu] x depth, Flatten,
  Dense(outputs), on 8x8x1 images; available once `ntkjax.stax` has `Conv`
  and `Flatten`. Slow on CPU at the default sizes (a full-batch step of
  width 64 on 1,000 digits took 0.4 s on 2 cores, XLA's convolutions):
  use it with `--quick` or e.g. `--train-size 200 --steps 100 --widths
  16,32,64,128`.

A user's network (`--arch module:function`, or `--arch file.py:function`):
`function(width, out_dim)` must return a `stax` layer, i.e. a triple
`(init_fn, apply_fn, kernel_fn)`, whose hidden layers have `width` units
(the width that goes to infinity) and whose output has `out_dim` units. A
module name is imported with the current directory on the path. The digits
are passed as (N, 64) features unless `--images` is given or the function
has an attribute `images = True`; then as (N, 8, 8, 1).

`--parameterization mup` builds the finite networks in the standard
parameterization and hands them to `ntkjax.mup.MuP`; the presets do this
themselves, a user's function must accept a keyword `parameterization`
('ntk' or 'standard') and pass it to its Dense/Conv layers.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Callable

import jax

from ntkjax import stax

W_STD, B_STD = 1.5, 0.05


class ArchitectureError(ValueError):
  """An `--arch` that cannot be built, with the reason."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How to build the network at each width.

  Attributes:
    name: the `--arch` value.
    description: the network in words (for the report).
    build: `build(width, out_dim, parameterization='ntk') -> (init_fn,
      apply_fn, kernel_fn)`.
    images: whether the network wants image inputs (N, H, W, C).
  """
  name: str
  description: str
  build: Callable
  images: bool = False


def _fully_connected(activation: Callable, depth: int):
  def build(width: int, out_dim: int, parameterization: str = 'ntk'):
    dense = lambda n: stax.Dense(n, W_std=W_STD, b_std=B_STD,
                                 parameterization=parameterization)
    layers = []
    for _ in range(depth):
      layers += [dense(width), activation()]
    return stax.serial(*layers, dense(out_dim))
  return build


def _cnn(depth: int):
  if not (hasattr(stax, 'Conv') and hasattr(stax, 'Flatten')):
    raise ArchitectureError(
        "--arch cnn: not available yet: ntkjax.stax has no Conv/Flatten "
        'layers in this version. Use fc-relu or fc-erf, or your own network '
        'with --arch module:function.')

  def build(width: int, out_dim: int, parameterization: str = 'ntk'):
    layers = []
    for _ in range(depth):
      layers += [stax.Conv(width, (3, 3), padding='SAME', W_std=W_STD,
                           b_std=B_STD, parameterization=parameterization),
                 stax.Relu()]
    return stax.serial(*layers, stax.Flatten(),
                       stax.Dense(out_dim, W_std=W_STD, b_std=B_STD,
                                  parameterization=parameterization))
  return build


PRESETS = ('fc-relu', 'fc-erf', 'cnn')


def preset(name: str, depth: int) -> Architecture:
  """One of `PRESETS` with `depth` hidden layers."""
  hidden = (f'{depth} hidden layer' + ('s' if depth > 1 else ''))
  if name == 'fc-relu':
    return Architecture(name, f'fully connected, ReLU, {hidden}, '
                        f'W_std={W_STD}, b_std={B_STD}',
                        _fully_connected(stax.Relu, depth))
  if name == 'fc-erf':
    return Architecture(name, f'fully connected, erf, {hidden}, '
                        f'W_std={W_STD}, b_std={B_STD}',
                        _fully_connected(stax.Erf, depth))
  if name == 'cnn':
    return Architecture(name, f'convolutional 3x3 SAME, ReLU, {hidden}, '
                        'flatten, dense readout', _cnn(depth), images=True)
  raise ArchitectureError(f'--arch {name}: unknown preset; choose one of '
                          f'{", ".join(PRESETS)}, or module:function.')


def _load_module(spec: str):
  if spec.endswith('.py'):
    if not os.path.isfile(spec):
      raise ArchitectureError(f'--arch: no such file {spec}.')
    name = '_ntkjax_user_arch_' + os.path.splitext(os.path.basename(spec))[0]
    module_spec = importlib.util.spec_from_file_location(name, spec)
    module = importlib.util.module_from_spec(module_spec)
    try:
      module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 -- report any failure clearly
      raise ArchitectureError(f'--arch: running {spec} failed: '
                              f'{type(error).__name__}: {error}') from error
    return module
  # `python -m` puts the current directory on the path, a console script
  # does not; users expect `--arch mymodule:net` to find ./mymodule.py.
  added = os.getcwd() not in sys.path
  if added:
    sys.path.insert(0, os.getcwd())
  try:
    return importlib.import_module(spec)
  except Exception as error:  # noqa: BLE001
    raise ArchitectureError(f'--arch: cannot import module {spec!r}: '
                            f'{type(error).__name__}: {error}') from error
  finally:
    if added:
      sys.path.remove(os.getcwd())


def custom(spec: str) -> Architecture:
  """`module:function` or `file.py:function` (module docstring)."""
  module_name, _, function_name = spec.rpartition(':')
  if not module_name or not function_name:
    raise ArchitectureError(
        f'--arch {spec}: expected a preset ({", ".join(PRESETS)}) or '
        'module:function (or path/to/file.py:function).')
  module = _load_module(module_name)
  function = getattr(module, function_name, None)
  if function is None:
    raise ArchitectureError(f'--arch {spec}: module {module_name!r} has no '
                            f'attribute {function_name!r}.')
  if not callable(function):
    raise ArchitectureError(f'--arch {spec}: {function_name!r} is not '
                            'callable; it must be function(width, out_dim).')
  try:
    inspect.signature(function).bind(64, 10)
  except TypeError as error:
    raise ArchitectureError(f'--arch {spec}: {function_name} must accept '
                            f'(width, out_dim): {error}.') from error
  except ValueError:
    pass  # no signature to inspect (a builtin); find out when calling it

  def build(width: int, out_dim: int, parameterization: str = 'ntk'):
    kwargs = {}
    if parameterization != 'ntk':
      # Only asked for when needed: networks written for the NTK
      # parameterization keep working without the keyword.
      if not _accepts_keyword(function, 'parameterization'):
        raise ArchitectureError(
            f'--arch {spec}: --parameterization mup builds the networks in '
            f'the standard parameterization, so {function_name} must accept '
            f'a keyword parameterization (\'ntk\' or \'standard\') and '
            'pass it to its Dense/Conv layers.')
      kwargs['parameterization'] = parameterization
    call = ', '.join([str(width), str(out_dim)] +
                     [f'{k}={v!r}' for k, v in kwargs.items()])
    try:
      layer = function(width, out_dim, **kwargs)
    except Exception as error:  # noqa: BLE001
      raise ArchitectureError(f'--arch {spec}: {function_name}({call}) '
                              f'raised {type(error).__name__}: '
                              f'{error}') from error
    if not (isinstance(layer, tuple) and len(layer) == 3
            and all(callable(f) for f in layer)):
      raise ArchitectureError(
          f'--arch {spec}: {function_name}(width, out_dim) must return a stax '
          'layer (init_fn, apply_fn, kernel_fn), e.g. stax.serial(...); got '
          f'{type(layer).__name__}.')
    return layer
  images = bool(getattr(function, 'images', False))
  return Architecture(spec, f'{spec}(width, out_dim)', build, images)


def _accepts_keyword(function: Callable, name: str) -> bool:
  try:
    inspect.signature(function).bind(64, 10, **{name: 'standard'})
  except TypeError:
    return False
  except ValueError:
    return True   # no signature to inspect; find out when calling it
  return True


def resolve(arch: str, depth: int = 1) -> Architecture:
  """An `--arch` value: a preset name or module:function."""
  if ':' in arch:
    return custom(arch)
  return preset(arch, depth)


def build_checked(architecture: Architecture, width: int, out_dim: int,
                  input_shape: tuple, parameterization: str = 'ntk'):
  """Builds the network at `width` (in `parameterization`, 'ntk' or
  'standard') and checks its output shape abstractly.

  Returns:
    `(init_fn, apply_fn, kernel_fn)`.

  Raises:
    ArchitectureError: the network does not accept the inputs or does not
      give (N, out_dim) outputs.
  """
  layer = architecture.build(width, out_dim, parameterization)
  init_fn, apply_fn, kernel_fn = layer
  box = {}

  def init(key):
    box['shape'], params = init_fn(key, (-1,) + tuple(input_shape))
    return params
  try:
    jax.eval_shape(init, jax.random.key(0))   # shapes only; no weights made
  except Exception as error:  # noqa: BLE001
    raise ArchitectureError(
        f'--arch {architecture.name}: init_fn fails on inputs of shape '
        f'(N, {", ".join(map(str, input_shape))}): {type(error).__name__}: '
        f'{error}') from error
  shape = tuple(box['shape'])
  if len(shape) != 2 or shape[-1] != out_dim:
    raise ArchitectureError(
        f'--arch {architecture.name}: the network maps inputs of shape '
        f'(N, {", ".join(map(str, input_shape))}) to {shape}; it must give '
        f'(N, {out_dim}) outputs (one per target).')
  return init_fn, apply_fn, kernel_fn
