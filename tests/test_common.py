"""The ground floor: presets, the data folder's errors, and a real two-process all-reduce."""
import argparse
import json

import pytest

from conftest import REPO, run_python
from nanochat_nb import common


def test_presets_cover_the_course_sizes():
    assert {"tiny", "cpu", "gpu1", "speedrun"} <= set(common.preset_names())
    speedrun = common.load_preset("speedrun")
    assert (speedrun["depth"], speedrun["target-param-data-ratio"], speedrun["device-batch-size"], speedrun["nproc"]) == ("24", "8", "16", "8")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="tiny.*cpu.*gpu1.*speedrun"):
        common.load_preset("gpu8")


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
    with pytest.raises(FileNotFoundError, match="(?s)does not exist.*pretrain/shard_XXXXX.parquet.*NANOCHAT_DATA"):
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
