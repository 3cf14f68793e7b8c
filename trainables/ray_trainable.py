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

Reports are handed to Ray Tune one report ahead (:class:`ReportAhead`). A function
trainable's ``tune.report`` returns only once the driver has processed the result (its
callbacks, MLflow logging included) and asked for the next one: a round trip that the
training thread would otherwise wait out at every report (tens of milliseconds on a
loaded 2-core machine, more than a digits window). Here a thread of the trial's own makes
that call while the loop trains the next window; the loop waits for it at its next report
at the latest, so at most one report is in flight and Ray Tune receives them in order.
When Ray Tune stops the trial (a scheduler's or stopper's decision), the thread sending
the report is told so, and the loop ends after its current optimizer step (``should_stop``
of ``trainables.loop.train``), without a further report, as it would have ended inside
this report before.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from typing import Any

import ray
from ray import tune

from tune_alr.monitor import MemoryCapExceeded

from . import loop
from .checkpoint import CHECKPOINT_FILE, TrainState

logger = logging.getLogger(__name__)
# Ray's trainable logs "Restored on <ip> from checkpoint: ..." at every restore (each PBT
# exploit, each retry), forwarded to the driver's terminal, and does so in the worker
# before ``train`` runs: quieted here, when the worker imports this module to unpickle
# the trainable. The progress table and MLflow's ``reapplied`` say what matters.
logging.getLogger("ray.tune.trainable.trainable").setLevel(logging.WARNING)

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
    if metrics.get("status", "running") != "running":
        # The trial's last result. Ray Tune reads ``done`` as "stop this trial" before it
        # asks the scheduler: without it a scheduler that pauses trials on a result
        # (MedianStoppingRule, HyperBand) could pause a finished one, which would resume
        # from its final checkpoint, report "finished" again, and be paused again.
        metrics = {**metrics, "done": True}
    if "caps/threads" in metrics:  # the first report of this start: say where it ran
        context = ray.get_runtime_context()
        metrics = {
            **metrics,
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
        }
    tune.report(metrics, checkpoint=checkpoint)


class ReportAhead:
    """A loop ``report`` that hands each report to ``send`` in a thread of its own.

    ``send(metrics, checkpoint_dir)`` runs for one report at a time, in report order: a
    call waits for the previous report's ``send`` to return (and raises what it raised) before
    starting this one's. The checkpoint folder, which the loop deletes when ``report``
    returns, is moved aside first and deleted after ``send``. A ``SystemExit`` inside
    ``send`` (Ray Tune stopping the trial) sets :attr:`stopped` (the loop's
    ``should_stop``) and makes the next call, or :meth:`wait`, raise ``SystemExit(0)`` in
    the caller's thread, which ends the trainable as Ray Tune expects.
    Threads start from the caller's, so they inherit its CPU affinity (the profile's cores).
    """

    def __init__(self, send: Callable[[dict[str, Any], str | None], None]) -> None:
        self._send = send
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.stopped = False

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.wait()
        own = None
        if checkpoint_dir is not None:
            own = f"{checkpoint_dir}.report"
            os.rename(checkpoint_dir, own)  # the loop deletes its folder when this returns
        self._thread = threading.Thread(
            target=self._run, args=(dict(metrics), own), name="tune-alr-report", daemon=True
        )
        self._thread.start()

    def _run(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        try:
            self._send(metrics, checkpoint_dir)
        except SystemExit:
            self.stopped = True
        except BaseException as err:  # raised in the training thread at its next report
            self._error = err
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def is_stopped(self) -> bool:
        """Whether Ray Tune has stopped the trial (the loop's ``should_stop``)."""
        return self.stopped

    def drain(self) -> None:
        """Wait until the report in flight, if any, has been sent."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """:meth:`drain`, then raise what the last ``send`` raised, or ``SystemExit(0)`` if
        Ray Tune stopped the trial."""
        self.drain()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self.stopped:
            raise SystemExit(0)


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

    Resumes from the newest checkpoint that loads (:func:`resume_state`). Reports go to
    ``tune.report`` one report ahead (:class:`ReportAhead`); all are sent before it
    returns. An error of :data:`DETERMINISTIC` ends the trial without a retry: a last
    result ``{"status": "failed", "error": error_line(err)}``, and a normal return. Any
    other error raises, so Ray restarts the trial from its last checkpoint.
    """
    # Ray logs "Checkpoint successfully created at ..." at every report, forwarded to
    # the driver's terminal: the progress table says what matters.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    reporter = ReportAhead(_report)
    try:
        try:
            resume = resume_state(tune.get_checkpoint())
            loop.train(config, reporter, resume=resume, should_stop=reporter.is_stopped)
        except loop.Stopped:
            raise SystemExit(0) from None  # Ray Tune stopped the trial: end as it expects
        finally:
            reporter.drain()  # every report sent before the trainable returns or raises
        reporter.wait()
    except DETERMINISTIC as err:
        # Raising would have Ray restart the trial max_failures times into the same error,
        # each with its traceback; one last result says what went wrong, and the driver
        # counts the trial as failed.
        logger.error("trial failed, not retried (a retry fails the same way)", exc_info=True)
        if reporter.stopped:
            raise SystemExit(0) from None
        tune.report({"status": "failed", "error": error_line(err), "done": True})
