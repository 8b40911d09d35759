"""The package must be exactly what the notebooks export, and the notebooks must be clean."""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

BIN = Path(sys.executable).parent


def export_diff(repo: Path, work: Path) -> list[str]:
    "Copy `repo`'s notebooks and package to `work`, run nbdev-clean and nbdev-export there, list what changed."
    for name in ("nbs", "nanochat_nb"):
        shutil.copytree(repo / name, work / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    shutil.copy(repo / "pyproject.toml", work / "pyproject.toml")
    for tool in ("nbdev-clean", "nbdev-export"):
        done = subprocess.run([str(BIN / tool)], cwd=work, capture_output=True, text=True)
        assert done.returncode == 0, f"{tool} failed:\n{done.stdout}\n{done.stderr}"
    changed = []
    for folder, pattern in (("nbs", "*.ipynb"), ("nanochat_nb", "*.py")):
        before = {p.name: p.read_bytes() for p in (repo / folder).glob(pattern)}
        after = {p.name: p.read_bytes() for p in (work / folder).glob(pattern)}
        changed += [f"{folder}/{name}" for name in sorted(before.keys() | after.keys())
                    if before.get(name) != after.get(name)]
    return changed


def test_package_is_what_the_notebooks_export(tmp_path):
    changed = export_diff(REPO, tmp_path)
    assert not changed, f"run nbdev-clean and nbdev-export, then commit: these differ: {changed}"


def test_an_edited_but_unexported_notebook_is_caught(tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(REPO / "nbs", edited / "nbs")
    shutil.copytree(REPO / "nanochat_nb", edited / "nanochat_nb", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", edited / "pyproject.toml")
    notebook = edited / "nbs" / "90_common.ipynb"
    text = notebook.read_text()
    assert '"def seed_everything(seed: int):' in text
    notebook.write_text(text.replace('"def seed_everything(seed: int):', '"def seed_everything(seed: int = 0):', 1))
    assert export_diff(edited, tmp_path / "check") == ["nanochat_nb/common.py"]
