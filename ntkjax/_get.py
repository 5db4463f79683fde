"""`get`: which kernels a function returns, and the named tuples they come in.

Every kernel function of the library (stax `kernel_fn`, the empirical and
Monte Carlo kernel functions, `batch`, `predict`'s prediction functions)
takes neural-tangents' `get`: None (everything, in a named tuple, or a
`Kernel` for stax), one name (that array alone) or a sequence of names (a
named tuple of them, in that order). The validation and the named-tuple
types live here, so every function accepts the same forms, reports an
unknown name the same way, and returns the same tuple type for the same
names (equal types keep jit caches and pytree structures stable).

Imports nothing of ours.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Mapping, Optional, Sequence, Union

Get = Union[None, str, Sequence[str]]


def requested(get: Get, allowed: Sequence[str], who: str,
              default: Optional[Sequence[str]] = None) -> tuple:
  """The names `get` asks for, validated.

  Args:
    get: None, a name, or a sequence of names.
    allowed: the names this function can compute.
    who: the function, for the error message.
    default: the names that `get=None` means (default: all of `allowed`).

  Returns:
    A tuple of names, in the order asked.
  """
  if get is None:
    return tuple(allowed if default is None else default)
  if isinstance(get, str):
    names = (get,)
  else:
    try:
      names = tuple(get)
    except TypeError:
      raise TypeError(f'{who}: get={get!r} must be None, a name or a sequence '
                      f'of names from {tuple(allowed)}.') from None
  for name in names:
    if not isinstance(name, str) or name not in allowed:
      raise ValueError(f'{who}: unknown get={name!r}; choose from '
                       f'{tuple(allowed)}, a tuple of them, or None.')
  return names


@functools.lru_cache(maxsize=None)
def result_tuple(typename: str, names: tuple) -> type:
  """The named-tuple type `typename` with fields `names` (one per pair: the
  combinations of a few kernel names are few)."""
  return collections.namedtuple(typename, names)


def pick(get: Get, values: Mapping[str, Any], typename: str):
  """`values[get]` for one name; otherwise a `typename` named tuple of the
  values, in the order of `get` (all of `values`, in order, for None)."""
  if isinstance(get, str):
    return values[get]
  names = tuple(values) if get is None else tuple(get)
  return result_tuple(typename, names)(*(values[name] for name in names))
