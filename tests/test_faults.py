"""Faults injected into real runs: a trial worker killed, the driver killed and resumed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import tune_alr
from trainables import loop
from tune_alr.experiment import Experiment
from tune_alr.report import load_trials

pytestmark = pytest.mark.slow


def _lines(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # being written
    return out


def _mlflow_children(uri: str, name: str) -> tuple[Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents + children


def _assert_lr_history_is_whole(client: Any, run_id: str, steps: int) -> None:
    history = client.get_metric_history(run_id, "lr")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # no gap, no repeat


@pytest.mark.heavy
def test_a_killed_trial_worker_resumes_exactly(ray_session: None, tmp_path: Path) -> None:
    exp = Experiment(
        name="trialkill",
        policies=["feedback"],
        seeds=1,
        report_every=25,  # digits' 340 steps: 14 reports, each with a checkpoint
        trial={"threads": 1},  # the same arithmetic in the Ray worker and in this process
        output=tmp_path / "out",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        verbose=0,
    )
    killed: list[int] = []

    def kill_worker_mid_run() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for result in (tmp_path / "out/ray/trialkill").glob("*/result.json"):
                rows = _lines(result)
                if rows and rows[-1]["step"] >= 200:
                    os.kill(rows[-1]["pid"], signal.SIGKILL)
                    killed.append(rows[-1]["pid"])
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_worker_mid_run, daemon=True)
    watcher.start()
    results = tune_alr.run(exp)
    watcher.join(timeout=5)
    assert killed, "the trial finished before the watcher could kill it"

    (record,) = results.records
    assert record.status == "finished"
    pids = {r["pid"] for r in record.results}
    assert killed[0] in pids and len(pids) == 2  # it ran in a second worker after the kill

    # The same trial, uninterrupted, in this process.
    reports: list[dict[str, Any]] = []
    loop.train(exp.trial_configs()[0], lambda m, _: reports.append(m))
    expected_lr = [lr for r in reports for lr in r["lr_trace"]]
    steps = reports[-1]["step"]
    assert len(expected_lr) == steps > 250  # the kill came after step 200: mid-run
    steps_seen, lrs = record.lr_path()
    assert steps_seen == list(range(1, steps + 1))
    assert lrs == expected_lr  # bit for bit, across the restart
    after_restart = {r["step"]: r["val_loss"] for r in record.results}
    assert after_restart == {r["step"]: r["val_loss"] for r in reports}

    client, runs = _mlflow_children(exp.uri, "trialkill")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    _assert_lr_history_is_whole(client, children[0].info.run_id, steps)


def _checkpoints(trial_dir: Path) -> list[Path]:
    """The trial's ``checkpoint_<n>`` folders on disk, newest (largest n) first."""
    return sorted(trial_dir.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]),
                  reverse=True)  # fmt: skip


def _sabotage_newest_two(trial_dir: Path) -> int:
    """Truncate the newest checkpoint's file and delete the next one's; returns the step of
    the third newest, the one the trial must fall back to.

    The worker is stopped, so no checkpoint is added meanwhile. Ray hands a restarted trial
    the newest checkpoint it has registered: the newest on disk, or the one before (a
    checkpoint is registered after its result is logged, in a round trip to the worker
    that the stop may have cut short; and the stop may come while the worker copies a
    next one, not yet registered either). Spoiling both makes the fallback deterministic.
    """
    newest, second, third = _checkpoints(trial_dir)[:3]
    newest_file = newest / loop.CHECKPOINT_FILE
    if newest_file.is_file():  # not yet there if the stop came mid-copy: as good as spoiled
        os.truncate(newest_file, newest_file.stat().st_size // 2)
    (second / loop.CHECKPOINT_FILE).unlink(missing_ok=True)
    return loop.load_checkpoint(third).step


@pytest.mark.heavy
def test_a_spoiled_newest_checkpoint_falls_back_to_an_older_one(
    ray_session: None, tmp_path: Path
) -> None:
    """The worker is killed after its newest checkpoint was truncated (and the one before
    lost its file): the restart resumes from the newest intact checkpoint and the LR path
    is the uninterrupted run's, bit for bit."""
    exp = Experiment(
        name="spoiled",
        policies=["feedback"],
        seeds=1,
        report_every=25,  # digits' 340 steps: 14 reports, each with a checkpoint
        trial={"threads": 1},
        output=tmp_path / "out",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        verbose=0,
    )
    killed: list[int] = []
    fallback_step: list[int] = []

    def spoil_and_kill() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for result in (tmp_path / "out/ray/spoiled").glob("*/result.json"):
                rows = _lines(result)
                if rows and rows[-1]["step"] >= 200:
                    pid = rows[-1]["pid"]
                    os.kill(pid, signal.SIGSTOP)  # no report while its checkpoints are cut
                    try:
                        fallback_step.append(_sabotage_newest_two(result.parent))
                    finally:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=spoil_and_kill, daemon=True)
    watcher.start()
    results = tune_alr.run(exp)
    watcher.join(timeout=5)
    assert killed and fallback_step, "the trial finished before the watcher could spoil it"

    (record,) = results.records
    assert record.status == "finished"
    restarted = [r for r in record.results if r["pid"] != killed[0]]
    assert restarted and len({r["pid"] for r in restarted}) == 1
    # The restart resumed from the newest checkpoint that loads, not from scratch.
    assert restarted[0]["lr_trace_start"] == fallback_step[0] + 1 > 100

    reports: list[dict[str, Any]] = []
    loop.train(exp.trial_configs()[0], lambda m, _: reports.append(m))
    expected_lr = [lr for r in reports for lr in r["lr_trace"]]
    steps, lrs = record.lr_path()
    assert steps == list(range(1, reports[-1]["step"] + 1))
    assert lrs == expected_lr  # bit for bit, across the fallback
    assert {r["step"]: r["val_loss"] for r in restarted} == {
        r["step"]: r["val_loss"] for r in reports if r["step"] > fallback_step[0]
    }

    client, runs = _mlflow_children(exp.uri, "spoiled")
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED"
    _assert_lr_history_is_whole(client, child.info.run_id, steps[-1])  # the replay: once


def _saved_checkpoints(trial_dir: Path, count: int) -> list[Path]:
    """``count`` real checkpoints of a short digits run, as Ray lays them out."""
    saved: list[Path] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None
        saved.append(trial_dir / f"checkpoint_{len(saved):06d}")
        shutil.copytree(checkpoint_dir, saved[-1])

    loop.train({"task": "digits", "policy": "feedback", "max_steps": 10 * count,
                "report_every": 10}, report)  # fmt: skip
    return saved


def test_resume_state_skips_checkpoints_that_do_not_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ray import tune

    from trainables import ray_trainable

    first, second, third = _saved_checkpoints(tmp_path, 3)
    (tmp_path / "checkpoint_000009").write_text("a file, not a checkpoint folder")
    (third / loop.CHECKPOINT_FILE).write_bytes((third / loop.CHECKPOINT_FILE).read_bytes()[:999])
    with caplog.at_level(logging.WARNING, logger="trainables.ray_trainable"):
        state = ray_trainable.resume_state(tune.Checkpoint(str(third)))
    assert state is not None and state.step == 20  # the second checkpoint's
    assert f"{third}/{loop.CHECKPOINT_FILE} does not load" in caplog.text
    assert f"resuming from the older checkpoint {second}" in caplog.text

    caplog.clear()
    (second / loop.CHECKPOINT_FILE).unlink()
    shutil.rmtree(first)
    with caplog.at_level(logging.WARNING, logger="trainables.ray_trainable"):
        assert ray_trainable.resume_state(tune.Checkpoint(str(third))) is None
    assert f"{second}/{loop.CHECKPOINT_FILE} does not load (FileNotFoundError" in caplog.text
    assert "starting from scratch" in caplog.text
    assert ray_trainable.resume_state(None) is None


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tune_alr.cli", *args]


def _end_leftovers(marker: str) -> None:
    """Kill, by PID, any process of the killed run's own Ray (its temp folder in argv)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):  # gone meanwhile
                proc.kill()


@pytest.mark.heavy
@pytest.mark.side
def test_a_killed_driver_resumes_the_unfinished_trials_only(tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="tar-dk-", dir="/tmp")  # short: socket path limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "out/ray/driverkill"
    argv = _cli(
        "run", "--name", "driverkill", "--policies", "constant,feedback,cosine",
        "--seeds", "1", "--report-every", "25",
        "--max-concurrent", "1", "--output", str(tmp_path / "out"),
        "--tracking-uri", uri, "--quiet",
    )  # fmt: skip
    driver = subprocess.Popen(
        argv, env=env, cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    finished_before: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            done, running = {}, False
            for result in folder.glob("*/result.json"):
                rows = _lines(result)
                if rows and rows[-1].get("status") == "finished":
                    done[result.parent.name] = result.read_text()
                elif rows:
                    running = True
            if done and running:
                os.kill(driver.pid, signal.SIGKILL)
                finished_before = done
                break
            time.sleep(0.05)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
        time.sleep(2)
        _end_leftovers(ray_tmp)
    assert finished_before, "the driver finished before it could be killed mid-experiment"

    resumed = subprocess.run(
        _cli("resume", str(folder)), env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    _end_leftovers(ray_tmp)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    records = load_trials(folder)
    assert len(records) == 3 and all(r.status == "finished" for r in records)
    for name, text in finished_before.items():  # finished trials were not run again
        assert (folder / name / "result.json").read_text() == text
    assert (tmp_path / "out/summary.csv").is_file()

    client, runs = _mlflow_children(uri, "driverkill")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == [
        "digits/constant/seed0", "digits/cosine/seed0", "digits/feedback/seed0",
    ]  # fmt: skip
    steps = {f"digits/{r.config['policy']}/seed0": r.results[-1]["step"] for r in records}
    for child in children:
        assert child.info.status == "FINISHED"
        _assert_lr_history_is_whole(client, child.info.run_id, steps[child.info.run_name])


def test_resume_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    from tune_alr import cli

    assert cli.main(["resume", str(tmp_path)]) == 2


def test_a_nan_batch_is_skipped_and_the_run_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """One training image is all NaN: its batch's update is skipped once per epoch."""
    import dataclasses

    import torch

    from trainables import tasks
    from trainables.data import Split

    digits = tasks.get("digits")

    def load_with_a_nan_row(config: Any) -> Any:
        data = digits.load(config)
        images = data.train.inputs[0].clone()
        images[7] = float("nan")
        return dataclasses.replace(data, train=Split((images,), data.train.labels))

    monkeypatch.setitem(
        tasks._TASKS, "digits-nan", dataclasses.replace(digits, name="digits-nan",
                                                        load=load_with_a_nan_row)
    )  # fmt: skip
    checkpoints: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None
        checkpoints.append(loop.load_checkpoint(checkpoint_dir))

    last = loop.train(
        # (no protective start: its ramp would end at the first guard trip, the NaN batch,
        # at a tenth of the LR, and 100 steps would not reach the accuracy checked below)
        {
            "task": "digits-nan",
            "policy": "feedback",
            "epochs": 3,
            "report_every": 50,
            "policy_params": {"warmup_steps": 0},
        },
        report,
    )
    assert last["status"] == "finished" and last["skipped_steps"] == 3  # one per epoch
    assert last["val_acc"] > 0.8
    for state in checkpoints:  # no checkpoint holds a non-finite weight
        assert all(torch.isfinite(t).all() for t in state.model.values())


def test_absurd_lrs_diverge_or_recover_without_crashing(ray_session: None, tmp_path: Path) -> None:
    import torch

    from tune_alr import Arm

    exp = Experiment(
        name="absurd",
        policies=[
            Arm("sgd-lr10", "constant", optimizer="sgd", lr=10.0),
            Arm("sgd-lr100", "constant", optimizer="sgd", lr=100.0),
            Arm("feedback-lr100", "feedback", optimizer="sgd", lr=100.0),
            Arm("sgd-lr1e6", "constant", optimizer="sgd", lr=1e6),  # overflows to NaN
        ],
        seeds=1,
        max_steps=150,
        report_every=25,
        trial={"max_bad_steps": 5},
        output=tmp_path / "out",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        verbose=0,
    )
    results = tune_alr.run(exp)
    trials = results.trials().set_index("policy")
    # Nothing crashed. SGD at 100 blows the validation loss up past 10x its start; at
    # 1e6 the loss overflows. At 10 the network dies at chance level (no explosion).
    assert set(trials["status"]) <= {"finished", "diverged"}
    assert trials.loc["sgd-lr1e6", "status"] == "diverged"
    assert "non-finite" in trials.loc["sgd-lr1e6", "diverged_reason"]
    assert trials.loc["sgd-lr100", "status"] == "diverged"
    assert "exceeds 10x its initial" in trials.loc["sgd-lr100", "diverged_reason"]
    for label, t in trials.iterrows():
        if t["status"] == "diverged":
            assert "at step" in t["diverged_reason"], label
    summary_md = (results.output_dir / "summary.md").read_text()
    assert "sgd-lr1e6/seed0: diverged: " in summary_md
    for ckpt in (tmp_path / "out/ray/absurd").glob("*/checkpoint_*/checkpoint.pt"):
        state = loop.load_checkpoint(ckpt.parent)
        assert all(torch.isfinite(t).all() for t in state.model.values()), ckpt
    _, runs = _mlflow_children(exp.uri, "absurd")
    tagged = {
        r.info.run_name: r.data.tags.get("tune_alr.diverged_reason")
        for r in runs
        if "mlflow.parentRunId" in r.data.tags
    }
    assert "non-finite" in tagged["digits/sgd-lr1e6/seed0"]
    assert all(r.info.status == "FINISHED" for r in runs)
