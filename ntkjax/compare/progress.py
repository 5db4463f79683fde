"""A small progress bar on stderr, for terminals and for logs.

On a terminal the bar redraws one line in place; elsewhere (CI logs, pipes,
captured output) it prints a plain line at most every `interval` seconds and
when the stage ends, so a log shows progress without thousands of lines.
Work units may be weighted (e.g. by the cost of a width), so that the
percentage and the time estimate follow the work, not the count of items.
No dependency: tqdm would do the same, but is not needed for one line.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_seconds(seconds: float) -> str:
  """'42 s', '3 min 05 s'."""
  seconds = max(0., float(seconds))
  if seconds < 60:
    return f'{seconds:.0f} s' if seconds >= 10 else f'{seconds:.1f} s'
  minutes, rest = divmod(int(round(seconds)), 60)
  return f'{minutes} min {rest:02d} s'


class Progress:
  """A progress bar for one stage of work.

  Args:
    label: what is being done, e.g. 'training'.
    total: total amount of work (any positive number; items or weights).
    stream: where to write (default `sys.stderr`).
    interval: seconds between lines when `stream` is not a terminal.
    width: characters of the bar.
  """

  def __init__(self, label: str, total: float,
               stream: Optional[TextIO] = None, interval: float = 5.,
               width: int = 24):
    self.label = label
    self.total = max(float(total), 1e-12)
    self.stream = sys.stderr if stream is None else stream
    self.interval = interval
    self.width = width
    self.done = 0.
    self.note = ''
    self.start = time.perf_counter()
    self.last_line = -float('inf')
    isatty = getattr(self.stream, 'isatty', None)
    self.tty = bool(isatty and isatty())
    self.closed = False
    self._draw(force=True)

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, exc_type, *exc) -> None:
    # An exception or Ctrl-C ends the bar as such, not as 'done'.
    self.close('interrupted' if exc_type is KeyboardInterrupt else
               'failed' if exc_type is not None else 'done')

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def advance(self, amount: float = 1., note: str = '') -> None:
    """Marks `amount` more work done; `note` says what was just finished."""
    self.done = min(self.total, self.done + amount)
    self.note = note
    self._draw()

  def close(self, outcome: str = 'done') -> None:
    """Ends the stage: a final line with the elapsed time and `outcome`."""
    if self.closed:
      return
    self.closed = True
    self.outcome = outcome
    self._draw(force=True, final=True)

  def _line(self, final: bool) -> str:
    fraction = self.done / self.total
    filled = int(round(fraction * self.width))
    bar = '#' * filled + '.' * (self.width - filled)
    text = (f'{self.label} [{bar}] {100 * fraction:3.0f}% '
            f'{format_seconds(self.elapsed)}')
    if final:
      return f'{text} {getattr(self, "outcome", "done")}'
    if 0 < fraction < 1:
      remaining = self.elapsed * (1 - fraction) / fraction
      text += f', ~{format_seconds(remaining)} left'
    return text + (f'  {self.note}' if self.note else '')

  def _draw(self, force: bool = False, final: bool = False) -> None:
    now = time.perf_counter()
    if self.tty:
      end = '\n' if final else ''
      self.stream.write('\r\033[K' + self._line(final) + end)
      self.stream.flush()
      return
    if force or now - self.last_line >= self.interval:
      self.stream.write(self._line(final) + '\n')
      self.stream.flush()
      self.last_line = now
