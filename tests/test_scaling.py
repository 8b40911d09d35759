"""Scaling: the isoFLOP fit recovers a known law, the crossing check tells crossing curves from parallel ones,
a sweep runs the real training stage and resumes from its CSV, and bad input is refused in one sentence."""
import math

import numpy as np
import pytest

from nanochat_nb import scaling
from nanochat_nb.scaling import (COLUMNS, CURVE_COLUMNS, Run, ScalingError, Sweep, append_rows, curve_crossings,
                                 curves_path, pending_runs, read_curves, read_results, run_sweep, scaling_fit,
                                 synthetic_isoflop_rows)

BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20]
TOLERANCE = 0.03  # on the exponents, with loss noise 0.003 (over 20 noise draws the chapter measures a spread of ±0.001)


@pytest.mark.parametrize("alpha,beta", [(0.34, 0.28), (0.3, 0.3), (0.25, 0.4)])
def test_fit_recovers_the_exponents_of_a_known_law_from_a_csv(tmp_path, alpha, beta):
    path = tmp_path / "sweep.csv"
    append_rows(path, synthetic_isoflop_rows(BUDGETS, alpha=alpha, beta=beta, noise=0.003, seed=1), COLUMNS)
    fit = scaling_fit(read_results(path))
    assert abs(fit["a"] - beta / (alpha + beta)) < TOLERANCE, fit["a"]
    assert abs(fit["b"] - alpha / (alpha + beta)) < TOLERANCE, fit["b"]
    assert abs(fit["a"] + fit["b"] - 1) < TOLERANCE  # C = 6ND: the exponents add up to one
    assert all(o["interior"] for o in fit["optima"])
    # the true optimum of L = E + A/N^a + B/D^b at C = 6ND, against the fitted one, per budget
    A, B = 406.4, 410.7
    for o in fit["optima"]:
        n_true = (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * (o["budget"] / 6) ** (beta / (alpha + beta))
        assert abs(math.log10(o["n_opt"] / n_true)) < 0.1, (o["n_opt"], n_true)
        assert abs(math.log10(o["ratio"] / (o["budget"] / 6 / n_true**2))) < 0.2


def test_fit_flags_a_minimum_outside_the_measured_sizes():
    rows = [r for r in synthetic_isoflop_rows(BUDGETS, n_per_budget=13) if r["depth"] >= 7]  # the big side only
    fit = scaling_fit(rows)
    assert not any(o["interior"] for o in fit["optima"])


def test_fit_needs_two_budgets_with_a_valley():
    rows = synthetic_isoflop_rows(BUDGETS[:1])
    with pytest.raises(ScalingError, match="at least two budgets"):
        scaling_fit(rows)
    downhill = [r | {"val_bpb": 3.0 - 0.05 * r["depth"] ** 2} for r in synthetic_isoflop_rows(BUDGETS[:2])]
    with pytest.raises(ScalingError, match="these results give 0"):
        scaling_fit(downhill)


def _curve_rows(ends: dict) -> list[dict]:
    "Curves L_d(F) = E_d + 2 (F / 1e6 d^2)^-1/4: bigger starts higher and ends lower; each from 1% of its end."
    floor = {1: 1.5, 2: 1.2, 3: 1.0}
    rows = []
    for depth, end in ends.items():
        for step, flops in enumerate(np.geomspace(end / 100, end, 25), start=1):
            rows.append({"run": f"d{depth}", "depth": depth, "step": step, "tokens": flops / 6e4, "flops": flops,
                         "val_bpb": floor[depth] + 2 * (flops / 1e6 / depth**2) ** -0.25})
        rows.append({"run": f"d{depth}", "depth": depth, "step": 0, "tokens": 0, "flops": 0, "val_bpb": 4.3})
    return rows


def test_crossing_check_flags_crossing_curves_and_passes_parallel_ones(tmp_path):
    parallel, crossing = tmp_path / "parallel_curves.csv", tmp_path / "crossing_curves.csv"
    append_rows(parallel, _curve_rows({1: 4e7, 2: 9e7, 3: 4e8}), CURVE_COLUMNS)
    append_rows(crossing, _curve_rows({1: 4e8, 2: 9e7, 3: 4e8}), CURVE_COLUMNS)  # d1 runs on past d2 and d3
    assert curve_crossings(read_curves(parallel)) == []
    found = curve_crossings(read_curves(crossing))
    assert {(c["a"], c["b"]) for c in found} == {(1, 2), (1, 3)}
    d1_d2 = next(c for c in found if c["b"] == 2)
    assert 4e7 < d1_d2["flops"] < 9e7  # the analytic crossing is at 5.8e7, between two evaluation points
    # a tolerance larger than the curves' differences sees no crossing
    assert curve_crossings(read_curves(crossing), tolerance=1.0) == []


def test_bad_results_files_are_refused_in_one_sentence(tmp_path):
    errors = []
    with pytest.raises(ScalingError) as missing:
        read_results(tmp_path / "none.csv")
    errors.append(str(missing.value))
    short = tmp_path / "short.csv"
    short.write_text("run,depth,val_bpb\nd1,1,2.0\n")
    with pytest.raises(ScalingError) as columns:
        read_results(short)
    errors.append(str(columns.value))
    assert "budget" in errors[-1] and "params_scaling" in errors[-1]
    garbled = tmp_path / "garbled.csv"
    append_rows(garbled, [{c: 1 for c in COLUMNS} | {"run": "d1", "val_bpb": "two"}], COLUMNS)
    with pytest.raises(ScalingError) as number:
        read_results(garbled)
    errors.append(str(number.value))
    with pytest.raises(ScalingError) as params:
        scaling_fit(synthetic_isoflop_rows(BUDGETS), params="params_everything")
    errors.append(str(params.value))
    for message in errors:
        assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message


@pytest.fixture(scope="module")
def tiny_sweep_flags():
    return scaling.ISOFLOP_SWEEPS["tiny"].train_flags


def test_sweep_trains_real_runs_and_resumes_from_its_csv(tmp_path, tokenizer, tiny_sweep_flags):
    results = tmp_path / "sweep.csv"
    sweep = Sweep([1], budgets=[2e9], train_flags=tiny_sweep_flags, vocab_size=2048)
    added = run_sweep(sweep, results, runs_dir=tmp_path / "runs", tokenizer_dir=tokenizer.folder)
    rows = read_results(results)
    assert [r["run"] for r in added] == [r["run"] for r in rows] == ["d1-C2e+09"]
    for row, budget in zip(rows, [2e9]):
        assert row["budget"] == budget and abs(row["flops"] / budget - 1) < 0.1  # whole steps: close to the budget
        assert row["params_scaling"] == row["params_matrices"] + row["params_lm_head"]
        assert row["params_total"] == sum(row[c] for c in scaling.PARAM_COLUMNS[:5])
        assert row["tokens"] == row["iterations"] * row["batch"] and 1 < row["val_bpb"] < 5
        assert math.isnan(row["core"]) and row["seconds"] > 0
    curves = read_curves(curves_path(results))
    assert list(curves) == [1] and len(curves[1][0]) == 1  # the run's final evaluation (step 0 left out)

    # the same sweep again trains nothing; a bigger one trains only the new run and keeps the old rows as they are
    assert pending_runs(results, sweep.runs()) == []
    assert run_sweep(sweep, results, runs_dir=tmp_path / "runs", tokenizer_dir=tokenizer.folder) == []
    before = results.read_text()
    bigger = Sweep([1], budgets=[2e9, 3e9], train_flags=tiny_sweep_flags, vocab_size=2048)
    assert [r.name for r in pending_runs(results, bigger.runs())] == ["d1-C3e+09"]
    added = run_sweep(bigger, results, runs_dir=tmp_path / "runs", tokenizer_dir=tokenizer.folder)
    assert [r["run"] for r in added] == ["d1-C3e+09"]
    assert results.read_text().startswith(before) and len(read_results(results)) == 2
    assert len(read_curves(curves_path(results))[1][0]) == 2


def test_a_failing_run_stops_the_sweep_with_its_exit_code_and_writes_no_row(tmp_path, tokenizer, tiny_sweep_flags):
    results = tmp_path / "sweep.csv"
    sweep = Sweep([1], budgets=[2e9], train_flags=[*tiny_sweep_flags, "--head-dim", "7"], vocab_size=2048)
    with pytest.raises(RuntimeError, match="exit code 2"):
        run_sweep(sweep, results, runs_dir=tmp_path / "runs", tokenizer_dir=tokenizer.folder)
    assert not results.exists()


def test_run_names_and_horizons():
    assert Run(3, budget=1e18).name == "d3-C1e+18" and Run(12, ratio=12).name == "d12-r12"
    assert Run(3, budget=2.5e11).horizon_flags()[-2:] == ["--target-flops", "2.5e+11"]
    assert "--num-iterations" in Run(3).horizon_flags()  # a preset's fixed step count must not win
    for sweeps in (scaling.ISOFLOP_SWEEPS, scaling.MINISERIES_SWEEPS):
        assert set(sweeps) == {"tiny", "cpu", "gpu1", "speedrun"}
    assert scaling.ISOFLOP_SWEEPS["gpu1"].budgets == [1e18, 2e18, 5e18, 1e19]
