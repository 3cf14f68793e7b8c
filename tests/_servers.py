"""Servers the tests start for themselves on loopback ports, ended by their PIDs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil


class _Process:
    """A server process on a loopback port, in its own session: ready once ``/health``
    answers 200, ended by its process group (SIGTERM, then SIGKILL)."""

    what = "server"

    def __init__(self, port: int) -> None:
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None  # where its output goes; None: discarded

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 90) -> None:
        out = open(self.log, "wb") if self.log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.command(),
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child holds its own copy
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} did not start{self._log_tail()}")
            time.sleep(0.5)

    def _log_tail(self) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        tail = self.log.read_text(errors="replace").strip().splitlines()[-15:]
        return ":\n" + "\n".join(tail) if tail else ""

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 20 s; then any process it started
        in a session of its own (``tune-alr ui`` runs ``mlflow ui`` so) that outlived it."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                descendants = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                descendants = []
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            for child in descendants:
                with contextlib.suppress(psutil.Error):
                    child.terminate()
            _, alive = psutil.wait_procs(descendants, timeout=10)
            for child in alive:
                with contextlib.suppress(psutil.Error):
                    child.kill()
        self.proc = None


class Server(_Process):
    """``mlflow server`` on a loopback port; started and stopped by PID (its session)."""

    what = "mlflow server"

    def __init__(self, folder: Path, port: int) -> None:
        super().__init__(port)
        self.folder = folder

    def command(self) -> list[str]:
        mlflow = str(Path(sys.executable).parent / "mlflow")
        return [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'srv.db'}",
                "--artifacts-destination", str(self.folder / "artifacts")]  # fmt: skip


class UiServer(_Process):
    """The project's own ``python -m tune_alr.cli ui`` on a store, its output in ``log``."""

    what = "tune-alr ui"

    def __init__(self, tracking_uri: str, port: int, log: Path | None = None) -> None:
        super().__init__(port)
        self.tracking_uri = tracking_uri
        self.log = log

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tune_alr.cli", "ui",
                "--tracking-uri", self.tracking_uri, "--port", str(self.port)]  # fmt: skip
