"""A real MLflow server stopped mid-experiment: training goes on, and re-logging heals it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
from conftest import free_port

import tune_alr
from tune_alr import cli
from tune_alr.experiment import Experiment

pytestmark = pytest.mark.slow


class Server:
    """``mlflow server`` on a loopback port; started and stopped by PID (its session)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mlflow = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'srv.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


def test_an_outage_loses_nothing_and_report_relogs(ray_session: None, tmp_path: Path) -> None:
    server = Server(tmp_path, free_port())
    server.start()
    try:
        exp = Experiment(
            name="outage",
            policies=["constant", "feedback"],
            seeds=2,
            report_every=20,
            max_concurrent=1,
            output=tmp_path / "out",
            tracking_uri=server.uri,
            verbose=0,
        )
        folder = tmp_path / "out/ray/outage"

        def stop_server_after_the_first_report() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if any(p.stat().st_size for p in folder.glob("*/result.json")):
                    server.stop()
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=stop_server_after_the_first_report, daemon=True)
        watcher.start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = tune_alr.run(exp)
        watcher.join(timeout=5)
        outage = [w for w in caught if "MLflow tracking at" in str(w.message)]
        assert len(outage) == 1, [str(w.message) for w in caught]  # said once
        assert "training goes on" in str(outage[0].message)
        # Ray kept everything: every trial finished and is in the tables.
        summary = results.summary()
        assert summary["finished"].tolist() == [2, 2]

        server.start()  # the store is back: re-log what it missed
        assert cli.main(["report", str(folder), "--tracking-uri", server.uri]) == 0

        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].info.run_id == results.parent_run_id  # the same parent run
        assert sorted(r.info.run_name for r in children) == [
            "digits/constant/seed0", "digits/constant/seed1",
            "digits/feedback/seed0", "digits/feedback/seed1",
        ]  # fmt: skip
        for child in children:
            assert child.info.status == "FINISHED"
            history = client.get_metric_history(child.info.run_id, "lr")
            steps = sorted(m.step for m in history)
            assert steps == list(range(1, len(steps) + 1)) and len(steps) == 340
            assert "val_acc" in child.data.metrics
            artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert artifacts == {"lr_curve.png", "val_curve.png"}
    finally:
        server.stop()
