"""A decoded-data cache shared by the trials (and their restarts) of one machine.

Reading and checking a dataset (Parquet through ``datasets``, image decoding, the row
checks of :mod:`trainables.hub`) costs seconds in every trial, and again in every restart
(a PBT exploit, a retry). What it produces, the checked NumPy arrays of each split, is
kept here once and read back in milliseconds.

Where: ``$TUNE_ALR_CACHE_DIR`` (``off`` turns the cache off), else
``$XDG_CACHE_HOME/tune-alr``, else ``~/.cache/tune-alr``; entries live in its ``data/``
folder, one folder per dataset version::

    data/<task>-<sha256 of the key, 24 hex>/
        meta.json                         the key, the origin, the arrays' shapes
        <split>.inputs.npy                images: uint8 exactly as stored (memory-mapped)
        <split>.text_bytes.npy            texts: UTF-8 bytes of all rows, and their
        <split>.text_offsets.npy          start offsets (N + 1)
        <split>.labels.npy                int64

The key (:func:`local_key`, :func:`hub_key`) is the cache format
(:data:`FORMAT_VERSION`), the source's identity and what its checks depend on (task,
hub id, column, number of classes, pixels per image), and the source files: for local
Parquet each file's resolved path, size and modification time (ns); for hub data each
split's ``datasets`` fingerprint and its Arrow cache files (path, size, modification
time). A changed source file gives a new key, hence a miss: the data is read, checked
and written again, and the superseded entries of the same files are removed.

Only checked arrays are written: :func:`trainables.hub.load_raw` stores what passed every
check, so the cache never serves data the loader would refuse. What it reads back is
checked again where that is cheap (the key in ``meta.json``, dtypes, shapes, the pixel
count, the label range); anything unexpected, a missing or truncated file included, is a
miss, never an error, and the entry is removed so that the next write replaces it.

Writes are atomic: an entry is written into a temporary folder beside the others and
renamed into place in one step, so a reader sees a whole entry or none. Two trials that
miss at once both decode and both write; the first rename wins and the other's folder is
discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "TUNE_ALR_CACHE_DIR"
#: Values of ``$TUNE_ALR_CACHE_DIR`` that turn the cache off.
OFF = ("off", "none", "0", "false", "no")
#: Bumped whenever what an entry holds, or how it is laid out, changes.
FORMAT_VERSION = 1
#: A writer's temporary folder older than this is a crashed writer's: removed.
STALE_TMP_S = 3600.0

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def cache_dir() -> Path | None:
    """The cache folder, or ``None`` when ``$TUNE_ALR_CACHE_DIR`` turns it off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "tune-alr"


@dataclass(frozen=True)
class Key:
    """What an entry is for: ``fields`` (JSON-able) hashed into the entry's name.

    ``files`` is the part that names the source files without their versions (paths
    only): entries with the same ``files`` and another key are superseded versions.
    """

    task: str
    fields: Mapping[str, Any]
    files: tuple[str, ...]

    @property
    def digest(self) -> str:
        text = json.dumps(dict(self.fields), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @property
    def name(self) -> str:
        return f"{self.task}-{self.digest}"


def _source_fields(source: Any) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "task": source.task,
        "hub_id": source.hub_id,
        "num_classes": source.num_classes,
        "expected_values": source.expected_values,
    }


def _stat(path: Path) -> dict[str, Any]:
    resolved = path.resolve()
    info = resolved.stat()
    return {"path": str(resolved), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def local_key(source: Any, files: Mapping[str, Path]) -> Key:
    """The key of local Parquet ``files`` (split -> path) of ``source`` (a ``hub.Source``)."""
    stats = {split: _stat(path) for split, path in sorted(files.items())}
    fields = {**_source_fields(source), "column": source.input_column, "files": stats}
    return Key(source.task, fields, tuple(s["path"] for s in stats.values()))


def hub_key(source: Any, loaded: Mapping[str, Any]) -> Key | None:
    """The key of a loaded hub ``DatasetDict``: each split's fingerprint and cache files.

    ``None`` when a split has no cache file to key on (a dataset held in memory only):
    such data is not cached.
    """
    splits: dict[str, Any] = {}
    paths: list[str] = []
    for split in sorted(loaded):
        dataset = loaded[split]
        cache_files = [Path(f["filename"]) for f in getattr(dataset, "cache_files", []) or []]
        if not cache_files:
            return None
        stats = [_stat(p) for p in cache_files]
        splits[split] = {"fingerprint": getattr(dataset, "_fingerprint", None), "files": stats}
        paths.extend(s["path"] for s in stats)
    fields = {**_source_fields(source), "column": source.hub_input_column, "hub": splits}
    return Key(source.task, fields, tuple(paths))


# --- Texts as two flat arrays (memory-mappable, no pickles) ------------------------------


def _pack_texts(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    encoded = [str(t).encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    flat = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return flat, offsets


def _unpack_texts(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    data = flat.tobytes()
    bounds = offsets.tolist()
    out = np.empty(len(bounds) - 1, dtype=object)
    out[:] = [data[a:b].decode("utf-8") for a, b in itertools.pairwise(bounds)]
    return out


# --- Reading ---------------------------------------------------------------------------


class _Miss(Exception):
    """An entry that cannot be served (absent, partial, or not what the key says)."""


def _entry(key: Key) -> Path | None:
    root = cache_dir()
    return None if root is None else root / "data" / key.name


def read(key: Key, source: Any) -> tuple[Arrays, Path] | None:
    """The arrays of ``key``'s entry and its folder, or ``None`` (a miss).

    Images come memory-mapped (read-only); labels and texts in memory.
    """
    folder = _entry(key)
    if folder is None or not folder.is_dir():
        return None
    try:
        return _read(folder, key, source), folder
    except (_Miss, OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        _discard(folder)  # so that the entry written next takes its place
        return None


def _discard(folder: Path) -> None:
    """Remove an entry that cannot be served: renamed aside first (atomic), then deleted."""
    aside = folder.with_name(f".{folder.name}.tmp-bad-{os.getpid()}-{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)


def _read(folder: Path, key: Key, source: Any) -> Arrays:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("key") != json.loads(json.dumps(dict(key.fields), default=str)):
        raise _Miss("another key")
    out: Arrays = {}
    for split, shape in meta["splits"].items():
        labels = np.load(folder / f"{split}.labels.npy")
        if labels.dtype != np.int64 or labels.ndim != 1 or len(labels) != shape["rows"]:
            raise _Miss("labels")
        if labels.size and (labels.min() < 0 or labels.max() >= source.num_classes):
            raise _Miss("label range")
        if source.expected_values is None:
            flat = np.load(folder / f"{split}.text_bytes.npy")
            offsets = np.load(folder / f"{split}.text_offsets.npy")
            if len(offsets) != len(labels) + 1 or int(offsets[-1]) != len(flat):
                raise _Miss("texts")
            inputs = _unpack_texts(flat, offsets)
        else:
            inputs = np.load(folder / f"{split}.inputs.npy", mmap_mode="r")
            pixels = int(np.prod(inputs.shape[1:])) if inputs.ndim > 1 else -1
            if (
                inputs.dtype != np.uint8
                or len(inputs) != len(labels)
                or pixels != source.expected_values
            ):
                raise _Miss("images")
        out[split] = (inputs, labels)
    return out


# --- Writing ---------------------------------------------------------------------------


def write(key: Key, arrays: Arrays, origin: str) -> Path | None:
    """Store checked ``arrays`` as ``key``'s entry, atomically; returns its folder.

    ``None`` when the cache is off. An entry another writer put in place first is kept
    (this one is discarded). Superseded entries of the same source files are removed.
    Raises ``OSError`` when the cache folder cannot be written.
    """
    folder = _entry(key)
    if folder is None:
        return None
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key.name}.tmp-", dir=parent))
    try:
        splits: dict[str, Any] = {}
        for split, (inputs, labels) in arrays.items():
            np.save(tmp / f"{split}.labels.npy", np.ascontiguousarray(labels, dtype=np.int64))
            if inputs.dtype == object:
                flat, offsets = _pack_texts(inputs)
                np.save(tmp / f"{split}.text_bytes.npy", flat)
                np.save(tmp / f"{split}.text_offsets.npy", offsets)
            else:
                np.save(tmp / f"{split}.inputs.npy", np.ascontiguousarray(inputs))
            splits[split] = {"rows": len(labels), "inputs": list(inputs.shape)}
        meta = {
            "key": dict(key.fields),
            "files": list(key.files),
            "origin": origin,
            "splits": splits,
            "written": time.time(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide it from the user's other tools
        try:
            os.rename(tmp, folder)  # atomic; fails if another writer's entry is there
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the other writer's entry stands
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_superseded(parent, key)
    return folder


def _remove_stale_tmp(parent: Path) -> None:
    now = time.time()
    for path in parent.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(path, ignore_errors=True)


def _remove_superseded(parent: Path, key: Key) -> None:
    """Entries for the same source files under an older key (the files changed since)."""
    for other in parent.glob(f"{key.task}-*"):
        if other.name == key.name or not other.is_dir():
            continue
        with contextlib.suppress(OSError, ValueError, json.JSONDecodeError):
            meta = json.loads((other / "meta.json").read_text())
            if tuple(meta.get("files", ())) == key.files:
                shutil.rmtree(other, ignore_errors=True)


__all__ = [
    "CACHE_ENV",
    "FORMAT_VERSION",
    "Key",
    "cache_dir",
    "hub_key",
    "local_key",
    "read",
    "write",
]
