"""What a checkpoint of :func:`trainables.loop.train` holds: one schema, one reader, one writer.

:class:`TrainState` lists every field the loop needs to continue a run exactly (same step
counter, same data order, same LR sequence). :meth:`TrainState.save` writes it as a plain
dict of its fields to ``checkpoint.pt``, never as a pickled ``TrainState``, so a file
loads with ``torch.load`` alone, without this class. :meth:`TrainState.load` reads such a
file back, including those written before this module existed: the fields added over
time (``optimizer_run``, ``cuda_rng``, ``loop_s``, ``policy_s``, ``cpu_s``,
``initial_val_loss``, ``config``) take their defaults when a file lacks them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


# kw_only: the fields keep the order of the dict the loop has always written, the
# optional ones (added over time, with defaults) among the required ones.
@dataclass(kw_only=True)
class TrainState:
    """Everything :func:`trainables.loop.train` saves at a report and resumes from."""

    # What is trained, as ``state_dict()``s: the model, its optimizer, the LR policy
    # (its factor, history, ...) and the optimizer's own extras (``optimizers.Run``:
    # DoG's averaged weights; empty for most optimizers, and in files that predate it).
    model: dict[str, Any]
    optimizer: dict[str, Any]
    policy: dict[str, Any]
    optimizer_run: dict[str, Any] = field(default_factory=dict)

    # The random number generators, so a resumed run draws what the whole run would
    # have: the data-order generator, torch's CPU one, CUDA's (``None`` off CUDA, and in
    # files that predate it), Python's ``random`` and NumPy's global one.
    order_rng: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None = None
    python_rng: tuple[Any, ...]
    numpy_rng: Any  # np.random.get_state(): a tuple (legacy) or a dict

    # Where the run is: optimizer steps taken, and the position in the current epoch's
    # permutation of the training rows (``None`` between epochs: the next step draws one).
    step: int
    position: int
    permutation: torch.Tensor | None

    # Counters summed over restarts: training wall seconds, the loop's wall seconds
    # (reports included), skipped non-finite updates, the best validation accuracy,
    # ``(step, wall_s)`` when the target was first reached, seconds inside
    # ``policy.step``, and the process's CPU seconds.
    wall_s: float
    loop_s: float = 0.0
    skipped: int
    best_val_acc: float
    reached: tuple[int, float] | None
    policy_s: float = 0.0
    # The untrained model's validation loss, the divergence test's yardstick (``None``
    # in files that predate it: the loop then measures the restored model's).
    initial_val_loss: float | None = None
    cpu_s: float = 0.0

    # The trial config the checkpoint was taken under (``TrialConfig.to_dict()``):
    # a resume under a different one (a PBT exploit) re-applies the new hyperparameters.
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (shallow: the tensors are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> TrainState:
        """A ``TrainState`` from a dict of its fields; missing optional ones take defaults.

        Keys that are not fields are ignored. Raises ``ValueError`` naming the missing
        required fields.
        """
        fields = dataclasses.fields(cls)
        required = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in state]
        if missing:
            raise ValueError(
                f"a checkpoint needs {', '.join(map(repr, missing))}; "
                f"it has {', '.join(map(repr, sorted(state)))}."
            )
        return cls(**{f.name: state[f.name] for f in fields if f.name in state})

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/checkpoint.pt`` (a plain dict of the fields); returns its path."""
        path = Path(directory) / CHECKPOINT_FILE
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TrainState:
        """The state saved in ``directory`` (on the CPU), by :meth:`save` or an older loop."""
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {CHECKPOINT_FILE} in checkpoint folder {directory}.")
        # weights_only=False: the RNG states are Python and NumPy objects, not tensors.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, Mapping):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint dict.")
        return cls.from_dict(state)


__all__ = ["CHECKPOINT_FILE", "TrainState"]
