"""The bench: its protocol on constructed trials with known answers, and a real small run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tune_alr import bench, bench_report, tracking
from tune_alr.report import TrialRecord

SEEDS = 8  # enough pairs for a two-sided Wilcoxon p below 0.05 (0.0078 at best)


def _record(tmp: Path, label: str, seed: int, curve: list[float], step: int = 10) -> TrialRecord:
    """A trial that reported ``curve`` (val accuracies) every ``step`` steps, 0.1 s each."""
    results: list[dict[str, Any]] = []
    for i, acc in enumerate(curve, start=1):
        results.append({"step": i * step, "wall_s": 0.1 * i, "val_acc": acc, "val_loss": 1 - acc,
                        "epoch": i / len(curve), "lr": 1e-3})  # fmt: skip
    results[-1].update({"best_val_acc": max(curve), "status": "finished"})
    folder = tmp / f"{label}_{seed}_t{label}{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"task": "digits", "label": label, "policy": label, "seed": seed}
    return TrialRecord(path=folder, config=config, results=results)


def _bench() -> bench.Bench:
    return bench.Bench(tasks=["digits"], grid=(1e-3, 1e-2), policies=("fast", "same"),
                       anchors=("prodigy",))  # fmt: skip


def _records(tmp: Path) -> list[TrialRecord]:
    records = []
    for seed in range(SEEDS):
        wobble = 0.001 * seed
        records += [
            # the grid: 1e-2 is the best arm; its best accuracies' median is the target
            _record(tmp, "adam-0.001", seed, [0.5, 0.6, 0.7, 0.8]),
            _record(tmp, "adam-0.01", seed, [0.6, 0.8, 0.85, 0.9 + wobble]),
            # a clear winner: reaches the target at the first report, every seed
            _record(tmp, "fast", seed, [0.95, 0.95, 0.96, 0.97]),
            # a tie with the best grid arm, report for report
            _record(tmp, "same", seed, [0.6, 0.8, 0.85, 0.9 + wobble]),
            # an anchor that misses the target on odd seeds
            _record(tmp, "prodigy", seed, [0.7, 0.8, 0.9, 0.95] if seed % 2 else [0.5] * 4),
        ]
    return records


def test_target_is_what_the_reference_arm_reaches_on_every_seed(tmp_path: Path) -> None:
    trials, goal = bench.timed_trials(_records(tmp_path), _bench())
    target, best = goal["digits"]
    assert best == "adam-0.01"  # the best grid arm by median best accuracy
    assert target == pytest.approx(0.9)  # the lowest of its bests 0.900..0.907
    reference = trials[trials["policy"] == "adam-0.01"]
    assert (reference["steps_to_target"] == 40).all()  # it never misses its own target
    fast = trials[trials["policy"] == "fast"]
    assert (fast["steps_to_target"] == 10).all() and (fast["wall_s_to_target"] == 0.1).all()
    prodigy = trials[trials["policy"] == "prodigy"].set_index("seed")
    assert math.isinf(prodigy.loc[0, "steps_to_target"])  # a miss is infinitely slow
    assert prodigy.loc[1, "steps_to_target"] == 30
    assert set(trials["kind"]) == {"grid", "policy", "anchor"}


def test_a_named_baseline_is_the_reference(tmp_path: Path) -> None:
    named = dataclasses.replace(_bench(), baseline="adam-0.001")
    trials, goal = bench.timed_trials(_records(tmp_path), named)
    assert goal["digits"] == (pytest.approx(0.8), "adam-0.001")
    comp = bench.comparisons(trials, goal)
    assert set(comp["baseline"]) == {"adam-0.001", "prodigy"}
    with pytest.raises(ValueError, match="baseline 'nope' is not one of the bench's arms"):
        dataclasses.replace(_bench(), baseline="nope").arms()


def test_comparisons_find_the_winner_and_not_the_tie(tmp_path: Path) -> None:
    trials, goal = bench.timed_trials(_records(tmp_path), _bench())
    comp = bench.comparisons(trials, goal).set_index(["policy", "baseline"])
    assert set(comp.index) == {("fast", "adam-0.01"), ("fast", "prodigy"),
                               ("same", "adam-0.01"), ("same", "prodigy")}  # fmt: skip
    win = comp.loc[("fast", "adam-0.01")]
    # the reference hits the target at step 40 on every seed, the winner at step 10
    assert win["pairs"] == SEEDS and win["informative"] == SEEDS
    assert win["steps_speedup"] == pytest.approx(4.0) and win["steps_ci_low"] == 4.0
    assert win["steps_p_holm"] < 0.05 and win["acc_p_holm"] < 0.05
    tie = comp.loc[("same", "adam-0.01")]
    assert tie["steps_speedup"] == pytest.approx(1.0) and tie["steps_p"] == 1.0
    assert tie["acc_p"] == 1.0 and tie["acc_diff"] == 0.0
    # against an anchor that misses on half the seeds, the winner's speed-up is infinite
    assert math.isinf(comp.loc[("fast", "prodigy"), "steps_speedup"])


def test_default_seeds_suffice_for_significance_after_holm() -> None:
    from tune_alr.stats import min_p

    for b in (bench.Bench(), bench.Bench(tasks=["digits", "mnist"])):
        seeds = len(b.seed_list())
        assert (
            min_p(seeds) * b.comparison_count() < 0.05 <= min_p(seeds - 1) * (b.comparison_count())
        )
        assert b.power_note() is None
    few = bench.Bench(seeds=5)
    assert "no comparison can reach p < 0.05" in str(few.power_note())
    assert "10 seeds could" in str(few.power_note())


def test_the_report_has_the_tables_plots_and_profile(tmp_path: Path) -> None:
    records = _records(tmp_path / "trials")
    trials, goal = bench.timed_trials(records, _bench())
    table = bench.main_table(trials)
    fast = table.set_index("arm").loc["fast"]
    assert fast["hits"] == SEEDS and fast["final_val_acc_mean"] == pytest.approx(0.97)
    profile = bench.profiles(trials)
    assert profile.loc[1.0, "fast"] == 1.0  # the fastest on every problem
    assert profile["prodigy"].iloc[-1] == 0.5  # never solves half of them

    tuned = pd.DataFrame([{"task": "digits", "method": "optuna", "trials": 4, "best_lr": 0.01,
                           "best_val_acc": 0.9, "trials_reaching_target": 1, "cost_s": 12.5,
                           "cost_steps": 400}])  # fmt: skip
    comp = bench.comparisons(trials, goal)
    b = _bench()
    files = bench_report.write(
        b.name, b.workloads(), tmp_path / "out", trials, table, comp, goal, profile, tuned
    )
    page = files["report.html"].read_text()
    assert "data:image/png;base64," in page  # the profile plot, embedded
    assert "<td>fast</td>" in page and "Tuned baselines" in page
    md = files["bench.md"].read_text()
    assert "Target 90.00% validation accuracy (reference arm: adam-0.01)" in md
    assert "| fast | adam-0.01 | 8 (8 informative) | 4.00 [4.00, 4.00] | 0.00781 / 0.0312 *" in md
    assert "- commit: `" in md and "- torch: `" in md and "- date: `" in md  # provenance
    assert files["perf_profile.png"].stat().st_size > 1000


def test_bad_bench_settings_are_refused_before_ray() -> None:
    with pytest.raises(ValueError, match="unknown workload 'cifar'; accepted: digits"):
        bench.Bench(tasks=["cifar"]).experiment()
    with pytest.raises(ValueError, match="unknown anchor 'adam'; accepted: sf-adamw"):
        bench.Bench(anchors=["adam"]).experiment()
    with pytest.raises(ValueError, match="grid needs at least one LR"):
        bench.Bench(grid=()).experiment()
    with pytest.raises(ValueError, match=r"optuna must be 0 \(off\) or an integer >= 2, got 1"):
        bench.Bench(optuna=1).searches()
    with pytest.raises(ValueError, match="unknown policy 'fedback'"):
        bench.Bench(policies=["fedback"]).experiment().validate()


@pytest.mark.slow
def test_a_small_bench_runs_on_ray_and_logs_its_report(ray_session: None, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = bench.Bench(tasks=["digits"], seeds=2, budget=0.3, grid=(1e-3, 1e-2),
                       policies=("feedback",), anchors=("sf-adamw",), name="tiny",
                       output=tmp_path / "out", tracking_uri=uri, verbose=0)  # fmt: skip
    outcome = bench.run(spec)
    assert set(outcome.table["arm"]) == {"adam-0.001", "adam-0.01", "feedback", "sf-adamw"}
    assert len(outcome.trials) == 8 and (outcome.trials["status"] == "finished").all()
    assert set(outcome.comparisons["baseline"]) == {outcome.targets["digits"][1], "sf-adamw"}
    client = tracking._client(uri)
    artifacts = {a.path for a in client.list_artifacts(outcome.results.parent_run_id)}
    assert {"report.html", "bench.md", "perf_profile.png", "lr_digits.png"} <= artifacts
