"""Tuned baselines: hyperparameters re-applied over a checkpoint, a real PBT run, Optuna."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_loop import Recorder

from trainables.loop import load_checkpoint, train
from tune_alr import tracking, tuning

BASE = {"task": "digits", "policy": "feedback", "seed": 3, "max_steps": 60, "report_every": 20,
        "policy_params": {"interval": 10, "early_interval": None}}  # fmt: skip


def test_a_resume_under_a_perturbed_config_applies_the_new_lr_over_the_checkpoint(
    tmp_path: Path,
) -> None:
    first = Recorder(tmp_path)
    train({**BASE, "lr": 1e-3}, first)
    ckpt = first.checkpoints[0]
    assert ckpt is not None
    state = load_checkpoint(ckpt)
    factor = state.policy["factor"]
    assert factor != 1.0  # the policy moved: its state matters
    rest = Recorder()
    train({**BASE, "lr": 3e-3}, rest, resume=state)
    head = rest.metrics[0]
    assert head["reapplied"] == "lr"
    assert head["restored_lr"] == pytest.approx(1e-3 * factor)
    assert head["lr_trace"][0] == pytest.approx(3e-3 * factor)  # new base x donor factor
    # an ordinary restart (same config) re-applies nothing
    same = Recorder()
    train({**BASE, "lr": 1e-3}, same, resume=load_checkpoint(ckpt))
    assert "reapplied" not in same.metrics[0]
    assert same.metrics[0]["lr_trace"][0] == pytest.approx(1e-3 * factor)


def test_a_changed_policy_parameter_is_applied_and_the_rest_of_the_state_kept(
    tmp_path: Path,
) -> None:
    first = Recorder(tmp_path)
    train({**BASE, "lr": 1e-3}, first)
    assert first.checkpoints[0] is not None
    state = load_checkpoint(first.checkpoints[0])
    rest = Recorder()
    changed = {**BASE["policy_params"], "threshold": 0.05}  # type: ignore[dict-item]
    train({**BASE, "lr": 1e-3, "policy_params": changed}, rest, resume=state)
    assert rest.metrics[0]["reapplied"] == "policy_params.threshold"
    assert rest.metrics[0]["lr_trace"][0] == pytest.approx(1e-3 * state.policy["factor"])


def _results(folder: Path) -> list[dict[str, Any]]:
    from tune_alr.report import RESULTS_FILE

    # the driver's whole log of the trial (Ray's result.json can miss reports at a restore)
    return [json.loads(line) for line in (folder / RESULTS_FILE).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.heavy
def test_pbt_exploits_continue_with_the_donors_state_and_the_perturbed_lr(
    ray_session: None, tmp_path: Path
) -> None:
    trial = {"max_steps": 60, "report_every": 10,
             "policy_params": {"interval": 10, "early_interval": None}}  # fmt: skip
    search = tuning.Search(task="digits", policy="feedback", num_samples=2, trial=trial,
                           name="pbt", output=tmp_path / "out",
                           tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", verbose=0)  # fmt: skip
    found = tuning.population(search, interval=2, quantile=0.5, factors=(2.0, 0.5), synch=True)
    exploits = [json.loads(x) for x in (found.experiment_dir / "pbt_global.txt").read_text()
                .splitlines()]  # fmt: skip
    assert exploits, "PBT made no exploit"
    folders = {f.name.rsplit("_", 1)[-1]: f for f in found.experiment_dir.glob("digits_*")}
    results = {tid: _results(f) for tid, f in folders.items()}
    checked = 0
    for tid, rows in results.items():
        for row in rows:
            if "reapplied" not in row:
                continue
            new_lr = row["config"]["lr"]
            restored_at = row["lr_trace_start"] - 1  # the step of the checkpoint it restored
            # the donor: another member's report at that step, under a config that an
            # exploit logged as perturbed into this one (PBT's log names the pair)
            pairs = {(e[4]["lr"], e[5]["lr"]) for e in exploits}
            donor = next(
                r for other, rs in results.items() if other != tid for r in rs
                if r["step"] == restored_at and (r["config"]["lr"], new_lr) in pairs
            )  # fmt: skip
            old_lr = donor["config"]["lr"]
            assert new_lr != pytest.approx(old_lr)
            # the checkpoint held the donor's LR and policy state ...
            assert row["restored_lr"] == pytest.approx(donor["lr"])
            if not row["lr_trace"]:  # exploited after its last step: nothing left to run
                assert row["step"] == donor["step"]
                continue
            assert row["step"] == donor["step"] + 10
            assert row["wall_s"] > donor["wall_s"]  # the donor's training time carried on
            assert row["policy/checks"] == donor["policy/checks"] + 1  # its counter went on
            # ... and the first step after the exploit ran at the perturbed LR
            assert row["lr_trace"][0] == pytest.approx(donor["lr"] * new_lr / old_lr)
            checked += 1
    assert checked >= 1
    # the cost is every recorded report window, however members jumped between checkpoints
    assert found.cost_steps == sum(len(r["lr_trace"]) for rs in results.values() for r in rs)
    assert found.cost_s == pytest.approx(sum(r["window_s"] for rs in results.values() for r in rs))


@pytest.mark.slow
def test_a_small_optuna_search_finishes_with_a_best_config(
    ray_session: None, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    search = tuning.Search(task="digits", num_samples=4, trial={"max_steps": 40,
                           "report_every": 10}, name="opt", output=tmp_path / "out",
                           tracking_uri=uri, verbose=0, asha=True)  # fmt: skip
    found = tuning.optuna_search(search)
    assert found.method == "optuna-asha" and len(found.trials) == 4
    assert 1e-4 <= found.best_config["lr"] <= 1e-1
    assert found.best_metric == found.trials["best_val_acc"].max()
    assert math.isfinite(found.cost_s) and found.cost_s > 0
    assert found.cost_steps == found.trials["steps"].sum()  # no restores in a search
    runs = tracking._client(uri).search_runs(
        [tracking._client(uri).get_experiment_by_name("opt").experiment_id]
    )
    # a parent and 4 children: finished, or KILLED where ASHA stopped them early
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 5 and [r.info.status for r in parent] == ["FINISHED"]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)


def test_bad_search_settings_are_refused_before_ray() -> None:
    with pytest.raises(ValueError, match=r"lr_range must be 0 < low < high, got \(0.1, 0.01\)"):
        tuning.Search(lr_range=(0.1, 0.01)).base_config()
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2, got 1"):
        tuning.Search(num_samples=1).base_config()
    with pytest.raises(ValueError, match="unknown policy"):
        tuning.Search(policy="nope").base_config()
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        tuning.population(tuning.Search(), interval=0)
