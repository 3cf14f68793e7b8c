"""Every result of every trial, appended to the trial's folder as the driver receives it.

Ray Tune 2.60 keeps a trial's ``result.json`` in a staging folder of the driver and
copies it into the experiment's storage from time to time. When a trial restarts from a
checkpoint (a PBT or PB2 exploit, a member resumed after a pause, a retry after a
crash), its JSON logger first copies the storage's ``result.json`` back over the staging
one: the reports received since the last copy are lost from the file. Measured here: the
PBT searches of the digits leaderboard (a 1360-step budget, counted from the reports the
driver received) left 760 to 1260 steps in their members' ``result.json`` files.

:class:`ResultLog` writes each result straight into the trial's storage folder
(``tune_alr_results.jsonl``, next to ``result.json``), where nothing overwrites it, and
:func:`tune_alr.report.load_trials` reads it in preference to ``result.json``. It writes
only where the storage is a local (or mounted) filesystem; with a storage URI the tables
fall back to ``result.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune

from .report import RESULTS_FILE


def _local_folder(trial: Any) -> Path | None:
    """The trial's storage folder when the storage is this machine's filesystem."""
    import pyarrow.fs

    storage = getattr(trial, "storage", None)
    if storage is None or not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return None
    return Path(trial.path)


class ResultLog(tune.Callback):
    """Appends each trial result, as JSON, to ``<trial folder>/tune_alr_results.jsonl``."""

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        folder = _local_folder(trial)
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / RESULTS_FILE).open("a") as out:
            out.write(json.dumps(result, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    """What ``json`` cannot write itself: numpy scalars and arrays, and the rest as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


__all__ = ["ResultLog"]
