"""`ntkjax compare`: finite networks beside their infinite-width limit.

    python -m ntkjax compare --out DIR        # or the `ntkjax` console script

runs one architecture at several widths on scikit-learn's digits (or your
`.npz`), and writes `results.json`, PNG plots and a self-contained
`report.html` into DIR. From Python:

    from ntkjax.compare import Config, run
    results = run(Config(out='out', widths=(64, 256), steps=100))

Modules: `data` (loading, checks, preprocessing), `architectures` (presets
and `module:function` networks), `experiment` (the computations, JSON),
`report` (plots, HTML, terminal table), `progress` (the progress bar),
`cli` (the command line).
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

from ntkjax.compare.architectures import ArchitectureError
from ntkjax.compare.data import DataError
from ntkjax.compare.experiment import (DEFAULT_WIDTHS, Config,
                                       DiscreteNtkDynamics, PowerLaw,
                                       fit_power_law, record_schedule)
from ntkjax.compare import experiment, report


def run(config: Config, stream: Optional[TextIO] = None) -> dict:
  """Runs the comparison, then writes the plots and `report.html`.

  Args:
    config: a `Config` (its `out` folder receives the files).
    stream: where progress goes (default stderr).

  Returns:
    The results dict (as in `results.json`), with `files`: the paths
    written.
  """
  stream = sys.stderr if stream is None else stream
  results = experiment.run(config, stream)
  stages = experiment._Stages(stream, results['timings'])
  with stages('plots and report'):
    files = report.write_report(results, config.out)
  files['results'] = f'{config.out}/results.json'
  results['files'] = files
  experiment.write_json(results, files['results'])
  return results


__all__ = ['ArchitectureError', 'Config', 'DEFAULT_WIDTHS', 'DataError',
           'DiscreteNtkDynamics', 'PowerLaw', 'fit_power_law',
           'record_schedule', 'run']
