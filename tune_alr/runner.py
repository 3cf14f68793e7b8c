"""Running experiments: the Ray lifecycle and the MLflow parent run, shared by every job.

    results = tune_alr.run(exp)            # validate, start Ray, fit, collect
    results = tune_alr.resume("results/demo/ray/demo")

``run``, ``resume``, ``bench`` and the tuned searches (``tune_alr.tuning``) all go
through the same two context managers:

* :func:`ray_session` starts Ray on this machine (bound to 127.0.0.1, with Ray's own
  authentication settings left as the user has them) or joins the cluster at
  ``address``, and shuts down only a Ray it started;
* :func:`parent_run` creates (or reopens) the MLflow parent run in the driver before
  any trial starts, and always closes it with the status the run earned: ``FINISHED``,
  or ``FAILED`` when the run raised or every trial failed. A failure to close it is a
  warning, so a tracking error never hides a training error.

:func:`parent_and_ray` enters both, the store's preparation in a thread while Ray
starts (``run`` and ``bench`` use it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import credentials, storage, tracking
from .experiment import Experiment
from .results import Results, collect, summary_files, trial_folders
from .tuner import (
    build_tuner,
    environment_variable,
    quiet_ray_output,
    tuner_space,
    without_tensorboard,
)

#: The address a Ray started here binds to: this machine only.
LOOPBACK = "127.0.0.1"


#: Ray's switch for a one-machine node: with it off, Ray takes the loopback address as
#: the node's address (as it does on macOS and Windows) and every server it starts (GCS,
#: raylet, workers, agents) listens there only. Read by Ray when it resolves addresses.
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Make a Ray started in this block bind 127.0.0.1 only; restore the setting after.

    Ray resolves ``127.0.0.1`` given as the node address to the machine's main interface
    (so that other nodes could join), and its servers then listen on every interface.
    For a Ray that is this machine alone, the cluster switch is turned off for the
    processes it starts (through the environment they inherit) and for this driver
    (Ray reads the constant at import, so the imported one is set too).
    """
    from ray._private import ray_constants

    saved_constant = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved_constant is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environment_variable(_CLUSTER_SWITCH, "0"):
            yield
    finally:
        if saved_constant is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_constant


@contextlib.contextmanager
def ray_session(
    address: str | None = None, node_resource: str | None = None, **init_kwargs: Any
) -> Iterator[bool]:
    """Ray for the duration of the block; yields whether this call started it.

    Uses a Ray that is already initialised as it is. Otherwise joins ``address`` (a
    cluster) or starts Ray here bound to the loopback address only, so that no other
    machine can reach its ports (Ray's token authentication stays as the user has it).
    ``node_resource``: a custom resource this machine then offers (a node type the
    trials ask for). ``init_kwargs`` go to ``ray.init`` (e.g. ``num_cpus``).
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    options: dict[str, Any] = {
        "include_dashboard": False,
        "configure_logging": False,
        **init_kwargs,
    }
    if address is not None:
        ray.init(address=address, **options)
        try:
            yield True
        finally:
            ray.shutdown()
        return
    with _loopback_only():
        ray.init(
            _node_ip_address=LOOPBACK,
            resources={node_resource: 1.0} if node_resource else None,
            **options,
        )
        try:
            yield True
        finally:
            ray.shutdown()


@dataclass
class Parent:
    """The MLflow parent run of one job; ``status`` is what it will be closed with."""

    handle: tracking.Handle
    output: Path | None = None
    status: str = "FINISHED"
    files: list[Path] = field(default_factory=list)


def close_parent(handle: tracking.Handle | None, status: str, files: list[Path]) -> None:
    """End the MLflow parent run with ``files`` attached; a failure only warns.

    Tracking must not hide the job's own outcome: whatever went wrong with the store is
    said (credentials redacted) and the job's exception, if any, propagates.
    """
    if handle is None:
        return
    try:
        tracking.finish_parent(handle, status, files)
    except Exception as err:
        warnings.warn(
            f"could not close the MLflow parent run {handle.parent_run_id} at "
            f"{handle.tracking_uri}: {type(err).__name__}: {credentials.scrub(str(err))}",
            RuntimeWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def parent_run(
    uri: str,
    *,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    reopen: tracking.Handle | None = None,
    output: Path | None = None,
    prepared: concurrent.futures.Future[tracking.Handle] | None = None,
) -> Iterator[Parent]:
    """Create (or ``reopen``, or take the ``prepared`` one of
    :func:`tracking.prepare_in_background`) the MLflow parent run; close it however the
    block ends.

    The status is ``FAILED`` when the block raises, else ``parent.status`` (which the
    block may set). The summary files of ``output`` (when given) are attached on close.
    """
    if reopen is not None:
        tracking.reopen_parent(reopen)
        handle = reopen
    elif prepared is not None:
        handle = prepared.result()  # its ValueError, if the store failed
    else:
        handle = tracking.prepare(uri, experiment=experiment, run_name=run_name, tags=tags)
    parent = Parent(handle, output=output)
    try:
        yield parent
    except BaseException:
        parent.status = "FAILED"
        raise
    finally:
        files = parent.files or (summary_files(output) if output is not None else [])
        close_parent(handle, parent.status, files)


@contextlib.contextmanager
def parent_and_ray(
    uri: str,
    *,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    output: Path | None,
    address: str | None,
    node_resource: str | None,
) -> Iterator[tuple[Parent, bool]]:
    """:func:`parent_run` and :func:`ray_session` with their start-ups side by side;
    yields the parent and whether Ray was started here.

    A new sqlite store costs MLflow's schema migrations and Ray's start-up waits on its
    processes: seconds each on one core (py-spy and cProfile of a two-trial bench: about
    as long as each other), so the store is prepared in a thread while Ray starts. The
    store was checked before Ray starts (``Experiment.validate``: a URI, a server that
    does not answer, a file that is not a database); what can still fail in the store
    raises the same ``ValueError`` here, after Ray has started, which is then shut down.
    If Ray fails to start, a parent run already created is ended ``FAILED``. The parent
    is closed before Ray shuts down.
    """
    pending = tracking.prepare_in_background(
        uri, experiment=experiment, run_name=run_name, tags=tags
    )
    with contextlib.ExitStack() as stack:
        try:
            started = stack.enter_context(ray_session(address, node_resource))
        except BaseException:
            _abandon(pending)
            raise
        parent = stack.enter_context(parent_run(
            uri, experiment=experiment, run_name=run_name, tags=tags, output=output,
            prepared=pending,
        ))  # fmt: skip
        yield parent, started


def _abandon(pending: concurrent.futures.Future[tracking.Handle]) -> None:
    """End ``FAILED`` the parent run a failed start leaves behind (if it was created)."""
    try:
        handle = pending.result()
    except Exception:  # the store failed too: the start's own error is the one to show
        return
    close_parent(handle, "FAILED", [])


def check_fits(
    resources: Mapping[str, float], cluster: Mapping[str, float], *, strict: bool
) -> None:
    """Raise ``ValueError`` (``strict``) or warn when no trial could ever be placed.

    Ray would otherwise keep such trials pending forever. On a cluster that may scale
    up (``strict=False``) the resources may still come, so it only warns.
    """
    names = {"cpu": "CPU", "gpu": "GPU"}
    short = []
    for key, amount in resources.items():
        have = float(cluster.get(names.get(key, key), 0.0))
        if amount > have + 1e-9:
            if key == "memory":
                short.append(f"memory {amount / 2**20:.0f} MiB (Ray has {have / 2**20:.0f} MiB)")
            else:
                short.append(f"{names.get(key, key)} {amount:g} (Ray has {have:g})")
    if not short:
        return
    message = (
        f"a trial asks for {', '.join(short)}: no trial could start. Use a smaller profile, "
        "fewer cpus/gpus per trial, or a cluster whose node types offer these resources "
        "(see cluster/README.md)."
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message + " Waiting for the cluster to scale up.", RuntimeWarning, stacklevel=2)


def _fit(exp: Experiment, tuner: Any, parent: Parent) -> Results:
    """Run ``tuner`` (the driver's system metrics logged meanwhile), collect its trials."""
    with (
        tracking.system_metrics(parent.handle),
        quiet_ray_output(exp.verbose),
        without_tensorboard(),
    ):
        grid = tuner.fit()
    results = collect(
        exp,
        storage.local_copy(exp, grid.experiment_path),
        parent.handle.parent_run_id,
        trial_folders(grid),
        parent.handle.experiment_id,
    )
    if results.all_failed:
        parent.status = "FAILED"
    return results


def _tags(exp: Experiment) -> dict[str, str]:
    return {
        "tune_alr.tasks": ",".join(exp.tasks),
        "tune_alr.arms": ",".join(a.label for a in exp.arms),
    }


def run(exp: Experiment) -> Results:
    """Validate ``exp``, run it on Ray Tune with MLflow tracking, and write its summaries.

    Every check that can fail deterministically runs first, before Ray starts.
    Returns the :class:`~tune_alr.results.Results`; ``summary()`` gives one row per
    (task, arm).
    """
    with credentials.scrubbed_output():
        return _run(exp)


def _run(exp: Experiment) -> Results:
    cells = exp.validate()
    note = exp.power_note()
    if note is not None:
        warnings.warn(f"{note} The run goes on; its comparisons will say so.", stacklevel=3)
    import ray

    # Ray snapshots the experiment state whenever a trial has written num_to_keep
    # checkpoints; with a report (and checkpoint) every few seconds that is expected
    # here, cheap for these small states, and its warning would flood the progress.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    resources = exp.ray_resources()
    with (
        storage.exclusive(exp),
        parent_and_ray(
            exp.uri, experiment=exp.name, run_name=exp.name, tags=_tags(exp),
            output=exp.output_dir, address=exp.address, node_resource=exp.node_type_resource,
        ) as (parent, started),
    ):  # fmt: skip
        check_fits(resources, ray.cluster_resources(), strict=started and not exp.address)
        # The experiment's settings on its parent run (as the user gave them; each
        # child run carries its trial's resolved settings).
        tracking.log_params(parent.handle, parent.handle.parent_run_id, exp.to_dict())
        storage.write_spec(exp, parent.handle)
        return _fit(exp, build_tuner(exp, parent.handle, cells), parent)


def read_spec(path: str | os.PathLike[str]) -> tuple[Experiment, tracking.Handle | None]:
    """The Experiment and MLflow handle that :func:`run` saved in its Ray Tune folder."""
    fields, handle = storage.read_spec(_location(path))
    return Experiment.from_dict(fields), handle


def _location(path: str | os.PathLike[str]) -> str:
    """A storage URI as it is; a folder made absolute (Ray Tune needs absolute paths)."""
    text = os.fspath(path)
    return text if "://" in text else str(Path(text).resolve())


def resume(path: str | os.PathLike[str], tracking_uri: str | None = None) -> Results:
    """Finish an interrupted experiment from its Ray Tune folder (``Tuner.restore``).

    Trials that finished are kept as they are; unfinished and errored ones continue from
    their last checkpoints; MLflow logging continues in the same parent and child runs.
    Ray Tune's run settings (progress output included) are those of the first run.

    The saved spec holds the tracking store without its credentials: give them as
    ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` (HTTP stores), or give the store's full
    URI again as ``tracking_uri`` (it must be the same store).

    Raises ``ValueError`` if ``path`` is not an experiment folder ``run`` wrote.
    """
    with credentials.scrubbed_output():
        return _resume(path, tracking_uri)


def _resume(path: str | os.PathLike[str], tracking_uri: str | None) -> Results:
    import dataclasses

    from ray import tune

    import trainables

    location = _location(path)
    exp, handle = read_spec(location)
    if tracking_uri is not None:
        public = credentials.public_uri(tracking_uri)
        if public != credentials.public_uri(exp.uri):
            raise ValueError(
                f"--tracking-uri {public} is not the store this experiment logs to "
                f"({credentials.public_uri(exp.uri)})."
            )
        exp = dataclasses.replace(exp, tracking_uri=tracking_uri)
        credentials.register(tracking_uri)
    if not tune.Tuner.can_restore(location):
        raise ValueError(f"Ray Tune cannot restore {os.fspath(path)!r} (no experiment state).")
    cells = exp.validate()
    with (
        storage.exclusive(exp),
        parent_run(
            exp.uri, experiment=exp.name, run_name=exp.name, tags=_tags(exp),
            reopen=handle, output=exp.output_dir,
        ) as parent,
        ray_session(exp.address, exp.node_type_resource),
    ):  # fmt: skip
        tuner = tune.Tuner.restore(
            location,
            trainable=tune.with_resources(trainables.train, exp.ray_resources()),
            # Trials not started yet hold placeholders for the looked-up settings,
            # which only a re-given param space fills.
            param_space=tuner_space(exp, cells),
            resume_unfinished=True,
            resume_errored=True,
        )
        return _fit(exp, tuner, parent)


__all__ = [
    "LOOPBACK",
    "Parent",
    "check_fits",
    "close_parent",
    "parent_and_ray",
    "parent_run",
    "ray_session",
    "read_spec",
    "resume",
    "run",
]
