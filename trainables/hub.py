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

The driver asks :func:`check_available` before Ray starts (local files: :func:`check_local`,
from Parquet metadata and a few rows; the hub: offline and not cached, or unreachable); a
trial's :func:`load_raw` refuses the same data again, checking every row. Nothing is ever
cast lossily: images must be ``uint8`` pixels of the task's size, labels integers
``0..num_classes-1`` without nulls, texts strings.

What passed the checks is kept in the decoded-data cache (:mod:`trainables.cache`), keyed
on the source files; a later trial on this machine (or a restart) reads it back in
milliseconds, without importing ``datasets`` for local files.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import cache

DATA_DIR_ENV = "TUNE_ALR_DATA_DIR"


@dataclass(frozen=True)
class Source:
    """One dataset: its hub id, its local folder name and its columns.

    ``expected_values`` is the number of pixel values of one image (C*H*W) for an image
    dataset, ``None`` for a text dataset (whose input column holds strings).
    """

    task: str
    hub_id: str
    folder: str
    input_column: str  # images (list<uint8> or Image) or text
    hub_input_column: str  # the same column's name on the hub
    num_classes: int
    expected_values: int | None = None


SOURCES: Mapping[str, Source] = {
    "mnist": Source("mnist", "ylecun/mnist", "mnist", "image", "image", 10, 28 * 28),
    "cifar10": Source("cifar10", "uoft-cs/cifar10", "cifar10", "image", "img", 10, 3 * 32 * 32),
    "imdb": Source("imdb", "stanfordnlp/imdb", "imdb", "text", "text", 2),
    "ag_news": Source("ag_news", "fancyzhx/ag_news", "ag_news", "text", "text", 4),
}

#: Rows of each local file whose inputs :func:`check_local` looks at (the loader: all).
CHECKED_ROWS = 8
#: Offending values (or rows) a message quotes.
QUOTED = 5


class DataUnavailable(ValueError):
    """Neither a local copy nor the hub could provide a dataset."""


@dataclass(frozen=True)
class RawSplits:
    """Columns of each split as NumPy arrays (inputs: images uint8 or texts object).

    ``cache``: what the decoded-data cache did (``"read from <folder>"``, ``"written to
    <folder>"``, ``"not written (<why>)"``), ``None`` when it is off.
    """

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    origin: str
    cache: str | None = None


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


# --- The hub: offline, cached, reachable --------------------------------------------


def _datasets_cache() -> Path:
    """The folder ``datasets`` keeps prepared datasets in.

    Resolved from the environment as ``datasets.config`` does when it is imported: the
    driver asks here without importing ``datasets`` (1-2 s), and a trial's process imports
    it under the same environment.
    """
    xdg = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.path.expanduser(os.getenv("HF_HOME", os.path.join(xdg, "huggingface")))
    return Path(os.getenv("HF_DATASETS_CACHE", os.path.join(home, "datasets"))).expanduser()


_UPPER_UPPER = re.compile(r"([A-Z]+)([A-Z][a-z])")
_LOWER_UPPER = re.compile(r"([a-z\d])([A-Z])")


def _cache_folder(source: Source) -> Path:
    """Where ``datasets`` keeps ``source`` once downloaded: ``<cache>/<namespace>___<name>``.

    The layout ``datasets.load.CachedDatasetModuleFactory`` searches offline (the name in
    snake case, as ``datasets.naming.camelcase_to_snakecase`` writes it).
    """
    namespace, _, name = source.hub_id.rpartition("/")
    name = _LOWER_UPPER.sub(r"\1_\2", _UPPER_UPPER.sub(r"\1_\2", name)).lower()
    return _datasets_cache() / (f"{namespace}___{name}" if namespace else name)


def _cached(source: Source) -> bool:
    """Whether ``datasets`` holds a prepared copy of ``source`` it would load offline.

    ``datasets`` loads a ``<config>/<version>/<hash>`` folder under :func:`_cache_folder`
    when the hub cannot answer; this looks for one (a directory listing, no import).
    """
    return any(path.is_dir() for path in _cache_folder(source).glob("*/*/*"))


def _hub_problem(source: Source) -> str | None:
    """Why the hub (or its local cache) cannot provide ``source`` now; ``None`` if it can."""
    if _offline():
        if _cached(source):
            return None
        return (
            "the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set), no data dir is "
            f"set, and the Hugging Face datasets cache has no copy in "
            f"{str(_cache_folder(source))!r}"
        )
    if _hub_reachable():
        return None
    hint = "; a cached copy exists: set HF_DATASETS_OFFLINE=1 to use it" if _cached(source) else ""
    return f"the hub is unreachable and no data dir is set{hint}"


def check_available(source: Source, data_dir: Path | None) -> None:
    """Raise ``DataUnavailable`` now, in the driver, where a trial's :func:`load_raw` would.

    With ``data_dir``: :func:`check_local` (files, columns, types, sizes, labels). Without
    it: the hub must be online and reachable (a connection check of at most 3 s), or
    offline with ``source`` in the local ``datasets`` cache; the message names
    ``--data-dir`` and the hub. Offline it answers in milliseconds (no ``datasets`` import).
    """
    if data_dir is not None:
        check_local(source, data_dir)
        return
    problem = _hub_problem(source)
    if problem is not None:
        raise _unavailable(source, problem)


# --- Columns: checked, never cast ---------------------------------------------------


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _is_list(type_: pa.DataType) -> bool:
    return bool(
        pa.types.is_list(type_) or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
    )  # fmt: skip


def _is_encoded(type_: pa.DataType) -> bool:
    """Encoded image files (PNG, ...) as Hugging Face's ``Image`` stores them."""
    return bool(pa.types.is_struct(type_) and type_.get_field_index("bytes") >= 0)


def _describe(type_: pa.DataType) -> str:
    """``list<float>`` rather than Arrow's ``list<item: float>``."""
    return f"list<{_describe(type_.value_type)}>" if _is_list(type_) else str(type_)


def _quote(values: Sequence[Any]) -> str:
    """The first few distinct values as Python writes them: ``[9.7, nan, 'cat']``."""
    distinct: dict[str, None] = {}
    for value in values:
        distinct.setdefault(repr(value), None)
        if len(distinct) == QUOTED:
            break
    return f"[{', '.join(distinct)}]"


def _rows(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:QUOTED]]


def _check_rows(rows: int, where: str) -> None:
    if rows == 0:
        raise DataUnavailable(f"{where} has 0 rows; expected a split with at least one row.")


def _accepted_images(source: Source) -> str:
    n = source.expected_values
    return (
        f"expected list<uint8> of {n} values per image, or image files (as Hugging Face's "
        f"Image stores them) that decode to {n} uint8 values (pixels 0..255; nothing is cast)"
    )


def _check_images(
    column: pa.Array | pa.ChunkedArray, source: Source, where: str, name: str
) -> None:
    """Every row a ``list<uint8>`` of ``source.expected_values`` values, no nulls."""
    values = _array(column)
    accepted = _accepted_images(source)
    if not _is_list(values.type) or not pa.types.is_uint8(values.type.value_type):
        first = values.slice(0, 1).to_pylist()[0]
        sample = _quote(first[:QUOTED] if isinstance(first, list) else [first])
        raise DataUnavailable(
            f"{where}, column {name!r}: images of Arrow type {_describe(values.type)}, "
            f"values such as {sample}; {accepted}."
        )
    if values.null_count:
        rows = _rows(values.is_null().to_numpy(zero_copy_only=False))
        raise DataUnavailable(f"{where}, column {name!r}: null images in rows {rows}; {accepted}.")
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    bad = lengths != source.expected_values
    if bad.any():
        rows = _rows(bad)
        raise DataUnavailable(
            f"{where}, column {name!r}: row {rows[0]} has {lengths[rows[0]]} values "
            f"(rows {rows} differ); {accepted}."
        )
    if pc.list_flatten(values).null_count:
        raise DataUnavailable(f"{where}, column {name!r}: null pixel values; {accepted}.")


def _checked_pixels(
    pixels: np.ndarray, row: int, source: Source, where: str, name: str
) -> np.ndarray:
    """A decoded image as it is, if uint8 with ``source.expected_values`` values."""
    if pixels.dtype != np.uint8 or pixels.size != source.expected_values:
        raise DataUnavailable(
            f"{where}, column {name!r}: row {row} decodes to {pixels.size} {pixels.dtype} "
            f"values (shape {pixels.shape}); {_accepted_images(source)}."
        )
    return pixels


def _check_encoded(
    column: pa.Array | pa.ChunkedArray, source: Source, where: str, name: str
) -> None:
    """Decode the given rows of an encoded-image column and check their pixels."""
    import io

    from PIL import Image

    for row, data in enumerate(_array(column).field("bytes").to_pylist()):
        if data is None:
            raise DataUnavailable(f"{where}, column {name!r}: row {row} has no image bytes.")
        with Image.open(io.BytesIO(data)) as image:
            _checked_pixels(np.asarray(image), row, source, where, name)


def _check_texts(column: pa.Array | pa.ChunkedArray, where: str, name: str) -> None:
    """Every row a string, no nulls."""
    values = _array(column)
    if not (
        pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
        or pa.types.is_string_view(values.type)
    ):  # fmt: skip
        raise DataUnavailable(
            f"{where}, column {name!r}: Arrow type {_describe(values.type)}, values such as "
            f"{_quote(values.slice(0, QUOTED).to_pylist())}; expected strings (texts)."
        )
    if values.null_count:
        rows = _rows(values.is_null().to_numpy(zero_copy_only=False))
        raise DataUnavailable(
            f"{where}, column {name!r}: null texts in rows {rows}; expected strings."
        )


def _check_inputs(
    column: pa.Array | pa.ChunkedArray, source: Source, where: str, name: str
) -> None:
    """The input column's rows given: texts, encoded images or pixel lists of ``source``."""
    if source.expected_values is None:
        _check_texts(column, where, name)
    elif _is_encoded(column.type):
        _check_encoded(column, source, where, name)
    else:
        _check_images(column, source, where, name)


def _whole(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        np.isfinite(value) and float(value).is_integer()
    )  # fmt: skip


def check_label_column(
    column: pa.Array | pa.ChunkedArray, num_classes: int, where: str
) -> np.ndarray:
    """The labels as int64 if of an integer Arrow type, without nulls, in range.

    Raises ``DataUnavailable`` naming ``where``, the column, a few offending values and
    what is accepted (integers ``0..num_classes-1``): floats (9.7, NaN), strings and
    nulls are refused, never cast.
    """
    values = _array(column)
    accepted = f"expected integers 0..{num_classes - 1}"
    if not pa.types.is_integer(values.type):
        listed = values.to_pylist()
        offending = [v for v in listed if not _whole(v)] or listed
        raise DataUnavailable(
            f"{where}, column 'label': Arrow type {_describe(values.type)}, values such as "
            f"{_quote(offending)}; {accepted} (an integer Arrow type)."
        )
    if values.null_count:
        rows = _rows(values.is_null().to_numpy(zero_copy_only=False))
        raise DataUnavailable(
            f"{where}, column 'label': {values.null_count} null value(s), rows {rows}; {accepted}."
        )
    labels = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    check_labels(labels, num_classes, where)
    return labels


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise ``DataUnavailable`` if a label falls outside ``0..num_classes-1``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][:QUOTED].tolist()
        raise DataUnavailable(
            f"labels out of range in {where}, column 'label': {bad}; expected integers "
            f"0..{num_classes - 1}."
        )


# --- Loading ------------------------------------------------------------------------


def _column_arrays(
    dataset: Any, source: Source, column: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` of one split, every row checked (``DataUnavailable`` otherwise).

    Images come back as uint8 ``[N, ...]`` exactly as stored (never cast), texts as an
    object array, labels as int64.
    """
    import datasets

    table = dataset.with_format("arrow")[:]  # the stored columns, undecoded
    _check_rows(table.num_rows, where)
    labels = check_label_column(table.column("label"), source.num_classes, where)
    values = table.column(column)
    if source.expected_values is None:
        _check_texts(values, where, column)
        return np.asarray(values.to_pylist(), dtype=object), labels
    if _is_encoded(values.type):
        if not isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image())
        images = [
            _checked_pixels(np.asarray(image), row, source, where, column)
            for row, image in enumerate(dataset[column])
        ]
        return np.stack(images), labels
    _check_images(values, source, where, column)
    flat = _array(values).flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(values), -1), labels


SPLITS = ("train", "test")


def _local_files(source: Source, data_dir: Path) -> dict[str, Path]:
    """The split files present in ``data_dir``; ``DataUnavailable`` if there are none."""
    if not data_dir.is_dir():
        raise DataUnavailable(f"data dir {str(data_dir)!r} does not exist.")
    folder = data_dir / source.folder
    files = {split: folder / f"{split}.parquet" for split in SPLITS}
    present = {split: path for split, path in files.items() if path.is_file()}
    if not present:
        raise _unavailable(source, f"no Parquet files in {str(folder)!r}")
    return present


def load_raw(source: Source, data_dir: Path | None) -> RawSplits:
    """The splits of ``source`` from ``data_dir`` or the hub; ``DataUnavailable`` if neither.

    Every row is checked as :func:`check_local` checks the first ones (local files) and
    refused alike (hub data too): nothing is cast. The checked arrays come from the
    decoded-data cache when it holds this version of the source (:mod:`trainables.cache`),
    and go into it otherwise.
    """
    if data_dir is not None:
        files = _local_files(source, data_dir)
        origin = f"local Parquet in {data_dir / source.folder}"
        key = cache.local_key(source, files)
        hit = cache.read(key, source)
        if hit is not None:
            return RawSplits(hit[0], origin=origin, cache=f"read from {hit[1]}")
        datasets = _datasets()
        for path in files.values():  # what ``datasets`` cannot say clearly (0 rows, columns)
            _check_local_file(source, path)
        loaded = datasets.load_dataset(
            "parquet", data_files={split: str(path) for split, path in files.items()}
        )
        splits = {
            split: _column_arrays(d, source, source.input_column, repr(str(files[split])))
            for split, d in loaded.items()
        }
        return RawSplits(splits, origin=origin, cache=_store(key, splits, origin))
    problem = _hub_problem(source)
    if problem is not None:
        raise _unavailable(source, problem)
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(source.hub_id)
    except (ConnectionError, OSError, FileNotFoundError) as err:
        raise _unavailable(source, f"{type(err).__name__}: {err}") from None
    origin = f"the Hugging Face hub ({source.hub_id})"
    present = {split: loaded[split] for split in SPLITS if split in loaded}
    hub_key = cache.hub_key(source, present)
    hit = cache.read(hub_key, source) if hub_key is not None else None
    if hit is not None:
        return RawSplits(hit[0], origin=origin, cache=f"read from {hit[1]}")
    splits = {
        split: _column_arrays(
            dataset,
            source,
            source.hub_input_column,
            f"the Hugging Face hub ({source.hub_id}), split {split!r}",
        )
        for split, dataset in present.items()
    }
    note = _store(hub_key, splits, origin) if hub_key is not None else None
    return RawSplits(splits, origin=origin, cache=note)


def _datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _store(
    key: cache.Key, splits: dict[str, tuple[np.ndarray, np.ndarray]], origin: str
) -> str | None:
    """Write checked ``splits`` into the cache; what happened, for the data notes."""
    try:
        folder = cache.write(key, splits, origin)
    except OSError as err:  # a read-only or full disk costs speed, never the trial
        return f"not written ({type(err).__name__}: {err})"
    return None if folder is None else f"written to {folder}"


def check_local(source: Source, data_dir: Path) -> None:
    """Check a local copy before any trial starts; ``DataUnavailable`` naming the file.

    Per split file: the columns and the row count (Parquet metadata), the input column's
    type and its first :data:`CHECKED_ROWS` rows (pixel type and image size, or strings),
    and the whole label column (integer type, no nulls, ``0..num_classes-1``). It never
    reads a whole image column (milliseconds per file); the loader checks every row.
    """
    for path in _local_files(source, data_dir).values():
        _check_local_file(source, path)


def _check_local_file(source: Source, path: Path) -> None:
    import pyarrow.parquet as pq

    where = repr(str(path))
    with pq.ParquetFile(path) as parquet:
        missing = {source.input_column, "label"} - set(parquet.schema_arrow.names)
        if missing:
            raise DataUnavailable(
                f"{where} lacks the column(s) {sorted(missing)}; expected "
                f"{source.input_column!r} and 'label' (see ../shared/data/README.md)."
            )
        _check_rows(parquet.metadata.num_rows, where)
        batches = parquet.iter_batches(batch_size=CHECKED_ROWS, columns=[source.input_column])
        first = next(batches).column(0)
    _check_inputs(first, source, where, source.input_column)
    labels = pq.read_table(path, columns=["label"]).column("label")
    check_label_column(labels, source.num_classes, where)
