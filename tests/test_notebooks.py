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


CHAPTER_ORDER = [("00_overview", "overview"), ("01_dataset", "dataset"), ("02_tokenizer", "tokenizer"),
                 ("03_dataloader", "dataloader"), ("04_gpt", "GPT"), ("05_optim", "optimizer"), ("06_train", "training"),
                 ("07_eval", "CORE eval"), ("08_engine", "engine"), ("09_chat", "chat"), ("10_serve", "serving"),
                 ("11_tasks", "tasks"), ("12_chat_eval", "chat eval"), ("13_sft", "SFT"), ("14_rl", "RL"),
                 ("15_scaling", "scaling")]
SIDE_CHAPTERS = {"04b_fused_head": ("04_gpt", "fused head"), "04c_fp8": ("04_gpt", "fp8")}
ROADMAP = "> **Roadmap:** "


def expected_roadmap(stem: str) -> str:
    "The chain of chapters, each linked but the current one, which is bold (a side chapter bolds its main one)."
    current, side = SIDE_CHAPTERS.get(stem, (stem, None))
    return ROADMAP + " → ".join(f"**{name}**" + (f" (side chapter: {side})" if side else "") if chapter == current
                                else f"[{name}]({chapter}.ipynb)" for chapter, name in CHAPTER_ORDER)


def first_markdown(nb) -> str:
    return next(cell.source for cell in nb.cells if cell.cell_type == "markdown")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_chapter_opens_with_its_roadmap(notebook):
    "At the top, one line places the chapter in the book; appendices carry the whole chain, unbolded."
    title, *rest = first_markdown(book.nbformat.read(notebook, as_version=4)).splitlines()
    assert title.startswith("# "), f"{notebook.name}: the first markdown cell should open with the chapter's title"
    roadmap = next((line for line in rest if line.startswith(ROADMAP)), None)
    assert roadmap, f"{notebook.name}: no `{ROADMAP.strip()}` line in the first markdown cell, under the title"
    if notebook.stem in dict(CHAPTER_ORDER) or notebook.stem in SIDE_CHAPTERS:
        assert roadmap == expected_roadmap(notebook.stem), f"{notebook.name}: roadmap line differs from the book's order"
    else:
        assert roadmap.startswith(expected_roadmap("appendix")), f"{notebook.name}: an appendix lists every chapter, linked"


def test_roadmap_of_a_chapter():
    line = expected_roadmap("04c_fp8")
    assert "[dataloader](03_dataloader.ipynb) → **GPT** (side chapter: fp8) → [optimizer](05_optim.ipynb)" in line
    assert line.count("](") == len(CHAPTER_ORDER) - 1 and "**overview**" in expected_roadmap("00_overview")


def is_table(text: str) -> bool:
    "Three or more consecutive lines with the same number (one or more) of `|` column separators: markdown or printed."
    run, columns = 0, None
    for line in text.splitlines():
        count = line.strip().strip("|").count("|")
        run, columns = (run + 1 if count == columns else 1, count) if count else (0, None)
        if run >= 3:
            return True
    return False


def shows_a_figure_or_table(nb) -> bool:
    "An image or an HTML table among the outputs, a table printed by the code, or a markdown table in the prose."
    for cell in nb.cells:
        if cell.cell_type == "markdown" and is_table(cell.source):
            return True
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data or "<table" in data.get("text/html", ""):
                return True
            if is_table(output.get("text", "") + data.get("text/plain", "") + data.get("text/markdown", "")):
                return True
    return False


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_chapter_shows_a_figure_or_table(notebook):
    assert shows_a_figure_or_table(book.nbformat.read(notebook, as_version=4)), \
        f"{notebook.name} shows no figure (image/png output) and no table (HTML, printed or markdown)"


def test_a_chapter_of_prose_and_prints_only_has_no_figure():
    new = book.nbformat.v4
    cell = new.new_code_cell("print('a | b')")
    cell.outputs = [new.new_output("stream", text="a | b\nc | d | e\n")]
    nb = new.new_notebook(cells=[new.new_markdown_cell("# T\n\nno table here: a | b\n\nnor | here"), cell])
    assert not shows_a_figure_or_table(nb)
    cell.outputs.append(new.new_output("stream", text="depth | loss\n2 | 4.1\n4 | 3.9\n"))
    assert shows_a_figure_or_table(nb)
    nb.cells[1].outputs = []
    nb.cells.append(new.new_markdown_cell("| a | b |\n|---|---|\n| 1 | 2 |"))
    assert shows_a_figure_or_table(nb)
