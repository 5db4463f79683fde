"""MkDocs hook for the ntkjax site (mkdocs.yml: `hooks:`).

* `<!-- ntkjax-compare-options -->` in a page becomes the table of
  `ntkjax compare`'s flags, built from the argparse parser itself, so a
  renamed or new flag changes the page without anyone editing it.
* The stax page lists the layers by hand, in groups; a name of
  `ntkjax.stax.__all__` missing from it (or a listed name that is not in
  `__all__`) is a warning, hence an error under `mkdocs build --strict`.

Warnings go to a logger under `mkdocs.`, which is what --strict counts.
"""

from __future__ import annotations

import argparse
import ast
import html
import logging
import os
import re

log = logging.getLogger('mkdocs.plugins.ntkjax_docs')

COMPARE_MARKER = '<!-- ntkjax-compare-options -->'
STAX_PAGE = 'api/stax.md'


def _stax_all(root: str) -> list:
  """`ntkjax.stax.__all__`, read from the source (nothing is imported)."""
  path = os.path.join(root, 'ntkjax', 'stax', '__init__.py')
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  for node in tree.body:
    if (isinstance(node, ast.Assign) and
        any(isinstance(t, ast.Name) and t.id == '__all__'
            for t in node.targets)):
      return list(ast.literal_eval(node.value))
  raise RuntimeError(f'{path} has no literal __all__')


def _check_stax_page(markdown: str, root: str) -> None:
  listed = set(re.findall(r'^::: ntkjax\.stax\.(\w+)\s*$', markdown,
                          flags=re.MULTILINE))
  exported = set(_stax_all(root))
  for name in sorted(exported - listed):
    log.warning(f'docs/{STAX_PAGE}: ntkjax.stax.{name} is in '
                f'ntkjax.stax.__all__ but not on the page; add a '
                f'"::: ntkjax.stax.{name}" block to one of its sections.')
  for name in sorted(listed - exported):
    log.warning(f'docs/{STAX_PAGE}: ntkjax.stax.{name} is on the page but '
                f'not in ntkjax.stax.__all__.')


def _cell(text: str) -> str:
  """One table cell of plain text: `<date-time>` is not an HTML tag."""
  return html.escape(' '.join(text.split()), quote=False).replace('|', '\\|')


def _compare_parser() -> argparse.ArgumentParser:
  # Imports ntkjax (and JAX): the preset names in --arch's help come from
  # ntkjax.compare.architectures.
  from ntkjax.compare import cli
  parser = argparse.ArgumentParser(prog='ntkjax')
  subparsers = parser.add_subparsers()
  return cli.add_parser(subparsers)


def _compare_options() -> str:
  parser = _compare_parser()
  exclusive = {}
  for group in parser._mutually_exclusive_groups:
    flags = [a.option_strings[-1] for a in group._group_actions]
    for action in group._group_actions:
      exclusive[action.dest] = [f for f in flags
                                if f != action.option_strings[-1]]
  rows = ['| option | value | description |', '|---|---|---|']
  for action in parser._actions:
    if isinstance(action, argparse._HelpAction) or not action.option_strings:
      continue
    flags = ', '.join(f'`{flag}`' for flag in action.option_strings)
    if action.nargs == 0:
      value = '(switch)'
    else:
      value = f'`{action.metavar or action.dest.upper()}`'
    text = _cell(action.help or '')
    if action.dest in exclusive:
      text += ('; not together with ' +
               ', '.join(f'`{f}`' for f in exclusive[action.dest]))
    rows.append(f'| {flags} | {value} | {text} |')
  usage = ' '.join(parser.format_usage().split())
  usage = usage.removeprefix('usage: ')
  return '\n'.join([
      '```text', usage, '```', '', _cell(parser.description or ''), '',
      *rows])


def on_page_markdown(markdown, page, config, files):
  root = os.path.dirname(config['config_file_path'])
  if page.file.src_uri == STAX_PAGE:
    _check_stax_page(markdown, root)
  if COMPARE_MARKER in markdown:
    markdown = markdown.replace(COMPARE_MARKER, _compare_options())
  return markdown
