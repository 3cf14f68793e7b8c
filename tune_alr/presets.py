"""The two research plans as runnable experiments (``tune-alr run --preset plan1``).

* ``plan1``: MNIST CNN, IMDB LSTM (one layer), AG News BiLSTM; Adam at 0.01, batch 32,
  20 epochs; feedback (and the plan's rule as written, ``plan1-literal``) against
  constant, step decay and cyclical schedules.
* ``plan2``: CIFAR-10 CNN, IMDB LSTM (two layers of 128), MNIST with plan 2's CNN; SGD
  at 1e-3, batch 64, 50 epochs; meta against fixed SGD at 1e-4, 1e-3 and 1e-2, and Adam
  and RMSprop at 1e-3.

``budget`` scales epochs and data for small machines (see ``Experiment``); ``None``
runs the plans' full settings, which is cluster work.
"""

from __future__ import annotations

from typing import Any

from .experiment import Arm

PRESETS: dict[str, dict[str, Any]] = {
    "plan1": {
        "tasks": ["mnist", "imdb", "ag_news"],
        "policies": ["feedback", "plan1-literal", "constant", "step", "cyclic"],
        "baseline": "constant",  # plan 1: the policy against a constant LR
        "optimizer": "adam",
        "lr": 0.01,
        "batch_size": 32,
        "epochs": 20,
    },
    "plan2": {
        "tasks": ["cifar10", "imdb", "mnist"],
        "task_params": {"imdb": {"layers": 2, "hidden": 128}, "mnist": {"model": "plan2"}},
        "policies": [
            Arm("meta", "meta", optimizer="sgd", lr=1e-3),
            Arm("sgd-1e-4", "constant", optimizer="sgd", lr=1e-4),
            Arm("sgd-1e-3", "constant", optimizer="sgd", lr=1e-3),
            Arm("sgd-1e-2", "constant", optimizer="sgd", lr=1e-2),
            Arm("adam-1e-3", "constant", optimizer="adam", lr=1e-3),
            Arm("rmsprop-1e-3", "constant", optimizer="rmsprop", lr=1e-3),
        ],
        "baseline": "sgd-1e-3",  # plan 2: meta against the fixed LR it starts from
        "batch_size": 64,
        "epochs": 50,
    },
}


def preset(name: str) -> dict[str, Any]:
    """The ``Experiment`` fields of preset ``name``; ``ValueError`` naming the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}.")
    return dict(PRESETS[name])
