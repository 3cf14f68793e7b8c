"""Summary tables from trial records, and the convergence definitions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tune_alr.experiment import Arm, Experiment
from tune_alr.presets import PRESETS, preset
from tune_alr.report import TrialRecord, epochs_to_stable, summarize, trials_frame

INF = math.inf


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ([1.0, 0.5, 0.3, 0.299, 0.2995], 3.0),  # later gains under 1%: stable at 0.3's report
        ([1.0, 0.5, 0.3, 0.25, 0.2], 5.0),  # still improving by >1% at the end
        ([1.0, 0.5, 0.6, 0.7], 2.0),  # over-fitting after the best counts as stable
        ([1.0], 1.0),
        ([], math.nan),
        ([float("nan"), 0.5, 0.5], 2.0),  # a non-finite report is ignored
    ],
)
def test_epochs_to_stable(losses: list[float], expected: float) -> None:
    epochs = [float(i + 1) for i in range(len(losses))]
    result = epochs_to_stable(epochs, losses)
    assert (math.isnan(result) and math.isnan(expected)) or result == expected


def _record(policy: str, seed: int, acc: float, status: str = "finished", **last) -> TrialRecord:
    results = [
        {"step": 10, "epoch": 1.0, "val_loss": 1.0, "val_acc": 0.5, "status": "running"},
        {"step": 20, "epoch": 2.0, "val_loss": 0.5, "val_acc": acc, "lr": 0.1,
         "wall_s": 3.0, "status": status, **last},
    ]  # fmt: skip
    config = {"task": "digits", "policy": policy, "seed": seed, "target": 0.9}
    return TrialRecord(path=Path(f"/x/{policy}{seed}"), config=config, results=results)


def test_summary_means_stds_and_time_to_target() -> None:
    records = [
        _record("a", 0, 0.90, steps_to_target=20, wall_s_to_target=3.0),
        _record("a", 1, 0.94, steps_to_target=20, wall_s_to_target=3.0),
        _record("b", 0, 0.80),
        _record("b", 1, 0.10, status="diverged"),
        TrialRecord(Path("/x/b2"), {"task": "digits", "policy": "b", "seed": 2}, [], "boom"),
    ]
    summary = summarize(trials_frame(records)).set_index("policy")
    assert summary.loc["a", "val_acc_mean"] == pytest.approx(0.92)
    assert summary.loc["a", "val_acc_std"] == pytest.approx(0.028284, rel=1e-4)
    assert summary.loc["a", "target_hits"] == 2 and summary.loc["a", "steps_to_target_median"] == 20
    b = summary.loc["b"]
    assert (b["seeds"], b["finished"], b["diverged"], b["failed"]) == (3, 1, 1, 1)
    assert b["target_hits"] == 0 and b["steps_to_target_median"] == INF  # misses count as inf
    assert b["val_acc_mean"] == pytest.approx(0.45)  # the failed trial has no accuracy


def test_an_arms_cpu_is_what_its_trials_ran_themselves() -> None:
    # A PBT member that exploited a donor at step 10: its cumulative counter carries the
    # donor's 5 CPU-s, its windows only its own 1 + 2.
    exploited = _record("a", 0, 0.9, **{"proc/cpu_s": 7.0, "proc/cpu_window_s": 2.0})
    exploited.results[0].update({"proc/cpu_s": 1.0, "proc/cpu_window_s": 1.0})
    older = _record("a", 1, 0.9, **{"proc/cpu_s": 4.0})  # written before the windows
    frame = trials_frame([exploited, older]).set_index("seed")
    assert frame.loc[0, "cpu_s"] == 7.0 and frame.loc[0, "cpu_s_run"] == 3.0
    assert frame.loc[1, "cpu_s_run"] == 4.0
    assert summarize(frame.reset_index()).loc[0, "cpu_s_total"] == 7.0


def test_the_driver_side_result_log_is_read_before_rays_result_json(tmp_path: Path) -> None:
    import json

    from tune_alr.report import RESULTS_FILE, load_trials

    for name, rows in (("whole", [10, 20, 30]), ("ray-only", [10, 20])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"task": "digits", "policy": "x"}))
        lines = [json.dumps({"step": s, "status": "running"}) for s in rows]
        (folder / "result.json").write_text("\n".join(lines[:2]) + "\n")  # cut short
        if name == "whole":
            (folder / RESULTS_FILE).write_text("\n".join(lines) + "\n")
    steps = {r.path.name: [x["step"] for x in r.results] for r in load_trials(tmp_path)}
    assert steps == {"whole": [10, 20, 30], "ray-only": [10, 20]}  # older folders still read


def test_markdown_rows_have_as_many_cells_as_the_header() -> None:
    from tune_alr.report import to_markdown

    records = [_record("a", 0, 0.9, steps_to_target=20), _record("a", 1, 0.8)]
    lines = to_markdown(summarize(trials_frame(records))).splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1
    # A miss is infinite (median of {20, inf}); records without resource figures show "-".
    # (the constructed records trained no step of their own and measured no CPU time)
    assert table[2].endswith("| never (1/2) | - | - | - | -, 0 |")


def test_presets_build_valid_experiments() -> None:
    plan1 = Experiment(name="p1", seeds=2, budget=0.05, **preset("plan1"))
    configs = plan1.trial_configs()
    assert len(configs) == 3 * 5 * 2
    assert {(c.optimizer, c.lr, c.batch_size, c.epochs) for c in configs} == {("adam", 0.01, 32, 1)}
    plan2 = Experiment(name="p2", seeds=1, **preset("plan2"))
    arms = {(c.task, c.label): c for c in plan2.trial_configs()}
    assert arms[("mnist", "meta")].optimizer == "sgd" and arms[("mnist", "meta")].lr == 1e-3
    assert arms[("imdb", "rmsprop-1e-3")].optimizer == "rmsprop"
    assert arms[("imdb", "sgd-1e-2")].task_params == {"layers": 2, "hidden": 128}
    assert arms[("mnist", "adam-1e-3")].task_params == {"model": "plan2"}
    assert {c.epochs for c in plan2.trial_configs()} == {50}
    # each plan's central comparison by default: feedback vs constant, meta vs SGD 1e-3
    assert plan1.baseline == "constant" and plan2.baseline == "sgd-1e-3"
    assert set(PRESETS) == {"plan1", "plan2"}
    with pytest.raises(ValueError, match="unknown preset 'plan3'; available: plan1, plan2"):
        preset("plan3")


def test_cli_preset_with_fewer_tasks_keeps_only_their_options() -> None:
    from tune_alr.cli import _run_fields, parser

    args = parser().parse_args(["run", "--preset", "plan2", "--tasks", "cifar10,mnist"])
    fields = _run_fields(args)
    assert fields["tasks"] == ["cifar10", "mnist"]
    assert fields["task_params"] == {"mnist": {"model": "plan2"}}
    Experiment(name="x", **fields).trial_configs()  # valid
    # --policies without the preset's reference arm drops it; --baseline names another
    args = parser().parse_args(["run", "--preset", "plan1", "--policies", "feedback,step"])
    assert "baseline" not in _run_fields(args)
    args = parser().parse_args(["run", "--preset", "plan1", "--baseline", "step"])
    assert _run_fields(args)["baseline"] == "step"


def test_arms_validate_before_ray() -> None:
    with pytest.raises(ValueError, match=r"policies has duplicates: \['x', 'x'\]"):
        Experiment(policies=[Arm("x", "constant"), Arm("x", "feedback")]).validate()
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'"):
        Experiment(policies=[Arm("x", "constant", optimizer="adagrad")]).validate()
    with pytest.raises(ValueError, match="budget must be a fraction in"):
        Experiment(budget=2.0).validate()
