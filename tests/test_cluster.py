"""The cluster: YAMLs against Ray's schema, placement on several nodes, a real `ray up`."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _hosts
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))


def _validate(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_there_is_a_local_an_aws_and_a_gcp_cluster_file() -> None:
    assert [p.name for p in CLUSTER_FILES] == ["aws.yaml", "gcp.yaml", "local.yaml"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_files_pass_rays_schema(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    _validate(config)
    text = path.read_text()
    commands = "\n".join(
        c for key, value in config.items() if key.endswith("_commands") for c in value
    )
    # What every file must hold: the pins, the MLflow server on the private address
    # (never on all interfaces), and no credentials.
    assert "-c ~/tune-alr/constraints.txt" in commands
    assert 'mlflow server\n--host "$(hostname -I' in commands.replace(" --host", "\n--host")
    assert "0.0.0.0" not in commands
    for secret in ("aws_secret_access_key", "AKIA", "BEGIN OPENSSH PRIVATE KEY", "password"):
        assert secret not in text
    if config["provider"]["type"] != "local":
        types = config["available_node_types"]
        assert any("constrained" in t.get("resources", {}) for t in types.values())
        assert len(types) >= 3  # a head and worker types


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_a_broken_copy_fails_the_schema(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    config["auth"]["ssh_usr"] = config["auth"].pop("ssh_user")  # a typo'd key
    with pytest.raises(Exception, match="ssh_usr"):
        _validate(config)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.side
def test_a_constrained_profile_lands_only_on_the_constrained_node(tmp_path: Path) -> None:
    """A head (no CPUs) and two workers, one offering ``constrained``: an own Ray cluster."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/multinode.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    trials = out["trials"]
    assert len(trials) == 4 and all(t["status"] == "finished" for t in trials)
    assert {t["node_id"] for t in trials} == {out["constrained"]}
    for trial in trials:  # the caps each trial reported it ran under
        assert trial["caps/threads"] == 1 and trial["caps/memory_mb"] == 1024
    assert {"cpu_s_mean", "peak_rss_mb_mean"} <= set(out["summary_columns"])


# -- a real `ray up` ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory):
    _hosts.prepare()
    reason = _hosts.unavailable()
    if reason:
        pytest.skip(f"no two SSH hosts on this machine: {reason}")
    with _hosts.TwoHosts(tmp_path_factory.mktemp("hosts")) as hosts:
        yield hosts


def _cluster_file(hosts: _hosts.TwoHosts, folder: Path) -> Path:
    """cluster/local.yaml with these hosts' addresses, user and key; nothing else changed."""
    config = yaml.safe_load((ROOT / "cluster/local.yaml").read_text())
    config["cluster_name"] = f"tune-alr-e2e-{hosts.namespaces[0]}"
    config["provider"]["head_ip"], worker = hosts.ips
    config["provider"]["worker_ips"] = [worker]
    config["auth"] = {"ssh_user": _hosts.USER, "ssh_private_key": str(hosts.key)}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.side
def test_ray_up_job_submit_ray_down(two_hosts: _hosts.TwoHosts, tmp_path: Path) -> None:
    hosts = two_hosts
    head_ip, worker_ip = hosts.ips
    config = _cluster_file(hosts, tmp_path)
    # The worker host says it is the constrained kind (see cluster/local.yaml).
    marker = hosts.home / "tune-alr-node-resources.json"
    marker.write_text('{"constrained": 1}')
    launcher_tmp = tmp_path / "launcher"
    launcher_tmp.mkdir()
    env = {
        **os.environ,
        "RAY_UP_enable_autoscaler_v2": "0",  # v2 never starts local-provider workers
        "RAY_TMPDIR": str(launcher_tmp),  # the launcher's state, apart from any node's
        "RAY_AUTH_MODE": "disabled",
    }
    ray = str(Path(sys.executable).parent / "ray")

    def launcher(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            hosts.in_head(ray, *args), env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    up = launcher("up", "-y", "--no-config-cache", str(config))
    try:
        (tmp_path / "ray-up.log").write_text(up.stdout + up.stderr)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        results = hosts.home / "results" / "e2e"
        job_id = f"e2e-{hosts.namespaces[0]}"
        dashboard = ("--address", "http://127.0.0.1:8265")
        submit = launcher(
            "job", "submit", *dashboard, "--submission-id", job_id, "--no-wait", "--",
            "tune-alr", "run", "--name", "e2e", "--tasks", "digits",
            "--policies", "constant,feedback", "--seeds", "1", "--max-steps", "40",
            "--profile", "edge", "--node-type", "constrained", "--address", "auto",
            "--tracking-uri", f"http://{head_ip}:5000", "--output", str(results), "--quiet",
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        # Poll rather than tail: the log stream may close while the job still runs.
        deadline, status = time.monotonic() + 420, ""
        while time.monotonic() < deadline:
            done = launcher("job", "status", *dashboard, job_id, timeout=60)
            status = done.stdout + done.stderr  # the Ray CLI logs to stderr
            if any(s in status.lower() for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(3)
        done = launcher("job", "logs", *dashboard, job_id, timeout=60)
        logs = done.stdout + done.stderr
        (tmp_path / "job.log").write_text(status + logs)
        assert "succeeded" in status.lower(), status[-2000:] + logs[-4000:]
        summary = (results / "summary.csv").read_text()
        assert "digits,constant" in summary and "digits,feedback" in summary
        trials = [
            json.loads(p.read_text().splitlines()[0])
            for p in sorted((results / "ray" / "e2e").glob("*/result.json"))
        ]
        assert len(trials) == 2
        assert {t["node_ip"] for t in trials} == {worker_ip}  # the constrained worker
        assert all(t["caps/threads"] == 1 and t["caps/memory_mb"] == 1024 for t in trials)
        # The MLflow runs, read back from the tracking server on the head.
        query = (
            "import json, mlflow; c = mlflow.MlflowClient(); "
            "e = c.get_experiment_by_name('e2e'); "
            "print(json.dumps(sorted([r.info.run_name, r.info.status] "
            "for r in c.search_runs([e.experiment_id]))))"
        )
        runs = subprocess.run(
            hosts.in_head(sys.executable, "-c", query),
            env={**env, "MLFLOW_TRACKING_URI": f"http://{head_ip}:5000"},
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        assert json.loads(runs.stdout.strip().splitlines()[-1]) == [
            ["digits/constant/seed0", "FINISHED"],
            ["digits/feedback/seed0", "FINISHED"],
            ["e2e", "FINISHED"],
        ]
    finally:
        # The MLflow server is not Ray's: stop it, then `ray down`.
        launcher("exec", str(config), "pkill -u $USER -f '[m]lflow server' || true", timeout=120)
        down = launcher("down", "-y", str(config), timeout=180)
        marker.unlink(missing_ok=True)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    # `ray down` stops Ray on the head; the on-premise provider does not log into the
    # workers, whose raylets exit once the head's GCS has been gone for
    # gcs_rpc_server_reconnect_timeout_s (60 s by default, 10 s on these hosts: see
    # _hosts). SSH control masters linger 10 s. After that, nothing of the cluster may be
    # left but a worker's agents that saw their raylet die: each exits after trying to
    # tell the (gone) GCS so, which Ray gives 60 s (`publish_error_to_driver`); they
    # must be orphans by then, and TwoHosts ends them by PID.
    started = time.monotonic()
    while time.monotonic() < started + 150:
        left = [p for p in hosts.user_processes() if not _an_agent(p)]
        if not left:
            break
        time.sleep(2)
    assert left == [], f"left after {time.monotonic() - started:.0f} s"
    agents = [p for p in hosts.user_processes() if _an_agent(p)]
    assert all(hosts.orphaned(int(p.split()[0])) for p in agents), agents
    print(
        f"ray down: every cluster process but {len(agents)} orphaned agents gone "
        f"{time.monotonic() - started:.0f} s later"
    )


def _an_agent(process: str) -> bool:
    """Whether a ``pid command`` line is one of a Ray node's agents."""
    return process.split(maxsplit=1)[-1] in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
