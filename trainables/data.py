"""Datasets as in-memory tensors: splits, a fixed probe subset, seeded everywhere.

Every task's data ends up as a :class:`TaskData`: train / validation / test
:class:`Split` objects whose ``inputs`` are the model's positional arguments, plus a
small fixed ``probe`` subset of the validation split for feedback policies. The
validation split is carved from the training data with ``data_seed``; the test split is
only read at the end of a run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def to(self, device: torch.device | str) -> Split:
        """This split on ``device`` (itself when already there)."""
        if self.labels.device == torch.device(device):
            return self
        return Split(tuple(t.to(device) for t in self.inputs), self.labels.to(device))

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
    test: Split | None
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


def _subset(n: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``range(n)`` (all when ``size`` is None)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


@dataclass(frozen=True)
class SplitPlan:
    """How to cut a dataset: sizes and the seed.

    ``budget`` (a fraction) scales the training split, and the validation and test
    splits too, but not below 500 and 1,000 rows (or their full size if smaller), so
    that a short run still measures accuracy to about a percent.
    """

    data_seed: int
    val_size: int
    test_size: int | None
    limit_train: int | None = None
    budget: float | None = None

    def train_size(self, n: int) -> int | None:
        sizes = [self.limit_train] if self.limit_train is not None else []
        if self.budget is not None:
            sizes.append(max(1, int(np.ceil(n * self.budget))))
        return min(sizes) if sizes else None

    def _scaled(self, size: int, floor: int) -> int:
        if self.budget is None:
            return size
        return max(min(size, floor), int(np.ceil(size * self.budget)))

    @property
    def val_rows(self) -> int:
        return self._scaled(self.val_size, 500)

    @property
    def test_rows(self) -> int | None:
        return None if self.test_size is None else self._scaled(self.test_size, 1000)


@dataclass(frozen=True)
class DataRequest:
    """What a task's loader is asked for (``TrialConfig.data_request()`` builds it).

    Attributes:
        task: the task's name.
        data_dir: the local Parquet folder, or ``None`` (``$TUNE_ALR_DATA_DIR``, else
            the hub).
        plan: how to cut the splits.
        probe_size: rows of the validation probe.
        params: the task's options, resolved (its defaults filled in).
    """

    task: str
    data_dir: str | None
    plan: SplitPlan
    probe_size: int
    params: Mapping[str, Any] = field(default_factory=dict)


def carve(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], plan: SplitPlan
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Train / val / test arrays from the raw splits, and notes on what was done.

    Validation is a stratified, seeded carve of the training split. A source with only a
    test split (AG News in ../shared/data) gives train and validation carved from it and
    no test split, and the notes say so.
    """
    notes: list[str] = []
    if "train" in splits:
        x, y = splits["train"]
        test = splits.get("test")
    else:
        x, y = splits["test"]
        test = None
        notes.append(
            f"no train split in the source: train and validation carved (stratified, seed "
            f"{plan.data_seed}) from its {len(y)}-row test split; no test split is left"
        )
    rest, val_idx = stratified_split(y, min(0.5, plan.val_rows / len(y)), plan.data_seed)
    keep = _subset(len(rest), plan.train_size(len(rest)), plan.data_seed + 1)
    train_idx = rest[keep]
    out = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx])}
    if test is not None:
        tx, ty = test
        test_idx = _subset(len(ty), plan.test_rows, plan.data_seed + 2)
        out["test"] = (tx[test_idx], ty[test_idx])
    if len(train_idx) < len(rest):
        notes.append(f"training on {len(train_idx)} of {len(rest)} training rows")
    return out, notes


def image_splits(
    arrays: dict[str, tuple[np.ndarray, np.ndarray]], shape: tuple[int, int, int], hwc: bool
) -> dict[str, Split]:
    """uint8 images -> float tensors ``[N, C, H, W]`` standardised with train statistics."""
    c, h, w = shape
    train_x = arrays["train"][0].astype(np.float32) / 255.0
    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0
    out = {}
    for name, (x, y) in arrays.items():
        images = x.astype(np.float32).reshape(len(x), *((h, w, c) if hwc else (c, h, w)))
        if hwc:
            images = images.transpose(0, 3, 1, 2)
        images = (images / 255.0 - mean) / std
        out[name] = Split((torch.from_numpy(np.ascontiguousarray(images)),), torch.from_numpy(y))
    return out


def _digits_file() -> Path | None:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits_arrays() -> tuple[np.ndarray, np.ndarray, str | None]:
    """The 1,797 digits as uint8 pixels ``[N, 64]`` (values 0..16) and int64 labels, and
    what the decoded-data cache did.

    Importing scikit-learn takes seconds in a fresh trial process; the arrays come from
    the cache (:mod:`trainables.cache`, keyed on scikit-learn's ``digits.csv.gz``) when it
    holds them.
    """
    from . import cache, hub

    source = hub.Source("digits", "sklearn.datasets.load_digits", "digits", "data", "data",
                        10, 64)  # fmt: skip
    path = _digits_file()
    key = cache.local_key(source, {"all": path}) if path is not None else None
    hit = cache.read(key, source) if key is not None else None
    if hit is not None:
        x, y = hit[0]["all"]
        return np.asarray(x), y, f"read from {hit[1]}"
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    pixels = np.asarray(bunch.data)
    if not (np.array_equal(pixels, np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        raise ValueError("scikit-learn's digits are not whole numbers 0..255")
    x, y = pixels.astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)
    note = None
    if key is not None:
        try:
            folder = cache.write(key, {"all": (x, y)}, "scikit-learn's bundled digits")
            note = None if folder is None else f"written to {folder}"
        except OSError as err:
            note = f"not written ({type(err).__name__}: {err})"
    return x, y, note


def load_digits(plan: SplitPlan, probe_size: int) -> TaskData:
    """scikit-learn's bundled 8x8 digits (1,797 images): 60/20/20 stratified, standardised.

    The split is fixed by ``plan.data_seed``; ``plan``'s limit and budget shrink train.
    """
    pixels, y, cached = digits_arrays()
    x = pixels.astype(np.float32).reshape(-1, 1, 8, 8)  # whole numbers: exact as before
    data_seed = plan.data_seed
    rest, test_idx = stratified_split(y, 0.2, data_seed)
    train_rel, val_rel = stratified_split(y[rest], 0.25, data_seed + 1)
    train_idx, val_idx = rest[train_rel], rest[val_rel]
    train_idx = train_idx[_subset(len(train_idx), plan.train_size(len(train_idx)), data_seed)]
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
        notes=(f"decoded data cache: {cached}",) if cached is not None else (),
    )
