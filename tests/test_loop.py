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
    # CPU: the cumulative counter carries the checkpoint's, the windows only this run's
    windows = [m["proc/cpu_window_s"] for m in resumed.metrics]
    assert all(w > 0 for w in windows)
    assert resumed.metrics[-1]["proc/cpu_s"] == pytest.approx(state.cpu_s + sum(windows))


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


# --- Checkpoint cadence -------------------------------------------------------------------

CADENCE = {**CONFIG, "max_steps": 130, "report_every": 10, "checkpoint_every": 3}


def test_every_kth_report_and_the_last_carry_a_checkpoint(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    train(CADENCE, rec)
    steps = [m["step"] for m in rec.metrics]
    assert steps == list(range(10, 131, 10))
    with_checkpoint = [s for s, c in zip(steps, rec.checkpoints, strict=True) if c is not None]
    assert with_checkpoint == [30, 60, 90, 120, 130]  # every 3rd report, and the last
    assert all(load_checkpoint(c).step == s for s, c in zip(steps, rec.checkpoints, strict=True)
               if c is not None)  # fmt: skip
    assert all(m["time/checkpoint_s"] == 0 for m, c in zip(rec.metrics, rec.checkpoints,
                                                           strict=True) if c is None)  # fmt: skip


@pytest.mark.parametrize("killed_after", [4, 5, 6])
def test_a_run_killed_after_report_n_replays_from_its_last_checkpoint_exactly(
    killed_after: int, tmp_path: Path
) -> None:
    """Cadence 3: a crash after report n resumes from the checkpoint of report 3 (n = 4, 5)
    or 6 (n = 6), repeats the reports after it, and every LR and validation loss is the
    uninterrupted run's, bit for bit."""
    whole = Recorder(tmp_path / "whole")
    (tmp_path / "whole").mkdir()
    train(CADENCE, whole)

    class Killed(Exception):
        pass

    crashed = Recorder(tmp_path / "crashed")
    (tmp_path / "crashed").mkdir()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        crashed(metrics, checkpoint_dir)
        if len(crashed.metrics) == killed_after:
            raise Killed

    with pytest.raises(Killed):
        train(CADENCE, report)
    last = [c for c in crashed.checkpoints if c is not None][-1]
    state = load_checkpoint(last)
    assert state.step == 30 * (killed_after // 3)
    resumed = Recorder()
    train(CADENCE, resumed, resume=state)
    replayed = [m["step"] for m in resumed.metrics if m["step"] <= 10 * killed_after]
    assert replayed == list(range(state.step + 10, 10 * killed_after + 1, 10))
    after = {m["step"]: m for m in resumed.metrics}
    for m in whole.metrics:
        if m["step"] > state.step:
            assert after[m["step"]]["lr_trace"] == m["lr_trace"], m["step"]
            assert after[m["step"]]["val_loss"] == m["val_loss"], m["step"]
    # the run as a whole: crashed reports, then the resumed ones from the checkpoint on
    lrs = [lr for m in crashed.metrics if m["step"] <= state.step for lr in m["lr_trace"]]
    lrs += [lr for m in resumed.metrics for lr in m["lr_trace"]]
    assert lrs == [lr for m in whole.metrics for lr in m["lr_trace"]]


def test_the_checkpoint_cadence_is_validated() -> None:
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
            TrialConfig.from_dict({**CONFIG, "checkpoint_every": bad})


# --- Evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def _evaluate_as_before(model: torch.nn.Module, split: Any) -> tuple[float, float]:
    """The loop's evaluation before the channels-last copy: the model itself, 512 a batch."""
    import torch.nn.functional as F

    model.eval()
    total, correct = 0.0, 0
    for start in range(0, len(split), 512):
        x = [t[start : start + 512] for t in split.inputs]
        y = split.labels[start : start + 512]
        logits = model(*x)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train()
    return total / len(split), correct / len(split)


def _trained(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for start in range(0, 256, 32):
        loss = F.cross_entropy(model(x[start : start + 32]), y[start : start + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("name", ["plan2", "plan1", "digits"])
def test_evaluation_gives_the_numbers_it_gave_before(name: str) -> None:
    from trainables.data import Split
    from trainables.loop import Evaluator
    from trainables.models import DigitsCNN, Plan1CNN, Plan2CNN

    torch.manual_seed(0)
    size = 8 if name == "digits" else 28
    model = {"plan2": lambda: Plan2CNN(1, 28, 10), "plan1": lambda: Plan1CNN(10),
             "digits": lambda: DigitsCNN(10)}[name]()  # fmt: skip
    x, y = torch.randn(1100, 1, size, size), torch.randint(0, 10, (1100,))
    split = Split((x,), y)
    _trained(model, x, y)
    evaluator = Evaluator()
    before = _evaluate_as_before(model, split)
    after = evaluator(model, split)
    assert after[0] == pytest.approx(before[0], rel=1e-5)  # the summation order differs
    assert after[1] == before[1]
    # the model itself is untouched: its layout, its mode, its autograd state
    assert model.training and all(p.is_contiguous() for p in model.parameters())
    assert all(p.grad is None or p.requires_grad for p in model.parameters())
    # the copy follows the model's weights from call to call
    _trained(model, x, y)
    assert evaluator(model, split)[0] == pytest.approx(_evaluate_as_before(model, split)[0],
                                                       rel=1e-5)  # fmt: skip
    model.eval()
    evaluator(model, split)
    assert not model.training  # its mode is restored, whatever it was


def test_text_batches_are_evaluated_by_the_model_itself() -> None:
    from trainables.data import Split
    from trainables.loop import Evaluator
    from trainables.models import TextLSTM

    torch.manual_seed(0)
    model = TextLSTM(50, 2, embed_dim=8, hidden=8)
    ids = torch.randint(1, 50, (600, 12))
    lengths = torch.randint(1, 13, (600,))
    split = Split((ids, lengths), torch.randint(0, 2, (600,)))
    evaluator = Evaluator()
    assert evaluator(model, split) == pytest.approx(_evaluate_as_before(model, split), rel=1e-6)
    assert len(evaluator._twins) == 0  # no channels-last copy for texts


def test_reports_say_where_the_time_went(tmp_path: Path) -> None:
    rec = Recorder()
    train({**CONFIG, "checkpoint_every": 2}, rec)
    first, rest = rec.metrics[0], rec.metrics[1:]
    for key in ("time/data_s", "time/model_s"):  # once per process
        assert first[key] >= 0 and all(key not in m for m in rest)
    phases = ("time/steps_s", "time/policy_s", "time/eval_s", "time/checkpoint_s",
              "time/report_s")  # fmt: skip
    for m in rec.metrics:
        assert all(m[k] >= 0 for k in phases)
        assert m["time/steps_s"] + m["time/policy_s"] <= m["window_s"]
    assert first["time/report_s"] == 0 and first["time/eval_s"] > 0  # the untrained model's
    assert rec.metrics[1]["time/checkpoint_s"] > 0 and first["time/checkpoint_s"] == 0
    last = rec.metrics[-1]
    accounted = sum(m[k] for m in rec.metrics for k in phases if k != "time/checkpoint_s")
    accounted += first["time/data_s"] + first["time/model_s"]
    accounted += sum(m["time/checkpoint_s"] for m in rec.metrics[:-1])
    assert accounted <= last["time/process_s"] <= accounted + 5.0  # config checks, setup
