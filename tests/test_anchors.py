"""The anchor optimizers (Schedule-Free, Prodigy, D-Adaptation, DoG) in the real loop."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from test_loop import Recorder
from torch import nn

from trainables import TrialConfig
from trainables.loop import load_checkpoint, train
from tune_alr import Arm, Experiment, optimizers

STEPS = 60


def _config(optimizer: str, **extra: object) -> dict[str, object]:
    return {"task": "digits", "policy": "constant", "optimizer": optimizer, "seed": 2,
            "max_steps": STEPS, "report_every": 20, **extra}  # fmt: skip


@pytest.mark.parametrize("name", optimizers.ANCHORS)
def test_each_anchor_trains_digits_and_records_its_step_size(name: str, tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    last = train(_config(name), rec)
    trace = [lr for m in rec.metrics for lr in m["lr_trace"]]
    assert last["status"] == "finished"
    assert len(trace) == STEPS  # one step size per optimizer step
    assert all(math.isfinite(v) and v > 0 for v in trace), trace[:5]
    assert math.isfinite(last["val_loss"]) and math.isfinite(last["test_acc"])
    assert rec.metrics[-1]["val_loss"] < rec.metrics[0]["val_loss"] or name == "dog"
    if name in ("prodigy", "dadapt-adam", "dog"):
        # The step size is the method's own estimate, which starts tiny and grows.
        assert trace[-1] > 10 * trace[0], (trace[0], trace[-1])
    else:
        # Schedule-Free with no warm-up steps at its published LR.
        assert trace == [optimizers.default_lr(name)] * STEPS


@pytest.mark.parametrize("name", ["sf-adamw", "dog", "prodigy"])
def test_an_anchor_run_resumes_identically(name: str, tmp_path: Path) -> None:
    """Schedule-Free's modes and DoG's averaged weights survive a checkpoint."""
    whole = Recorder(tmp_path / "a")
    train(_config(name), whole)
    first = Recorder(tmp_path / "b")
    stopped = TrialConfig.from_dict(_config(name))
    train(_config(name, max_steps=20), first)  # the same first 20 steps
    ckpt = first.checkpoints[0]
    assert ckpt is not None
    rest = Recorder(tmp_path / "c")
    train(stopped, rest, resume=load_checkpoint(ckpt))
    assert [m["val_loss"] for m in rest.metrics] == [m["val_loss"] for m in whole.metrics[1:]]
    assert [m["lr_trace"] for m in rest.metrics] == [m["lr_trace"] for m in whole.metrics[1:]]


def test_schedule_free_evaluates_its_averaged_weights_and_returns_to_train_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    run = optimizers.build("sf-adamw", model, lr=0.05)
    run.train_mode()
    for _ in range(20):
        loss = model(torch.randn(16, 4)).square().mean()
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
    y = [p.detach().clone() for p in model.parameters()]
    with run.eval_model() as evaluated:
        assert evaluated is model
        x = [p.detach().clone() for p in model.parameters()]
        assert run.optimizer.param_groups[0]["train_mode"] is False
    assert run.optimizer.param_groups[0]["train_mode"] is True
    assert any(not torch.equal(a, b) for a, b in zip(x, y, strict=True))  # x differs from y
    for a, b in zip(model.parameters(), y, strict=True):  # and training resumes from y
        torch.testing.assert_close(a.detach(), b)


def test_schedule_free_recomputes_batchnorm_statistics_at_the_evaluated_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    batches = [(torch.randn(32, 4) + 1.0,) for _ in range(5)]
    run = optimizers.build("sf-adamw", model, lr=0.05, bn_batches=lambda: iter(batches))
    run.train_mode()
    for (inputs,) in batches * 4:
        loss = model(inputs).square().mean()
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
    bn = model[1]
    with run.eval_model():
        # The cumulative mean of the first layer's outputs at x, over the given batches.
        with torch.no_grad():
            expected = torch.stack([model[0](b).mean(0) for (b,) in batches]).mean(0)
        assert bn.running_mean is not None
        torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1  # restored for training


def test_dog_evaluates_the_polynomial_average() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    run = optimizers.build("dog", model)
    for _ in range(10):
        loss = model(torch.randn(8, 3)).square().mean()
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.after_step()
    with run.eval_model() as averaged:
        assert averaged is not model
        assert not torch.equal(averaged.weight, model.weight)
    assert run.state_dict()["averager"]["t"] == 11


def test_an_anchor_without_lr_runs_at_its_published_default() -> None:
    assert TrialConfig.from_dict(_config("prodigy")).lr == 1.0
    assert TrialConfig.from_dict(_config("sf-adamw")).lr == 0.0025
    assert TrialConfig.from_dict(_config("sf-adamw", lr=0.01)).lr == 0.01
    assert TrialConfig.from_dict(_config("adam")).lr == 1e-3  # the task's default
    # an experiment's LR is for PyTorch's optimizers, not the anchors
    exp = Experiment(name="a", policies=["feedback", "prodigy", Arm("sf", "constant", "sf-adamw",
                     optimizer_params={"warmup_steps": 5})], lr=0.01, seeds=1)  # fmt: skip
    configs = {c.label: c for c in exp.trial_configs()}
    assert configs["feedback"].lr == 0.01
    assert (configs["prodigy"].optimizer, configs["prodigy"].lr) == ("prodigy", 1.0)
    assert configs["prodigy"].policy == "constant"
    assert configs["sf"].optimizer_params == {"warmup_steps": 5}


def test_unknown_optimizer_and_missing_package_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamm'; accepted: sgd, .*prodigy"):
        TrialConfig.from_dict(_config("adamm"))
    with pytest.raises(ValueError, match=r"unknown policy 'prodigyy'.*anchor optimizers: sf-adamw"):
        Experiment(name="a", policies=["constant", "prodigyy"]).validate()
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import now fails
    with pytest.raises(ValueError, match=r"needs the package 'prodigyopt'.*tune-alr\[anchors\]"):
        TrialConfig.from_dict(_config("prodigy"))
    with pytest.raises(ValueError, match="rejected its parameters"):
        train(_config("dog", optimizer_params={"momentum": 0.9}), Recorder())
