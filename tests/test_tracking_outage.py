"""A real MLflow server stopped mid-experiment: training goes on, and re-logging heals it."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import pytest
from _servers import Server
from conftest import free_port

import tune_alr
from tune_alr import cli
from tune_alr.experiment import Experiment

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.side]


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
        relog = ["report", str(folder), "--tracking-uri", server.uri, "--output", str(tmp_path)]
        assert cli.main(relog) == 0

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
