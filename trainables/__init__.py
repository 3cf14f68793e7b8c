"""What runs inside one trial: tasks, models, data and the training loop.

``trainables.train`` is the Ray Tune function trainable; importing this package does
not import Ray (only ``trainables.ray_trainable`` does, on first use of ``train``).
"""

from __future__ import annotations

from typing import Any

from . import tasks
from .config import TrialConfig

__all__ = ["TrialConfig", "tasks", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .ray_trainable import train

        return train
    raise AttributeError(f"module 'trainables' has no attribute {name!r}")
