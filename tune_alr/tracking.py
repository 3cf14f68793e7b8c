"""MLflow tracking: one parent run per experiment, one child run per trial.

All writes happen in the driver, through ``MlflowClient`` (no global active run, so
nothing leaks between experiments): :func:`prepare` creates the store, the MLflow
experiment and the parent run before Ray starts any trial (two trials creating a new
sqlite database at once fail), and ``tune_alr.mlflow_callback.MLflowTracking`` is the
Ray Tune callback that logs each trial's results through :class:`TrialLogger` as they
arrive. This module does not import Ray. The trainable knows nothing of MLflow.

A child run is named ``<task>/<policy>/seed<k>`` and tagged with the Tune trial id, so a
restarted trial or a resumed experiment continues its run instead of opening a second
one. Each report's ``lr_trace`` becomes the metric ``lr`` at every optimizer step.

If the tracking store fails mid-run, training goes on: the callback warns once and
stops logging; every result stays in Ray's experiment folder, from which
``tune-alr report DIR`` rebuilds the tables and ``tune-alr report DIR --tracking-uri
URI`` re-logs it (:func:`relog`), continuing the runs logged in part. HTTP stores are
asked with few retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=3``, a 15 s timeout, unless
set), so that an outage stalls the driver seconds, not minutes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import credentials

log = logging.getLogger(__name__)

TRIAL_TAG = "tune_alr.trial_id"
STATUS_TAG = "tune_alr.status"
ERROR_TAG = "tune_alr.error"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
STOP_TAG = "tune_alr.stop_reason"
#: MLflow 3's value of ``mlflow.experimentKind`` for model training: without it the UI
#: opens an experiment on its GenAI overview (traces, token usage).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
_BATCH = 500  # MLflow accepts at most 1000 metrics per log_batch
#: What a run's metrics are led by: no prefix, so MLflow lists and charts them first.
MAIN_METRICS = ("val_acc", "val_loss", "lr", "train_loss", "best_val_acc", "test_acc",
                "test_loss", "steps_to_target", "wall_s_to_target", "epochs_to_stable")  # fmt: skip
#: Report keys logged under a section prefix (MLflow groups charts by prefix).
_SECTIONS = {
    "epoch": "train/epoch",
    "skipped_steps": "train/skipped_steps",
    "samples_per_s": "speed/samples_per_s",
    "policy_ms_per_step": "speed/policy_ms_per_step",
    "wall_s": "time/wall_s",
    "window_s": "time/window_s",
    "loop_s": "time/loop_s",
    "restored_lr": "train/restored_lr",
}
#: Report keys that are not metrics: Ray Tune's bookkeeping, the per-step LR trace (``lr``
#: is logged at every step from it), the step (the x axis) and the constants.
_NOT_METRICS = {
    "lr", "lr_trace", "lr_trace_start", "step", "status", "config", "total_steps",
    "num_classes",
    "timestamp", "pid", "time_this_iter_s", "time_total_s", "training_iteration",
    "iterations_since_restore", "time_since_restore", "done", "trial_id", "date",
    "hostname", "node_ip", "checkpoint_dir_name", "should_checkpoint", "experiment_tag",
}  # fmt: skip
#: Report keys that become tags of the trial's run (strings, said once).
_TAGS = {
    "data_notes": "tune_alr.data",
    "profile": "tune_alr.profile",
    "caps_notes": "tune_alr.caps",
    "node_id": "tune_alr.node_id",
    "node_ip": "tune_alr.node_ip",
    "diverged_reason": "tune_alr.diverged_reason",
    "reapplied": "tune_alr.reapplied",
    "error": ERROR_TAG,
}
_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db``, MLflow's own default location."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> str:
    """Raise ``ValueError`` unless ``uri`` is a tracking URI MLflow 3 accepts.

    Checks the form only (no connection); messages show the URI without its secrets.
    """
    parsed = urlparse(uri) if isinstance(uri, str) else None
    shown = credentials.public_uri(uri) if isinstance(uri, str) else uri
    if parsed is None or parsed.scheme not in _SCHEMES:
        raise ValueError(
            f"malformed tracking URI {shown!r}; use sqlite:///path/to/mlflow.db, "
            "http://host:port or another MLflow store URI "
            f"(schemes: {', '.join(_SCHEMES)})."
        )
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        raise ValueError(f"tracking URI {shown!r} has no host; e.g. http://127.0.0.1:5000.")
    if parsed.scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None or uri.endswith("/") or path.is_dir():
            raise ValueError(
                f"tracking URI {shown!r} names no database file (a folder or nothing); "
                "e.g. sqlite:///mlflow.db."
            )
    return uri


def redact(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (for printing and warnings)."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :]
    return Path(rest) if rest and rest != ":memory:" else None


def _artifact_location(uri: str) -> str | None:
    # Beside a sqlite store, not in the current folder: the trials' working folders
    # differ from the driver's, and MLflow's default would scatter artifacts.
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlartifacts").as_uri()


@dataclass(frozen=True)
class Handle:
    """Where an experiment's runs live."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=credentials.connection_uri(uri))


def prepare(uri: str, experiment: str, run_name: str, tags: Mapping[str, str]) -> Handle:
    """Create (or reuse) the store, the MLflow experiment and the parent run.

    The handle holds the URI's public form (``tune_alr.credentials``). A store that
    cannot be reached or used (a corrupt database, a server that is down) raises
    ``ValueError`` naming it, in seconds.
    """
    return _create(uri, _process_settings(uri), experiment, run_name, tags)


def prepare_in_background(
    uri: str, experiment: str, run_name: str, tags: Mapping[str, str]
) -> concurrent.futures.Future[Handle]:
    """:func:`prepare` in a thread of its own (its result, or its ``ValueError``, from the
    future): creating a new sqlite store runs MLflow's schema migrations, seconds of one
    core that the driver can spend starting Ray meanwhile. What touches this process's
    environment (credentials, MLflow's HTTP settings) is done here, in the caller's
    thread, before the thread starts."""
    public = _process_settings(uri)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tune-alr-mlflow")
    try:
        return pool.submit(_create, uri, public, experiment, run_name, tags)
    finally:
        pool.shutdown(wait=False)


def _process_settings(uri: str) -> str:
    """Check ``uri``, register its credentials and MLflow's HTTP settings; its public form."""
    check_tracking_uri(uri)
    public = credentials.register(uri)
    # MLflow's defaults (7 retries, 120 s timeout) would stall the driver for minutes
    # on an outage; the user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    return public


def _create(
    uri: str, public: str, experiment: str, run_name: str, tags: Mapping[str, str]
) -> Handle:
    _check_reachable(public)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # "Creating initial MLflow database tables..." at INFO: set-up chatter, not news.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        # Two drivers creating one new sqlite store at once collide in MLflow's schema
        # set-up: they take turns here (the lock is the store file's own).
        with _store_lock(db):
            client = _client(public)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                experiment_id = client.create_experiment(
                    experiment,
                    artifact_location=_artifact_location(uri),
                    tags=dict([EXPERIMENT_KIND]),
                )
            else:
                experiment_id = found.experiment_id
                if EXPERIMENT_KIND[0] not in found.tags:
                    client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
            parent = client.create_run(experiment_id, run_name=run_name, tags=standard_tags(tags))
    except Exception as err:
        first = credentials.scrub(str(err)).strip().splitlines()[:1] or [""]
        raise ValueError(
            f"the tracking store {public} cannot be used: {type(err).__name__}: {first[0]}"
        ) from None
    return Handle(public, experiment_id, parent.info.run_id)


def check_store(uri: str) -> None:
    """Raise ``ValueError`` now for a store that cannot work: an HTTP(S) server that does
    not answer, or an existing sqlite file that is not a database. Reads nothing else."""
    _check_reachable(credentials.public_uri(uri))
    db = sqlite_path(uri)
    if db is not None and db.is_file():
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as err:
            raise ValueError(
                f"the tracking store {credentials.public_uri(uri)} cannot be used: "
                f"{str(db)!r} is not an sqlite database ({err})."
            ) from None


def training_view(base_url: str, experiment_id: str) -> str:
    """The UI address of an experiment's runs in MLflow's training view.

    MLflow 3.17's UI opens an experiment on its GenAI overview unless the address says
    ``workflowType=machine_learning`` (it does not yet follow the experiment's
    ``mlflow.experimentKind`` tag, which this project sets too: mlflow/mlflow#24498).
    """
    return (
        f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    )


def latest_experiment(uri: str) -> tuple[str, str] | None:
    """``(id, name)`` of the store's most recently updated experiment, if any."""
    client = _client(uri)
    found = client.search_experiments(order_by=["last_update_time DESC"], max_results=1)
    return (found[0].experiment_id, found[0].name) if found else None


def standard_tags(tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow's standard run tags (user, source, git commit where known), the project's
    version and the command line (secrets scrubbed), under ``tags``."""
    import sys

    from mlflow.tracking.context.registry import resolve_tags

    from . import __version__

    own = {
        "tune_alr.version": __version__,
        "tune_alr.command": credentials.scrub(" ".join(sys.argv))[:5000],
    }
    out: dict[str, str] = resolve_tags({**own, **dict(tags or {})})
    return out


def log_params(handle: Handle, run_id: str, params: Mapping[str, Any]) -> None:
    """Log ``params`` (nested dicts flattened with dots; ``None`` values left out)."""
    from mlflow.entities import Param

    flat = [Param(k, v) for k, v in _flatten(params).items()]
    client = _client(handle.tracking_uri)
    for i in range(0, len(flat), 100):
        client.log_batch(run_id, params=flat[i : i + 100])


def _check_reachable(uri: str, timeout: float = 3.0) -> None:
    """An HTTP(S) store's host and port answer, or ``ValueError`` (before any retry)."""
    import socket

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return
    except OSError as err:
        raise ValueError(
            f"the tracking store {uri} is unreachable ({type(err).__name__}: {err}); start "
            "the MLflow server, or use a sqlite:/// store."
        ) from None


@contextlib.contextmanager
def _store_lock(db: Path | None) -> Iterator[None]:
    """An exclusive lock on the sqlite file ``db`` for the block (none when ``db`` is None).

    The file itself is locked (created empty if new: sqlite takes an empty file as a new
    database), not its folder: the folder may be a run's output folder, which
    ``storage.exclusive`` holds locked for the whole run.
    """
    if db is None:
        yield
        return
    import fcntl

    fd = os.open(db, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def reopen_parent(handle: Handle) -> None:
    """Mark the parent run RUNNING again (an experiment resumed after its driver died)."""
    _client(handle.tracking_uri).update_run(handle.parent_run_id, status="RUNNING")


def log_artifacts(uri: str, run_id: str, artifacts: Iterable[Path]) -> None:
    """Attach files to a run (finished or not)."""
    client = _client(uri)
    for path in artifacts:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))


def finish_parent(handle: Handle, status: str, artifacts: Iterable[Path] = ()) -> None:
    """Attach the experiment's summary files to the parent run and end it.

    A ``summary.md`` among them also becomes the run's description (the UI's notes).
    """
    client = _client(handle.tracking_uri)
    for path in artifacts:
        if path.is_file():
            client.log_artifact(handle.parent_run_id, str(path))
            if path.name == "summary.md":
                client.set_tag(handle.parent_run_id, NOTE_TAG, path.read_text()[:50_000])
    client.set_terminated(handle.parent_run_id, status)


@contextlib.contextmanager
def system_metrics(handle: Handle | None, interval_s: float = 5.0) -> Iterator[None]:
    """MLflow's own system metrics (``system/*``) of this machine on the parent run.

    They describe the machine the driver runs on (all trials, when Ray runs here);
    each trial's own figures are its ``proc/*`` metrics. A failure to start them is
    a warning, never an error.
    """
    monitor = None
    if handle is not None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Its start/stop lines at INFO would interleave with Ray Tune's progress.
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            monitor = SystemMetricsMonitor(
                handle.parent_run_id,
                sampling_interval=interval_s,
                tracking_uri=handle.tracking_uri,
            )
            monitor.start()
        except Exception as err:
            log.warning("MLflow system metrics not started: %s", err)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def trial_run_name(config: Mapping[str, Any]) -> str:
    label = config.get("label") or config.get("policy")
    return f"{config.get('task')}/{label}/seed{config.get('seed')}"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        elif value is not None:  # unset: no param, never the string 'None'
            out[name] = str(value)[:6000]
    return out


def _resolved(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The trial's full settings, task defaults filled in, for the run's params."""
    from trainables.config import TrialConfig

    try:
        return TrialConfig.from_dict(config).to_dict()
    except ValueError:
        return config


@dataclass
class _TrialLog:
    run_id: str
    lr_steps: list[int] = field(default_factory=list)
    lr_values: list[float] = field(default_factory=list)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # step, val_loss, val_acc
    epochs: list[float] = field(default_factory=list)  # the epoch of each curve point
    last_step: int = 0
    constants_logged: bool = False
    #: The tags as last written to the run: a report writes only the ones that changed.
    tags: dict[str, str] = field(default_factory=dict)


class TrialLogger:
    """Writes trials into child runs of one parent run; shared by live and offline logging."""

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self._client = _client(handle.tracking_uri)
        self._trials: dict[str, _TrialLog] = {}

    def start(self, trial_id: str, config: Mapping[str, Any]) -> None:
        """Open (or reopen, after a restart) the child run of ``trial_id``."""
        if trial_id in self._trials:
            return
        from mlflow.entities import Param

        existing = self._client.search_runs(
            [self.handle.experiment_id],
            filter_string=(
                f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                f"tags.`mlflow.parentRunId` = '{self.handle.parent_run_id}'"
            ),
            max_results=1,
        )
        if existing:
            run_id = existing[0].info.run_id
            state = _TrialLog(run_id)
            history = self._client.get_metric_history(run_id, "lr")
            state.last_step = max((m.step for m in history), default=0)
            state.lr_steps = [m.step for m in history]
            state.lr_values = [m.value for m in history]
            self._client.update_run(run_id, status="RUNNING")
            self._trials[trial_id] = state
            return
        run = self._client.create_run(
            self.handle.experiment_id,
            run_name=trial_run_name(config),
            tags=standard_tags(
                {"mlflow.parentRunId": self.handle.parent_run_id, TRIAL_TAG: trial_id}
            ),
        )
        params = [Param(k, v) for k, v in _flatten(_resolved(config)).items()]
        for i in range(0, len(params), 100):
            self._client.log_batch(run.info.run_id, params=params[i : i + 100])
        self._trials[trial_id] = _TrialLog(run.info.run_id)

    def _set_tag(self, state: _TrialLog, key: str, value: str) -> None:
        self._client.set_tag(state.run_id, key, value)
        state.tags[key] = value

    def _write(
        self, state: _TrialLog, tags: Mapping[str, str], metrics: list[Any], params: list[Any]
    ) -> None:
        """One ``log_batch`` per report (one store transaction): the tags that changed,
        the params and the metrics (in chunks MLflow accepts, tags and params first)."""
        from mlflow.entities import RunTag

        changed = [RunTag(k, v) for k, v in tags.items() if state.tags.get(k) != v]
        if not (changed or metrics or params):
            return
        self._client.log_batch(state.run_id, metrics=metrics[:_BATCH], params=params, tags=changed)
        for i in range(_BATCH, len(metrics), _BATCH):
            self._client.log_batch(state.run_id, metrics=metrics[i : i + _BATCH])
        state.tags.update({t.key: t.value for t in changed})

    def result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """Log one report: its scalar metrics at its step, and ``lr`` at every step.

        A report is one write to the store: tags are written when their value changes
        (``tune_alr.status`` says "running" once, not at every report).
        """
        from mlflow.entities import Metric, Param

        state = self._trials[trial_id]
        # A trial that fails mid-run reports its status (a tag) without a step.
        tags: dict[str, str] = {}
        if "status" in result:
            tags[STATUS_TAG] = str(result["status"])
        for key, tag in _TAGS.items():
            if key in result:
                tags[tag] = str(result[key])[:5000]
        if "step" not in result:
            self._write(state, tags, [], [])
            return
        step = int(result["step"])
        if step <= state.last_step and state.last_step > 0:
            # Already logged (a report repeated after a restart, or re-logged after an
            # outage): only the curve for the PNGs and epochs_to_stable is rebuilt.
            if "val_loss" in result and step not in {s for s, _, _ in state.curve}:
                state.curve.append((step, float(result["val_loss"]), float(result["val_acc"])))
                state.epochs.append(float(result.get("epoch", math.nan)))
            self._write(state, tags, [], [])
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(_SECTIONS.get(key, key), float(value), now, step)
            for key, value in result.items()
            if key not in _NOT_METRICS
            and not key.startswith("caps/")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
        ]
        # caps/*: once per start of the trial's process, what it ran under
        for key, value in result.items():
            if key.startswith("caps/"):
                tags[f"tune_alr.{key.replace('/', '.')}"] = str(value)
        params = []
        if "total_steps" in result and not state.constants_logged:
            params.append(Param("total_steps", str(int(result["total_steps"]))))
        start = int(result.get("lr_trace_start", step + 1))
        for offset, lr in enumerate(result.get("lr_trace") or ()):
            lr_step = start + offset
            if lr_step > state.last_step:
                metrics.append(Metric("lr", float(lr), now, lr_step))
                state.lr_steps.append(lr_step)
                state.lr_values.append(float(lr))
        self._write(state, tags, metrics, params)
        state.constants_logged = state.constants_logged or bool(params)
        if "val_loss" in result:
            state.curve.append((step, float(result["val_loss"]), float(result["val_acc"])))
            state.epochs.append(float(result.get("epoch", math.nan)))
        state.last_step = step

    def open_trials(self) -> list[str]:
        """The trials whose runs this logger has started and not yet ended."""
        return list(self._trials)

    def stop(self, trial_id: str, reason: str) -> None:
        """End the run of a trial stopped before its last step: KILLED (MLflow's word for
        a run ended from outside), tagged ``tune_alr.status=stopped`` with the reason."""
        state = self._trials.get(trial_id)
        if state is None:
            return
        self._set_tag(state, STOP_TAG, reason[:5000])
        self.finish(trial_id, "KILLED")
        self._set_tag(state, STATUS_TAG, "stopped")

    def finish(self, trial_id: str, status: str, error: str | None = None) -> None:
        """Attach the LR and validation curves and end the run (FINISHED or FAILED).

        A FAILED run is tagged ``tune_alr.status=failed`` and, when known, with the
        error (``tune_alr.error``), so the status tag never says "running" after the end.
        """
        state = self._trials.get(trial_id)
        if state is None:
            return
        if error:
            self._set_tag(state, ERROR_TAG, credentials.scrub(error)[-5000:])
        if status == "FAILED":
            self._set_tag(state, STATUS_TAG, "failed")
        from .report import epochs_to_stable, plot_trial_curves

        if state.curve:
            stable = epochs_to_stable(state.epochs, [loss for _, loss, _ in state.curve])
            if math.isfinite(stable):
                self._client.log_metric(state.run_id, "epochs_to_stable", stable)

        with tempfile.TemporaryDirectory() as tmp:
            for path in plot_trial_curves(state.lr_steps, state.lr_values, state.curve, Path(tmp)):
                self._client.log_artifact(state.run_id, str(path))
        self._client.set_terminated(state.run_id, status)
        del self._trials[trial_id]


def relog(
    records: Iterable[Any], uri: str, experiment: str, parent: Handle | None = None
) -> Handle:
    """Log an experiment's trials from Ray Tune's folder into MLflow.

    For after a tracking outage (runs logged in part are continued, not duplicated:
    the same parent run when ``parent`` is in the store ``uri``), or to copy an
    experiment into another store (a new parent run). ``records`` are
    ``report.TrialRecord`` s. The caller ends the parent with :func:`finish_parent`.
    """
    check_tracking_uri(uri)
    if parent is not None and parent.tracking_uri == uri:
        reopen_parent(parent)
        handle = parent
    else:
        handle = prepare(uri, experiment, run_name=experiment, tags={"tune_alr.relogged": "1"})
    logger = TrialLogger(handle)
    for record in records:
        logger.start(record.trial_id, record.config)
        for result in record.results:
            logger.result(record.trial_id, result)
        if record.status == "stopped":
            logger.stop(record.trial_id, str(record.stop_reason))
            continue
        status = "FINISHED" if record.status in ("finished", "diverged") else "FAILED"
        last = record.results[-1] if record.results else {}
        logger.finish(record.trial_id, status, record.error or last.get("error"))
    return handle
