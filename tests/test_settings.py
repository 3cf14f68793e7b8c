"""Settings resolution: every trial setting, given every supported way, reaches the trial.

The table below names, for each ``TrialConfig`` field, a value and the ways a user can
give it (an Experiment field, ``trial``, ``task_trial``, an Arm, the command line); the
first test fails when a field is added without a row. The effects of the values are
checked on the real loop (steps, first LR, optimizer class, clipping) and, through a
real Ray Tune run, in MLflow.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from trainables import loop
from trainables.config import TrialConfig
from tune_alr import cli
from tune_alr.experiment import Arm, Experiment

# field -> (value, the value the trial sees, ways). "exp": Experiment(field=value);
# "trial": Experiment(trial={field: value}); "task": task_trial; "arm": an Arm's own;
# "cli": a flag or --set. Grid fields (task, policy, seed, label) have their own ways.
CASES: dict[str, tuple[Any, Any, tuple[str, ...]]] = {
    "optimizer": ("sgd", "sgd", ("exp", "trial", "task", "arm", "cli")),
    "lr": (0.05, 0.05, ("exp", "trial", "task", "arm", "cli")),
    "batch_size": (16, 16, ("exp", "trial", "task", "cli")),
    "epochs": (3, 3, ("exp", "trial", "task", "cli")),
    "max_steps": (7, 7, ("exp", "trial", "task", "cli")),
    "report_every": (5, 5, ("exp", "trial", "task", "cli")),
    "checkpoint_every": (3, 3, ("trial", "task", "cli")),
    "policy_params": ({"interval": 7}, {"interval": 7}, ("exp", "arm", "cli")),
    "optimizer_params": (
        {"weight_decay": 1e-2},
        {"weight_decay": 1e-2},
        ("trial", "task", "arm", "cli"),
    ),
    "clip_grad": (0.5, 0.5, ("trial", "task", "cli")),
    "probe_size": (64, 64, ("trial", "task", "cli")),
    "data_seed": (3, 3, ("trial", "task", "cli")),
    "limit_train": (100, 100, ("trial", "task", "cli")),
    "threads": (1, 1, ("trial", "task", "cli")),
    "max_bad_steps": (5, 5, ("trial", "task", "cli")),
    "diverge_factor": (3.0, 3.0, ("trial", "task", "cli")),
    "task_params": ({"model": "plan2"}, {"model": "plan2"}, ("exp", "cli")),
    "data_dir": ("<tmp>", "<tmp>", ("trial", "task", "cli")),
    "budget": (0.5, 0.5, ("exp", "cli")),
    "val_size": (300, 300, ("trial", "task", "cli")),
    "test_size": (200, 200, ("trial", "task", "cli")),
    "target": (0.9, 0.9, ("exp", "trial", "task", "cli")),
    "profile": ("edge", "<edge>", ("exp", "cli")),
    "device": ("cpu", "cpu", ("trial", "task", "cli")),
    "imports": (["json"], ("json",), ("trial", "task", "cli")),
    "import_paths": (["<tmp>"], ("<tmp>",), ("trial", "task", "cli")),
}
GRID = {"task", "policy", "seed", "label"}
#: Flags of ``tune-alr run`` for the fields that have one (the rest go through --set).
FLAGS = {
    "optimizer": "--optimizer", "lr": "--lr", "batch_size": "--batch-size",
    "epochs": "--epochs", "max_steps": "--max-steps", "report_every": "--report-every",
    "target": "--target", "budget": "--budget", "profile": "--profile",
    "data_dir": "--data-dir", "limit_train": "--limit-train",
}  # fmt: skip


def test_every_trial_field_has_a_row() -> None:
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    assert fields == set(CASES) | GRID


def _cli_args(field: str, value: Any, task: str, policy: str) -> list[str]:
    import json

    args = ["run", "--tasks", task, "--policies", policy, "--seeds", "1"]
    if field == "policy_params":
        return [*args, "--policy-param", f"{policy}.interval=7"]
    if field == "task_params":
        return [*args, "--task-param", f"{task}.model=plan2"]
    if field == "imports":
        return [*args, "--import", value[0]]
    if field == "import_paths":
        return [*args, "--set", f"import_paths={json.dumps(value)}"]
    if field in FLAGS:
        return [*args, FLAGS[field], str(value)]
    return [*args, "--set", f"{field}={json.dumps(value)}"]


def _experiment(field: str, value: Any, way: str, tmp_path: Path) -> Experiment:
    task = "mnist" if field == "task_params" else "digits"
    policy = "feedback"
    if way == "cli":
        args = cli.parser().parse_args(_cli_args(field, value, task, policy))
        exp: Experiment = cli._experiment(args, **cli._run_fields(args))  # as `main` builds it
        return exp
    base: dict[str, Any] = {"name": "x", "tasks": [task], "seeds": 1, "output": tmp_path / "o"}
    if way == "exp":
        if field == "policy_params":
            return Experiment(**base, policies=[policy], policy_params={policy: value})
        if field == "task_params":
            return Experiment(**base, policies=[policy], task_params={task: value})
        return Experiment(**base, policies=[policy], **{field: value})
    if way == "trial":
        return Experiment(**base, policies=[policy], trial={field: value})
    if way == "task":
        return Experiment(**base, policies=[policy], task_trial={task: {field: value}})
    assert way == "arm"
    arm = {"policy_params": "params"}.get(field, field)
    return Experiment(**base, policies=[Arm("mine", policy, **{arm: value})])


@pytest.mark.parametrize(
    ("field", "way"), [(f, w) for f, (_, _, ways) in CASES.items() for w in ways]
)
def test_a_value_given_each_way_reaches_the_trial(
    field: str, way: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNE_ALR_DATA_DIR", raising=False)
    value, seen, _ = CASES[field]
    if value == "<tmp>":
        value = seen = str(tmp_path)
    elif value == ["<tmp>"]:
        value, seen = [str(tmp_path)], (str(tmp_path),)
    exp = _experiment(field, value, way, tmp_path)
    (config,) = exp.trial_configs()
    got = getattr(config, field)
    if seen == "<edge>":
        assert got["name"] == "edge" and got["memory_mb"] == 1024
    elif field == "epochs" and way != "cli":
        assert got == value
    else:
        assert got == seen, f"{field} via {way}: {got!r} != {seen!r}"
    # the complete settings travel: nothing is left for the trial to fill in
    (cell,) = exp.cells()
    assert set(cell.config(0)) == {f.name for f in dataclasses.fields(TrialConfig)}


def test_the_grid_fields_reach_the_trial(tmp_path: Path) -> None:
    exp = Experiment(name="x", tasks=["digits"], seeds=[4, 9],
                     policies=["cyclic", Arm("slow", "constant", lr=1e-4)])  # fmt: skip
    configs = exp.trial_configs()
    assert [(c.task, c.policy, c.label, c.seed) for c in configs] == [
        ("digits", "cyclic", "cyclic", 4), ("digits", "cyclic", "cyclic", 9),
        ("digits", "constant", "slow", 4), ("digits", "constant", "slow", 9),
    ]  # fmt: skip
    assert {c.lr for c in configs if c.label == "slow"} == {1e-4}


def test_budget_scales_the_resolved_epochs_last() -> None:
    exp = Experiment(name="x", tasks=["digits"], policies=["constant"], seeds=1,
                     epochs=8, budget=0.25)  # fmt: skip
    (config,) = exp.trial_configs()
    assert config.epochs == 2 and config.budget == 0.25
    # from the task's default (10) when no epochs are given
    (config,) = dataclasses.replace(exp, epochs=None).trial_configs()
    assert config.epochs == 2  # round(10 * 0.25) = 2 (banker's rounding of 2.5)


def test_none_is_a_value_no_clipping_on_a_task_that_clips_by_default() -> None:
    exp = Experiment(name="x", tasks=["imdb"], policies=["constant"], seeds=1,
                     trial={"clip_grad": None})  # fmt: skip
    (config,) = exp.trial_configs()
    assert config.clip_grad is None
    (default,) = dataclasses.replace(exp, trial={}).trial_configs()
    assert default.clip_grad == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.1, "trial": {"lr": 0.2}},
         "lr is given twice with different values: Experiment.lr (--lr) = 0.1 and trial['lr']"),
        ({"epochs": 2, "trial": {"epochs": 3}}, "epochs is given twice"),
        ({"batch_size": 16, "trial": {"batch_size": 64}}, "batch_size is given twice"),
        ({"policies": [Arm("a", "constant", lr=0.1)], "lr": 0.01},
         "lr = 0.01 from Experiment.lr (--lr) would be ignored: every trial takes lr from "
         "elsewhere (arm 'a' lr)"),
        ({"policies": [Arm("a", "constant", optimizer="sgd")], "optimizer": "adam"},
         "optimizer = 'adam' from Experiment.optimizer (--optimizer) would be ignored"),
        ({"policies": ["prodigy"], "lr": 0.01}, "would be ignored: every trial takes lr from "
         "elsewhere (prodigy default)"),
        ({"policies": [Arm("a", "feedback", params={"interval": 3})],
          "policy_params": {"feedback": {"interval": 5}}},
         "policy_params.interval = 5 from policy_params['feedback'] key 'interval' would be "
         "ignored"),
        ({"task_trial": {"digits": {"lr": 0.3}}, "policies": [Arm("a", "constant", lr=0.2)]},
         "lr is given twice with different values: task_trial['digits']['lr'] = 0.3 and "
         "arm 'a' lr = 0.2"),
        ({"trial": {"task_params": {"x": 1}}}, "give it as task_params={task: {...}}"),
        ({"trial": {"policy_params": {"x": 1}}}, "give it as policy_params={policy: {...}}"),
        ({"trial": {"seed": 3}}, "sets 'seed', which the grid sets: use seeds="),
        ({"trial": {"lr": None}}, "lr must be a finite number > 0, got None"),
        ({"trial": {"colour": "red"}}, "unknown trial setting 'colour'"),
    ],
)  # fmt: skip
def test_a_setting_that_would_be_ignored_or_given_twice_is_refused(
    kwargs: dict[str, Any], message: str
) -> None:
    fields = {"name": "x", "tasks": ["digits"], "seeds": 1, **kwargs}
    with pytest.raises(ValueError) as err:
        Experiment(**fields).validate()
    assert message in str(err.value)


def test_policy_params_reach_arms_of_that_policy_and_merge_with_their_own() -> None:
    exp = Experiment(
        name="x", tasks=["digits"], seeds=1,
        policies=["feedback", Arm("fb-fast", "feedback", params={"interval": 5})],
        policy_params={"feedback": {"interval": 50, "factor": 0.2}},
    )  # fmt: skip
    by_label = {c.label: c.policy_params for c in exp.trial_configs()}
    assert by_label == {
        "feedback": {"interval": 50, "factor": 0.2},
        "fb-fast": {"interval": 5, "factor": 0.2},
    }


def test_an_anchor_named_by_an_arm_keeps_its_lr_the_experiment_choosing_it_does_not() -> None:
    both = Experiment(name="x", tasks=["digits"], seeds=1, lr=0.01,
                      policies=["constant", "prodigy"])  # fmt: skip
    lrs = {c.label: (c.optimizer, c.lr) for c in both.trial_configs()}
    assert lrs == {"constant": ("adam", 0.01), "prodigy": ("prodigy", 1.0)}
    chosen = Experiment(name="x", tasks=["digits"], seeds=1, policies=["constant"],
                        optimizer="prodigy", lr=0.5)  # fmt: skip
    assert [(c.optimizer, c.lr) for c in chosen.trial_configs()] == [("prodigy", 0.5)]


def test_cli_booleans_are_parsed_strictly() -> None:
    args = cli.parser().parse_args(
        ["run", "--policy-param", "feedback.guard=False", "--policy-param",
         "feedback.accelerate=no", "--set", "clip_grad=null"]
    )  # fmt: skip
    fields = cli._run_fields(args)
    assert fields["policy_params"] == {"feedback": {"guard": False, "accelerate": False}}
    assert fields["trial"] == {"clip_grad": None}
    feedback = next(c for c in Experiment(name="x", **fields).trial_configs()
                    if c.policy == "feedback")  # fmt: skip
    from tune_alr.policies import build

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    policy = build("feedback", opt, **feedback.policy_params)
    assert policy.guard is False and policy.accelerate is False  # type: ignore[attr-defined]


# -- effects on the real loop -------------------------------------------------------------


def _train(config: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    reports: list[dict[str, Any]] = []
    states: list[Any] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        reports.append(metrics)
        if checkpoint_dir is not None:
            states.append(loop.load_checkpoint(checkpoint_dir))

    loop.train(config, report)
    return reports, states


def _resolved(**fields: Any) -> dict[str, Any]:
    exp = Experiment(name="x", tasks=["digits"], seeds=1, **fields)
    (config,) = exp.trial_configs()
    return config.to_dict()


def test_lr_epochs_and_optimizer_from_trial_have_their_effect() -> None:
    # The bug this guards: trial={"lr": ...} ran Adam at 1e-3 for the task's epochs.
    trial = {"lr": 0.05, "epochs": 1, "optimizer": "sgd", "report_every": 34}
    config = _resolved(policies=["constant"], trial=trial)
    reports, states = _train(config)
    assert reports[0]["lr_trace"][0] == 0.05
    assert reports[-1]["step"] == math.ceil(1078 / 32)  # one epoch of digits' training rows
    group = states[-1].optimizer["param_groups"][0]
    assert "momentum" in group and "betas" not in group  # SGD's param group, not Adam's


def test_batch_size_report_every_and_optimizer_params_have_their_effect() -> None:
    config = _resolved(policies=[Arm("a", "constant", optimizer_params={"weight_decay": 0.01})],
                       batch_size=64, report_every=4, max_steps=8)  # fmt: skip
    reports, states = _train(config)
    assert [r["step"] for r in reports] == [4, 8]
    assert reports[0]["epoch"] == pytest.approx(4 / math.ceil(1078 / 64))
    assert states[-1].optimizer["param_groups"][0]["weight_decay"] == 0.01


def test_policy_params_and_clip_grad_have_their_effect() -> None:
    config = _resolved(policies=["feedback"], max_steps=20, report_every=20,
                       policy_params={"feedback": {"interval": 5, "early_interval": None,
                                                   "warmup_steps": 0}},
                       trial={"clip_grad": 1e-9})  # fmt: skip
    reports, states = _train(config)
    assert states[-1].policy["interval"] == 5 and reports[-1]["policy/checks"] == 4
    unclipped, _ = _train({**config, "clip_grad": None})
    # a gradient clipped to norm 1e-9 barely moves the weights; an unclipped one does
    assert reports[-1]["train_loss"] > unclipped[-1]["train_loss"] + 0.05


@pytest.mark.slow
def test_settings_from_trial_reach_a_real_ray_trial_and_mlflow(
    ray_session: None, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    import tune_alr

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = Experiment(name="reach", tasks=["digits"], policies=["constant"], seeds=1,
                     trial={"lr": 0.05, "epochs": 1, "optimizer": "sgd"}, report_every=17,
                     output=tmp_path / "out", tracking_uri=uri, verbose=0)  # fmt: skip
    results = tune_alr.run(exp)
    (record,) = results.records
    assert record.config["lr"] == 0.05 and record.config["optimizer"] == "sgd"
    assert record.results[-1]["step"] == math.ceil(1078 / 32)
    client = MlflowClient(uri)
    (child,) = [r for r in client.search_runs([client.get_experiment_by_name("reach")
                                               .experiment_id])
                if r.data.tags.get("mlflow.parentRunId")]  # fmt: skip
    history = sorted(client.get_metric_history(child.info.run_id, "lr"), key=lambda m: m.step)
    assert history[0].step == 1 and history[0].value == 0.05
    assert len(history) == math.ceil(1078 / 32)
    assert child.data.params["optimizer"] == "sgd" and child.data.params["epochs"] == "1"


def test_a_relative_controller_path_reaches_the_trial_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trial runs in its own working directory: a relative path would lead nowhere there.
    from importlib import resources

    shipped = resources.files("tune_alr.policies") / "controllers" / "meta-trained.json"
    (tmp_path / "mine.json").write_text(shipped.read_text())
    monkeypatch.chdir(tmp_path)
    config = _resolved(policies=["meta"], policy_params={"meta": {"controller": "mine.json"}})
    assert config["policy_params"]["controller"] == str(tmp_path / "mine.json")
    for name in ("scratch", "meta-trained"):
        config = _resolved(policies=["meta"], policy_params={"meta": {"controller": name}})
        assert config["policy_params"]["controller"] == name


def test_checking_settings_builds_every_policy_without_importing_dynamo() -> None:
    """The driver checks every trial's settings before Ray starts; a torch optimizer's
    first ``add_param_group`` would import ``torch._dynamo`` there (1.4 s), so the check
    builds the policies on an optimizer that does not (a fresh process: this one has)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from trainables.config import TrialConfig\n"
        "from tune_alr.policies import available\n"
        "for name in available():\n"
        "    TrialConfig.from_dict({'task': 'digits', 'policy': name})\n"
        "try:\n"
        "    TrialConfig.from_dict({'task': 'digits', 'policy': 'meta',\n"
        "                           'policy_params': {'meta_lr': -1}})\n"
        "except ValueError as err:\n"
        "    print('refused:', err)\n"
        "print('dynamo imported:', 'torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    assert "refused: meta_lr must be a finite number > 0, got -1." in done.stdout
    assert "dynamo imported: False" in done.stdout


def test_the_checking_optimizer_holds_one_group_and_never_steps() -> None:
    from trainables.config import _CheckingOptimizer

    opt = _CheckingOptimizer()
    assert isinstance(opt, torch.optim.Optimizer)
    ((group),) = opt.param_groups
    assert group["lr"] == 1.0 and len(group["params"]) == 1
    with pytest.raises(NotImplementedError):
        opt.step()
