"""The Ray Tune adapter: the only module of ``trainables`` that imports Ray.

``train(config)`` is a Ray Tune function trainable. It resumes from
``tune.get_checkpoint()`` when Ray restarts the trial, and forwards every report of the
loop to ``tune.report`` with its checkpoint. (``ray.train.report`` and
``ray.train.get_checkpoint`` make a Tune trial fail under Ray 2.60: use ``ray.tune``'s.)
"""

from __future__ import annotations

from typing import Any

from ray import tune

from . import loop


def _report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    tune.report(metrics, checkpoint=checkpoint)


def train(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one model under one policy (see ``trainables.loop``)."""
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = loop.load_checkpoint(directory)
    loop.train(config, _report, resume=resume)
