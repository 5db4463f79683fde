"""The notebooks in `notebooks/` run from top to bottom without errors.

Each is executed in a fresh Jupyter kernel (nbclient, the engine of
`jupyter nbconvert --execute`) in a temporary folder, so `make test` keeps
them working; their cells assert what they show (e.g. the critical
W_std = sqrt(2) of ReLU, the slope of the kernel distance).
"""

import glob
import os

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), '..', 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))
CELL_TIMEOUT_S = 300   # generous for a loaded 2-core machine; they take ~10 s


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {'quickstart.ipynb', 'finite_vs_infinite.ipynb',
          'signal_propagation.ipynb'} <= names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
      resources={'metadata': {'path': str(tmp_path)}})
  client.execute()   # raises CellExecutionError with the cell and traceback
  errors = [output for cell in notebook.cells if cell.cell_type == 'code'
            for output in cell.get('outputs', [])
            if output.get('output_type') == 'error']
  assert not errors
