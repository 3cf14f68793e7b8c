"""A user's own task, as the README shows: registered on import (``imports=[...]``).

Three Gaussian blobs in 2-D, generated from the data seed, and a small MLP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables import tasks
from trainables.data import DataRequest, Split, TaskData, probe_subset


def load(request: DataRequest) -> TaskData:
    rng = np.random.default_rng(request.plan.data_seed)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])

    def split(n: int) -> Split:
        labels = rng.integers(0, 3, size=n)
        points = centres[labels] + rng.normal(size=(n, 2))
        return Split((torch.tensor(points, dtype=torch.float32),), torch.tensor(labels))

    val = split(300)
    return TaskData(train=split(900), val=val, test=split(300),
                    probe=probe_subset(val, request.probe_size, request.plan.data_seed),
                    num_classes=3)  # fmt: skip


def model(data: TaskData, options: Mapping[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Linear(2, options["hidden"]), nn.ReLU(),
                         nn.Linear(options["hidden"], data.num_classes))  # fmt: skip


tasks.register(
    tasks.Task(
        name="blobs",
        description="three Gaussian blobs, an MLP (the README's example of one's own task)",
        load=load,
        model=model,
        defaults={"optimizer": "adam", "lr": 1e-2, "batch_size": 32, "epochs": 3},
        params={"hidden": 16},
    )
)
