"""Security defaults: loopback servers, no credentials printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port

from tune_alr.tracking import redact


def test_passwords_in_tracking_uris_are_never_printed() -> None:
    assert redact("http://alice:s3cret@mlflow:5000") == "http://alice:***@mlflow:5000"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact("postgresql://u:pw@db/mlflow") == "postgresql://u:***@db/mlflow"


@pytest.mark.slow
def test_the_mlflow_ui_listens_on_loopback_only(tmp_path: Path) -> None:
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "tune_alr.cli", "ui", "--port", str(port),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        addresses: set[str] = set()
        deadline = time.monotonic() + 90
        while not addresses and time.monotonic() < deadline and ui.poll() is None:
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    addresses.add(conn.laddr.ip)
            time.sleep(0.5)
        assert addresses == {"127.0.0.1"}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=20)
