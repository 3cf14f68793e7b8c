"""Nothing lost, status that tells the truth: concurrent runs, failed trials, resume paths."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tune_alr
from tune_alr import cli, tracking
from tune_alr.experiment import Experiment

pytestmark = pytest.mark.slow


def _runs(uri: str, name: str) -> list[object]:
    client = tracking._client(uri)
    return list(client.search_runs([client.get_experiment_by_name(name).experiment_id]))


def test_trials_that_all_fail_end_failed_in_mlflow_and_the_cli(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # A memory cap far below what torch needs: each trial fails inside, where only it can.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["run", "--name", "capped", "--policies", "constant", "--seeds", "2",
                     "--max-steps", "20", "--profile", "cpus=1,threads=1,memory_mb=64",
                     "--tracking-uri", uri, "--quiet"])  # fmt: skip
    assert code == 1
    runs = _runs(uri, "capped")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.status for p in parents] == ["FAILED"]
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED"
        assert child.data.tags["tune_alr.status"] == "failed"
        assert "memory cap" in child.data.tags["tune_alr.error"]
    summary = (tmp_path / "results" / "capped" / "summary.csv").read_text()
    assert ",2,0,0,0,2," in summary  # seeds 2, finished 0, diverged 0, stopped 0, failed 2


@pytest.mark.heavy
def test_a_second_run_into_the_same_folders_is_refused_at_once(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "--name", "twice", "--policies", "constant", "--seeds", "1", "--epochs",
            "8", "--output", str(tmp_path / "out"), "--tracking-uri", uri, "--quiet"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "tune_alr.cli", *args], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        # the first run holds its folders once its Ray folder exists
        deadline = time.monotonic() + 120
        while not (tmp_path / "out/ray/twice/tune_alr_experiment.json").exists():
            assert first.poll() is None, first.communicate()[0].decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "tune_alr.cli", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert second.returncode == 2
        assert "another run of experiment 'twice' is using" in second.stderr
        assert time.monotonic() - start < 60  # refused, not queued behind the first
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # the first run is whole: its parent and child finished, its spec resumable
    runs = _runs(uri, "twice")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert cli.main(["resume", str(tmp_path / "out/ray/twice")]) == 0


@pytest.mark.heavy
def test_two_drivers_creating_one_new_sqlite_store_both_succeed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    code = (
        "import sys; from tune_alr import tracking; "
        "h = tracking.prepare(sys.argv[1], sys.argv[2], 'r', {}); "
        "tracking.finish_parent(h, 'FINISHED')"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, f"exp{i}"],
                              stderr=subprocess.PIPE) for i in range(2)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert {len(_runs(uri, "exp0")), len(_runs(uri, "exp1"))} == {1}


def test_resume_takes_a_relative_path(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exp = Experiment(name="rel", policies=["constant"], seeds=1, max_steps=10, verbose=0,
                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # fmt: skip
    tune_alr.run(exp)
    assert cli.main(["resume", os.path.join("results", "rel", "ray", "rel")]) == 0
