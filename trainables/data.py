"""Datasets as in-memory tensors: splits, a fixed probe subset, seeded everywhere.

Every task's data ends up as a :class:`TaskData`: train / validation / test
:class:`Split` objects whose ``inputs`` are the model's positional arguments, plus a
small fixed ``probe`` subset of the validation split for feedback policies. The
validation split is carved from the training data with ``data_seed``; the test split is
only read at the end of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    """One split: ``inputs`` are the model's positional arguments, ``labels`` the targets."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.labels)
        for tensor in self.inputs:
            if len(tensor) != n:
                raise ValueError(f"split inputs have {len(tensor)} rows but {n} labels.")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> Split:
        """The rows at ``index``."""
        return Split(tuple(t[index] for t in self.inputs), self.labels[index])

    def batches(self, batch_size: int) -> list[Split]:
        """Consecutive batches in order (for evaluation)."""
        return [
            self.take(torch.arange(i, min(i + batch_size, len(self))))
            for i in range(0, len(self), batch_size)
        ]


@dataclass(frozen=True)
class TaskData:
    """The splits of one task, and what a run should know about where they came from."""

    train: Split
    val: Split
    test: Split
    probe: Split
    num_classes: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rest, held_out)`` with ``fraction`` of each class held out, seeded."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        k = round(len(idx) * fraction)
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def probe_subset(val: Split, size: int, seed: int) -> Split:
    """A fixed random subset of the validation split, the same for every policy."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(val), generator=g)[: min(size, len(val))]
    return val.take(torch.sort(index).values)


def load_digits(*, data_seed: int, probe_size: int, limit_train: int | None = None) -> TaskData:
    """scikit-learn's bundled 8x8 digits (1,797 images): 60/20/20 stratified, standardised."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = bunch.data.astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    rest, test_idx = stratified_split(y, 0.2, data_seed)
    train_rel, val_rel = stratified_split(y[rest], 0.25, data_seed + 1)
    train_idx, val_idx = rest[train_rel], rest[val_rel]
    if limit_train is not None:
        train_idx = train_idx[:limit_train]
    # Normalise with statistics of the training split only.
    mean, std = float(x[train_idx].mean()), float(x[train_idx].std())

    def split(index: np.ndarray) -> Split:
        return Split((torch.from_numpy((x[index] - mean) / std),), torch.from_numpy(y[index]))

    val = split(val_idx)
    return TaskData(
        train=split(train_idx),
        val=val,
        test=split(test_idx),
        probe=probe_subset(val, probe_size, data_seed),
        num_classes=10,
    )
