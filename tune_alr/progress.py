"""The terminal progress of an experiment: a short table, not Ray Tune's boxes.

:class:`ProgressTable` is a Ray Tune callback. Every ``interval`` seconds, and when the
experiment ends, it prints one status line and a row for each trial that is running or
has ended since the last table: task, arm, seed, step, ``val_acc``, ``val_loss``, ``lr``
and status. Each trial thus shows up while it runs and once when it ends, whatever the
number of trials. Ray Tune's own output (configs, result boxes) is off unless the
experiment asks for it (``verbose=2``, ``--verbose``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from ray import tune

#: The columns: header, width.
_COLUMNS = (("task", 10), ("arm", 14), ("seed", 4), ("step", 11), ("val_acc", 7),
            ("val_loss", 8), ("lr", 9), ("status", 9))  # fmt: skip


def _number(value: Any, spec: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "-"


def row(config: Mapping[str, Any], result: Mapping[str, Any], status: str) -> str:
    """One trial's line of the table."""
    step = result.get("step")
    total = result.get("total_steps")
    steps = "-" if step is None else f"{step}/{total}" if total else str(step)
    cells = (
        str(config.get("task", "?")),
        str(config.get("label") or config.get("policy", "?")),
        str(config.get("seed", "?")),
        steps,
        _number(result.get("val_acc"), ".4f"),
        _number(result.get("val_loss"), ".4f"),
        _number(result.get("lr"), ".2e"),
        status,
    )
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True)).rstrip()


def header() -> str:
    return "  ".join(h.ljust(w) for h, w in _COLUMNS).rstrip()


class ProgressTable(tune.Callback):
    """Prints the experiment's progress as a compact table (see the module docstring)."""

    def __init__(self, interval: float = 15.0, stream: TextIO | None = None) -> None:
        self.interval = interval
        self.stream = stream
        self._start = time.monotonic()
        self._last = -math.inf
        self._results: dict[str, Mapping[str, Any]] = {}
        self._status: dict[str, str] = {}  # trial id -> running / ended status
        self._configs: dict[str, Mapping[str, Any]] = {}
        self._unshown: list[str] = []  # trials that ended since the last table

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._configs[trial.trial_id] = trial.config
        self._status[trial.trial_id] = "running"

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._configs[trial.trial_id] = trial.config
        self._results[trial.trial_id] = result
        self._status[trial.trial_id] = "running"

    def _ended(self, trial: Any, status: str) -> None:
        self._configs.setdefault(trial.trial_id, trial.config)
        self._status[trial.trial_id] = status
        self._unshown.append(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = self._results.get(trial.trial_id, getattr(trial, "last_result", {}) or {})
        status = str(last.get("status", "finished"))
        # a trial a scheduler stopped ends without a final status of its own
        self._ended(trial, "stopped" if status == "running" else status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "error")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.interval:
            self.print_table(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.print_table(trials)

    def print_table(self, trials: list) -> None:
        """The status line and the rows of running and newly ended trials."""
        self._last = time.monotonic()
        running = [t for t, s in self._status.items() if s == "running"]
        rows = [*running, *[t for t in self._unshown if t not in running]]
        if not rows:
            return
        ended = sum(1 for s in self._status.values() if s != "running")
        pending = max(0, len(trials) - len(self._status))
        out = self._out()
        print(
            f"[{time.monotonic() - self._start:5.0f} s] {len(running)} running, {pending} "
            f"pending, {ended} ended of {len(trials)} trials",
            file=out,
        )
        print(header(), file=out)
        for trial_id in rows:
            result = self._results.get(trial_id, {})
            print(row(self._configs[trial_id], result, self._status[trial_id]), file=out)
        self._unshown = []
        out.flush()


__all__ = ["ProgressTable", "header", "row"]
