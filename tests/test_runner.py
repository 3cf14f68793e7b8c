"""The runner's MLflow parent run: closed with the status the job earned, and a tracking
failure never hides the job's own error."""

from __future__ import annotations

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
