"""Tuned baselines through Ray Tune's own tools: an Optuna search and a PBT population.

    from tune_alr import tuning
    found = tuning.optuna_search(tuning.Search(task="digits", num_samples=12, asha=True))
    found.best_config["lr"], found.cost_s

    pbt = tuning.population(tuning.Search(task="digits", num_samples=4), interval=3)

Both run the same trainable as every other trial (``trainables.train``) and log to
MLflow like an experiment (a parent run and one child per trial). The cost of tuning is
counted: ``cost_s`` is the training wall seconds of every trial of the search, and
``cost_steps`` their optimizer steps, so a tuned baseline can be set against a policy
that needed one run. Both are summed over every report the driver received
(``tune_alr.resultlog``: Ray Tune 2.60's own ``result.json`` loses the reports before a
restore, which under PBT made these costs a lower bound).

* :func:`optuna_search`: ``OptunaSearch`` (TPE, seeded) over the LR (log-uniform) and
  any other ranges given, ``num_samples`` trials, optionally pruned by ``ASHAScheduler``
  on validation accuracy.
* :func:`population`: ``PopulationBasedTraining`` over the LR with ``num_samples``
  members, exploiting every ``interval`` reports. After an exploit the member continues
  from the donor's checkpoint under the donor's perturbed config; the training loop
  re-applies the perturbed LR over the checkpoint's (``trainables.loop``'s
  ``reapply_hyperparameters``), so the perturbation is what trains.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import report, runner, tracking
from .experiment import Arm, Experiment
from .policies.base import check_int
from .results import trial_folders
from .scheduling import POPULATION
from .tuner import (
    checkpoints_to_keep,
    quiet_ray_output,
    ray_verbosity,
    run_callbacks,
    trial_dirname,
    trial_name,
    without_tensorboard,
)


@dataclass(frozen=True)
class Search:
    """One tuned baseline: what is searched, on what, at what size.

    Args:
        task: the task.
        policy: the policy whose settings are tuned (default ``constant``).
        optimizer: the optimizer (default ``adam``).
        lr_range: the LR's log-uniform range.
        num_samples: Optuna trials, or PBT's population size.
        trial: other trial settings shared by all (e.g. ``{"max_steps": 300}``), resolved
            over the task's defaults as ``Experiment.trial`` is (``tune_alr.settings``);
            its ``policy_params`` are the searched policy's parameters.
        task_params: the task's options.
        budget: scales epochs and data as ``Experiment.budget``.
        seed: the trials' model and data seed, and the searcher's.
        asha: prune Optuna trials with ASHA on validation accuracy.
        metric: what is maximised (a reported metric).
        name, output, tracking_uri, max_concurrent, verbose, address: as for
            ``Experiment``.
    """

    task: str = "digits"
    policy: str = "constant"
    optimizer: str = "adam"
    lr_range: tuple[float, float] = (1e-4, 1e-1)
    num_samples: int = 8
    trial: Mapping[str, Any] = field(default_factory=dict)
    task_params: Mapping[str, Any] = field(default_factory=dict)
    budget: float | None = None
    seed: int = 0
    asha: bool = False
    metric: str = "val_acc"
    name: str = "tuned"
    output: str | os.PathLike[str] | None = None
    tracking_uri: str | None = None
    max_concurrent: int | None = None
    verbose: int = 1
    address: str | None = None

    def experiment(self) -> Experiment:
        """The one-trial experiment whose settings every trial of the search shares."""
        trial = dict(self.trial)
        params = dict(trial.pop("policy_params", None) or {})  # one policy: its own
        arm = Arm(self.label, self.policy, self.optimizer, lr=self.lr_range[0], params=params)
        return Experiment(
            name=self.name,
            tasks=[self.task],
            policies=[arm],
            seeds=[self.seed],
            trial=trial,
            task_params={self.task: dict(self.task_params)} if self.task_params else {},
            budget=self.budget,
            output=self.output,
            tracking_uri=self.tracking_uri,
            max_concurrent=self.max_concurrent,
            verbose=self.verbose,
            address=self.address,
        )

    @property
    def label(self) -> str:
        return f"{self.policy}-tuned"

    def base_config(self) -> dict[str, Any]:
        """The trial settings every trial shares, resolved and validated (``ValueError``).

        ``lr`` is left out: the search supplies it.
        """
        low, high = self.lr_range
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float))):
            raise ValueError(f"lr_range must be two numbers, got {self.lr_range!r}.")
        if not 0 < low < high:
            raise ValueError(f"lr_range must be 0 < low < high, got {self.lr_range!r}.")
        check_int("num_samples", self.num_samples, minimum=2)
        (cell,) = self.experiment().validate()  # every setting checked before Ray starts
        config = cell.config(self.seed)
        del config["lr"]
        return config

    def run_name(self, method: str) -> str:
        """The Ray Tune folder and MLflow parent run of one search: one per task and method."""
        return f"{self.name}-{self.task}-{method}"

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output is not None else Path("results") / self.name


@dataclass
class Tuned:
    """The outcome of a search."""

    method: str
    best_config: dict[str, Any]
    best_metric: float
    trials: pd.DataFrame  # one row per trial: lr, best_val_acc, steps, wall_s, status
    cost_s: float  # training wall seconds of every trial
    cost_steps: int  # optimizer steps of every trial
    experiment_dir: Path
    parent_run_id: str | None


def _run(search: Search, method: str, space: dict[str, Any], tune_config: Any) -> Tuned:
    from ray import tune

    import trainables

    storage = (search.output_dir / "ray").resolve()
    # A trial that fails for good reports status "failed" without the searched metric
    # (trainables.ray_trainable); Ray Tune would stop the whole search on that.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    with (
        runner.parent_run(
            search.tracking_uri or tracking.default_tracking_uri(),
            experiment=search.name,
            run_name=search.run_name(method),
            tags={"tune_alr.tasks": search.task, "tune_alr.arms": method},
        ) as parent,
        runner.ray_session(search.address),
    ):
        tuner = tune.Tuner(
            tune.with_resources(trainables.train, {"cpu": 1}),
            param_space=space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=search.run_name(method),
                storage_path=str(storage),
                # PBT restores members from their donors' checkpoints: keep them all.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=checkpoints_to_keep(method in POPULATION)
                ),
                callbacks=run_callbacks(parent.handle, search.verbose),
                verbose=ray_verbosity(search.verbose),
            ),
        )
        with quiet_ray_output(search.verbose), without_tensorboard():
            grid = tuner.fit()
        experiment_dir = storage / search.run_name(method)
        records = report.load_trials(experiment_dir, trial_folders(grid))
        if all(r.status not in ("finished", "diverged") for r in records):
            parent.status = "FAILED"
    return _outcome(search, method, records, experiment_dir, parent.handle.parent_run_id)


def _outcome(
    search: Search,
    method: str,
    records: list[report.TrialRecord],
    experiment_dir: Path,
    parent_run_id: str | None,
) -> Tuned:
    rows = []
    for r in records:
        last = r.results[-1] if r.results else {}
        best = max((x.get(search.metric, -math.inf) for x in r.results), default=-math.inf)
        rows.append(
            {
                "trial_id": r.trial_id,
                "lr": float(last.get("config", r.config).get("lr", r.config.get("lr"))),
                "best_" + search.metric: best,
                "steps": int(last.get("step", 0)),
                "wall_s": float(last.get("wall_s", 0.0)),
                "status": r.status,
            }
        )
    frame = pd.DataFrame(rows)
    key = "best_" + search.metric
    top = frame.loc[frame[key].idxmax()]
    best_record = next(r for r in records if r.trial_id == top["trial_id"])
    best_config = dict(best_record.results[-1].get("config", best_record.config))
    return Tuned(
        method=method,
        best_config=best_config,
        best_metric=float(top[key]),
        trials=frame,
        # PBT members continue each other's runs: count each member's own windows.
        cost_s=float(sum(_own(r, "window_s") for r in records)),
        cost_steps=int(sum(_own(r, "step") for r in records)),
        experiment_dir=experiment_dir,
        parent_run_id=parent_run_id,
    )


def _own(record: report.TrialRecord, key: str) -> float:
    """What this trial computed itself: the sum of its report windows.

    Cumulative counters (``step``, ``wall_s``) restart from a donor's values after a PBT
    exploit, so the windows (``window_s``, and ``lr_trace``'s length for steps) are summed.
    """
    if key == "step":
        return float(sum(len(r.get("lr_trace", [])) for r in record.results))
    return float(sum(r.get("window_s", 0.0) for r in record.results))


def _names() -> dict[str, Any]:
    return {"trial_name_creator": trial_name, "trial_dirname_creator": trial_dirname}


def optuna_search(search: Search) -> Tuned:
    """Tune the LR with ``OptunaSearch`` (TPE, seeded) over ``num_samples`` trials."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    base = search.base_config()
    space = {**base, "lr": tune.loguniform(*search.lr_range)}
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", grace_period=2, reduction_factor=3)
        if search.asha
        else None
    )
    config = tune.TuneConfig(
        metric=search.metric,
        mode="max",
        search_alg=OptunaSearch(seed=search.seed),
        **_names(),
        scheduler=scheduler,
        num_samples=search.num_samples,
        max_concurrent_trials=search.max_concurrent,
    )
    return _run(search, "optuna-asha" if search.asha else "optuna", space, config)


def population(
    search: Search,
    *,
    interval: int = 3,
    quantile: float = 0.25,
    factors: tuple[float, float] = (1.2, 0.8),
    synch: bool = False,
) -> Tuned:
    """Population Based Training of the LR: ``num_samples`` members, exploit every
    ``interval`` reports (bottom ``quantile`` copies the top, LR times a factor).

    Every member checkpoints at every report (``checkpoint_every=1``, whatever the
    trial settings say): an exploit continues from the donor's latest checkpoint, which
    must be the report PBT ranked it on.
    """
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    check_int("interval", interval, minimum=1)  # in reports
    if not 0 < quantile <= 0.5:
        raise ValueError(f"quantile must be in (0, 0.5], got {quantile!r}.")
    base = search.base_config()
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=interval,
        hyperparam_mutations={"lr": tune.loguniform(*search.lr_range)},
        quantile_fraction=quantile,
        resample_probability=0.0,
        perturbation_factors=factors,
        synch=synch,
        require_attrs=False,  # a failed trial's last report has no val_acc
    )
    config = tune.TuneConfig(
        metric=search.metric,
        mode="max",
        scheduler=scheduler,
        num_samples=search.num_samples,
        max_concurrent_trials=search.max_concurrent,
        # PBT pauses and resumes members from their checkpoints: in reused workers, not a
        # fresh process per resume (see tune_alr.tuner).
        reuse_actors=True,
        **_names(),
    )
    space = {**base, "lr": tune.loguniform(*search.lr_range), "checkpoint_every": 1}
    return _run(search, "pbt", space, config)


__all__ = ["Search", "Tuned", "optuna_search", "population"]
