"""The benchmark's workloads: a task with fixed settings, reproducible from DESIGN.md.

``tune-alr bench --tasks digits,mnist`` runs the workloads below (``--tasks`` maps a
task's name to its workload); their settings reproduce ``../shared/DESIGN.md``'s
"numbers to beat", so that figures measured here and there are the same work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Workload:
    """One benchmark problem: a task with fixed settings.

    Attributes:
        name: the workload's name (``--workload``).
        task: the task it runs.
        trial: trial settings (``TrialConfig`` fields) for this task.
        task_params: the task's options.
        note: where the settings come from.
    """

    name: str
    task: str
    trial: Mapping[str, Any] = field(default_factory=dict)
    task_params: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "digits",
            "digits",
            {"epochs": 10, "report_every": 10, "threads": 1},
            note="the embedded 8x8 digits, 10 epochs (340 steps), batch 32",
        ),
        Workload(
            "mnist-anchor",
            "mnist",
            {
                "limit_train": 10000,
                "val_size": 2000,
                "batch_size": 32,
                "epochs": 2,
                "report_every": 25,
                "threads": 1,
            },
            {"model": "plan2"},
            note="DESIGN.md: plan 2's CNN, 10,000 / 2,000 of train, batch 32, 2 epochs (626 "
            "steps), 1 thread",
        ),
        Workload(
            "agnews-anchor",
            "ag_news",
            {
                "val_size": 1600,
                "batch_size": 32,
                "epochs": 2,
                "clip_grad": 1.0,
                "report_every": 25,
                "threads": 1,
            },
            {"vocab_size": 20000, "max_len": 64, "hidden": 64},
            note="DESIGN.md: 6,000 / 1,600 of test.csv, BiLSTM(64), 20k words, length 64, "
            "batch 32, 2 epochs (376 steps), clip 1.0",
        ),
    )
}

#: ``--tasks`` names map to their workloads.
BY_TASK = {"digits": "digits", "mnist": "mnist-anchor", "ag_news": "agnews-anchor"}


def workload(name: str) -> Workload:
    """A workload by its name or its task's name; ``ValueError`` naming the accepted ones."""
    key = BY_TASK.get(name, name)
    if key not in WORKLOADS:
        raise ValueError(
            f"unknown workload {name!r}; accepted: {', '.join(WORKLOADS)} "
            f"(or the tasks {', '.join(BY_TASK)})."
        )
    return WORKLOADS[key]


__all__ = ["BY_TASK", "WORKLOADS", "Workload", "workload"]
