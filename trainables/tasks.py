"""The task registry: a task gives data, a model and defaults; the policy is the plug-in.

from trainables import tasks
tasks.available()                        # ['digits', ...]
task = tasks.get("digits")
data = task.load(config.data_request())  # TaskData
model = task.model(data, config.task_options())

A task of one's own is a :class:`Task` given to :func:`register` in a module that Ray's
workers import too (see the README: "Adding a task").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from . import hub, text
from .data import DataRequest
from .models import DigitsCNN, Plan1CNN, Plan2CNN, TextLSTM

#: ``load(request) -> TaskData``
Loader = Callable[[DataRequest], data_mod.TaskData]
#: ``model(data, options) -> nn.Module``: built after seeding, so its weights are seeded.
ModelBuilder = Callable[[data_mod.TaskData, Mapping[str, Any]], nn.Module]


@dataclass(frozen=True)
class Task:
    """One learning problem.

    Attributes:
        name: the registry key.
        description: one line for listings.
        load: ``load(request) -> TaskData`` (:class:`~trainables.data.DataRequest`).
        model: ``model(data, options) -> nn.Module``, ``options`` the task's options
            resolved (built after seeding, so its weights are seeded).
        defaults: the task's default trial settings (optimizer, lr, batch_size, epochs,
            and optionally clip_grad, report_every).
        params: the task's own options (``task_params``) and their defaults.
        choices: for options with a fixed set of values, the values accepted.
        minimums: for integer options, the least accepted (1 where not given).
    """

    name: str
    description: str
    load: Loader
    model: ModelBuilder
    defaults: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    minimums: Mapping[str, int] = field(default_factory=dict)

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The task's options with ``given`` applied; ``ValueError`` for an unknown one."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            accepted = ", ".join(f"{k} (default {v!r})" for k, v in self.params.items())
            raise ValueError(
                f"task {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"it accepts: {accepted or 'none'}."
            )
        resolved = {**self.params, **given}
        for key, default in self.params.items():
            value = resolved[key]
            least = self.minimums.get(key, 1)
            if isinstance(default, int) and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise ValueError(f"task option {key} must be an integer >= {least}, got {value!r}.")
            if key in self.choices and value not in self.choices[key]:
                raise ValueError(
                    f"task option {key} must be one of {', '.join(self.choices[key])}, "
                    f"got {value!r}."
                )
        return resolved


_TASKS: dict[str, Task] = {}
#: A vocabulary holds the padding and unknown tokens before any word.
_TEXT_MINIMUMS = {"vocab_size": 3}


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


def _load_real(r: DataRequest) -> tuple[hub.Source, dict[str, Any], list[str]]:
    source = hub.SOURCES[r.task]
    raw = hub.load_raw(source, hub.data_dir_from(r.data_dir))
    for split, (_, labels) in raw.splits.items():
        hub.check_labels(labels, source.num_classes, f"{raw.origin}, split {split!r}")
    arrays, notes = data_mod.carve(raw.splits, r.plan)
    cached = [f"decoded data cache: {raw.cache}"] if raw.cache is not None else []
    return source, arrays, [f"data from {raw.origin}", *cached, *notes]


def _task_data(
    splits: dict[str, data_mod.Split], r: DataRequest, num_classes: int, notes: list[str]
) -> data_mod.TaskData:
    return data_mod.TaskData(
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test"),
        probe=data_mod.probe_subset(splits["val"], r.probe_size, r.plan.data_seed),
        num_classes=num_classes,
        notes=tuple(notes),
    )


def _image_loader(shape: tuple[int, int, int], hwc: bool) -> Loader:
    def load(c: DataRequest) -> data_mod.TaskData:
        source, arrays, notes = _load_real(c)
        width = arrays["train"][0].reshape(len(arrays["train"][0]), -1).shape[1]
        if width != shape[0] * shape[1] * shape[2]:
            raise hub.DataUnavailable(
                f"{source.task} images have {width} values each; expected "
                f"{shape[0] * shape[1] * shape[2]} ({'x'.join(map(str, shape))})."
            )
        return _task_data(data_mod.image_splits(arrays, shape, hwc), c, source.num_classes, notes)

    return load


def _load_text(c: DataRequest) -> data_mod.TaskData:
    source, arrays, notes = _load_real(c)
    params = c.params
    tokenizer = text.train_tokenizer(list(arrays["train"][0]), params["vocab_size"])
    splits = {
        name: data_mod.Split(
            text.encode(tokenizer, list(x), params["max_len"]), torch.from_numpy(y)
        )
        for name, (x, y) in arrays.items()
    }
    notes.append(f"vocabulary of {tokenizer.get_vocab_size()} words from the training split")
    return _task_data(splits, c, source.num_classes, notes)


def _text_model(bidirectional: bool) -> ModelBuilder:
    def build(d: data_mod.TaskData, p: Mapping[str, Any]) -> nn.Module:
        return TextLSTM(
            p["vocab_size"],
            d.num_classes,
            embed_dim=p["embed_dim"],
            hidden=p["hidden"],
            layers=p["layers"],
            bidirectional=bidirectional,
        )

    return build


def _mnist_model(d: data_mod.TaskData, p: Mapping[str, Any]) -> nn.Module:
    variant = p["model"]
    return Plan1CNN(d.num_classes) if variant == "plan1" else Plan2CNN(1, 28, d.num_classes)


register(
    Task(
        name="mnist",
        description="MNIST (ylecun/mnist); plan 1's CNN, or plan 2's with model=plan2",
        load=_image_loader((1, 28, 28), hwc=False),
        model=_mnist_model,
        defaults={
            "optimizer": "adam",
            "lr": 1e-3,
            "batch_size": 32,
            "epochs": 2,
            "report_every": 100,
        },
        params={"model": "plan1"},
        choices={"model": ("plan1", "plan2")},
    )
)
register(
    Task(
        name="cifar10",
        description="CIFAR-10 (uoft-cs/cifar10); plan 2's CNN conv32-pool-conv64-pool-fc128",
        load=_image_loader((3, 32, 32), hwc=True),
        model=lambda d, p: Plan2CNN(3, 32, d.num_classes),
        # ../shared/data holds a 4,000-image subset: a 2,000-image validation would halve it
        defaults={
            "optimizer": "adam",
            "lr": 1e-3,
            "batch_size": 64,
            "epochs": 5,
            "report_every": 50,
            "val_size": 800,
        },
    )
)
register(
    Task(
        name="imdb",
        description="IMDB sentiment (stanfordnlp/imdb); embedding + LSTM (layers=1 or 2)",
        load=_load_text,
        model=_text_model(bidirectional=False),
        defaults={
            "optimizer": "adam",
            "lr": 1e-3,
            "batch_size": 32,
            "epochs": 2,
            "clip_grad": 1.0,
            "report_every": 100,
        },
        minimums=_TEXT_MINIMUMS,
        params={
            "vocab_size": 20000,
            "max_len": 256,
            "embed_dim": 128,
            "hidden": 128,
            "layers": 1,
        },
    )
)
register(
    Task(
        name="ag_news",
        description="AG News topics (fancyzhx/ag_news); embedding + BiLSTM",
        load=_load_text,
        model=_text_model(bidirectional=True),
        # 6,000 / 1,600 from the 7,600-row test split when no train split exists (DESIGN.md)
        defaults={
            "optimizer": "adam",
            "lr": 1e-3,
            "batch_size": 32,
            "epochs": 2,
            "clip_grad": 1.0,
            "report_every": 50,
            "val_size": 1600,
        },
        minimums=_TEXT_MINIMUMS,
        params={
            "vocab_size": 20000,
            "max_len": 64,
            "embed_dim": 128,
            "hidden": 64,
            "layers": 1,
        },
    )
)
register(
    Task(
        name="digits",
        description="scikit-learn's bundled 8x8 digits, small CNN (embedded, no download)",
        load=lambda r: data_mod.load_digits(r.plan, r.probe_size),
        model=lambda d, p: DigitsCNN(d.num_classes),
        defaults={"optimizer": "adam", "lr": 1e-3, "batch_size": 32, "epochs": 10},
    )
)
