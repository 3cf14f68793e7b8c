"""Security defaults, checked on a real run: Ray on loopback only, credentials nowhere.

One ``tune-alr run`` in a subprocess (its own Ray, started the way a user's is) logs to
a real MLflow server behind a proxy that demands HTTP basic authentication. While it
runs, the test samples the listening sockets of that process tree (psutil). After it,
every byte the run printed or wrote (stdout, stderr, the output folder with Ray's files
and ``tuner.pkl``, the MLflow server's database and artifacts) is searched for the
password.
"""

from __future__ import annotations

import base64
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _servers import Server
from conftest import free_port

from tune_alr import credentials
from tune_alr.tracking import redact

PASSWORD = "s3cret-Pa55"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_passwords_in_tracking_uris_are_never_printed() -> None:
    assert redact("http://alice:s3cret@mlflow:5000") == "http://alice:***@mlflow:5000"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact("postgresql://u:pw@db/mlflow") == "postgresql://u:***@db/mlflow"


@pytest.mark.parametrize(
    ("uri", "public"),
    [
        ("http://alice:s3cret@h:5000", "http://h:5000"),
        ("https://h/x?token=abc&x=1", "https://h/x?token=***&x=1"),
        ("https://h/x?access_key=abc", "https://h/x?access_key=***"),
        ("postgresql://u:pw@db/m", "postgresql://u@db/m"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ],
)
def test_the_public_form_of_a_uri_keeps_no_secret(uri: str, public: str) -> None:
    assert credentials.public_uri(uri) == public


class _AuthProxy(http.server.ThreadingHTTPServer):
    """Forwards to ``target`` only requests with the right basic-auth header (else 401)."""

    def __init__(self, port: int, target: str, user: str, password: str) -> None:
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.denied = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _forward(self) -> None:
                if self.headers.get("Authorization") != expected:
                    server.denied += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                dropped = ("host", "authorization", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                request = urllib.request.Request(
                    target + self.path, data=body or None, headers=headers, method=self.command
                )
                try:
                    with urllib.request.urlopen(request, timeout=60) as reply:
                        status, data, reply_headers = reply.status, reply.read(), reply.headers
                except urllib.error.HTTPError as err:
                    status, data, reply_headers = err.code, err.read(), err.headers
                self.send_response(status)
                for key, value in reply_headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        server = self
        super().__init__(("127.0.0.1", port), Handler)


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real CLI run to an authenticated MLflow server, its sockets sampled."""
    root = tmp_path_factory.mktemp("secure")
    server = Server(root / "server", free_port())
    (root / "server").mkdir()
    server.start()
    proxy = _AuthProxy(free_port(), server.uri, "alice", PASSWORD)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{proxy.server_address[1]}"
    # as a user runs it: no test's switches, no credentials but the URI's
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_AUTH_MODE" and not k.startswith("MLFLOW_TRACKING_")}  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, "-m", "tune_alr.cli", "run", "--tasks", "digits", "--policies",
         "constant", "--seeds", "1", "--epochs", "2", "--name", "secure",
         "--output", str(root / "out"), "--tracking-uri", uri],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    listening: set[tuple[str, str]] = set()  # (process name, address)
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((run.stdout, out), (run.stderr, err))]  # fmt: skip
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 300
        while run.poll() is None and time.monotonic() < deadline:
            try:
                tree = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in tree:
                try:
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            listening.add((proc.name(), conn.laddr.ip))
                except psutil.Error:
                    pass  # ended between listing and asking
            time.sleep(0.3)
        run.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=30)
        yield {
            "root": root, "code": run.returncode, "stdout": b"".join(out),
            "stderr": b"".join(err), "listening": listening, "denied": proxy.denied,
            "server": root / "server",
        }  # fmt: skip
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=30)
        proxy.shutdown()
        server.stop()


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.side
def test_a_run_succeeds_with_credentials_from_the_uri(guarded_run: dict[str, Any]) -> None:
    assert guarded_run["code"] == 0, guarded_run["stderr"][-3000:].decode(errors="replace")
    assert guarded_run["denied"] == 0  # every request carried the credentials
    assert b"http://127.0.0.1:" in guarded_run["stdout"]  # the store, shown without them


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.side
def test_ray_listens_on_loopback_only(guarded_run: dict[str, Any]) -> None:
    names = {name for name, _ in guarded_run["listening"]}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's servers were seen listening
    exposed = {(n, ip) for n, ip in guarded_run["listening"] if ip not in LOOPBACK}
    assert exposed == set()


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.side
def test_the_password_is_in_no_output_file_or_mlflow(guarded_run: dict[str, Any]) -> None:
    secret = PASSWORD.encode()
    assert secret not in guarded_run["stdout"] and secret not in guarded_run["stderr"]
    searched = 0
    for folder in (guarded_run["root"] / "out", guarded_run["server"]):
        for path in folder.rglob("*"):
            if path.is_file():
                searched += 1
                assert secret not in path.read_bytes(), path
    assert searched > 20  # Ray's files, the summaries, the server's database and artifacts
    assert (guarded_run["root"] / "out" / "ray" / "secure" / "tuner.pkl").is_file()


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.side
def test_the_ui_answers_when_it_says_so_on_loopback_and_stops_whole(tmp_path: Path) -> None:
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "tune_alr.cli", "ui", "--port", str(port),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert ui.stdout is not None
        line = ui.stdout.readline()  # blocks until the UI prints its address
        assert line.startswith(f"MLflow UI on http://127.0.0.1:{port}"), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            assert reply.status == 200  # it answers as soon as it says so
        addresses = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip
        assert addresses == {"127.0.0.1"}
        started = psutil.Process(ui.pid).children(recursive=True)
        assert started, "the UI runs the MLflow server as a child"
        ui.send_signal(signal.SIGTERM)  # to tune-alr only, as a service manager would
        ui.wait(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert alive == [], [p.pid for p in alive]
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=20)
