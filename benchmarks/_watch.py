"""Run a benchmark case in a watched subprocess; measure competing CPU load.

Standard library only (Linux /proc; elsewhere the memory checks and the load
measurement are skipped), so any benchmark script, ours or a reference one,
can use it.

- `run(command, ...)` starts the command and polls it every 50 ms: it is
  killed after `timeout_s`, as soon as its RSS passes `rss_limit_gb`, or when
  the machine's available memory drops under `min_available_gib` (a plan
  check alone cannot protect a small machine where the plan is unknown).
- `other_cores` in its result is the average number of cores that *other*
  processes kept busy while the command ran (machine busy time from
  /proc/stat, minus this process's and its children's CPU time): timings
  taken with other_cores well above 0 are inflated.
- `wait_quiet(...)` waits until other processes have been nearly idle for a
  few seconds, so a case does not start in the middle of someone else's job.
"""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import time
from typing import Optional, Sequence


def cpu_seconds(who=resource.RUSAGE_SELF) -> float:
  """User + system CPU seconds of this process (or its reaped children)."""
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


def _busy_seconds() -> float:
  """CPU seconds the whole machine has been busy (/proc/stat; 0 if absent)."""
  try:
    with open('/proc/stat') as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return 0.
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')


def _other_cpu() -> float:
  """Busy CPU seconds so far, minus this process's and its children's."""
  return (_busy_seconds() - cpu_seconds(resource.RUSAGE_SELF) -
          cpu_seconds(resource.RUSAGE_CHILDREN))


def wait_quiet(quiet_cores: float, max_seconds: float,
               window: float = 5.) -> float:
  """Wait until other processes use under `quiet_cores` cores for `window` s.

  Args:
    quiet_cores: the threshold, in cores.
    max_seconds: give up (and go ahead) after this long.
    window: seconds over which the load is measured.

  Returns:
    The seconds waited.
  """
  start = time.monotonic()
  while time.monotonic() - start < max_seconds:
    other = _other_cpu()
    time.sleep(window)
    if (_other_cpu() - other) / window < quiet_cores:
      break
  return round(time.monotonic() - start, 1)


def _read_kib(path: str, field: str) -> Optional[int]:
  """A 'Field:   123 kB' line of a /proc file, in KiB (None if absent)."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except (OSError, ValueError, IndexError):
    pass
  return None


def _poll(proc: subprocess.Popen, timeout_s: float, rss_limit_gb: float,
          min_available_gib: float) -> tuple:
  """Wait for `proc`; kill it on timeout or memory pressure.

  Returns `(reason or None, highest RSS seen in MiB)`.
  """
  deadline = time.monotonic() + timeout_s
  highest = 0.
  while proc.poll() is None:
    rss = _read_kib(f'/proc/{proc.pid}/status', 'VmRSS')
    free = _read_kib('/proc/meminfo', 'MemAvailable')
    highest = max(highest, (rss or 0) / 1024)
    reason = None
    if time.monotonic() > deadline:
      reason = f'failed: timeout after {timeout_s:g} s'
    elif rss is not None and rss * 1024 > rss_limit_gb * 1e9:
      reason = (f'failed: killed at {rss * 1024 / 1e9:.1f} GB RSS '
                f'(limit {rss_limit_gb:g} GB)')
    elif free is not None and free < min_available_gib * 1024**2:
      reason = (f'failed: killed, machine down to {free / 1024**2:.1f} GiB '
                f'available at {(rss or 0) / 1024**2:.1f} GiB RSS')
    if reason:
      proc.kill()  # our own child, by its pid
      proc.wait()
      return reason, round(highest, 1)
    time.sleep(0.05)
  return None, round(highest, 1)


def run(command: Sequence[str], timeout_s: float, rss_limit_gb: float,
        min_available_gib: float) -> dict:
  """Run `command` to completion (or its kill), watched as described above.

  Args:
    command: argv of the child.
    timeout_s: wall-clock limit.
    rss_limit_gb: kill once the child's RSS exceeds this (units of 1e9 B).
    min_available_gib: kill once MemAvailable drops under this.

  Returns:
    dict with returncode, killed (a 'failed: ...' reason or None), stdout,
    stderr, highest_rss_mib_seen, wall_seconds and other_cores.
  """
  other = _other_cpu()
  start = time.perf_counter()
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    # Files, not pipes: a chatty child can never block on a full pipe.
    proc = subprocess.Popen(list(command), stdout=out, stderr=err, text=True)
    reason, highest = _poll(proc, timeout_s, rss_limit_gb, min_available_gib)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  wall = time.perf_counter() - start
  return {'returncode': proc.returncode, 'killed': reason, 'stdout': stdout,
          'stderr': stderr, 'highest_rss_mib_seen': highest,
          'wall_seconds': round(wall, 1),
          'other_cores': round(max(0., _other_cpu() - other) / wall, 2)}
