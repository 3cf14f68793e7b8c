"""Ray Tune schedulers and searchers on experiments, and the stopper that reads policies."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

import tune_alr
from tune_alr import cli, scheduling, tracking
from tune_alr.experiment import Arm, Experiment
from tune_alr.stopper import PolicyStopper


@pytest.mark.parametrize(
    ("key", "spec", "expected"),
    [
        ("lr", "log:1e-4:1e-1", ("log", 1e-4, 1e-1, ())),
        ("feedback.interval", "int:10:200", ("int", 10, 200, ())),
        ("meta.max_step", "float:0.01:0.2", ("float", 0.01, 0.2, ())),
        ("optimizer", "choice:sgd,adam", ("choice", math.nan, math.nan, ("sgd", "adam"))),
    ],
)
def test_space_entries_parse(key: str, spec: str, expected: tuple[Any, ...]) -> None:
    d = scheduling.parse_dimension(key, spec)
    kind, low, high, choices = expected
    assert d.kind == kind and d.choices == choices
    assert (d.low == low or (math.isnan(d.low) and math.isnan(low))) and (
        d.high == high or (math.isnan(d.high) and math.isnan(high))
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scheduler": "bohb"}, "unknown scheduler 'bohb'; accepted: fifo, asha"),
        ({"search": "random"}, "unknown search 'random'; accepted: grid, optuna"),
        ({"scheduler": "asha", "scheduler_params": {"grace": 2}},
         "scheduler 'asha' has no option 'grace'; accepted: grace_period, reduction_factor"),
        ({"scheduler": "asha", "scheduler_params": {"grace_period": 0}},
         "grace_period must be a number > 0"),
        ({"scheduler": "pbt", "scheduler_params": {"synch": 1}},
         "scheduler option synch must be true or false, got 1"),
        ({"scheduler": "pbt", "trial": {"checkpoint_every": 3}},
         "pbt restores a member from the checkpoint of the report it ranked: it needs "
         "checkpoint_every 1, got 3"),
        ({"num_samples": 4}, "num_samples is the number of trials of a search"),
        ({"search": "optuna", "tasks": ["digits", "mnist"]}, "a search tunes one task"),
        ({"search": "optuna", "space": {"lr": "log:0:1"}}, "need LOW < HIGH and LOW > 0"),
        ({"search": "optuna", "space": {"batch": "int:1:2"}}, "space key 'batch' is not "
         "searchable"),
        ({"search": "optuna", "space": {"meta.max_step": "log:0.01:0.1"}},
         "names policy 'meta', which no arm runs"),
        ({"scheduler": "pbt", "space": {"feedback.interval": "int:5:50"}},
         "pbt mutates every member of the population"),
        ({"scheduler": "pbt", "search": "optuna"}, "pbt is a search of its own"),
        ({"scheduler": "pbt"}, "pbt copies a donor's whole config into the member it "
         "exploits, so every member must run the same policy; got constant, feedback"),
        ({"scheduler": "pb2", "policies": ["feedback"], "tasks": ["digits", "mnist"]},
         "every member must run the same task; got digits, mnist"),
        ({"scheduler": "pbt", "policies": [Arm("a", "feedback", "adam"),
                                           Arm("b", "feedback", "sgd")]},
         "every member must run the same optimizer; got adam, sgd"),
        ({"search": "optuna", "space": {"lr": "uniform:1:2"}}, "unknown kind 'uniform'"),
    ],
)  # fmt: skip
def test_bad_scheduling_settings_are_refused_before_ray(
    fields: dict[str, Any], message: str
) -> None:
    base = {"name": "x", "policies": ["constant", "feedback"], "seeds": 1}
    with pytest.raises(ValueError) as err:
        Experiment(**{**base, **fields}).validate()
    assert message in str(err.value)


class _Trial:
    """What Optuna's define-by-run captor offers, recording each suggestion."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.asked: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        self.asked[name] = self.label if name == "label" else choices[0]
        return self.asked[name]

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.asked[name] = low
        return low

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        self.asked[name] = high
        return high


def test_the_optuna_space_samples_a_policys_parameter_only_with_that_policy() -> None:
    exp = Experiment(name="x", policies=["constant", "feedback"], seeds=[3], search="optuna",
                     num_samples=4, space={"lr": "log:1e-3:1e-1",
                                           "feedback.interval": "int:10:200"})  # fmt: skip
    cells = exp.validate()
    space = scheduling.build_search(exp, cells, scheduling.check(exp))._space
    trial = _Trial("feedback")
    constants = space(trial)
    assert trial.asked == {"label": "feedback", "lr": 0.1, "policy_params/interval": 10}
    assert constants["policy"] == "feedback" and constants["seed"] == 3
    assert "lr" not in constants and "policy_params/interval" not in constants
    trial = _Trial("constant")
    space(trial)
    assert trial.asked == {"label": "constant", "lr": 0.1}  # no feedback parameter
    json.dumps(constants)  # plain values, as Ray Tune stores them


@pytest.mark.parametrize(
    ("results", "stopper", "reason"),
    [
        # the target, at the report that reaches it
        ([{"val_acc": 0.5}, {"val_acc": 0.96}], PolicyStopper(0.95), "target 0.95 reached"),
        ([{"val_acc": 0.5}, {"val_acc": 0.94}], PolicyStopper(0.95), None),
        # at chance (10 classes: 0.1) for 3 reports in a row
        ([{"val_acc": 0.1, "num_classes": 10}] * 3, PolicyStopper(chance_patience=3),
         "no progress: val_acc 0.1000 at chance (0.10) for 3 reports"),
        ([{"val_acc": 0.1, "num_classes": 10}, {"val_acc": 0.5, "num_classes": 10},
          {"val_acc": 0.1, "num_classes": 10}], PolicyStopper(chance_patience=2), None),
        # pinned at a bound while the loss got worse than its best of those reports
        ([{"val_acc": 0.5, "val_loss": v, "policy/at_bound": 1.0} for v in (1.0, 0.8, 0.9)],
         PolicyStopper(pinned_patience=3), "stayed at its bound for 3 reports"),
        ([{"val_acc": 0.5, "val_loss": v, "policy/at_bound": 1.0} for v in (1.0, 0.8, 0.7)],
         PolicyStopper(pinned_patience=3), None),
        ([{"val_acc": 0.5, "val_loss": v, "policy/at_bound": b}
          for v, b in ((1.0, 1.0), (0.8, 0.0), (0.9, 1.0))],
         PolicyStopper(pinned_patience=2), None),
        # a trial's own end is never a stop
        ([{"val_acc": 0.99, "status": "finished"}], PolicyStopper(0.95), None),
    ],
)  # fmt: skip
def test_stopper_rules(results: list[dict[str, Any]], stopper: PolicyStopper, reason: str | None
                       ) -> None:  # fmt: skip
    decisions = [stopper("t1", {"step": 10 * (i + 1), **r}) for i, r in enumerate(results)]
    assert decisions[:-1] == [False] * (len(results) - 1)
    assert decisions[-1] is (reason is not None)
    if reason is not None:
        assert reason in stopper.reasons["t1"]


def _runs(uri: str, name: str) -> list[Any]:
    client = tracking._client(uri)
    return list(client.search_runs([client.get_experiment_by_name(name).experiment_id]))


@pytest.mark.slow
def test_asha_over_an_optuna_search_stops_trials_and_says_so(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # The command at a smaller scale: 8 trials of up to 120 digits steps.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["run", "--name", "asha", "--policies", "constant,feedback,meta",
                     "--scheduler", "asha", "--scheduler-param", "grace_period=1",
                     "--search", "optuna", "--num-samples", "8", "--max-steps", "120",
                     "--report-every", "10", "--tracking-uri", uri, "--quiet"])  # fmt: skip
    assert code == 0
    trials = (tmp_path / "results/asha/trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 8
    stopped = [t for t in trials if ",stopped," in t]
    assert stopped, "ASHA stopped no trial early"
    assert all("stopped early by the asha scheduler" in t for t in stopped)
    summary = (tmp_path / "results/asha/summary.md").read_text()
    assert "## Trials stopped early" in summary and "stopped)" in summary
    children = [r for r in _runs(uri, "asha") if "mlflow.parentRunId" in r.data.tags]
    killed = [r for r in children if r.info.status == "KILLED"]
    assert len(killed) == len(stopped)
    for run in killed:
        assert run.data.tags["tune_alr.status"] == "stopped"
        assert run.data.tags["tune_alr.stop_reason"].startswith("stopped early by the asha")
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) + len(killed) == 8
    # the searched LRs and the chosen arms reached the trials
    assert len({r.data.params["lr"] for r in children}) == 8
    assert {r.data.params["label"] for r in children} <= {"constant", "feedback", "meta"}
    # equal compute: what each arm spent over all its trials, stopped ones included
    rows = (tmp_path / "results/asha/summary.csv").read_text().splitlines()
    head = rows[0].split(",")
    steps = sum(int(r.split(",")[head.index("steps_total")]) for r in rows[1:])
    assert steps == sum(
        len(tracking._client(uri).get_metric_history(r.info.run_id, "lr")) for r in children
    )


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("scheduler", ["hyperband", "median"])
def test_stopping_schedulers_stop_a_trial_early(
    scheduler: str, ray_session: None, tmp_path: Path
) -> None:
    params = {"hyperband": {"max_t": 9}, "median": {"grace_period": 1,
                                                    "min_samples_required": 2}}  # fmt: skip
    exp = Experiment(
        name=scheduler, policies=[Arm(f"adam-{lr:g}", "constant", "adam", lr)
                                  for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 0.3)],
        seeds=1, max_steps=90, report_every=10, scheduler=scheduler,
        scheduler_params=params[scheduler], output=tmp_path / "out",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", verbose=0,
    )  # fmt: skip
    results = tune_alr.run(exp)
    statuses = [r.status for r in results.records]
    assert "stopped" in statuses, statuses
    assert results.summary()["stopped"].sum() == statuses.count("stopped")


def test_the_leaderboard_on_constructed_trials(tmp_path: Path) -> None:
    import pandas as pd

    from tune_alr import bench, bench_report, leaderboard

    # a policy's one run, and a search that spent 4x as much for a little more accuracy
    policy = pd.DataFrame([{"task": "digits", "policy": "feedback", "seed": s,
                            "best_val_acc": 0.97 + 0.001 * s, "val_acc": 0.96,
                            "steps_run": 340, "cpu_s_run": 3.0} for s in range(3)])  # fmt: skip
    entries = leaderboard.policy_entries(policy, ["feedback"])
    for seed in range(3):
        search = pd.DataFrame([
            {"best_val_acc": math.nan, "val_acc": 0.95, "steps_run": 100, "cpu_s_run": 1.0},
            {"best_val_acc": 0.98, "val_acc": 0.98, "steps_run": 1260, "cpu_s_run": 11.0},
        ])  # fmt: skip
        entries.append(leaderboard.entry("digits", "asha", 4, seed, search))
    board = leaderboard.table(entries).set_index("method")
    assert board.loc["asha", "best_val_acc_median"] == 0.98
    assert board.loc["asha", "steps_median"] == 1360 and board.loc["asha", "budget"] == 4
    assert board.loc["policy: feedback", "best_val_acc_median"] == pytest.approx(0.971)
    assert board.loc["policy: feedback", "steps_median"] == 340
    # the report: a section, a CSV and a plot
    b = bench.Bench(tasks=["digits"], policies=("feedback",), anchors=(), grid=(1e-3,))
    files = bench_report.write(
        b.name, b.workloads(), tmp_path, pd.DataFrame(columns=["status"]), pd.DataFrame(),
        pd.DataFrame(), {}, pd.DataFrame(), None, leaderboard=board.reset_index(),
    )  # fmt: skip
    md = files["bench.md"].read_text()
    assert "## Accuracy against compute" in md
    assert "| digits | asha | 4x | 3 | 98.00 | 98.00 | 1360 | 12.0 |" in md
    assert files["leaderboard.png"].stat().st_size > 1000


def test_each_leaderboard_search_is_a_valid_budgeted_experiment() -> None:
    from tune_alr import bench, leaderboard
    from tune_alr.stopper import ComputeBudget

    b = bench.Bench(tasks=["digits"], policies=("feedback",), anchors=(), seeds=2)
    for method in leaderboard.METHODS:
        exp = leaderboard.search_experiment(b, "digits", method, 2, 1, policy_steps=340)
        exp.validate()
        assert isinstance(exp.stopper, ComputeBudget) and exp.stopper.steps == 680
        assert exp.seed_list == [1] and exp.tasks == ["digits"]
        assert exp.scheduler == {"optuna": "fifo", "asha": "asha"}.get(method, method)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("scheduler", ["pbt", "pb2"])
def test_population_schedulers_continue_the_policy_state_across_an_exploit(
    scheduler: str, ray_session: None, tmp_path: Path
) -> None:
    params = {"interval": 10, "early_interval": None}
    exp = Experiment(
        name=scheduler, seeds=1, max_steps=80, report_every=10, scheduler=scheduler,
        policies=[Arm(f"fb-{lr:g}", "feedback", "adam", lr, params=params)
                  for lr in (1e-4, 3e-3)],
        # synch: the members wait for each other at every perturbation, so that an
        # exploit happens whatever the start-up skew between two short trials
        scheduler_params={"perturbation_interval": 2, "quantile_fraction": 0.5, "synch": True},
        space={"lr": "log:1e-4:3e-2"}, output=tmp_path / "out",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", verbose=0,
    )  # fmt: skip
    results = tune_alr.run(exp)
    for record in results.records:
        _reports_are_contiguous(record.results)
    exploited = [r for rec in results.records for r in rec.results if "reapplied" in r]
    assert exploited, f"{scheduler} made no exploit"
    for row in exploited:
        assert "lr" in row["reapplied"] and math.isfinite(row["restored_lr"])
        if row["lr_trace"]:
            # the donor's policy went on: its check counter is the donor's plus this window
            assert row["policy/checks"] == row["step"] // 10
            # the first step after the exploit runs at the donor's step size, rescaled by
            # the perturbation of the base LR
            assert row["lr_trace"][0] != pytest.approx(row["restored_lr"])
    assert all(r.status in ("finished", "stopped") for r in results.records)


def _reports_are_contiguous(results: list[dict[str, Any]]) -> None:
    """Each report continues from the one before it (``lr_trace_start`` = its step + 1),
    except the first after an exploit (``reapplied``): no report of the trial was lost."""
    for before, after in itertools.pairwise(results):
        if "reapplied" not in after:
            assert after["lr_trace_start"] == before["step"] + 1, (before["step"], after["step"])


@pytest.mark.slow
@pytest.mark.heavy
def test_a_budgeted_population_ends_every_member_and_keeps_every_report(
    ray_session: None, tmp_path: Path
) -> None:
    # Four PBT members on two CPUs: PBT pauses a member at each perturbation while the
    # others catch up, and the compute budget ends the experiment with members running
    # and paused (Ray Tune then calls no on_trial_complete for them).
    from tune_alr.stopper import ComputeBudget

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = Experiment(
        name="budgeted", seeds=1, max_steps=100, report_every=10, scheduler="pbt",
        policies=[Arm(f"adam-{lr:g}", "constant", "adam", lr) for lr in (1e-4, 1e-3, 3e-3, 1e-2)],
        scheduler_params={"perturbation_interval": 2}, stopper=ComputeBudget(240),
        output=tmp_path / "out", tracking_uri=uri, verbose=0,
    )  # fmt: skip
    results = tune_alr.run(exp)
    statuses = [r.status for r in results.records]
    assert "incomplete" not in statuses and "stopped" in statuses, statuses
    # each member is counted under the arm it started as, whatever donors it copied
    assert sorted(r.config["label"] for r in results.records) == sorted(a.label for a in exp.arms)
    assert (results.summary()["seeds"] == 1).all()
    for record in results.records:
        if record.status == "stopped":
            assert "compute budget of 240 steps was spent" in str(record.stop_reason)
        _reports_are_contiguous(record.results)
    assert results.trials()["steps_run"].sum() >= 240
    children = [r for r in _runs(uri, "budgeted") if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status in ("FINISHED", "KILLED") for r in children)
    assert sum(r.info.status == "KILLED" for r in children) == statuses.count("stopped")


def test_the_stop_record_of_an_experiment_end_only_when_the_stopper_ended_it(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from tune_alr.report import STOP_FILE
    from tune_alr.stopper import ComputeBudget, StopRecorder

    def trial(name: str, status: str) -> Any:
        (tmp_path / name).mkdir()
        last = {"status": status, "step": 20, "training_iteration": 2}
        return SimpleNamespace(trial_id=name, last_result=last, path=str(tmp_path / name))

    budget = ComputeBudget(100)
    recorder = StopRecorder("pbt", budget)
    running, done = trial("running", "running"), trial("done", "finished")
    recorder.on_experiment_end([running, done])  # budget not spent: an interruption
    assert not list(tmp_path.glob(f"*/{STOP_FILE}"))
    budget.spent = 100
    recorder.on_experiment_end([running, done])
    assert json.loads((tmp_path / "running" / STOP_FILE).read_text()) == {
        "reason": "the experiment's compute budget of 100 steps was spent"
    }
    assert not (tmp_path / "done" / STOP_FILE).exists()
