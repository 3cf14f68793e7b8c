"""The training loop on its own, with a list-appending ``report``."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from trainables import TrialConfig, tasks
from trainables.checkpoint import CHECKPOINT_FILE, TrainState
from trainables.loop import load_checkpoint, train


class Recorder:
    """A ``report`` that keeps every metrics dict and a copy of every checkpoint."""

    def __init__(self, keep: Path | None = None) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.checkpoints: list[Path | None] = []
        self.keep = keep

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.metrics.append(metrics)
        if checkpoint_dir is None or self.keep is None:
            self.checkpoints.append(None)
            return
        copy = self.keep / f"ckpt{len(self.metrics)}"
        shutil.copytree(checkpoint_dir, copy)
        self.checkpoints.append(copy)


CONFIG = {"task": "digits", "policy": "feedback", "seed": 1, "max_steps": 60, "report_every": 20,
          "policy_params": {"interval": 10, "early_interval": None}}  # fmt: skip


def test_digits_is_registered() -> None:
    assert "digits" in tasks.available()


def test_reports_carry_finite_metrics_and_every_lr(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    last = train(CONFIG, rec)
    assert [m["step"] for m in rec.metrics] == [20, 40, 60]
    for m in rec.metrics:
        for key in ("train_loss", "val_loss", "val_acc", "lr", "samples_per_s", "wall_s", "epoch"):
            assert math.isfinite(m[key]), key
        assert len(m["lr_trace"]) == 20
    assert [m["lr_trace_start"] for m in rec.metrics] == [1, 21, 41]
    assert last["status"] == "finished" and math.isfinite(last["test_acc"])
    assert rec.metrics[0]["status"] == "running"
    assert rec.metrics[-1]["val_loss"] < rec.metrics[0]["val_loss"]  # it learns
    assert all(c is not None for c in rec.checkpoints)
    # the policy's own state is reported, so a user can see why the LR moved
    assert rec.metrics[-1]["policy/checks"] == 6


def test_resume_continues_the_identical_run(tmp_path: Path) -> None:
    whole = Recorder(tmp_path / "a")
    (tmp_path / "a").mkdir()
    train(CONFIG, whole)
    first = Recorder(tmp_path / "b")
    (tmp_path / "b").mkdir()
    train({**CONFIG, "max_steps": 60}, first)
    state = load_checkpoint(first.checkpoints[0])  # after step 20
    assert state.step == 20
    resumed = Recorder()
    train(CONFIG, resumed, resume=state)
    assert [m["step"] for m in resumed.metrics] == [40, 60]
    for a, b in zip(whole.metrics[1:], resumed.metrics, strict=True):
        assert a["lr_trace"] == b["lr_trace"]
        assert a["val_loss"] == b["val_loss"]  # bit for bit on CPU
        assert a["lr"] == b["lr"]


# The keys a checkpoint has always held; the loop added the last six over time.
KEYS = ["model", "optimizer", "policy", "optimizer_run", "order_rng", "torch_rng", "cuda_rng",
        "python_rng", "numpy_rng", "step", "position", "permutation", "wall_s", "loop_s",
        "skipped", "best_val_acc", "reached", "policy_s", "initial_val_loss", "cpu_s",
        "config"]  # fmt: skip
ADDED_LATER = ["policy_s", "cpu_s", "loop_s", "initial_val_loss", "optimizer_run", "cuda_rng"]


def test_a_checkpoint_is_a_plain_dict_and_an_older_one_still_resumes(tmp_path: Path) -> None:
    whole = Recorder(tmp_path)
    train(CONFIG, whole)
    assert whole.checkpoints[0] is not None
    # torch.load alone reads it (no TrainState needed): a dict of the same keys as ever
    raw = torch.load(whole.checkpoints[0] / CHECKPOINT_FILE, map_location="cpu",
                     weights_only=False)  # fmt: skip
    assert type(raw) is dict and list(raw) == KEYS
    state = TrainState.load(whole.checkpoints[0])
    assert state.to_dict().keys() == raw.keys() and state.step == 20
    # A checkpoint written before the keys added over time: they take their defaults,
    # and the run continues identically (the initial validation loss only feeds the
    # divergence test, which this run is far from).
    old = tmp_path / "old"
    old.mkdir()
    torch.save({k: v for k, v in raw.items() if k not in ADDED_LATER}, old / CHECKPOINT_FILE)
    state = load_checkpoint(old)
    assert (state.policy_s, state.cpu_s, state.loop_s) == (0.0, 0.0, 0.0)
    assert (state.initial_val_loss, state.optimizer_run, state.cuda_rng) == (None, {}, None)
    resumed = Recorder()
    train(CONFIG, resumed, resume=state)
    assert [m["lr_trace"] for m in resumed.metrics] == [m["lr_trace"] for m in whole.metrics[1:]]
    assert [m["val_loss"] for m in resumed.metrics] == [m["val_loss"] for m in whole.metrics[1:]]
    # and a plain dict is accepted as resume, as torch.load returns it
    from_dict = Recorder()
    train(CONFIG, from_dict, resume=raw)
    assert [m["lr_trace"] for m in from_dict.metrics] == [m["lr_trace"] for m in whole.metrics[1:]]


def test_a_checkpoint_without_a_required_field_says_which(tmp_path: Path) -> None:
    torch.save({"step": 3}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="a checkpoint needs 'model', 'optimizer'") as err:
        load_checkpoint(tmp_path)
    assert "it has 'step'" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint\.pt in checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_absurd_lr_diverges_cleanly_without_a_checkpoint(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    last = train({"task": "digits", "policy": "constant", "optimizer": "sgd", "lr": 1e8,
                  "max_steps": 200, "report_every": 50, "max_bad_steps": 5}, rec)  # fmt: skip
    assert last["status"] == "diverged"
    assert rec.checkpoints[-1] is None  # no checkpoint of non-finite weights
    assert last["skipped_steps"] >= 5


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"task": "imagenet"}, "unknown task 'imagenet'; available:"),
        ({"policy": "magic"}, "unknown policy 'magic'; available:"),
        ({"optimizer": "adagrad"}, "unknown optimizer 'adagrad'; accepted: sgd, adam"),
        ({"lr": -0.1}, "lr must be a finite number > 0, got -0.1"),
        ({"lr": 0}, "lr must be a finite number > 0, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"epochs": -1}, "epochs must be an integer >= 1, got -1"),
        ({"seed": -3}, "seed must be an integer >= 0, got -3"),
        ({"colour": "red"}, "unknown trial setting(s) 'colour'"),
        ({"policy_params": {"interval": 0}}, "interval must be an integer >= 1, got 0"),
        ({"diverge_factor": 1.0}, "diverge_factor must be > 1 (or None), got 1.0"),
    ],
)
def test_bad_trial_config(change: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        TrialConfig.from_dict({**CONFIG, **change})
    assert fragment in str(err.value)


def test_task_defaults_fill_the_config() -> None:
    cfg = TrialConfig.from_dict({"task": "digits", "policy": "constant"})
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("adam", 1e-3, 32, 10)
