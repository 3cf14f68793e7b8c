"""The runner's MLflow parent run: closed with the status the job earned, and a tracking
failure never hides the job's own error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tune_alr import credentials, runner, tracking


def _status(uri: str, run_id: str) -> str:
    return str(tracking._client(uri).get_run(run_id).info.status)


def test_the_parent_ends_finished_or_failed_as_the_block_does(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with runner.parent_run(uri, experiment="e", run_name="ok", tags={}) as ok:
        pass
    assert _status(uri, ok.handle.parent_run_id) == "FINISHED"
    with (
        pytest.raises(KeyError, match="boom"),
        runner.parent_run(uri, experiment="e", run_name="bad", tags={}) as bad,
    ):
        raise KeyError("boom")
    assert _status(uri, bad.handle.parent_run_id) == "FAILED"
    with runner.parent_run(uri, experiment="e", run_name="all-failed", tags={}) as told:
        told.status = "FAILED"  # as a run whose every trial failed sets it
    assert _status(uri, told.handle.parent_run_id) == "FAILED"


def test_a_tracking_failure_on_close_never_hides_the_training_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def store_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("the tracking store went away")

    with (
        pytest.raises(ValueError, match="the training failed"),
        pytest.warns(RuntimeWarning, match="could not close the MLflow parent run .*went away"),
        runner.parent_run(uri, experiment="e", run_name="r", tags={}),
    ):
        monkeypatch.setattr(tracking, "finish_parent", store_down)
        raise ValueError("the training failed")


def test_a_close_failure_after_success_only_warns_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    public = credentials.register("http://alice:s3cret@127.0.0.1:9")
    handle = tracking.Handle(public, "0", "run")

    def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionError("refused by http://alice:s3cret@127.0.0.1:9")

    monkeypatch.setattr(tracking, "finish_parent", refused)
    with pytest.warns(RuntimeWarning) as caught:
        runner.close_parent(handle, "FINISHED", [])
    message = str(caught[0].message)
    assert "refused" in message and "s3cret" not in message and "***" in message


class _Counting:
    """A real MlflowClient whose writes are counted (every call still reaches the store)."""

    def __init__(self, client: object) -> None:
        self.client = client
        self.writes: list[str] = []

    def __getattr__(self, name: str) -> object:
        method = getattr(self.client, name)
        if name in ("log_batch", "set_tag", "log_param", "log_metric"):
            self.writes.append(name)
        return method


def test_a_report_is_one_store_write_and_tags_are_written_when_they_change(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    handle = tracking.prepare(uri, experiment="e", run_name="parent", tags={})
    logger = tracking.TrialLogger(handle)
    counting = _Counting(logger._client)
    logger._client = counting
    logger.start("t1", {"task": "digits", "policy": "constant", "seed": 0})
    first = {"step": 10, "status": "running", "val_loss": 0.5, "val_acc": 0.8, "lr": 0.1,
             "total_steps": 30, "caps/threads": 1, "node_ip": "127.0.0.1"}  # fmt: skip
    counting.writes.clear()
    logger.result("t1", first)
    logger.result("t1", {"step": 20, "status": "running", "val_loss": 0.4, "val_acc": 0.9})
    logger.result("t1", {"step": 20, "status": "running", "val_loss": 0.4, "val_acc": 0.9})
    assert counting.writes == ["log_batch", "log_batch"]  # the repeated report writes nothing
    logger.result("t1", {"step": 30, "status": "finished", "val_loss": 0.3, "val_acc": 0.95})
    run = tracking._client(uri).get_run(logger._trials["t1"].run_id)
    assert run.data.tags["tune_alr.status"] == "finished"
    assert run.data.tags["tune_alr.node_ip"] == "127.0.0.1"
    assert run.data.tags["tune_alr.caps.threads"] == "1"
    assert run.data.params["total_steps"] == "30"
    history = tracking._client(uri).get_metric_history(run.info.run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(10, 0.8), (20, 0.9), (30, 0.95)]
    # Stopped, then reopened (a restart): its first report says "running" again.
    logger.stop("t1", "stopped early by the asha scheduler")
    assert tracking._client(uri).get_run(run.info.run_id).data.tags["tune_alr.status"] == (
        "stopped"
    )
    logger.start("t1", {"task": "digits", "policy": "constant", "seed": 0})
    logger.result("t1", {"step": 40, "status": "running", "val_loss": 0.2, "val_acc": 0.96})
    assert tracking._client(uri).get_run(run.info.run_id).data.tags["tune_alr.status"] == (
        "running"
    )


class _FakeRay:
    """Stands in for ``ray_session`` (the orchestration is under test, not Ray)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.entered, self.exited = fail, False, False

    @contextlib.contextmanager
    def __call__(self, address: object, node_resource: object) -> Iterator[bool]:
        if self.fail:
            raise RuntimeError("Ray did not start")
        self.entered = True
        try:
            yield True
        finally:
            self.exited = True


def _both(uri: str) -> contextlib.AbstractContextManager[tuple[runner.Parent, bool]]:
    return runner.parent_and_ray(
        uri, experiment="e", run_name="r", tags={}, output=None, address=None,
        node_resource=None,
    )  # fmt: skip


def test_the_store_is_prepared_while_ray_starts_and_closed_before_ray_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"  # a new store: migrations to run
    fake = _FakeRay()
    monkeypatch.setattr(runner, "ray_session", fake)
    with _both(uri) as (parent, started):
        assert started and fake.entered and not fake.exited
        run_id = parent.handle.parent_run_id
        assert _status(uri, run_id) == "RUNNING"
    assert fake.exited and _status(uri, run_id) == "FINISHED"


def test_a_ray_that_fails_to_start_leaves_no_running_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(runner, "ray_session", _FakeRay(fail=True))
    with pytest.raises(RuntimeError, match="Ray did not start"), _both(uri):
        pass
    runs = tracking._client(uri).search_runs(
        [tracking._client(uri).get_experiment_by_name("e").experiment_id]
    )
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_store_that_fails_after_its_check_stops_the_ray_started_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> tracking.Handle:
        raise ValueError("the tracking store sqlite:///x cannot be used: OperationalError")

    fake = _FakeRay()
    monkeypatch.setattr(runner, "ray_session", fake)
    monkeypatch.setattr(tracking, "_create", broken)
    with pytest.raises(ValueError, match="cannot be used"), _both("sqlite:///x.db"):
        raise AssertionError("the block must not run")
    assert fake.entered and fake.exited


def test_a_new_store_inside_the_runs_locked_output_folder_is_created(tmp_path: Path) -> None:
    """``storage.exclusive`` holds the output folder locked; the store's creation lock
    must not wait on it (it did: a bench with ``--output D --tracking-uri sqlite:///D/...``
    hung before its first trial)."""
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # as storage.exclusive holds it
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        future = tracking.prepare_in_background(
            f"sqlite:///{out / 'mlflow.db'}", experiment="e", run_name="r", tags={}
        )
        handle = future.result(timeout=120)
    finally:
        os.close(held)
    assert _status(f"sqlite:///{out / 'mlflow.db'}", handle.parent_run_id) == "RUNNING"
