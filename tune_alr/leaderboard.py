"""Accuracy against compute: one untuned policy run against tuners given 1x, 2x, 4x its steps.

    tune-alr bench --tasks digits --leaderboard

A policy's claim is that one run replaces a learning-rate search. The leaderboard sets
that one run (its optimizer steps, ``S``) against Ray Tune's own tuners of a constant
Adam LR, each stopped when its trials have taken ``k x S`` steps in all
(``tune_alr.stopper.ComputeBudget``), for ``k`` in 1, 2, 4 and on the same paired seeds:

* ``optuna``: TPE over the LR (log-uniform), trials run to their end;
* ``asha``: the same search, pruned by ASHA (so more, shorter trials fit);
* ``pbt`` / ``pb2``: a population of four members started on a log grid of LRs,
  perturbed every two reports.

Each entry is the best validation accuracy the method reached within its budget (what
a user would keep), with the steps and CPU seconds it spent. Every search is an
ordinary tune-alr experiment: MLflow has its runs, Ray's folder its trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .bench import Bench
    from .experiment import Experiment

METHODS = ("optuna", "asha", "pbt", "pb2")
BUDGETS = (1, 2, 4)
LR_SPACE = {"lr": "log:1e-4:1e-1"}
POPULATION = 4


@dataclass(frozen=True)
class Entry:
    """One method on one task and seed, at one budget."""

    task: str
    method: str
    budget: float  # multiples of the policy's steps
    seed: int
    best_val_acc: float
    steps: int
    cpu_s: float


def search_experiment(
    bench: Bench, task: str, method: str, budget: int, seed: int, policy_steps: int
) -> Experiment:
    """The experiment that runs ``method`` on ``task`` for ``budget`` x ``policy_steps``."""
    import dataclasses

    from .experiment import Arm
    from .stopper import ComputeBudget

    base = bench.experiment()
    name = f"{bench.name}-lb-{task}-{method}-x{budget}-s{seed}"
    common: dict[str, Any] = {
        "name": name,
        "output": base.output_dir / "leaderboard" / name,
        "verbose": 0,
        "tasks": [task],
        "seeds": [seed],
        "stopper": ComputeBudget(budget * policy_steps),
        "task_trial": {task: base.task_trial[task]},
        "task_params": {task: base.task_params[task]} if task in base.task_params else {},
        "max_concurrent": bench.max_concurrent,
        "optimizer": None,  # each arm names Adam itself
    }
    if method in ("optuna", "asha"):
        # More samples than the budget can run: the budget, not the count, ends it.
        return dataclasses.replace(
            base, **common, policies=[Arm("adam-tuned", "constant", "adam")],
            search="optuna", num_samples=8 * budget + 4, space=LR_SPACE,
            scheduler="asha" if method == "asha" else "fifo",
            scheduler_params={"grace_period": 1} if method == "asha" else {},
        )  # fmt: skip
    lrs = np.geomspace(1e-4, 3e-2, POPULATION)
    return dataclasses.replace(
        base, **common, search="grid", num_samples=1, space=LR_SPACE, scheduler=method,
        policies=[Arm(f"adam-{lr:.1e}", "constant", "adam", float(lr)) for lr in lrs],
    )  # fmt: skip


def entry(task: str, method: str, budget: float, seed: int, trials: pd.DataFrame) -> Entry:
    """What one search reached and spent (``trials``: ``report.trials_frame``)."""
    best = trials["best_val_acc"].astype(float)
    # a trial stopped early has no best_val_acc of its own: its last val_acc stands in
    reached = np.fmax(best.to_numpy(), trials["val_acc"].astype(float).to_numpy())
    finite = reached[np.isfinite(reached)]
    return Entry(
        task=task,
        method=method,
        budget=budget,
        seed=seed,
        best_val_acc=float(finite.max()) if finite.size else math.nan,
        steps=int(trials["steps_run"].sum()),
        cpu_s=float(trials["cpu_s_run"].fillna(0).sum()),
    )


def table(entries: Sequence[Entry]) -> pd.DataFrame:
    """One row per (task, method, budget): medians over seeds (and the seeds)."""
    frame = pd.DataFrame([e.__dict__ for e in entries])
    if frame.empty:
        return frame
    rows = []
    for (task, method, budget), g in frame.groupby(["task", "method", "budget"], sort=True):
        rows.append(
            {
                "task": task,
                "method": method,
                "budget": budget,
                "seeds": len(g),
                "best_val_acc_median": float(g["best_val_acc"].median()),
                "best_val_acc_min": float(g["best_val_acc"].min()),
                "steps_median": float(g["steps"].median()),
                "cpu_s_median": float(g["cpu_s"].median()),
            }
        )
    return pd.DataFrame(rows)


def policy_entries(trials: pd.DataFrame, policies: Sequence[str]) -> list[Entry]:
    """The untuned policies' single runs as budget-1 entries (``bench`` trials)."""
    out = []
    for row in trials[trials["policy"].isin(policies)].itertuples():
        best = float(row.best_val_acc)
        out.append(
            Entry(
                task=str(row.task),
                method=f"policy: {row.policy}",
                budget=1.0,
                seed=int(row.seed),
                best_val_acc=best if math.isfinite(best) else float(row.val_acc),
                steps=int(row.steps_run),
                cpu_s=float(row.cpu_s_run),
            )
        )
    return out


def run(bench: Bench, trials: pd.DataFrame) -> pd.DataFrame:
    """Run every method at every budget on every workload and seed; the entries.

    The searches share one Ray session (started here unless Ray is already up, or
    joined at ``bench.address``): each search is still its own Ray Tune experiment and
    MLflow parent run, but Ray starts once, not once per search.
    """
    import time

    from .runner import ray_session
    from .runner import run as run_experiment

    entries = policy_entries(trials, bench.policy_labels())
    with ray_session(bench.address):
        for task, group in trials.groupby("task"):
            mine = group[group["policy"].isin(bench.policy_labels())]
            policy_steps = int(mine["steps_run"].median())
            for seed in bench.seed_list():
                for method in METHODS:
                    for budget in BUDGETS:
                        exp = search_experiment(
                            bench, str(task), method, budget, seed, policy_steps
                        )
                        began = time.perf_counter()
                        results = run_experiment(exp)
                        found = entry(str(task), method, budget, seed, results.trials())
                        entries.append(found)
                        print(f"leaderboard {task} seed {seed}: {method} at {budget}x "
                              f"({found.steps} steps, {found.cpu_s:.0f} CPU-s): best val acc "
                              f"{found.best_val_acc:.4f} [{time.perf_counter() - began:.0f} s]",
                              flush=True)  # fmt: skip
    return pd.DataFrame([e.__dict__ for e in entries])


__all__ = ["BUDGETS", "METHODS", "Entry", "entry", "policy_entries", "run", "search_experiment",
           "table"]  # fmt: skip
