"""Every chapter executes top to bottom, its checks included (nbdev's notebook runner)."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "nbs").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_notebook_runs(notebook):
    nbdev_test = Path(sys.executable).parent / "nbdev-test"
    done = subprocess.run([str(nbdev_test), str(notebook)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{notebook.name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
