"""The Ray Tune adapter: the only module of ``trainables`` that imports Ray.

``train(config)`` is a Ray Tune function trainable. It resumes from
``tune.get_checkpoint()`` when Ray restarts the trial, and forwards every report of the
loop to ``tune.report`` with its checkpoint; the first report of each start or restart also
says which node it ran on (``node_id``, ``node_ip``). (``ray.train.report`` and
``ray.train.get_checkpoint`` make a Tune trial fail under Ray 2.60: use ``ray.tune``'s.)

Two kinds of failure are handled here rather than left to Ray's retries:

* an error a retry would only repeat (:data:`DETERMINISTIC`: bad data or settings, the
  memory guard) ends the trial at once with a last result ``{"status": "failed",
  "error": "<Type>: <message>"}`` and no checkpoint; its traceback goes to the worker's
  log once. Any other error still raises, and Ray restarts the trial from its last
  checkpoint (``FailureConfig.max_failures``).
* a checkpoint that does not load (a truncated or missing ``checkpoint.pt``) is skipped
  with a warning for the newest older one that does (Ray keeps ``num_to_keep`` of them as
  sibling ``checkpoint_<n>`` folders), or, when none loads, the trial starts afresh.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import ray
from ray import tune

from tune_alr.monitor import MemoryCapExceeded

from . import loop
from .checkpoint import CHECKPOINT_FILE, TrainState

logger = logging.getLogger(__name__)

#: Errors that a retry would only repeat: ``ValueError`` (every config and data check,
#: ``hub.DataUnavailable`` included) and the memory guard's ``MemoryCapExceeded`` (a
#: ``MemoryError``: the same trial under the same cap trips it again).
DETERMINISTIC: tuple[type[Exception], ...] = (ValueError, MemoryCapExceeded)

#: The longest ``error`` a failed trial's last result carries.
ERROR_CHARS = 500

_CHECKPOINT_FOLDER = re.compile(r"checkpoint_(\d+)")


def error_line(err: BaseException, limit: int = ERROR_CHARS) -> str:
    """``"<Type>: <message>"`` on one line (whitespace collapsed), at most ``limit`` chars."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    if "caps/threads" in metrics:  # the first report of this start: say where it ran
        context = ray.get_runtime_context()
        metrics = {
            **metrics,
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
        }
    tune.report(metrics, checkpoint=checkpoint)


def _checkpoint_index(folder: str) -> int | None:
    """``n`` of a ``checkpoint_<n>`` folder name; ``None`` for any other name."""
    match = _CHECKPOINT_FOLDER.fullmatch(folder.rstrip("/").rpartition("/")[2])
    return int(match.group(1)) if match else None


def newest_first(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """``checkpoint``, then its older siblings (``checkpoint_<n>``, smaller ``n``), newest first.

    The siblings are listed through the checkpoint's own (pyarrow) filesystem, so this works
    for a folder and for a storage URI alike. A folder that cannot be listed gives
    ``[checkpoint]``.
    """
    import pyarrow.fs

    own, filesystem = _checkpoint_index(checkpoint.path), checkpoint.filesystem
    if own is None or filesystem is None:
        return [checkpoint]
    parent = checkpoint.path.rstrip("/").rpartition("/")[0]
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return [checkpoint]
    older = []
    for entry in entries:
        index = _checkpoint_index(entry.path)
        if entry.type == pyarrow.fs.FileType.Directory and index is not None and index < own:
            older.append((index, entry.path))
    older.sort(reverse=True)
    return [checkpoint, *(tune.Checkpoint(path, filesystem) for _, path in older)]


def _load(checkpoint: tune.Checkpoint) -> TrainState:
    with checkpoint.as_directory() as directory:
        return loop.load_checkpoint(directory)


def resume_state(checkpoint: tune.Checkpoint | None) -> TrainState | None:
    """The state of the newest checkpoint of :func:`newest_first` that loads, or ``None``.

    A checkpoint that does not load is skipped with a warning naming its file; when none
    loads, a warning says the trial starts from scratch and ``None`` is returned.
    """
    if checkpoint is None:
        return None
    for candidate in newest_first(checkpoint):
        try:
            state = _load(candidate)
        # Whatever broke the file (truncated: torch.load's RuntimeError or EOFError;
        # missing: FileNotFoundError; not a checkpoint: ValueError), it cannot resume the
        # trial, and raising would have Ray retry on the same file until max_failures.
        except Exception as err:
            logger.warning(
                "checkpoint file %s/%s does not load (%s); trying an older checkpoint",
                candidate.path,
                CHECKPOINT_FILE,
                error_line(err),
            )
            continue
        if candidate is not checkpoint:
            logger.warning("resuming from the older checkpoint %s", candidate.path)
        return state
    logger.warning(
        "no checkpoint of this trial loads (newest: %s); starting from scratch", checkpoint.path
    )
    return None


def train(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one model under one policy (see ``trainables.loop``).

    Resumes from the newest checkpoint that loads (:func:`resume_state`). An error of
    :data:`DETERMINISTIC` ends the trial without a retry: a last result
    ``{"status": "failed", "error": error_line(err)}``, and a normal return. Any other error
    raises, so Ray restarts the trial from its last checkpoint.
    """
    # Ray logs "Checkpoint successfully created at ..." at every report, forwarded to
    # the driver's terminal: the progress table says what matters.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    try:
        resume = resume_state(tune.get_checkpoint())
        loop.train(config, _report, resume=resume)
    except DETERMINISTIC as err:
        # Raising would have Ray restart the trial max_failures times into the same error,
        # each with its traceback; one last result says what went wrong, and the driver
        # counts the trial as failed.
        logger.error("trial failed, not retried (a retry fails the same way)", exc_info=True)
        tune.report({"status": "failed", "error": error_line(err)})
