"""The `ntkjax` command: `python -m ntkjax compare ...` or `ntkjax compare ...`.

Subcommands:
  compare   finite networks vs their infinite-width limit (ntkjax.compare)
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Parses `argv` (default: the command line) and runs the subcommand.

  Returns:
    The exit code: 0 on success, 1 for unusable data or networks; argparse
    exits with 2 on bad flags.
  """
  from ntkjax.compare import cli
  parser = argparse.ArgumentParser(
      prog='ntkjax',
      description='ntkjax: finite and infinite-width neural networks from one '
                  'definition.')
  subparsers = parser.add_subparsers(dest='command', metavar='COMMAND',
                                     required=True)
  cli.add_parser(subparsers)
  args = parser.parse_args(argv)
  return args.handler(args)


if __name__ == '__main__':
  sys.exit(main())
