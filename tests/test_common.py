"""The ground floor: presets, the data folder's errors, errors a user can act on, packaging, and a real two-process
all-reduce."""
import argparse
import ast
import re
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from conftest import REPO, one_line_error, run_python
from nanochat_nb import common


def test_presets_cover_the_course_sizes():
    assert {"tiny", "cpu", "gpu1", "speedrun"} <= set(common.preset_names())
    speedrun = common.load_preset("speedrun")
    assert (speedrun["depth"], speedrun["target-param-data-ratio"], speedrun["device-batch-size"], speedrun["nproc"]) == ("24", "8", "16", "8")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="tiny.*cpu.*gpu1.*speedrun"):
        common.load_preset("gpu8")
    with pytest.raises(common.UserError) as error:
        common.load_preset("gpu8")
    assert str(error.value).startswith("Unknown preset 'gpu8': choose one of tiny, cpu, gpu1, speedrun")


def test_unknown_preset_on_the_command_line():
    done = run_python("-m", "nanochat_nb.dataset", "check", "--preset", "nope")
    assert "Unknown preset 'nope': choose one of tiny, cpu" in one_line_error(done, "nanochat-data")


def test_preset_value_of_the_wrong_type(tmp_path, monkeypatch):
    settings = tmp_path / "settings.ini"
    settings.write_text("[mine]\nnum-shards = abc\n")
    done = run_python("-m", "nanochat_nb.dataset", "check", "--preset", "mine",
                      env={"NANOCHAT_SETTINGS": str(settings)})
    message = one_line_error(done, "nanochat-data")
    assert f"Preset 'mine' sets num-shards = 'abc', which is not a valid int: fix it in {settings}." in message
    settings.write_text("[mine]\nno-progress = maybe\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset")
    parser.add_argument("--no-progress", action="store_true")
    monkeypatch.setenv("NANOCHAT_SETTINGS", str(settings))
    with pytest.raises(common.PresetValueError, match="no-progress = 'maybe', which is not a valid boolean"):
        common.parse_args_with_preset(parser, ["--preset", "mine"])


def test_home_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("")
    home = tmp_path / "a_file" / "home"
    done = run_python("-m", "nanochat_nb.tokenizer", "eval", env={"NANOCHAT_HOME": str(home)})
    message = one_line_error(done, "nanochat-tok-eval")
    assert f"Cannot create the home folder {home}" in message and "set NANOCHAT_HOME to a writable folder" in message


def test_home_that_is_not_writable(monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", "/proc")   # a folder that exists and that not even root may write into
    with pytest.raises(common.UserError, match="home folder /proc is not writable .*: set NANOCHAT_HOME to a writable"):
        common.nanochat_home()


def test_flags_override_preset_values():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--device-batch-size", type=int, default=32)
    args = common.parse_args_with_preset(parser, ["--preset", "tiny", "--device-batch-size", "2"])
    assert (args.depth, args.device_batch_size) == (2, 2)
    assert common.parse_args_with_preset(parser, []).depth == 20


def test_missing_data_folder_names_the_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist: set NANOCHAT_DATA to a folder holding pretrain/shard_XXXXX.parquet"):
        common.data_dir("pretrain")


def test_data_folder_without_the_part_asked_for(tmp_path, monkeypatch):
    (tmp_path / "pretrain").mkdir()  # present but empty
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no pretrain/"):
        common.data_dir("pretrain")
    with pytest.raises(ValueError, match="Unknown data sub-folder"):
        common.data_dir("pretraining")


def test_shared_data_resolves(data_root):
    assert common.data_dir("pretrain") == data_root / "pretrain"
    assert common.data_dir("eval_bundle").joinpath("core.yaml").is_file()


def test_bad_dtype_override(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp8")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        common.compute_dtype("cpu")
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    assert str(common.compute_dtype("cpu")) == "torch.bfloat16"


def test_run_logger_appends_json_lines(tmp_path):
    logger = common.RunLogger(tmp_path / "log.jsonl", echo=False)
    for step in range(3):
        logger.log(step, loss=4.0 - step)
    assert [r["loss"] for r in common.read_log(tmp_path / "log.jsonl")] == [4.0, 3.0, 2.0]


def test_torchrun_all_reduce_on_two_cpu_processes(tmp_path):
    done = run_python("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                      str(REPO / "tests" / "dist_allreduce_worker.py"), str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert results == ["2 3.0", "2 3.0"]  # 1 + 2 on both ranks


# ---- packaging -------------------------------------------------------------------------------------------------

def test_presets_file_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_SETTINGS", raising=False)
    assert common.settings_path() == REPO / "settings.ini"  # the file a learner edits, in a checkout
    mine = tmp_path / "mine.ini"
    mine.write_text("[mine]\ndepth = 3\n")
    monkeypatch.setenv("NANOCHAT_SETTINGS", str(mine))
    assert common.settings_path() == mine and common.preset_names() == ["mine"]
    mine.write_text("depth = 3\n")  # no [section] line
    with pytest.raises(common.UserError, match=f"The presets file {mine} cannot be parsed"):
        common.load_preset("mine")


def test_wheel_ships_the_presets(tmp_path, monkeypatch):
    """Build a wheel from a copy of the package (the tree itself stays untouched), then import it from a bare folder,
    away from the repository: the presets must come with it."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "settings.ini"):
        (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(["cp", "-a", str(REPO / "nanochat_nb"), str(source)], check=True)  # -a: keeps the link a link
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), "."], cwd=source, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("nanochat_nb-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("nanochat_nb/settings.ini") == (REPO / "settings.ini").read_bytes()
        archive.extractall(tmp_path / "site")
    monkeypatch.delenv("NANOCHAT_SETTINGS", raising=False)
    code = "from nanochat_nb import common; print(common.settings_path()); print(common.load_preset('tiny')['depth'])"
    done = run_python("-c", code, env={"PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "site" / "nanochat_nb" / "settings.ini"), "2"]


def third_party_imports() -> set[str]:
    "Top-level modules outside the standard library that the package imports (an import inside `try:` is optional)."
    names = set()
    for path in (REPO / "nanochat_nb").glob("*.py"):
        tree = ast.parse(path.read_text())
        optional = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for node in ast.walk(s)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"nanochat_nb"}


def test_dependencies_are_what_the_package_imports():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    distributions = {re.match(r"[A-Za-z0-9_.-]+", spec)[0].lower() for spec in declared}
    module_of = {"pyyaml": "yaml"}  # distributions whose module has another name
    assert {module_of.get(name, name) for name in distributions} == third_party_imports()


def test_dtype_override_wins_without_measuring(monkeypatch):
    common.measured_cpu_dtype.cache_clear()
    for name, dtype in [("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("FP16", torch.float16)]:
        monkeypatch.setenv("NANOCHAT_DTYPE", name)
        assert common.compute_dtype_choice("cpu") == (dtype, f"NANOCHAT_DTYPE={name}")
    assert common.measured_cpu_dtype.cache_info().misses == 0


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [(1.0, 0.2, torch.bfloat16), (1.5, 1.0, torch.bfloat16),
                                                      (1.4, 1.0, torch.float32), (0.05, 1.0, torch.float32)])
def test_cpu_dtype_rule(fp32_s, bf16_s, expected):
    dtype, reason = common.choose_cpu_dtype(fp32_s, bf16_s)
    assert dtype == expected
    assert f"{fp32_s / bf16_s:.2f}x" in reason and ("1.5x" in reason)


def test_cpu_dtype_measured_once_per_process(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    calls = []
    real = common.matmul_seconds
    monkeypatch.setattr(common, "matmul_seconds", lambda dtype: calls.append(dtype) or real(dtype))
    common.measured_cpu_dtype.cache_clear()
    started = time.perf_counter()
    first = common.compute_dtype_choice("cpu")
    assert time.perf_counter() - started < 2.0  # "a fraction of a second"; generous on a loaded machine
    assert common.compute_dtype_choice("cpu") == first and common.compute_dtype("cpu") == first[0]
    assert calls == [torch.float32, torch.bfloat16]
    assert first[0] in (torch.float32, torch.bfloat16) and "as fast as fp32 on this CPU" in first[1]
    common.measured_cpu_dtype.cache_clear()


def test_matmul_seconds_times_real_matmuls():
    small, large = common.matmul_seconds(torch.float32, n=64), common.matmul_seconds(torch.float32, n=512)
    assert 0 < small < large
