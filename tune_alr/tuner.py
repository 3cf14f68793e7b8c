"""The Ray Tune side of an experiment: its param space and its ``Tuner``.

The param space is a grid over task, arm label and seed; every other setting of a
trial is looked up from its (task, arm) cell, resolved completely by
:mod:`tune_alr.settings`, so a trial never fills in a default of its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import tracking

if TYPE_CHECKING:
    from .experiment import Experiment
    from .settings import Cell


def trial_name(trial: Any) -> str:
    """``<task>_<arm>_seed<k>``: the trial's name in Ray Tune's tables."""
    c = trial.config
    return f"{c['task']}_{c.get('label') or c['policy']}_seed{c['seed']}"


def trial_dirname(trial: Any) -> str:
    """The trial's folder: its name and Ray Tune's trial id (unique per run)."""
    return f"{trial_name(trial)}_{trial.trial_id}"


def _lookup(table: Mapping[tuple[str, str], Mapping[str, Any]], key: str) -> Callable[..., Any]:
    """A ``sample_from`` function: the ``key`` setting of the trial's (task, label) cell."""

    def sample(config: Any) -> Any:
        return table[(config["task"], config["label"])][key]

    return sample


def param_space(exp: Experiment, cells: Sequence[Cell] | None = None) -> dict[str, Any]:
    """The Tuner's param space: a grid over task, arm and seed; the rest looked up.

    A setting the same in every cell is given as it is (Ray's tables show it plainly);
    one that differs between cells is looked up from the trial's cell.
    """
    from ray import tune

    cells = list(cells) if cells is not None else exp.validate()
    table = {(c.task, c.label): c.settings for c in cells}
    keys = sorted({k for c in cells for k in c.settings} - {"task", "label"})
    space: dict[str, Any] = {
        "task": tune.grid_search(list(dict.fromkeys(c.task for c in cells))),
        "label": tune.grid_search(list(dict.fromkeys(c.label for c in cells))),
        "seed": tune.grid_search(exp.seed_list),
    }
    for key in keys:
        values = [c.settings[key] for c in cells]
        if all(v == values[0] for v in values[1:]):
            space[key] = values[0]
        else:
            space[key] = tune.sample_from(_lookup(table, key))
    return space


def build_tuner(
    exp: Experiment, handle: tracking.Handle | None, cells: Sequence[Cell] | None = None
) -> Any:
    """The Ray Tune ``Tuner`` for ``exp`` (Ray must be initialised).

    The grid (or, with ``search="optuna"``, Optuna's define-by-run space), the scheduler
    and the stopper of ``exp`` (``tune_alr.scheduling``), the MLflow callback, the
    progress table, and the record of why trials stopped early.
    """
    from ray import tune

    import trainables

    from . import scheduling

    cells = list(cells) if cells is not None else exp.validate()
    dims = scheduling.check(exp)
    population = exp.scheduler in scheduling.POPULATION
    return tune.Tuner(
        tune.with_resources(trainables.train, exp.ray_resources()),
        param_space=tuner_space(exp, cells),
        tune_config=tune.TuneConfig(
            num_samples=exp.num_samples,
            search_alg=scheduling.build_search(exp, cells, dims),
            scheduler=scheduling.build_scheduler(exp, dims),
            max_concurrent_trials=exp.max_concurrent,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
            # A worker process per trial costs seconds of start-up and imports; reusing
            # it between trials with the same resources halves short experiments. PBT and
            # PB2 pause a member at every perturbation while others catch up, then
            # resume it from its checkpoint: in a reused worker (Ray's ``reset_config``
            # ends the paused function first) rather than a fresh process each time.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=exp.storage_path,
            failure_config=tune.FailureConfig(max_failures=exp.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints_to_keep(population)),
            stop=exp.stopper,
            callbacks=run_callbacks(handle, exp.verbose, exp.scheduler, exp.stopper),
            verbose=ray_verbosity(exp.verbose),
        ),
    )


def checkpoints_to_keep(population: bool) -> int | None:
    """Checkpoints Ray Tune keeps per trial: 3, or all of them under a population scheduler.

    An exploit restores the recipient from the donor's latest checkpoint, but the donor
    trains on while the recipient's worker starts (seconds): with reports sent ahead
    (``trainables.ray_trainable``) and short windows it writes several checkpoints in that
    time, and one that Ray has already deleted cannot be restored ("does not exist on
    storage anymore"). The population's checkpoints are kept until the run ends.
    """
    return None if population else 3


def tuner_space(exp: Experiment, cells: Sequence[Cell]) -> dict[str, Any]:
    """What the Tuner gets as its param space: the grid's, or nothing for a search
    (Optuna's define-by-run space then gives every setting)."""
    return param_space(exp, cells) if exp.search == "grid" else {}


@contextlib.contextmanager
def environment_variable(key: str, value: str) -> Iterator[None]:
    """``os.environ[key] = value`` for the block; the user's own value (or its absence)
    restored after."""
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


@contextlib.contextmanager
def quiet_ray_output(verbose: int) -> Iterator[None]:
    """During ``Tuner.fit``: Ray Tune's output engine off unless ``verbose >= 2``.

    Ray Tune's newer engine prints its experiment box, a results path and a TensorBoard
    hint even at verbosity 0; its older one prints nothing at 0. ``RAY_AIR_NEW_OUTPUT``
    chooses between them when ``fit`` starts; the user's own setting is restored after.
    Ray's warning about trials without results (a search's never-started ones) is held
    back too, and so is its JSON logger's "Remote file not found" at every restore of a
    member whose ``result.json`` was not yet in storage (``tune_alr.resultlog`` keeps
    the results; errors of that logger still show).
    """
    if verbose >= 2:
        yield
        return
    import logging

    # Trials a budget or a search created and then never ran have no results: Ray warns
    # of each; the tables count them as they are.
    quieted = [
        logging.getLogger("ray.tune.analysis.experiment_analysis"),
        logging.getLogger("ray.tune.logger.logger"),
    ]
    levels = [q.level for q in quieted]
    for q in quieted:
        q.setLevel(logging.ERROR)
    try:
        with environment_variable("RAY_AIR_NEW_OUTPUT", "0"):
            yield
    finally:
        for q, level in zip(quieted, levels, strict=True):
            q.setLevel(level)


@contextlib.contextmanager
def without_tensorboard() -> Iterator[None]:
    """During ``Tuner.fit``: none of Ray Tune's default loggers added behind our back.

    :func:`run_callbacks` gives Ray Tune its JSON and CSV loggers itself (``params.json``
    and ``result.json``, which the reports read, and ``progress.csv``); the one left out
    is the TensorBoard logger: MLflow holds every metric, and on a 2-core machine that
    logger's per-result summaries and its writer thread took 12% of the driver's CPU in
    a 150-trial bench (py-spy). ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` is read when
    ``fit`` starts; the user's own setting is restored after.
    """
    with environment_variable("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"):
        yield


def ray_verbosity(verbose: int) -> int:
    """Ray Tune's own verbosity for ours: 0 and 1 silence it (1 prints our table)."""
    return 0 if verbose <= 1 else min(3, verbose)


def run_callbacks(
    handle: tracking.Handle | None,
    verbose: int,
    scheduler: str = "fifo",
    stopper: Any = None,
) -> list[Any]:
    """Ray Tune's JSON and CSV loggers, every result into the trial's folder
    (:class:`~tune_alr.resultlog.ResultLog`), MLflow logging (with a store), the record of
    early stops and, at ``verbose == 1``, the progress table (no TensorBoard logger: see
    :func:`without_tensorboard`)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .mlflow_callback import MLflowTracking
    from .progress import ProgressTable
    from .resultlog import ResultLog
    from .stopper import StopRecorder

    recorder = StopRecorder(scheduler, stopper)
    callbacks: list[Any] = [JsonLoggerCallback(), CSVLoggerCallback(), ResultLog(), recorder]
    if handle is not None:
        callbacks.append(MLflowTracking(handle, recorder))
    if verbose == 1:
        callbacks.append(ProgressTable())
    return callbacks


__all__ = [
    "build_tuner",
    "environment_variable",
    "param_space",
    "quiet_ray_output",
    "ray_verbosity",
    "run_callbacks",
    "trial_dirname",
    "trial_name",
    "tuner_space",
    "without_tensorboard",
]
