"""Each lesson runs end to end under papermill at its smallest preset, through the very command the README gives."""
import json
import re
import shlex

import pytest

from conftest import REPO, run_python

LESSONS = sorted((REPO / "lessons").glob("*.ipynb"))


def readme_commands() -> dict[str, list[str]]:
    "The papermill commands of the README's lessons section: {lesson path: the command's words after `papermill`}."
    text = (REPO / "README.md").read_text()
    section = text.split("## The lessons", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line.split("#", 1)[0]) for line in section.splitlines() if line.startswith("papermill ")]
    return {words[1]: words[1:] for words in commands}


COMMANDS = readme_commands()


def test_the_readme_gives_one_command_per_lesson():
    assert sorted(COMMANDS) == [f"lessons/{lesson.name}" for lesson in LESSONS]


def test_lessons_have_a_parameters_cell():
    for lesson in LESSONS:
        cells = json.loads(lesson.read_text())["cells"]
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), lesson.name


def at_tiny_preset(words: list[str], folder) -> list[str]:
    "The README's command at preset `tiny`, writing the executed notebook and any `out_dir` into `folder`."
    lesson, _, *options = words
    assert "preset" in options, f"the README's command for {lesson} sets no preset"
    options[options.index("preset") + 1] = "tiny"
    if "out_dir" in options:
        options[options.index("out_dir") + 1] = str(folder / "out")
    return [lesson, str(folder / "executed.ipynb"), *options]


@pytest.mark.parametrize("lesson", sorted(COMMANDS))
def test_lesson_runs_at_the_tiny_preset(lesson, tmp_path):
    done = run_python("-m", "papermill", *at_tiny_preset(COMMANDS[lesson], tmp_path),
                      env={"NANOCHAT_HOME": str(tmp_path / "home")}, timeout=900)
    assert done.returncode == 0, f"{lesson} failed:\n{done.stderr[-6000:]}"
    executed = json.loads((tmp_path / "executed.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
