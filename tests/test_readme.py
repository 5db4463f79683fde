"""Every Python block of README.md runs as written (issue 17).

The blocks run in order in one fresh interpreter, in one namespace, as a
reader pasting them into a session would (later blocks may use names an
earlier block defined), with the README's default precision (float32: the
tests' conftest turns float64 on, so they cannot run in this process), in
an empty working directory. A block that raises fails the test with its
number, its first line and the error.
"""

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, os.pardir, 'README.md')

_RUNNER = r'''
import re, sys, traceback
import matplotlib
matplotlib.use('Agg')
blocks = re.findall(r"```python\n(.*?)```", open(sys.argv[1]).read(), re.S)
namespace = {}
for number, block in enumerate(blocks, 1):
  try:
    exec(compile(block, f'README block {number}', 'exec'), namespace)
  except Exception:
    first = block.strip().splitlines()[0]
    sys.exit(f'README block {number} ({first!r}) does not run:\n'
             + traceback.format_exc()[-3000:])
print(f'ran {len(blocks)} blocks')
'''


def test_readme_blocks_exist():
  blocks = re.findall(r'```python\n(.*?)```', open(README).read(), re.S)
  assert len(blocks) >= 9, len(blocks)


def test_every_readme_block_runs_as_written(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', MPLBACKEND='Agg')
  env.pop('JAX_ENABLE_X64', None)
  result = subprocess.run(
      [sys.executable, '-c', _RUNNER, os.path.abspath(README)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip().splitlines()[-1].startswith('ran '), (
      result.stdout[-2000:])
