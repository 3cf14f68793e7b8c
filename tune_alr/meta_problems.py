"""The training distribution of ``tune-alr meta-train``: small generated problems.

Each problem is a seeded :class:`ProblemSpec`: generated data (nothing downloaded, and
none of the evaluation tasks: no digits, MNIST, CIFAR-10, IMDB, AG News, nor the toy
problems of :mod:`tune_alr.toy_problems`), a model, an optimizer, a batch size and a
step budget. The families:

* ``mixture``: Gaussian mixtures (two clusters per class) -> linear or MLP classifier;
* ``teacher``: labels of a random tanh teacher network -> linear or MLP classifier;
* ``regression``: a teacher network's real outputs plus noise -> linear or MLP, MSE loss;
* ``images``: 8x8 one-channel images, class templates (smoothed noise) shifted by a
  pixel, scaled and noised -> CNN of one or two conv layers;
* ``sequences``: sequences of 8 vectors whose class is a decayed sum of a teacher's
  projections -> LSTM of one or two layers.

MLPs have 1-3 hidden layers of 16-64 units (tanh or ReLU), CNNs 4 or 8 channels,
LSTMs 8 or 16 units; the optimizers are SGD, SGD with momentum 0.9, Adam and RMSprop; runs take
120-240 steps on batches of 16-64 (a fraction of a second to a second each on one
thread).

:func:`rollout` trains one problem from a start LR under a policy and returns the
validation loss at evenly spaced checkpoints: what the meta-training objective
(``tune_alr.metatrain``) is made of.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .policies import build

FAMILIES = ("mixture", "teacher", "regression", "images", "sequences")
#: Bumped whenever the distribution changes (problems of the same name would differ):
#: cached references of another version are not reused.
DISTRIBUTION_VERSION = 1
STEPS = (120, 180, 240)
SEQUENCE_LENGTH = 8
OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop")
#: The constant LRs tried per optimizer to find a problem's reference (half-decade steps).
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": tuple(10 ** (k / 2) for k in range(-7, 3)),  # 3e-4 .. 10
    "momentum": tuple(10 ** (k / 2) for k in range(-9, 1)),  # 3e-5 .. 1
    "adam": tuple(10 ** (k / 2) for k in range(-11, -1)),  # 3e-6 .. 0.1
    "rmsprop": tuple(10 ** (k / 2) for k in range(-11, -1)),
}
N_TRAIN, N_VAL = 2048, 512


@dataclass(frozen=True)
class ProblemSpec:
    """One seeded training problem (data, model, optimizer, batch, steps)."""

    family: str
    model: str  # linear, mlp, cnn, lstm
    depth: int
    width: int
    activation: str  # tanh, relu (MLPs)
    optimizer: str
    batch: int
    steps: int
    dim: int
    classes: int  # outputs for regression
    seed: int

    @property
    def name(self) -> str:
        shape = self.model if self.model == "linear" else f"{self.model}{self.depth}x{self.width}"
        return f"{self.family}/{shape}/{self.optimizer}/b{self.batch}/t{self.steps}/s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProblemSpec:
        return cls(**dict(data))


def sample_problems(n: int, seed: int) -> list[ProblemSpec]:
    """``n`` problems drawn from the distribution, reproducibly from ``seed``.

    Families and optimizers are dealt in turn (every family meets every optimizer when
    ``n`` is a multiple of 20); the rest is drawn at random.
    """
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        family = FAMILIES[k % len(FAMILIES)]
        optimizer = OPTIMIZERS[(k // len(FAMILIES) + k) % len(OPTIMIZERS)]
        model, depth, width, activation = "mlp", 1, 32, "tanh"
        dim, classes = int(rng.choice([8, 16, 32])), int(rng.choice([2, 3, 5]))
        if family in ("mixture", "teacher", "regression"):
            model = "linear" if rng.random() < 0.3 else "mlp"
            depth = int(rng.integers(1, 4))
            width = int(rng.choice([16, 32, 64]))
            activation = str(rng.choice(["tanh", "relu"]))
            if family == "regression":
                classes = int(rng.choice([1, 3]))
        elif family == "images":
            model, depth, width = "cnn", int(rng.integers(1, 3)), int(rng.choice([4, 8]))
            dim, classes = 8, int(rng.choice([3, 4, 6]))
        else:
            model, depth, width = "lstm", int(rng.integers(1, 3)), int(rng.choice([8, 16]))
            dim, classes = 4, int(rng.choice([2, 3]))
        # Convolutions and recurrences cost the most per sample: smaller batches.
        batches = [16, 32] if model in ("cnn", "lstm") else [16, 32, 64]
        out.append(
            ProblemSpec(
                family=family,
                model=model,
                depth=depth,
                width=width,
                activation=activation,
                optimizer=optimizer,
                batch=int(rng.choice(batches)),
                steps=int(rng.choice(STEPS)),
                dim=dim,
                classes=classes,
                seed=int(rng.integers(0, 2**31 - 1)),
            )
        )
    return out


# -- data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    regression: bool


def _teacher(g: torch.Generator, dim: int, out: int, gain: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, out))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(max(1, p.shape[-1])))
    return net


@functools.lru_cache(maxsize=64)
def make_data(spec: ProblemSpec) -> Data:
    """The problem's training and validation sets (cached per process)."""
    g = torch.Generator().manual_seed(spec.seed)
    n = N_TRAIN + N_VAL
    regression = spec.family == "regression"
    if spec.family == "mixture":
        sep = 1.0 + 1.5 * float(torch.rand(1, generator=g))
        means = torch.randn(spec.classes * 2, spec.dim, generator=g) * sep / math.sqrt(spec.dim / 8)
        cluster = torch.randint(0, spec.classes * 2, (n,), generator=g)
        x = means[cluster] + torch.randn(n, spec.dim, generator=g)
        y = cluster % spec.classes
        flip = torch.rand(n, generator=g) < 0.05  # label noise
        y = torch.where(flip, torch.randint(0, spec.classes, (n,), generator=g), y)
    elif spec.family in ("teacher", "regression"):
        x = torch.randn(n, spec.dim, generator=g)
        with torch.no_grad():
            out = _teacher(g, spec.dim, spec.classes, gain=2.0)(x)
        if regression:
            out = out + 0.1 * out.std() * torch.randn(out.shape, generator=g)
            y = (out - out.mean(0)) / (out.std(0) + 1e-8)
        else:
            y = out.argmax(1)
    elif spec.family == "images":
        size = spec.dim
        raw = torch.randn(spec.classes, 1, size + 2, size + 2, generator=g)
        templates = F.avg_pool2d(raw, 3, stride=1)  # smoothed noise, size x size
        templates = templates / templates.std(dim=(1, 2, 3), keepdim=True)
        y = torch.randint(0, spec.classes, (n,), generator=g)
        shifts = torch.randint(-1, 2, (n, 2), generator=g)
        scale = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
        base = templates[y]
        x = torch.stack(
            [torch.roll(base[i], (int(shifts[i, 0]), int(shifts[i, 1])), (1, 2)) for i in range(n)]
        )
        x = scale * x + 0.8 * torch.randn(x.shape, generator=g)
    else:  # sequences
        length = SEQUENCE_LENGTH
        x = torch.randn(n, length, spec.dim, generator=g)
        w = torch.randn(spec.classes, spec.dim, generator=g)
        decay = 0.8 ** torch.arange(length - 1, -1, -1, dtype=torch.float32)
        score = torch.einsum("ntd,cd,t->nc", x, w, decay)
        y = (score + 0.3 * torch.randn(score.shape, generator=g)).argmax(1)
    return Data(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], regression)


# -- models and optimizers ------------------------------------------------------------


class _LSTMClassifier(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: int, classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def make_model(spec: ProblemSpec) -> nn.Module:
    """The problem's model, initialised from its seed."""
    torch.manual_seed(spec.seed + 1)
    if spec.model == "linear":
        return nn.Linear(spec.dim, spec.classes)
    if spec.model == "mlp":
        act = nn.Tanh if spec.activation == "tanh" else nn.ReLU
        layers: list[nn.Module] = []
        width_in = spec.dim
        for _ in range(spec.depth):
            layers += [nn.Linear(width_in, spec.width), act()]
            width_in = spec.width
        return nn.Sequential(*layers, nn.Linear(width_in, spec.classes))
    if spec.model == "cnn":
        convs: list[nn.Module] = []
        channels, size = 1, spec.dim
        for _ in range(spec.depth):
            convs += [nn.Conv2d(channels, spec.width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = spec.width, size // 2
        return nn.Sequential(*convs, nn.Flatten(), nn.Linear(channels * size * size, spec.classes))
    if spec.model == "lstm":
        return _LSTMClassifier(spec.dim, spec.width, spec.depth, spec.classes)
    raise ValueError(f"unknown model {spec.model!r}; accepted: linear, mlp, cnn, lstm.")


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """SGD, SGD with momentum 0.9, Adam or RMSprop (PyTorch's defaults otherwise)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}.")


# -- one run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """Validation losses at the checkpoints (``losses[0]`` before training), the last LR,
    and whether every training loss and LR stayed finite."""

    losses: tuple[float, ...]
    final_lr: float
    finite: bool


def _loss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    return F.mse_loss(out, y) if regression else F.cross_entropy(out, y)


def rollout(
    spec: ProblemSpec,
    lr: float,
    *,
    policy: str = "meta",
    total_known: bool = True,
    checkpoints: int = 8,
    params: Mapping[str, Any] | None = None,
) -> Rollout:
    """Train ``spec`` from ``lr`` under ``policy`` (``build(policy, ...)`` with ``params``).

    The policy is given ``total_steps`` when ``total_known``. A step whose training loss
    is not finite is not applied (the policy still sees the loss, as in
    ``tune_alr.toy_problems``). The validation loss is measured before training and at
    ``checkpoints`` evenly spaced steps, the last one at the end.
    """
    data = make_data(spec)
    model = make_model(spec)
    optimizer = make_optimizer(spec.optimizer, model.parameters(), lr)
    total = spec.steps if total_known else None
    scheduler = build(policy, optimizer, total_steps=total, **dict(params or {}))
    order = torch.Generator().manual_seed(spec.seed + 2)
    marks = {round(spec.steps * (k + 1) / checkpoints) for k in range(checkpoints)}

    @torch.no_grad()
    def val_loss() -> float:
        return float(_loss(model(data.x_val), data.y_val, data.regression))

    losses = [val_loss()]
    finite = True
    for step in range(1, spec.steps + 1):
        index = torch.randint(0, len(data.x), (spec.batch,), generator=order)
        loss = _loss(model(data.x[index]), data.y[index], data.regression)
        optimizer.zero_grad()
        loss.backward()
        value = loss.item()
        if math.isfinite(value):
            optimizer.step()
        else:
            finite = False
        scheduler.step(value)
        finite = finite and math.isfinite(float(scheduler.get_last_lr()[0]))
        if step in marks:
            losses.append(val_loss())
    return Rollout(tuple(losses), float(scheduler.get_last_lr()[0]), finite)


def log_losses(losses: Sequence[float]) -> list[float]:
    """``log`` of each checkpoint's loss, a non-finite or exploded one capped at the log
    of the untrained loss + 1 (worse than not training, by a fixed amount)."""
    ceiling = math.log(max(losses[0], 1e-12)) + 1.0 if math.isfinite(losses[0]) else 5.0
    return [
        min(ceiling, math.log(max(v, 1e-12))) if math.isfinite(v) else ceiling for v in losses[1:]
    ]


__all__ = [
    "DISTRIBUTION_VERSION",
    "FAMILIES",
    "LR_GRIDS",
    "OPTIMIZERS",
    "STEPS",
    "Data",
    "ProblemSpec",
    "Rollout",
    "log_losses",
    "make_data",
    "make_model",
    "make_optimizer",
    "rollout",
    "sample_problems",
]
