"""The GPU check (bench/gpu_check.py, `make gpu-check`) runs end to end in its CPU dry mode: every part (wheels,
the gpu-marked tests, the step benchmark, the short training run) succeeds and leaves its figures under OUT."""
import json

from conftest import REPO, run_python


def test_gpu_check_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu_check"
    done = run_python(str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
                      "--wheels", str(tmp_path / "no_wheels"), timeout=600,
                      env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    results = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0, (results, done.stdout[-3000:])
    parts = results["parts"]
    assert list(parts) == ["wheels", "tests", "steps", "training"] and all(p["ok"] for p in parts.values())
    assert parts["tests"]["tests"] >= 8 and parts["tests"]["skipped"] == parts["tests"]["tests"]  # no GPU here
    assert parts["steps"]["ours d2"]["tok_per_s"] > 0 and parts["steps"]["ours d2"]["mfu"] > 0
    assert parts["training"]["steps"] == 4 and parts["training"]["val_bpb"] > 0
    assert (out / "gpu_check.log").read_text().count("$ ") >= 4
    assert any((out / "home" / "base_checkpoints").glob("d2/model_*.pt"))
