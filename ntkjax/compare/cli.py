"""The `compare` subcommand: flags, checks, and the run.

Bad flags are argparse errors (exit code 2, the usage line and what is
wrong); bad data or a network that cannot be built print one line,
`ntkjax compare: error: ...`, and exit with code 1, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

QUICK = {'widths': (32, 128), 'seeds': 1, 'steps': 20, 'train_size': 100,
         'test_size': 100, 'kernel_points': 64, 'records': 6}
DEFAULTS = {'seeds': 3, 'steps': 400, 'train_size': None, 'test_size': None,
            'kernel_points': 256, 'records': 16}


def _int_at_least(low: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}')
    if value < low:
      raise argparse.ArgumentTypeError(f'must be >= {low}, got {value}')
    return value
  return parse


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a number, got {text!r}')
  if not value > 0 or value == float('inf'):
    raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
  return value


def _fraction(text: str) -> float:
  value = _positive_float(text)
  if value >= 1:
    raise argparse.ArgumentTypeError(
        f'must be in (0, 1): 1 is the largest stable learning rate, got {text}')
  return value


def _widths(text: str) -> tuple:
  parts = [p.strip() for p in text.split(',') if p.strip()]
  if not parts:
    raise argparse.ArgumentTypeError('expected a comma-separated list of '
                                     'widths, e.g. 64,256,1024')
  widths = []
  for part in parts:
    try:
      value = int(part)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f'{part!r} is not an integer; give widths like 64,256,1024')
    if value < 1:
      raise argparse.ArgumentTypeError(f'widths must be >= 1, got {value}')
    widths.append(value)
  if len(set(widths)) != len(widths):
    raise argparse.ArgumentTypeError(f'widths repeat: {text}')
  return tuple(sorted(widths))


def _alphas(text: str) -> tuple:
  values = []
  for part in (p.strip() for p in text.split(',') if p.strip()):
    try:
      values.append(_positive_float(part))
    except argparse.ArgumentTypeError as error:
      raise argparse.ArgumentTypeError(f'--alpha {part!r}: {error}')
  if not values:
    raise argparse.ArgumentTypeError('expected a comma-separated list of '
                                     'output scales, e.g. 0.1,1,10')
  return tuple(sorted(set(values)))


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `compare` to the `ntkjax` command's subparsers."""
  from ntkjax.compare.architectures import PRESETS
  parser = subparsers.add_parser(
      'compare', help='finite networks vs their infinite-width limit',
      description=(
          'Trains finite networks of one architecture at several widths and '
          'compares them with the infinite-width NNGP/NTK predictions of the '
          'same definition: test metrics, kernel distance at initialization '
          '(slope vs width), function-space gap along training, kernel drift. '
          'Writes results.json, PNG plots and report.html into --out.'))
  parser.add_argument('--data', metavar='PATH.npz', default=None,
                      help='arrays x_train, y_train, x_test, y_test (labels '
                           'or 2-d targets); default: scikit-learn\'s digits '
                           '(1,000 train / 797 test)')
  parser.add_argument('--arch', default='fc-relu',
                      help=f'a preset ({", ".join(PRESETS)}) or '
                           'module:function / file.py:function, called as '
                           'function(width, out_dim) -> stax layer '
                           '[default: fc-relu]; cnn is slow on CPU at the '
                           'default sizes, try it with --quick')
  parser.add_argument('--depth', type=_int_at_least(1), default=1,
                      help='hidden layers of the presets [default: 1]')
  parser.add_argument('--widths', type=_widths, default=None,
                      help='comma-separated widths [default: '
                           '64,128,256,512,1024,2048]')
  parser.add_argument('--seeds', type=_int_at_least(1), default=None,
                      help=f'initializations per width [default: '
                           f'{DEFAULTS["seeds"]}]')
  parser.add_argument('--steps', type=_int_at_least(1), default=None,
                      help=f'gradient-descent steps [default: '
                           f'{DEFAULTS["steps"]}]')
  rate = parser.add_mutually_exclusive_group()
  rate.add_argument('--lr', type=_positive_float, default=None,
                    help='absolute learning rate of optax.sgd')
  rate.add_argument('--lr-fraction', type=_fraction, default=0.5,
                    help='learning rate as a fraction of the largest stable '
                         'one of the infinite-width NTK (muP: of its kernel '
                         'at the base width) [default: 0.5]')
  parser.add_argument('--train-size', type=_int_at_least(2), default=None,
                      help='use the first N training examples [default: all]')
  parser.add_argument('--test-size', type=_int_at_least(1), default=None,
                      help='use the first N test examples [default: all]')
  parser.add_argument('--kernel-points', type=_int_at_least(2), default=None,
                      help='training inputs on which kernels are compared '
                           f'[default: {DEFAULTS["kernel_points"]}]')
  parser.add_argument('--records', type=_int_at_least(2), default=None,
                      help='steps (log-spaced) at which outputs are recorded '
                           f'[default: {DEFAULTS["records"]}]')
  parser.add_argument('--images', action='store_true',
                      help='pass the digits as 8x8x1 images (the cnn preset '
                           'does this itself)')
  parser.add_argument('--no-center', dest='center', action='store_false',
                      help='train f itself instead of f - f_0 (the output '
                           'minus its value at initialization); each network '
                           'then keeps its random initial function')
  parser.add_argument('--alpha', type=_alphas, default=(), metavar='A,B,..',
                      help='also train each network as alpha (f - f_0) on '
                           'loss / alpha^2 for these output scales (the '
                           'lazy-rich dial of Chizat et al. 2019) and '
                           'report test metrics, kernel drift and '
                           'kernel-target alignment against alpha '
                           '[default: none]')
  parser.add_argument('--parameterization', choices=('ntk', 'mup'),
                      default='ntk',
                      help='the finite networks\' parameterization: ntk, '
                           'whose limit is the kernel, or mup (maximal '
                           'update, Yang & Hu 2021), which keeps learning '
                           'features at every width; the report then shows '
                           'where the kernel description breaks [default: '
                           'ntk]')
  parser.add_argument('--base-width', type=_int_at_least(1), default=None,
                      help='muP\'s base width, where it equals the standard '
                           'parameterization and its learning rate is set '
                           '[default: the smallest width]')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny run in seconds (widths 32,128, 1 seed, 20 '
                           'steps, 100 train / 100 test); other flags override')
  parser.add_argument('--out', metavar='DIR', default=None,
                      help='output folder [default: '
                           'compare_output/<date-time>]')
  parser.set_defaults(handler=main)
  return parser


def config_from_args(args):
  """The `Config` the parsed flags describe (`--quick` fills the gaps)."""
  from ntkjax.compare.experiment import DEFAULT_WIDTHS, Config
  base = QUICK if args.quick else DEFAULTS
  pick = lambda name: (getattr(args, name) if getattr(args, name) is not None
                       else base.get(name))
  out = args.out or os.path.join('compare_output',
                                 time.strftime('%Y%m%d-%H%M%S'))
  return Config(
      out=out, data=args.data, arch=args.arch, depth=args.depth,
      widths=args.widths or (QUICK['widths'] if args.quick else DEFAULT_WIDTHS),
      seeds=pick('seeds'), steps=pick('steps'), learning_rate=args.lr,
      lr_fraction=args.lr_fraction, train_size=pick('train_size'),
      test_size=pick('test_size'), kernel_points=pick('kernel_points'),
      records=pick('records'), images=args.images, center=args.center,
      alphas=args.alpha, parameterization=args.parameterization,
      base_width=args.base_width)


def _writable(path: str) -> bool:
  """Whether `path` is, or can be created as, a folder we may write in
  (checked on its nearest existing ancestor; nothing is created)."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  return os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)


def main(args) -> int:
  """Runs `ntkjax compare` for parsed flags; returns the exit code."""
  from ntkjax import compare
  from ntkjax.compare import report
  if args.base_width is not None and args.parameterization != 'mup':
    print('ntkjax compare: error: --base-width is muP\'s; give it with '
          '--parameterization mup.', file=sys.stderr)
    return 2
  config = config_from_args(args)
  if os.path.exists(config.out) and not os.path.isdir(config.out):
    print(f'ntkjax compare: error: --out {config.out} exists and is not a '
          'folder.', file=sys.stderr)
    return 1
  if not _writable(config.out):
    # Fail now, not after an hour of kernels.
    print(f'ntkjax compare: error: cannot write to --out {config.out}; '
          'choose a writable folder.', file=sys.stderr)
    return 1
  stale = [os.path.join(config.out, name) for name in
           ['report.html'] + [f'{plot}.png' for plot in
                                      report.PLOTS + report.OPTIONAL_PLOTS]]
  stale = [path for path in stale if os.path.isfile(path)]
  for path in stale:
    # A previous run's report beside this run's (maybe partial) results
    # would describe the wrong run.
    os.remove(path)
  if stale:
    print(f'ntkjax compare: note: removed the previous report from '
          f'{config.out}; results.json is rewritten after every width.',
          file=sys.stderr)
  if len(config.widths) < 2:
    print('ntkjax compare: note: with one width no slope can be fitted.',
          file=sys.stderr)
  start = time.perf_counter()
  try:
    results = compare.run(config)
  except (compare.DataError, compare.ArchitectureError) as error:
    print(f'ntkjax compare: error: {error}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f'\nntkjax compare: interrupted; finished widths are in '
          f'{os.path.join(config.out, "results.json")}', file=sys.stderr)
    return 130
  print(report.summary_text(results))
  print(f'\nwrote {", ".join(sorted(results["files"].values()))} in '
        f'{time.perf_counter() - start:.0f} s')
  return 0
