"""``tune-alr ui``: the MLflow UI over the project's store, on loopback by default.

The UI runs as a child process group (``mlflow ui`` and its workers), so that Ctrl-C or
SIGTERM ends every process it started. Its address is printed only once the server
answers. The store's URI reaches the server through MLflow's own
``MLFLOW_BACKEND_STORE_URI`` variable, not its command line, where any user of the
machine could read credentials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType

from . import credentials
from .tracking import latest_experiment, training_view

#: How long the server may take to answer (it imports MLflow and migrates the store).
READY_TIMEOUT_S = 300.0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server's whole process group: SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(uri: str, host: str, port: int) -> int:
    """Run the UI until it exits or this process is told to stop; its exit status."""
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": credentials.connection_uri(uri)}
    # The UI needs no background job runner (it would start more processes).
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port),
               "--workers", "1"]  # fmt: skip
    # The server's own log (request lines, start-up chatter) goes to a file, kept and
    # shown only when the server fails; the terminal gets the address.
    log = Path(tempfile.mkstemp(prefix="tune-alr-ui-", suffix=".log")[1])
    keep_log = False
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(signum: int, frame: FrameType | None) -> None:
        # Only unwind: the ``finally`` below ends the server (waiting on it here, inside
        # the interrupted wait, would block on the lock that wait holds).
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = _wait(proc, f"http://{host}:{port}", uri, log)
        keep_log = status != 0
        return status
    finally:
        _stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not keep_log:
            log.unlink(missing_ok=True)


def _wait(proc: subprocess.Popen[bytes], url: str, uri: str, log: Path) -> int:
    """Say where the UI is once it answers, then wait for it; its exit status."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _answers(f"{url}/health"):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            print(f"{tail}\ntune-alr: error: the MLflow UI exited ({proc.returncode}); its "
                  f"log: {log}", file=sys.stderr)  # fmt: skip
            return proc.returncode or 1
        if time.monotonic() > deadline:
            print(f"tune-alr: error: the MLflow UI did not answer on {url} within "
                  f"{READY_TIMEOUT_S:.0f} s; its log: {log}", file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(0.5)
    print(f"MLflow UI on {url} (store {credentials.public_uri(uri)}); Ctrl-C stops it.")
    latest = _latest(uri)
    if latest is not None:
        print(f"Training view of {latest[1]!r}: {training_view(url, latest[0])}")
    sys.stdout.flush()
    return proc.wait()


def _latest(uri: str) -> tuple[str, str] | None:
    """The store's latest experiment, or ``None`` when it cannot be read (never fatal)."""
    try:
        return latest_experiment(uri)
    except Exception:  # the UI is up either way; the link is a convenience
        return None


__all__ = ["READY_TIMEOUT_S", "serve"]
