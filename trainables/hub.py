"""Loading the plans' datasets through Hugging Face ``datasets``.

Where the data comes from, in order:

1. a local folder (``data_dir``, or the ``TUNE_ALR_DATA_DIR`` environment variable)
   laid out as ``<dir>/<task>/{train,test}.parquet`` (see ../shared/data/README.md),
   read with ``datasets.load_dataset("parquet", data_files=...)``;
2. the Hugging Face hub (``datasets.load_dataset(<hub id>)``), or its local cache.

When neither works the error names both options. It comes at once: with
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, ``datasets`` answers from its cache
only; otherwise a 3-second connection check to the hub precedes the download, since
``datasets`` would retry an unreachable hub for about 23 seconds.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

DATA_DIR_ENV = "TUNE_ALR_DATA_DIR"


@dataclass(frozen=True)
class Source:
    """One dataset: its hub id, its local folder name and its columns."""

    task: str
    hub_id: str
    folder: str
    input_column: str  # images (list<uint8> or Image) or text
    hub_input_column: str  # the same column's name on the hub
    num_classes: int


SOURCES: Mapping[str, Source] = {
    "mnist": Source("mnist", "ylecun/mnist", "mnist", "image", "image", 10),
    "cifar10": Source("cifar10", "uoft-cs/cifar10", "cifar10", "image", "img", 10),
    "imdb": Source("imdb", "stanfordnlp/imdb", "imdb", "text", "text", 2),
    "ag_news": Source("ag_news", "fancyzhx/ag_news", "ag_news", "text", "text", 4),
}


class DataUnavailable(ValueError):
    """Neither a local copy nor the hub could provide a dataset."""


@dataclass(frozen=True)
class RawSplits:
    """Columns of each split as NumPy arrays (inputs: images uint8 or texts object)."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    origin: str


def data_dir_from(config_dir: str | None) -> Path | None:
    """The local data folder: the config's, else ``$TUNE_ALR_DATA_DIR``, else ``None``."""
    value = config_dir or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    parsed = urlparse(constants.ENDPOINT)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(source: Source, why: str) -> DataUnavailable:
    return DataUnavailable(
        f"dataset {source.hub_id!r} for task {source.task!r} is not available ({why}). "
        f"Either point --data-dir (or {DATA_DIR_ENV}) at a folder holding "
        f"{source.folder}/train.parquet and {source.folder}/test.parquet, or run where "
        "the Hugging Face hub is reachable (and HF_HUB_OFFLINE is unset)."
    )


def _column_arrays(dataset: Any, input_column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)``: images as uint8 ``[N, ...]``, texts as an object array."""
    import datasets

    feature = dataset.features[input_column]
    labels = np.asarray(dataset.with_format("numpy")["label"], dtype=np.int64)
    if isinstance(feature, datasets.Image):
        images = np.stack([np.asarray(img, dtype=np.uint8) for img in dataset[input_column]])
        return images, labels
    if isinstance(feature, datasets.Value) and feature.dtype == "string":
        return np.asarray(dataset[input_column], dtype=object), labels
    table = dataset.with_format("arrow")[:]
    column = table.column(input_column).combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), -1).astype(np.uint8, copy=False), labels


def load_raw(source: Source, data_dir: Path | None) -> RawSplits:
    """The splits of ``source`` from ``data_dir`` or the hub; ``DataUnavailable`` if neither."""
    import datasets

    datasets.disable_progress_bars()
    if data_dir is not None:
        folder = data_dir / source.folder
        if not data_dir.is_dir():
            raise DataUnavailable(f"data dir {str(data_dir)!r} does not exist.")
        files = {s: str(folder / f"{s}.parquet") for s in ("train", "test")}
        present = {s: f for s, f in files.items() if Path(f).is_file()}
        if not present:
            raise _unavailable(source, f"no Parquet files in {str(folder)!r}")
        loaded = datasets.load_dataset("parquet", data_files=present)
        for split in loaded.values():
            missing = {source.input_column, "label"} - set(split.column_names)
            if missing:
                raise DataUnavailable(
                    f"{str(folder)!r} lacks the column(s) {sorted(missing)}; expected "
                    f"{source.input_column!r} and 'label' (see ../shared/data/README.md)."
                )
        splits = {s: _column_arrays(d, source.input_column) for s, d in loaded.items()}
        return RawSplits(splits, origin=f"local Parquet in {folder}")
    if not _offline() and not _hub_reachable():
        raise _unavailable(source, "the hub is unreachable and no data dir is set")
    try:
        loaded = datasets.load_dataset(source.hub_id)
    except (ConnectionError, OSError, FileNotFoundError) as err:
        raise _unavailable(source, f"{type(err).__name__}: {err}") from None
    splits = {
        s: _column_arrays(loaded[s], source.hub_input_column)
        for s in ("train", "test")
        if s in loaded
    }
    return RawSplits(splits, origin=f"the Hugging Face hub ({source.hub_id})")


def check_local(source: Source, data_dir: Path) -> None:
    """Check a local copy before any trial starts: files, columns and label range.

    Reads only the Parquet schemas and label columns (fast even for the full sets).
    Raises ``DataUnavailable`` naming the file and what was expected.
    """
    import pyarrow.parquet as pq

    if not data_dir.is_dir():
        raise DataUnavailable(f"data dir {str(data_dir)!r} does not exist.")
    folder = data_dir / source.folder
    files = [folder / f"{s}.parquet" for s in ("train", "test")]
    present = [f for f in files if f.is_file()]
    if not present:
        raise _unavailable(source, f"no Parquet files in {str(folder)!r}")
    for path in present:
        missing = {source.input_column, "label"} - set(pq.read_schema(path).names)
        if missing:
            raise DataUnavailable(
                f"{str(path)!r} lacks the column(s) {sorted(missing)}; expected "
                f"{source.input_column!r} and 'label' (see ../shared/data/README.md)."
            )
        labels = pq.read_table(path, columns=["label"]).column("label").to_numpy()
        check_labels(np.asarray(labels, dtype=np.int64), source.num_classes, str(path))


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise ``DataUnavailable`` if a label falls outside ``0..num_classes-1``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][:5].tolist()
        raise DataUnavailable(
            f"labels out of range in {where}: {bad}; expected integers 0..{num_classes - 1}."
        )
