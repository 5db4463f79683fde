"""Griffe extension for the ntkjax site (mkdocs.yml: mkdocstrings'
`extensions:`).

Some classes build their docstring from parts, e.g. in
`ntkjax.estimators`:

    class NTKRegressor(_Regressor):
      __doc__ = \"\"\"Kernel regression with the NTK ...\"\"\" + _PARAMETERS_DOC

Static analysis sees no docstring there. This extension evaluates such a
`__doc__` assignment when it is made of string literals and module-level
names bound to string literals (still without importing anything), so the
docstring is rendered, and its `Args:` are checked against the signature
like any other. An assignment it cannot evaluate is a warning.
"""

from __future__ import annotations

import ast
import logging

import griffe

log = logging.getLogger('mkdocs.plugins.griffe_ntkjax')


def _evaluate(node: ast.AST, module: griffe.Module, seen: frozenset) -> str:
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return node.value
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    return (_evaluate(node.left, module, seen) +
            _evaluate(node.right, module, seen))
  if isinstance(node, ast.Name) and node.id not in seen:
    member = module.members.get(node.id)
    if isinstance(member, griffe.Attribute) and member.value is not None:
      value = ast.parse(str(member.value), mode='eval').body
      return _evaluate(value, module, seen | {node.id})
  raise ValueError(ast.unparse(node))


def _classes(obj: griffe.Object):
  for member in obj.members.values():
    if member.is_alias:
      continue
    if member.is_class:
      yield member
    if member.is_module or member.is_class:
      yield from _classes(member)


class ComposedDocstrings(griffe.Extension):
  """Docstrings assigned as `__doc__ = "..." + NAME` in a class body."""

  def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                 **kwargs) -> None:
    for cls in _classes(pkg):
      doc = cls.members.get('__doc__')
      if cls.docstring is not None or not isinstance(doc, griffe.Attribute):
        continue
      try:
        expr = ast.parse(str(doc.value), mode='eval').body
        text = _evaluate(expr, cls.module, frozenset())
      except (SyntaxError, ValueError) as error:
        log.warning(f'{cls.path}: cannot evaluate its __doc__ statically '
                    f'({error}); give the class a literal docstring.')
        continue
      cls.docstring = griffe.Docstring(
          text, lineno=doc.lineno, endlineno=doc.endlineno, parent=cls,
          parser=loader.docstring_parser,
          parser_options=loader.docstring_options)
      # Not an attribute to list: it is the docstring.
      cls.del_member('__doc__')
