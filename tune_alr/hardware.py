"""Hardware profiles: the Ray resources of a trial and the real caps inside it.

A :class:`Profile` says what one trial may use. The driver turns it into Ray
resources (:meth:`Profile.ray_resources`: CPUs, a GPU fraction, memory, and
optionally a custom node resource that pins the trial to one node type of a cluster),
so Ray places and packs trials as it would on that hardware. Ray's resources are
only bookkeeping, though: inside the trial, :func:`applied` enforces the caps for
real:

* ``threads``: ``torch.set_num_threads``;
* ``pin_cpus``: CPU affinity to ``ceil(cpus)`` cores of their own. Cores are claimed
  with ``fcntl`` locks in a per-user folder under the temp folder, so one user's
  concurrent trials on a machine never share a core, and a killed trial's cores free
  themselves; without free cores (or locks) the trial runs unpinned and says so;
* ``memory_mb``: the memory guard (``tune_alr.monitor``): a trial whose resident
  memory passes the cap ends with :class:`~tune_alr.monitor.MemoryCapExceeded`;
* ``gpu_memory_fraction``: ``torch.cuda.set_per_process_memory_fraction`` when CUDA
  is present (on a machine without one the cap is noted and skipped).

Built-in profiles: ``edge``, ``laptop`` and ``gpu-slice`` (:data:`PROFILES`). A user
profile is a :class:`Profile` passed to ``Experiment(profile=...)``, one added with
:func:`register`, or a spec string such as ``"cpus=1,threads=1,memory_mb=512"``.

This module imports torch and psutil only: it runs inside trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

#: The Ray resource amount a trial asks of a node type's custom resource. Tiny, so
#: that CPUs, not this marker, bound how many trials share a node.
NODE_TYPE_SHARE = 0.01


@dataclass(frozen=True)
class Profile:
    """What one trial may use.

    Args:
        name: the profile's name (tables, MLflow params).
        cpus: Ray CPUs per trial; also the number of cores it is pinned to (rounded up).
        gpus: Ray GPUs per trial (a fraction shares one GPU).
        memory_mb: resident-memory cap in MiB (Ray's ``memory`` resource and the
            in-trial guard); ``None``: no cap.
        threads: torch threads; ``None``: ``max(1, floor(cpus))``.
        pin_cpus: pin the trial to cores of its own where the OS allows it.
        gpu_memory_fraction: CUDA memory fraction; ``None``: ``gpus`` when below 1.
        node_type: a custom Ray resource that a cluster's node type declares (e.g.
            ``constrained``); trials then run only on nodes that have it.
    """

    name: str
    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: float | None = None
    threads: int | None = None
    pin_cpus: bool = True
    gpu_memory_fraction: float | None = None
    node_type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(
                f"profile name must be a non-empty name without '/', got {self.name!r}."
            )
        for key in ("cpus", "gpus"):
            value = getattr(self, key)
            # ``not value >= 0`` is also true of NaN, which every comparison lets through
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not value >= 0
            ):
                raise ValueError(f"profile {key} must be a finite number >= 0, got {value!r}.")
        if self.cpus == 0 and self.gpus == 0:
            raise ValueError(f"profile {self.name!r} needs cpus > 0 or gpus > 0.")
        if self.memory_mb is not None and (
            isinstance(self.memory_mb, bool)
            or not isinstance(self.memory_mb, (int, float))
            or not math.isfinite(self.memory_mb)
            or not self.memory_mb > 0
        ):
            raise ValueError(
                f"profile memory_mb must be a number of MiB > 0, got {self.memory_mb!r}."
            )
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"profile threads must be an integer >= 1, got {self.threads!r}.")
        if not isinstance(self.pin_cpus, bool):
            raise ValueError(f"profile pin_cpus must be true or false, got {self.pin_cpus!r}.")
        fraction = self.gpu_memory_fraction
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction <= 1  # false for NaN too
        ):
            raise ValueError(f"profile gpu_memory_fraction must be in (0, 1], got {fraction!r}.")
        if self.node_type is not None and (
            not isinstance(self.node_type, str)
            or not self.node_type
            or self.node_type in ("CPU", "GPU", "memory", "object_store_memory")
        ):
            raise ValueError(
                f"profile node_type must name a custom Ray resource of a node type "
                f"(e.g. 'constrained'), got {self.node_type!r}."
            )

    @property
    def torch_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, math.floor(self.cpus))

    @property
    def cuda_memory_fraction(self) -> float | None:
        if self.gpu_memory_fraction is not None:
            return self.gpu_memory_fraction
        return float(self.gpus) if 0 < self.gpus < 1 else None

    def ray_resources(self) -> dict[str, float]:
        """The resources for ``tune.with_resources``."""
        out: dict[str, float] = {"cpu": float(self.cpus), "gpu": float(self.gpus)}
        if self.memory_mb is not None:
            out["memory"] = float(self.memory_mb) * 2**20
        if self.node_type is not None:
            out[self.node_type] = NODE_TYPE_SHARE
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Profile:
        """A profile from a plain dict; unknown keys raise ``ValueError``."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown profile setting(s) {unknown}; accepted: {', '.join(known)}.")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, Profile] = {
    "edge": Profile("edge", cpus=1, threads=1, memory_mb=1024),
    "laptop": Profile("laptop", cpus=2, threads=2, memory_mb=4096),
    "gpu-slice": Profile("gpu-slice", cpus=1, gpus=0.25, threads=1),
}


def register(profile: Profile) -> Profile:
    """Add (or replace) a named profile."""
    PROFILES[profile.name] = profile
    return profile


def available() -> list[str]:
    return sorted(PROFILES)


def resolve(spec: str | Profile | Mapping[str, Any]) -> Profile:
    """A profile from a name, a ``key=value,...`` spec, a dict or a :class:`Profile`.

    A spec may start from a named profile: ``"edge,memory_mb=2048"``.
    """
    if isinstance(spec, Profile):
        return spec
    if isinstance(spec, Mapping):
        values = dict(spec)
        values.setdefault("name", "custom")
        return Profile.from_dict(values)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a profile is a name ({', '.join(available())}) or a spec, got {spec!r}.")
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    base: dict[str, Any] = {"name": "custom"}
    if "=" not in parts[0]:
        name = parts.pop(0)
        if name not in PROFILES:
            raise ValueError(
                f"unknown profile {name!r}; available: {', '.join(available())}, "
                "or a spec such as 'cpus=1,threads=1,memory_mb=512'."
            )
        base = PROFILES[name].to_dict()
    types = {f.name: f.type for f in dataclasses.fields(Profile)}
    for part in parts:
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(
                f"bad profile setting {part!r}; use key=value with keys {', '.join(types)}."
            )
        base[key] = _parse_value(key, raw.strip())
    return Profile.from_dict(base)


def _parse_value(key: str, raw: str) -> Any:
    if key in ("name", "node_type"):
        return None if raw.lower() == "none" else raw
    if key == "pin_cpus":
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"profile pin_cpus must be true or false, got {raw!r}.")
        return raw.lower() in ("true", "1")
    if raw.lower() == "none":
        return None
    try:
        return int(raw) if key == "threads" else float(raw)
    except ValueError:
        raise ValueError(f"profile {key} must be a number, got {raw!r}.") from None


# -- inside the trial ---------------------------------------------------------------


@dataclass
class Applied:
    """The caps a trial runs under, as applied (reported with its first metrics)."""

    profile: str
    threads: int
    memory_mb: float | None
    cores: list[int] = field(default_factory=list)
    gpu_memory_fraction: float | None = None
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "profile": self.profile,
            "caps/threads": self.threads,
            "caps/cores": len(self.cores),
        }
        if self.memory_mb is not None:
            out["caps/memory_mb"] = self.memory_mb
        if self.gpu_memory_fraction is not None:
            out["caps/gpu_memory_fraction"] = self.gpu_memory_fraction
        if self.notes:
            out["caps_notes"] = "; ".join(self.notes)
        return out


def _core_lock_dir() -> Path:
    # One folder per user: another user's trials cannot hold (or block) these locks.
    path = Path(tempfile.gettempdir()) / f"tune-alr-cores-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def claim_cores(count: int) -> tuple[list[int], list[IO[bytes]]]:
    """Lock ``count`` cores of this process's affinity no other trial holds.

    Returns the cores and the open lock files (closing them releases the cores; so
    does the process's death). Fewer than ``count`` free: nothing is claimed.
    """
    allowed = sorted(os.sched_getaffinity(0))
    cores: list[int] = []
    handles: list[IO[bytes]] = []
    for core in allowed:
        if len(cores) == count:
            break
        handle = open(_core_lock_dir() / f"core-{core}.lock", "wb")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        cores.append(core)
        handles.append(handle)
    if len(cores) < count:
        for held in handles:
            held.close()
        return [], []
    return cores, handles


def _set_process_affinity(cores: set[int]) -> None:
    # sched_setaffinity(0) moves only the calling thread; a trial is the whole process
    # (Ray runs the trainable in a thread, and torch has its pool).
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cores)


@contextlib.contextmanager
def applied(profile: Profile | None, threads: int | None = None) -> Iterator[Applied]:
    """Apply ``profile``'s caps to this process for the ``with`` block, then undo them.

    ``threads`` (the trial's own setting) overrides the profile's. Without a profile
    only ``threads`` applies. Undoing matters: Ray reuses a worker process for the
    next trial.
    """
    name = profile.name if profile is not None else "none"
    n_threads = threads or (profile.torch_threads if profile else torch.get_num_threads())
    result = Applied(name, n_threads, profile.memory_mb if profile else None)
    old_threads = torch.get_num_threads()
    old_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    handles: list[IO[bytes]] = []
    torch.set_num_threads(n_threads)
    try:
        if profile is not None and profile.pin_cpus and profile.cpus > 0:
            wanted = max(1, math.ceil(profile.cpus))
            if old_affinity is None:
                result.notes.append("CPU affinity is not supported on this OS; cores not pinned")
            else:
                try:
                    cores, handles = claim_cores(wanted)
                except OSError as err:  # no lock folder: run unpinned rather than fail
                    cores, handles = [], []
                    result.notes.append(f"core locks unavailable ({err}); not pinned")
                if cores:
                    _set_process_affinity(set(cores))
                    result.cores = cores
                else:
                    result.notes.append(
                        f"no {wanted} free core(s) of {len(old_affinity)} to pin; not pinned"
                    )
        fraction = profile.cuda_memory_fraction if profile else None
        if fraction is not None:
            if torch.cuda.is_available():
                torch.cuda.set_per_process_memory_fraction(fraction)
                result.gpu_memory_fraction = fraction
            else:
                result.notes.append(f"no CUDA device: GPU memory fraction {fraction} not applied")
        yield result
    finally:
        torch.set_num_threads(old_threads)
        if result.cores and old_affinity is not None:
            _set_process_affinity(old_affinity)
        for handle in handles:
            handle.close()
        if result.gpu_memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)


__all__ = [
    "NODE_TYPE_SHARE",
    "PROFILES",
    "Applied",
    "Profile",
    "applied",
    "available",
    "claim_cores",
    "register",
    "resolve",
]
