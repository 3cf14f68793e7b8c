"""Two SSH hosts on this machine, for a real ``ray up`` of ``cluster/local.yaml``.

Each host is a network namespace (its own address on a veth pair, its own port 22),
a PID namespace (``ray stop`` on one host must not see the other's processes) and a
mount namespace with a private ``/tmp/ray`` (Ray's per-node folder), ``/dev/shm`` and
``/proc``, as separate machines have. The hosts share the rest of the filesystem, so
the cluster user's home works as a shared filesystem (as NFS homes do on many
on-premise clusters), and the project's virtual environment is already "installed" on
both: the user's ``~/.bashrc`` puts it first on ``PATH``, so the YAML's install step
finds ``tune-alr`` and skips itself.

A dedicated user runs the cluster, because ``ray down`` runs ``ray stop``, which ends
every Ray process of its user. It must be able to run this venv's Python: where that
sits under a folder others cannot enter (pyenv under ``/root``), the folder gets the
"others may pass" bit for the test's duration. Everything started here is ended by PID
in :meth:`TwoHosts.close`; the user and its home are removed and folder modes restored.

Needs root, ``ip netns``, ``sshd``, ``rsync`` and ``nc``; :func:`unavailable` says why
not where they are missing (``prepare`` installs the Debian packages where it can).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

USER = "tunealr"
PACKAGES = ("openssh-server", "rsync", "netcat-openbsd")


def _run(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def prepare() -> None:
    """Install sshd, rsync and nc from Debian's packages if missing (root only)."""
    if all(shutil.which(t) for t in ("rsync", "nc")) and Path("/usr/sbin/sshd").exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ("apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES)
    if _run(*install, check=False, env=env).returncode != 0:
        _run("apt-get", "update", "-q", check=False, env=env)
        _run(*install, check=False, env=env)


def unavailable() -> str | None:
    """Why two hosts cannot be made here, or ``None``."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces and a cluster user needs root"
    for tool in ("ip", "rsync", "nc", "ssh", "ssh-keygen", "unshare", "useradd"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not Path("/usr/sbin/sshd").exists():
        return "sshd (openssh-server) is not installed"
    probe = f"tap{secrets.token_hex(3)}"
    if _run("ip", "netns", "add", probe, check=False).returncode != 0:
        return "`ip netns add` is not permitted here"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _python_folders() -> list[Path]:
    """The folders the cluster user must be able to enter to run this venv's Python."""
    folders: set[Path] = set()
    for path in (Path(sys.prefix), Path(os.path.realpath(sys.executable))):
        folders.update(path.resolve().parents)
    return sorted(folders)


class TwoHosts:
    """A head and a worker host; ``with TwoHosts(tmp) as hosts: ...``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        tag = secrets.token_hex(2)
        self.namespaces = (f"tah{tag}", f"taw{tag}")
        self.veth = (f"tah{tag}v", f"taw{tag}v")
        octet = 100 + int(tag, 16) % 100
        self.ips = (f"10.{octet}.77.1", f"10.{octet}.77.2")
        self.key = workdir / "id_ed25519"
        self._sshd: list[subprocess.Popen[bytes]] = []
        self._modes: dict[Path, int] = {}
        self.home = Path(f"/home/{USER}")

    # -- set-up ------------------------------------------------------------------------

    def __enter__(self) -> TwoHosts:
        try:
            self._let_user_run_python()
            self._network()
            self._user()
            for ns, ip in zip(self.namespaces, self.ips, strict=True):
                self._sshd.append(self._start_sshd(ns, ip))
            for ip in self.ips:
                self._wait_for_ssh(ip)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _let_user_run_python(self) -> None:
        # The venv's interpreter may sit under a folder only root can enter (pyenv in
        # /root): let others pass through (x only, no listing) until close() restores it.
        for folder in _python_folders():
            mode = os.stat(folder).st_mode
            if not mode & 0o001:
                self._modes[folder] = mode
                os.chmod(folder, (mode | 0o001) & 0o7777)

    def _network(self) -> None:
        for ns in self.namespaces:
            _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, dev, ip in zip(self.namespaces, self.veth, self.ips, strict=True):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "up")

    def _user(self) -> None:
        if _run("id", USER, check=False).returncode != 0:
            _run("useradd", "--create-home", "--shell", "/bin/bash", USER)
        # "*": no password login, but not "locked" ("!"), which sshd without PAM refuses.
        _run("usermod", "--password", "*", USER)
        pw = pwd.getpwnam(USER)
        self.home = Path(pw.pw_dir)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        ssh = self.home / ".ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        venv_bin = Path(sys.prefix) / "bin"
        # Ray runs every remote command in `bash --login -i` after sourcing ~/.bashrc.
        # `ray down` on an on-premise cluster leaves the workers' raylets to exit once the
        # head's GCS has been gone for gcs_rpc_server_reconnect_timeout_s: Ray's 60 s
        # default made a third of the end-to-end test a wait; these hosts say 10 s.
        (self.home / ".bashrc").write_text(
            f'export PATH="{venv_bin}:$PATH"\n'
            "export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0\n"
            "export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1\n"
            "export RAY_gcs_rpc_server_reconnect_timeout_s=10\n"
        )
        (self.home / ".bash_profile").write_text("source ~/.bashrc\n")
        for path in [ssh, ssh / "authorized_keys", self.home / ".bashrc"]:
            os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chown(self.home / ".bash_profile", pw.pw_uid, pw.pw_gid)

    def _start_sshd(self, ns: str, ip: str) -> subprocess.Popen[bytes]:
        folder = self.workdir / ns
        folder.mkdir()
        host_key = folder / "host_key"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        config = folder / "sshd_config"
        config.write_text(
            f"ListenAddress {ip}\nPort 22\nHostKey {host_key}\nPidFile {folder / 'sshd.pid'}\n"
            f"AllowUsers {USER}\nPermitRootLogin no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        # The host's own Ray folder and /dev/shm: Ray keeps per-node sockets, state and
        # its object store there. (Not all of /tmp: the venv may live under it.)
        script = (
            "mkdir -p /tmp/ray && mount -t tmpfs -o mode=1777 tmpfs /tmp/ray && "
            "mount -t tmpfs -o mode=1777 tmpfs /dev/shm && "
            f"exec /usr/sbin/sshd -D -e -f {config}"
        )
        log = open(folder / "sshd.log", "wb")  # noqa: SIM115 - lives as long as sshd
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
             "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", script],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def _wait_for_ssh(self, ip: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = self.ssh(ip, "true", check=False, timeout=10)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {ip} did not answer: {done.stderr.strip()}")
            time.sleep(0.3)

    # -- use -------------------------------------------------------------------------

    def in_head(self, *args: str) -> list[str]:
        """``args`` as a command in the head's network namespace (as root)."""
        return ["ip", "netns", "exec", self.namespaces[0], *args]

    def ssh(
        self, ip: str, command: str, *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``command`` as the cluster user on host ``ip`` (through the head's namespace)."""
        return _run(
            *self.in_head(
                "ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
                f"{USER}@{ip}", command,
            ),
            check=check,
            timeout=timeout,
        )  # fmt: skip

    def user_processes(self) -> list[str]:
        """``pid command`` of every process the cluster user still has."""
        out = _run("pgrep", "-a", "-u", USER, check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def orphaned(self, pid: int) -> bool:
        """Whether process ``pid`` (gone counts) no longer has a parent of the cluster user's:
        its parent died and it was handed to its host's first process (sshd here)."""
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            owner = Path(f"/proc/{ppid}").stat().st_uid
        except (FileNotFoundError, ProcessLookupError):
            return True
        return owner != pwd.getpwnam(USER).pw_uid

    # -- tear-down -------------------------------------------------------------------

    def close(self) -> None:
        """End the cluster user's processes and the sshds by PID; remove namespaces and user."""
        for _ in range(3):
            pids = [int(line.split()[0]) for line in self.user_processes()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        for proc in self._sshd:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        for ns in self.namespaces:
            _run("ip", "netns", "del", ns, check=False)
        if _run("id", USER, check=False).returncode == 0 and not self.user_processes():
            _run("userdel", "--remove", USER, check=False)
        for folder, mode in self._modes.items():
            os.chmod(folder, mode & 0o7777)
        self._modes.clear()
