"""The Ray Tune adapter: the only module of ``trainables`` that imports Ray.

``train(config)`` is a Ray Tune function trainable. It resumes from
``tune.get_checkpoint()`` when Ray restarts the trial, and forwards every report of the
loop to ``tune.report`` with its checkpoint; the first report of each start or restart also
says which node it ran on (``node_id``, ``node_ip``). (``ray.train.report`` and
``ray.train.get_checkpoint`` make a Tune trial fail under Ray 2.60: use ``ray.tune``'s.)
"""

from __future__ import annotations

from typing import Any

import ray
from ray import tune

from . import loop


def _report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    if "caps/threads" in metrics:  # the first report of this start: say where it ran
        context = ray.get_runtime_context()
        metrics = {
            **metrics,
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
        }
    tune.report(metrics, checkpoint=checkpoint)


def train(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one model under one policy (see ``trainables.loop``)."""
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = loop.load_checkpoint(directory)
    loop.train(config, _report, resume=resume)
