"""The task registry: a task gives data, a model and defaults; the policy is the plug-in.

from trainables import tasks
tasks.available()            # ['digits', ...]
task = tasks.get("digits")
data = task.load(config)     # TaskData
model = task.build_model(data, config)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from . import data as data_mod
from .models import DigitsCNN

if TYPE_CHECKING:
    from .config import TrialConfig


@dataclass(frozen=True)
class Task:
    """One learning problem.

    Attributes:
        name: the registry key.
        description: one line for listings.
        load: ``load(config) -> TaskData``.
        model: ``model(data, config) -> nn.Module`` (built after seeding, so seeded).
        defaults: the task's default trial settings (optimizer, lr, batch_size, epochs,
            and optionally clip_grad).
    """

    name: str
    description: str
    load: Callable[[TrialConfig], data_mod.TaskData]
    model: Callable[[data_mod.TaskData, TrialConfig], nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def build_model(self, data: data_mod.TaskData, config: TrialConfig) -> nn.Module:
        return self.model(data, config)


_TASKS: dict[str, Task] = {}


def register(task: Task) -> None:
    """Add ``task`` to the registry (replacing one of the same name)."""
    _TASKS[task.name] = task


def available() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def get(name: str) -> Task:
    """The task called ``name``; ``ValueError`` naming the accepted ones otherwise."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available())}.") from None


register(
    Task(
        name="digits",
        description="scikit-learn's bundled 8x8 digits, small CNN (embedded, no download)",
        load=lambda c: data_mod.load_digits(
            data_seed=c.data_seed, probe_size=c.probe_size, limit_train=c.limit_train
        ),
        model=lambda d, c: DigitsCNN(d.num_classes),
        defaults={"optimizer": "adam", "lr": 1e-3, "batch_size": 32, "epochs": 10},
    )
)
