"""Small deterministic problems for checking that an LR policy fixes a mis-set LR.

Each problem is seeded end to end (data, initial weights, minibatch order), runs plain
SGD for a fixed step budget under a policy, and returns the final full-data loss. The
question a policy must answer: started far too low or far too high, does it end near
the final loss of the best constant LR from a grid, in the same budget?

    from tune_alr.toy_problems import PROBLEMS, run, best_constant
    best_lr, best_loss = best_constant("logreg")
    result = run("logreg", "meta", lr=1e-5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .policies import build

#: The constant-LR grid (8 values, half a decade apart).
GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
STEPS = 600
BATCH = 32


@dataclass(frozen=True)
class Problem:
    name: str
    description: str
    data: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    model: Callable[[], nn.Module]


def _logreg_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 20, generator=g)
    w = torch.randn(20, generator=g)
    y = (x @ w + 0.5 * torch.randn(2000, generator=g) > 0).long()
    return x, y


def _mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 10, generator=g)
    y = (torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] > 0).long()
    return x, y


PROBLEMS = {
    "logreg": Problem(
        "logreg", "logistic regression, 20 features, label noise", _logreg_data,
        lambda: nn.Linear(20, 2),
    ),
    "mlp": Problem(
        "mlp", "tiny tanh MLP (10-32-2) on a non-linear boundary", _mlp_data,
        lambda: nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2)),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ToyResult:
    final_loss: float
    final_lr: float
    finite: bool  # every loss and LR along the way was finite


def run(problem: str, policy: str, lr: float, *, steps: int = STEPS, **params: Any) -> ToyResult:
    """SGD on ``problem`` for ``steps`` steps under ``policy`` started at ``lr``."""
    spec = PROBLEMS[problem]
    x, y = spec.data()
    torch.manual_seed(1)
    model = spec.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    @torch.no_grad()
    def probe() -> float:
        return float(F.cross_entropy(model(x[:256]), y[:256]))

    scheduler = build(policy, optimizer, evaluate=probe, total_steps=steps, **params)
    order = torch.Generator().manual_seed(2)
    finite = True
    for _ in range(steps):
        index = torch.randint(0, len(x), (BATCH,), generator=order)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        value = loss.item()
        if math.isfinite(value):
            optimizer.step()
        else:
            finite = False
        scheduler.step(value)
        finite = finite and math.isfinite(float(scheduler.get_last_lr()[0]))
    with torch.no_grad():
        final = float(F.cross_entropy(model(x), y))
    last_lr = float(scheduler.get_last_lr()[0])
    return ToyResult(final, last_lr, finite and math.isfinite(final))


def best_constant(problem: str, *, steps: int = STEPS) -> tuple[float, float]:
    """``(lr, final_loss)`` of the best constant LR of :data:`GRID`."""
    losses = {lr: run(problem, "constant", lr, steps=steps).final_loss for lr in GRID}
    finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
    best = min(finite, key=finite.__getitem__)
    return best, finite[best]
