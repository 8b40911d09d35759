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


sys.path.insert(0, str(REPO / "tools"))
import book  # noqa: E402


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_chapter_is_committed_with_fresh_outputs(notebook):
    "A reader on GitHub sees what the code printed and drew: outputs exist and were produced by this very code."
    assert book.staleness(notebook) is None, book.staleness(notebook)


def test_an_edited_chapter_is_stale(tmp_path):
    chapter = tmp_path / "chapter.ipynb"
    nb = book.nbformat.v4.new_notebook(cells=[book.nbformat.v4.new_code_cell("print(1)")])
    nb.cells[0].outputs = [book.nbformat.v4.new_output("stream", text="1\n")]
    nb.metadata[book.STAMP] = {"code_sha256": book.code_hash(nb)}
    book.nbformat.write(nb, chapter)
    assert book.staleness(chapter) is None
    nb.cells[0].source = "print(2)"
    book.nbformat.write(nb, chapter)
    assert "changed after it was executed" in book.staleness(chapter)
