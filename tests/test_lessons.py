"""Each lesson runs end to end under papermill at its smallest preset."""
import json

import pytest

from conftest import REPO, run_python

LESSONS = sorted((REPO / "lessons").glob("*.ipynb"))


def test_lessons_have_a_parameters_cell():
    for lesson in LESSONS:
        cells = json.loads(lesson.read_text())["cells"]
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), lesson.name


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.name for p in LESSONS])
def test_lesson_runs_at_the_tiny_preset(lesson, tmp_path):
    out = tmp_path / lesson.name
    done = run_python("-m", "papermill", str(lesson), str(out), "-p", "preset", "tiny", "-k", "python3",
                      "--cwd", str(REPO / "lessons"), env={"NANOCHAT_HOME": str(tmp_path / "home")}, timeout=900)
    assert done.returncode == 0, f"{lesson.name} failed:\n{done.stderr[-6000:]}"
    executed = json.loads(out.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
