"""What a trial used: a psutil sampler with the memory guard.

:class:`ResourceSampler` runs a daemon thread that reads this process's resident
memory every ``interval`` seconds, keeps its peak and trips the guard when it passes
``memory_limit_mb``. :meth:`ResourceSampler.snapshot` gives the figures a report
carries (all ``proc/*``):

* ``proc/cpu_percent``: CPU use since the previous snapshot, in percent of one core
  (two busy threads read 200);
* ``proc/cpu_s``: CPU seconds (user + system) since the sampler started;
* ``proc/rss_mb``, ``proc/peak_rss_mb``: resident memory now and its sampled peak;
* with CUDA: ``proc/gpu_memory_mb`` and ``proc/gpu_peak_memory_mb`` (torch's
  allocator), and ``proc/gpu_utilization_percent`` where NVML answers.

The training loop calls :meth:`ResourceSampler.check` after every step, which raises
:class:`MemoryCapExceeded` once the guard has tripped: the trial ends as an error that
says so, and Ray goes on with its siblings. (The machine-wide figures of MLflow's own
system metrics are logged by the driver; these are per trial.)
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from types import TracebackType

import psutil
import torch

_MB = 2**20


class MemoryCapExceeded(MemoryError):
    """A trial's resident memory passed its profile's cap."""


class ResourceSampler:
    """Samples this process; a context manager that starts and stops the thread."""

    def __init__(
        self,
        memory_limit_mb: float | None = None,
        interval: float = 0.2,
        profile: str = "none",
    ) -> None:
        if not interval > 0:
            raise ValueError(f"sampler interval must be > 0 seconds, got {interval!r}.")
        self.memory_limit_mb = memory_limit_mb
        self.interval = interval
        self.profile = profile
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._start_cpu = self._cpu_seconds()
        self._last_cpu = self._start_cpu
        self._last_wall = time.perf_counter()
        self._rss = self._read_rss()
        self._peak = self._rss
        self.exceeded: str | None = None
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()

    # -- sampling -------------------------------------------------------------------

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def _read_rss(self) -> float:
        return float(self._process.memory_info().rss) / _MB

    def sample(self) -> float:
        """Read resident memory now, update the peak and the guard; returns MiB."""
        rss = self._read_rss()
        with self._lock:
            self._rss = rss
            self._peak = max(self._peak, rss)
            limit = self.memory_limit_mb
            if limit is not None and rss > limit and self.exceeded is None:
                self.exceeded = (
                    f"trial exceeded its memory cap: resident memory {rss:.0f} MiB > "
                    f"cap {limit:.0f} MiB (profile {self.profile!r}); give the profile more "
                    "memory_mb, or make the trial smaller (--budget, --batch-size, "
                    "--limit-train)."
                )
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> ResourceSampler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tune-alr-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 1)
            self._thread = None

    def __enter__(self) -> ResourceSampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- reading ----------------------------------------------------------------------

    def check(self, *, fresh: bool = False) -> None:
        """Raise :class:`MemoryCapExceeded` if the guard has tripped: on the sampling
        thread's last reading, or (``fresh``) on one taken now."""
        if fresh:
            self.sample()
        if self.exceeded is not None:
            raise MemoryCapExceeded(self.exceeded)

    def snapshot(self) -> dict[str, float]:
        """The ``proc/*`` figures now (CPU percent over the time since the last call)."""
        self.sample()
        now_wall, now_cpu = time.perf_counter(), self._cpu_seconds()
        span = now_wall - self._last_wall
        percent = 100.0 * (now_cpu - self._last_cpu) / span if span > 0 else math.nan
        self._last_wall, self._last_cpu = now_wall, now_cpu
        with self._lock:
            out = {
                "proc/cpu_percent": percent,
                "proc/cpu_s": now_cpu - self._start_cpu,
                "proc/rss_mb": self._rss,
                "proc/peak_rss_mb": self._peak,
            }
        if self._cuda:
            out["proc/gpu_memory_mb"] = torch.cuda.memory_allocated() / _MB
            out["proc/gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated() / _MB
            # NVML may be missing or not permitted: the figure is optional.
            with contextlib.suppress(Exception):
                out["proc/gpu_utilization_percent"] = float(torch.cuda.utilization())
        return out


__all__ = ["MemoryCapExceeded", "ResourceSampler"]
