"""The benchmark: adaptive policies against a fixed-LR grid and the LR-free anchors.

    from tune_alr import bench
    outcome = bench.run(bench.Bench(tasks=["digits", "mnist"], seeds=5, data_dir="../shared/data"))
    outcome.files["report.html"]

One Ray Tune experiment runs every arm on every workload and paired seed (the same
initial weights and data order for every arm):

* the *grid*: the workload's optimizer (Adam) at fixed LRs, ``constant`` policy;
* the *policies* under test at the workload's default optimizer and LR, untouched;
* the *anchors* (``tune_alr.optimizers.ANCHORS``) at their published defaults.

The protocol follows AlgoPerf's time-to-target:

* the **target** of a workload is the median (over seeds) best validation accuracy of
  the best grid arm (the grid LR with the highest such median);
* each trial's **time to target** is the step and the training wall seconds of its first
  validation report at or above the target (report granularity); a miss is infinite;
* **statistics** (:mod:`tune_alr.stats`): every policy against every anchor and the best
  grid arm, on paired seeds: a Wilcoxon signed-rank test on log time to target and on
  final accuracy, Holm's correction across all comparisons of a measure, bootstrap 95%
  intervals of the median speed-up; performance profiles over (workload, seed).

The workloads reproduce the settings of ``../shared/DESIGN.md`` ("The numbers to beat"),
so that figures measured here and there are the same work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import optimizers, report, stats
from .experiment import Arm, Experiment
from .results import Results
from .runner import run as run_experiment
from .workloads import BY_TASK, WORKLOADS, Workload, workload

GRID_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
POLICIES = ("feedback", "meta", "hd", "cyclic")


def grid_label(lr: float) -> str:
    return f"adam-{lr:g}"


@dataclass(frozen=True)
class Bench:
    """What ``tune-alr bench`` runs.

    Args:
        tasks: workload or task names (``WORKLOADS``, ``BY_TASK``), one per task.
        seeds: paired seeds (a count or the seeds); ``None``: as many as it takes for a
            policy that wins on every seed to show p < 0.05 after Holm's correction over
            all the bench's comparisons (``stats.seeds_needed``; 10 for the default
            digits bench, 11 for digits and MNIST together).
        baseline: the reference arm (its label) that defines the target and that every
            policy is compared with, besides the anchors; ``None``: the best grid arm.
        policies: the policies under test: names, run at the workload's default optimizer
            and LR, or :class:`~tune_alr.experiment.Arm` s (a policy with its own LR,
            optimizer or parameters, e.g. ``Arm("meta-shipped", "meta",
            params={"controller": "meta-trained"})``), compared like the named ones.
        anchors: the anchor optimizers (``tune_alr.optimizers.ANCHORS``).
        grid: the fixed LRs of the Adam grid.
        budget: scales epochs and data like ``Experiment.budget`` (``None``: full).
        data_dir: the local datasets (``TUNE_ALR_DATA_DIR`` when ``None``).
        name, output, tracking_uri, address, max_concurrent, verbose: as ``Experiment``.
        optuna: if > 0, also tune Adam's constant LR per workload with ``OptunaSearch``
            over this many trials (seed 0); ``asha`` prunes them with ASHA.
        pbt: if > 0, also train a PBT population of this many members per workload.
            Tuning costs are reported with the tuned results (``tune_alr.tuning``).
        leaderboard: also run the equal-compute leaderboard (``tune_alr.leaderboard``):
            Optuna, ASHA, PBT and PB2 searches of Adam's LR at 1, 2 and 4 times a
            policy's steps, on every workload and seed.
    """

    tasks: Sequence[str] = ("digits",)
    seeds: int | Sequence[int] | None = None
    baseline: str | None = None
    policies: Sequence[str | Arm] = POLICIES
    anchors: Sequence[str] = optimizers.ANCHORS
    grid: Sequence[float] = GRID_LRS
    budget: float | None = None
    data_dir: str | None = None
    name: str = "bench"
    output: str | os.PathLike[str] | None = None
    tracking_uri: str | None = None
    address: str | None = None
    max_concurrent: int | None = None
    verbose: int = 1
    optuna: int = 0
    asha: bool = False
    pbt: int = 0
    leaderboard: bool = False

    def comparison_count(self) -> int:
        """How many comparisons the bench makes (each policy against each anchor and
        the reference, per workload): the family Holm's correction runs over."""
        return len(self.policies) * (len(self.anchors) + 1) * len(self.tasks)

    def policy_labels(self) -> list[str]:
        """The labels of the arms under test (a name is its own label)."""
        return [p if isinstance(p, str) else p.label for p in self.policies]

    def seed_list(self) -> list[int]:
        """The paired seeds: as given, or enough for significance (see ``seeds``)."""
        from .stats import seeds_needed

        seeds = self.seeds
        if seeds is None:
            seeds = seeds_needed(self.comparison_count())
        return Experiment(seeds=seeds).seed_list

    def power_note(self) -> str | None:
        """A warning when the seeds are too few for any comparison to be significant."""
        from .stats import power_note

        if not self.policies:
            return None
        return power_note(len(self.seed_list()), self.comparison_count())

    def workloads(self) -> list[Workload]:
        chosen = [workload(t) for t in self.tasks]
        tasks = [w.task for w in chosen]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"one workload per task, got {[w.name for w in chosen]}.")
        return chosen

    def arms(self) -> list[Arm]:
        if not self.grid:
            raise ValueError("the grid needs at least one LR: the target is defined from it.")
        for lr in self.grid:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"grid LRs must be numbers > 0, got {lr!r}.")
        for name in self.anchors:
            if name not in optimizers.ANCHORS:
                raise ValueError(
                    f"unknown anchor {name!r}; accepted: {', '.join(optimizers.ANCHORS)}."
                )
        grid = [Arm(grid_label(lr), "constant", "adam", float(lr)) for lr in self.grid]
        mine = [Arm(p, p) if isinstance(p, str) else p for p in self.policies]
        arms = [*grid, *mine, *(Arm(a, "constant", a) for a in self.anchors)]
        labels = [a.label for a in arms]
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(
                f"baseline {self.baseline!r} is not one of the bench's arms; accepted: "
                f"{', '.join(labels)}."
            )
        return arms

    def searches(self) -> list[Any]:
        """The tuned-baseline searches (``tune_alr.tuning.Search``), one per workload."""
        from .tuning import Search

        for label, value in (("optuna", self.optuna), ("pbt", self.pbt)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value == 1:
                raise ValueError(f"{label} must be 0 (off) or an integer >= 2, got {value!r}.")
        out = []
        exp = self.experiment()
        for w in self.workloads():
            out.append(
                Search(
                    task=w.task,
                    # the workload's settings, as the bench's own trials get them
                    trial={**exp.trial, **w.trial},
                    task_params=w.task_params,
                    budget=self.budget,
                    name=self.name,
                    output=exp.output_dir,
                    tracking_uri=self.tracking_uri,
                    max_concurrent=self.max_concurrent,
                    verbose=self.verbose,
                    asha=self.asha,
                    address=self.address,
                )
            )
        for search in out:
            search.base_config()
        return out

    def experiment(self) -> Experiment:
        """The Ray Tune experiment that runs the bench (validated by ``run``)."""
        chosen = self.workloads()
        trial: dict[str, Any] = {}
        if self.data_dir is not None:
            trial["data_dir"] = str(Path(self.data_dir).expanduser().resolve())
        return Experiment(
            name=self.name,
            tasks=[w.task for w in chosen],
            policies=self.arms(),
            seeds=self.seed_list(),
            # the policies under test run on Adam (the grid and the anchors name their own)
            optimizer="adam" if self.policies else None,
            task_params={w.task: dict(w.task_params) for w in chosen if w.task_params},
            task_trial={w.task: dict(w.trial) for w in chosen},
            budget=self.budget,
            trial=trial,
            cpus_per_trial=1,
            output=self.output,
            tracking_uri=self.tracking_uri,
            address=self.address,
            max_concurrent=self.max_concurrent,
            verbose=self.verbose,
        )


# -- analysis -------------------------------------------------------------------------


def kind_of(label: str, bench: Bench) -> str:
    if label in {grid_label(lr) for lr in bench.grid}:
        return "grid"
    return "anchor" if label in bench.anchors else "policy"


def targets(
    trials: pd.DataFrame, grid: Sequence[str], reference: str | None = None
) -> dict[str, tuple[float, str]]:
    """Per task: ``(target, reference arm)``.

    The reference arm is ``reference`` when given, else the best grid arm (the highest
    median best validation accuracy over seeds). The target is the *lowest* best
    validation accuracy of the reference over its seeds: the accuracy it reaches on
    every seed, so that it never misses its own target and its time to target is defined
    on every seed.
    """
    out = {}
    for task, group in trials.groupby("task"):
        if reference is None:
            mine = group[group["policy"].isin(grid)]
            if mine.empty:
                raise ValueError(f"task {task!r} has no grid trials: the target is undefined.")
            medians = mine.groupby("policy")["best_val_acc"].median()
            best = str(medians.idxmax())
        else:
            best = reference
        bests = group.loc[group["policy"] == best, "best_val_acc"].astype(float)
        bests = bests[np.isfinite(bests)]
        if bests.empty:
            raise ValueError(
                f"the reference arm {best!r} has no finished trial on task {task!r}: the "
                "target is undefined."
            )
        out[str(task)] = (float(bests.min()), best)
    return out


def time_to_target(record: report.TrialRecord, target: float) -> tuple[float, float]:
    """(steps, training wall seconds) at the first report with ``val_acc >= target``."""
    for r in record.results:
        if "val_acc" in r and r["val_acc"] >= target - 1e-12:
            return float(r["step"]), float(r["wall_s"])
    return math.inf, math.inf


def timed_trials(
    records: Sequence[report.TrialRecord], bench: Bench
) -> tuple[pd.DataFrame, dict[str, tuple[float, str]]]:
    """``report.trials_frame`` with the bench's target, time to target and arm kind."""
    trials = report.trials_frame(records)
    grid = [grid_label(lr) for lr in bench.grid]
    goal = targets(trials, grid, bench.baseline)
    steps, wall = [], []
    for record in records:
        target = goal[str(record.config["task"])][0]
        s, w = time_to_target(record, target)
        steps.append(s)
        wall.append(w)
    by_id = pd.DataFrame(
        {
            "trial_id": [r.trial_id for r in records],
            "steps_to_target": steps,
            "wall_s_to_target": wall,
        }
    )
    trials = trials.drop(columns=["steps_to_target", "wall_s_to_target"], errors="ignore")
    trials = trials.merge(by_id, on="trial_id", how="left")
    trials["target"] = trials["task"].map(lambda t: goal[t][0])
    trials["kind"] = trials["policy"].map(lambda p: kind_of(p, bench))
    return trials, goal


def main_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, arm): accuracy, time to target, overhead and memory."""
    rows = []
    for (task, arm), g in trials.groupby(["task", "policy"], sort=False):
        hits = np.isfinite(g["steps_to_target"].astype(float))
        rows.append(
            {
                "task": task,
                "arm": arm,
                "kind": g["kind"].iloc[0],
                "seeds": len(g),
                "final_val_acc_mean": g["val_acc"].mean(),
                "final_val_acc_std": g["val_acc"].std(),  # over seeds, as summary.md
                "best_val_acc_median": g["best_val_acc"].median(),
                "hits": int(hits.sum()),
                "steps_to_target_median": float(np.median(g["steps_to_target"].astype(float))),
                "wall_s_to_target_median": float(np.median(g["wall_s_to_target"].astype(float))),
                "wall_s_mean": g["wall_s"].mean(),
                "policy_ms_per_step_mean": g["policy_ms_per_step"].mean(),
                "peak_rss_mb_mean": g["peak_rss_mb"].mean(),
            }
        )
    return pd.DataFrame(rows)


def comparisons(trials: pd.DataFrame, goal: Mapping[str, tuple[float, str]]) -> pd.DataFrame:
    """Every policy against every anchor and the best grid arm, per task (paired seeds)."""
    pairs = []
    for task, group in trials.groupby("task"):
        kinds = group.groupby("policy")["kind"].first()
        mine = sorted(kinds[kinds == "policy"].index)
        reference = goal[str(task)][1]
        anchors = sorted(a for a in kinds[kinds == "anchor"].index if a != reference)
        others = [reference, *anchors]
        mine = [p for p in mine if p != reference]
        pairs += [(str(task), p, o) for p in mine for o in others]
    return stats.compare_pairs(trials, pairs)


def profiles(trials: pd.DataFrame, measure: str = "wall_s_to_target") -> pd.DataFrame:
    """Performance profiles over the problems (task, seed) that every arm ran."""
    wide = trials.pivot_table(
        index=["task", "seed"], columns="policy", values=measure, aggfunc="first"
    ).dropna()
    return stats.performance_profile({str(c): wide[c].tolist() for c in wide.columns})


@dataclass
class Outcome:
    """What :func:`run` produced."""

    results: Results
    trials: pd.DataFrame
    table: pd.DataFrame
    comparisons: pd.DataFrame
    targets: dict[str, tuple[float, str]]
    files: dict[str, Path]
    tuned: pd.DataFrame
    leaderboard: pd.DataFrame


def tuned_table(tuned: Sequence[Any], goal: Mapping[str, tuple[float, str]]) -> pd.DataFrame:
    """One row per tuned baseline: what it found and what the search cost."""
    rows = []
    for t in tuned:
        task = str(t.best_config["task"])
        target = goal.get(task, (math.nan, ""))[0]
        hits = t.trials[t.trials["best_val_acc"] >= target - 1e-12]
        rows.append(
            {
                "task": task,
                "method": t.method,
                "trials": len(t.trials),
                "best_lr": float(t.best_config["lr"]),
                "best_val_acc": t.best_metric,
                "trials_reaching_target": len(hits),
                "cost_s": t.cost_s,
                "cost_steps": t.cost_steps,
            }
        )
    return pd.DataFrame(rows)


def analyse(
    bench: Bench,
    results: Results,
    tuned: Sequence[Any] = (),
    entries: pd.DataFrame | None = None,
) -> Outcome:
    """The bench tables, plots and report from a finished experiment (and searches, and
    the leaderboard's entries)."""
    from . import bench_report, leaderboard

    trials, goal = timed_trials(results.records, bench)
    table = main_table(trials)
    comp = comparisons(trials, goal)
    extra = tuned_table(tuned, goal)
    board = (
        leaderboard.table([leaderboard.Entry(**row) for row in entries.to_dict("records")])
        if entries is not None and not entries.empty
        else pd.DataFrame()
    )
    files = bench_report.write(
        bench.name,
        bench.workloads(),
        results.output_dir,
        trials,
        table,
        comp,
        goal,
        profiles(trials),
        extra,
        warning=bench.power_note(),
        leaderboard=board,
    )
    return Outcome(results, trials, table, comp, goal, files, extra, board)


def run(bench: Bench) -> Outcome:
    """Run the bench on Ray Tune (MLflow tracked) and write its report.

    ``report.html``, ``bench.md`` and the plots land in the output folder and in the
    experiment's MLflow parent run.
    """
    import dataclasses

    from . import tuning

    exp = bench.experiment()
    exp.validate()
    searches = bench.searches()  # validated before Ray starts too
    note = bench.power_note()
    if note is not None:
        import warnings

        warnings.warn(f"{note} The bench goes on; its report will say so.", stacklevel=2)
    results = run_experiment(exp)
    tuned: list[tuning.Tuned] = []
    for search in searches:
        if bench.optuna:
            tuned.append(
                tuning.optuna_search(dataclasses.replace(search, num_samples=bench.optuna))
            )
        if bench.pbt:
            tuned.append(tuning.population(dataclasses.replace(search, num_samples=bench.pbt)))
    entries = None
    if bench.leaderboard:
        from . import leaderboard

        entries = leaderboard.run(bench, report.trials_frame(results.records))
    outcome = analyse(bench, results, tuned, entries)
    if results.parent_run_id is not None:
        from . import tracking

        tracking.log_artifacts(results.tracking_uri, results.parent_run_id, outcome.files.values())
    return outcome


__all__ = [
    "BY_TASK",
    "GRID_LRS",
    "POLICIES",
    "WORKLOADS",
    "Bench",
    "Outcome",
    "Workload",
    "analyse",
    "comparisons",
    "main_table",
    "run",
    "targets",
    "time_to_target",
    "timed_trials",
    "workload",
]
