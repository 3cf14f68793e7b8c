"""The decoded-data cache (trainables.cache): hits, misses, invalidation, atomic writes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainables import TrialConfig, cache, hub, tasks

MNIST = hub.SOURCES["mnist"]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    return folder


def _mnist_table(seed: int, n: int = 60) -> pa.Table:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 784)).astype(np.uint8)
    return pa.table({"image": pa.array(list(pixels), type=pa.list_(pa.uint8())),
                     "label": pa.array(rng.integers(0, 10, n), type=pa.int64())})  # fmt: skip


def _write(root: Path, table: pa.Table, split: str = "train") -> Path:
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    path = root / "mnist" / f"{split}.parquet"
    pq.write_table(table, path)
    return path


def _expected(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([np.asarray(v, np.uint8) for v in table.column("image").to_pylist()])
    return x, table.column("label").to_numpy()


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache hit must not read the source: ``datasets`` made unavailable."""

    def refuse() -> Any:
        raise AssertionError("the source was decoded although the cache holds it")

    monkeypatch.setattr(hub, "_datasets", refuse)


def _entries(folder: Path) -> list[Path]:
    return sorted((folder / "data").glob("mnist-*"))


def test_a_miss_writes_and_a_hit_reads_without_decoding(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = _mnist_table(0)
    _write(tmp_path / "data", table)
    first = hub.load_raw(MNIST, tmp_path / "data")
    assert first.cache is not None and first.cache.startswith("written to ")
    (entry,) = _entries(cache_dir)
    assert (entry / "train.inputs.npy").is_file() and (entry / "meta.json").is_file()

    _no_decoding(monkeypatch)
    second = hub.load_raw(MNIST, tmp_path / "data")
    assert second.cache == f"read from {entry}"
    x, y = second.splits["train"]
    assert isinstance(x, np.memmap)  # served memory-mapped
    ex, ey = _expected(table)
    assert x.dtype == np.uint8 and np.array_equal(x, ex) and np.array_equal(y, ey)
    assert second.origin == first.origin


def test_a_changed_source_file_is_a_miss_and_its_old_entry_goes(
    cache_dir: Path, tmp_path: Path
) -> None:
    path = _write(tmp_path / "data", _mnist_table(0))
    hub.load_raw(MNIST, tmp_path / "data")
    (old,) = _entries(cache_dir)
    time.sleep(0.01)  # a later modification time even on coarse clocks
    changed = _mnist_table(1)
    assert _write(tmp_path / "data", changed) == path  # same path, new content
    again = hub.load_raw(MNIST, tmp_path / "data")
    assert again.cache is not None and again.cache.startswith("written to ")
    x, y = again.splits["train"]
    ex, ey = _expected(changed)
    assert np.array_equal(x, ex) and np.array_equal(y, ey)
    (new,) = _entries(cache_dir)  # the superseded entry was removed
    assert new != old and not old.exists()


def test_a_new_cache_format_is_a_miss(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "data", _mnist_table(0))
    files = {"train": tmp_path / "data/mnist/train.parquet"}
    before = cache.local_key(MNIST, files)
    monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION + 1)
    assert cache.local_key(MNIST, files).name != before.name


def test_refused_data_is_never_cached(cache_dir: Path, tmp_path: Path) -> None:
    table = pa.table({"image": pa.array([np.zeros(784, np.uint8)] * 4, pa.list_(pa.uint8())),
                      "label": [0, 3, 12, 1]})  # fmt: skip
    _write(tmp_path / "data", table)
    for _ in range(2):  # refused again: nothing was cached the first time
        with pytest.raises(hub.DataUnavailable, match="out of range"):
            hub.load_raw(MNIST, tmp_path / "data")
    assert _entries(cache_dir) == []


def test_an_entry_that_does_not_pass_the_checks_is_a_miss(cache_dir: Path, tmp_path: Path) -> None:
    """A tampered entry (labels out of range) and a truncated one are read from the
    source again, never served."""
    table = _mnist_table(0)
    _write(tmp_path / "data", table)
    hub.load_raw(MNIST, tmp_path / "data")
    (entry,) = _entries(cache_dir)
    labels = np.load(entry / "train.labels.npy")
    labels[3] = 12
    np.save(entry / "train.labels.npy", labels)
    again = hub.load_raw(MNIST, tmp_path / "data")
    assert again.cache == f"written to {entry}"  # decoded again, and the entry replaced
    assert np.array_equal(again.splits["train"][1], _expected(table)[1])
    key = cache.local_key(MNIST, {"train": tmp_path / "data/mnist/train.parquet"})
    assert cache.read(key, MNIST) is not None

    path = entry / "train.inputs.npy"
    os.truncate(path, path.stat().st_size // 2)
    assert cache.read(key, MNIST) is None
    assert hub.load_raw(MNIST, tmp_path / "data").cache == f"written to {entry}"


def test_the_task_loader_serves_the_same_splits_from_the_cache(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "data", _mnist_table(0, 300), "train")
    _write(tmp_path / "data", _mnist_table(1, 100), "test")
    cfg = TrialConfig.from_dict({"task": "mnist", "policy": "constant", "val_size": 50,
                                 "test_size": 40, "limit_train": 200,
                                 "data_dir": str(tmp_path / "data")})  # fmt: skip
    fresh = tasks.get("mnist").load(cfg.data_request())
    assert any(n.startswith("decoded data cache: written to") for n in fresh.notes)
    _no_decoding(monkeypatch)
    cached = tasks.get("mnist").load(cfg.data_request())
    assert any(n.startswith("decoded data cache: read from") for n in cached.notes)
    for name in ("train", "val", "test", "probe"):
        a, b = getattr(fresh, name), getattr(cached, name)
        assert a.inputs[0].equal(b.inputs[0]) and a.labels.equal(b.labels), name


def test_texts_round_trip(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["plain", "ünïcödé ✓", "", "a much longer text " * 20]
    (tmp_path / "data/imdb").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts, "label": [0, 1, 0, 1]}),
                   tmp_path / "data/imdb/train.parquet")  # fmt: skip
    hub.load_raw(hub.SOURCES["imdb"], tmp_path / "data")
    _no_decoding(monkeypatch)
    raw = hub.load_raw(hub.SOURCES["imdb"], tmp_path / "data")
    assert raw.cache is not None and raw.cache.startswith("read from")
    x, y = raw.splits["train"]
    assert x.dtype == object and list(x) == texts and list(y) == [0, 1, 0, 1]


def test_concurrent_writers_leave_one_whole_entry_and_readers_never_see_half(
    cache_dir: Path, tmp_path: Path
) -> None:
    _write(tmp_path / "data", _mnist_table(0))
    files = {"train": tmp_path / "data/mnist/train.parquet"}
    key = cache.local_key(MNIST, files)
    arrays = {"train": _expected(_mnist_table(0))}
    writers, start = 6, threading.Barrier(7)
    seen: list[str] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            start.wait()
            cache.write(key, arrays, "test")
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def read() -> None:
        start.wait()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            got = cache.read(key, MNIST)
            if got is None:
                seen.append("miss")
                continue
            x, y = got[0]["train"]
            seen.append("whole" if np.array_equal(x, arrays["train"][0])
                        and np.array_equal(y, arrays["train"][1]) else "HALF")  # fmt: skip
            if len(seen) > 50:
                return

    threads = [threading.Thread(target=write) for _ in range(writers)]
    threads.append(threading.Thread(target=read))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert "HALF" not in seen and "whole" in seen
    assert _entries(cache_dir) == [cache_dir / "data" / key.name]
    assert not list((cache_dir / "data").glob(".*"))  # no temporary folder left


def test_a_crashed_writers_folder_is_ignored_and_later_removed(
    cache_dir: Path, tmp_path: Path
) -> None:
    _write(tmp_path / "data", _mnist_table(0))
    key = cache.local_key(MNIST, {"train": tmp_path / "data/mnist/train.parquet"})
    leftover = cache_dir / "data" / f".{key.name}.tmp-crashed"
    leftover.mkdir(parents=True)
    (leftover / "train.labels.npy").write_bytes(b"half")
    assert cache.read(key, MNIST) is None
    old = time.time() - 2 * cache.STALE_TMP_S
    os.utime(leftover, (old, old))
    hub.load_raw(MNIST, tmp_path / "data")
    assert not leftover.exists() and cache.read(key, MNIST) is not None


def test_where_the_cache_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    assert cache.cache_dir() is None
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "tune-alr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_dir() == Path("~/.cache/tune-alr").expanduser()


def test_off_means_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    _write(tmp_path / "data", _mnist_table(0))
    assert hub.load_raw(MNIST, tmp_path / "data").cache is None
    assert not any(tmp_path.rglob("*.npy"))


def test_an_unwritable_cache_costs_speed_not_the_trial(cache_dir: Path, tmp_path: Path) -> None:
    cache_dir.write_text("a file where the folder should be")
    _write(tmp_path / "data", _mnist_table(0))
    raw = hub.load_raw(MNIST, tmp_path / "data")
    assert raw.cache is not None and raw.cache.startswith("not written (")
    assert len(raw.splits["train"][1]) == 60


class _FakeDataset:
    def __init__(self, files: list[Path], fingerprint: str) -> None:
        self.cache_files = [{"filename": str(f)} for f in files]
        self._fingerprint = fingerprint


def test_hub_data_is_keyed_on_its_fingerprint_and_cache_files(tmp_path: Path) -> None:
    arrow = tmp_path / "data-00000.arrow"
    arrow.write_bytes(b"x" * 10)
    key = cache.hub_key(MNIST, {"train": _FakeDataset([arrow], "abc")})
    assert key is not None
    assert cache.hub_key(MNIST, {"train": _FakeDataset([arrow], "abc")}) == key
    other = cache.hub_key(MNIST, {"train": _FakeDataset([arrow], "abd")})
    assert other is not None and other.name != key.name
    arrow.write_bytes(b"y" * 11)
    changed = cache.hub_key(MNIST, {"train": _FakeDataset([arrow], "abc")})
    assert changed is not None and changed.name != key.name
    assert cache.hub_key(MNIST, {"train": _FakeDataset([], "abc")}) is None  # in memory only


def test_the_digits_come_from_the_cache_without_importing_scikit_learn(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import sys

    from sklearn.datasets import load_digits

    from trainables import data
    from trainables.data import SplitPlan

    plan = SplitPlan(data_seed=0, val_size=2000, test_size=5000)
    first = data.load_digits(plan, 64)
    assert first.notes[0].startswith("decoded data cache: written to")
    bunch = load_digits()
    x, y, _ = data.digits_arrays()
    assert np.array_equal(x, bunch.data) and np.array_equal(y, bunch.target)

    real_import = builtins.__import__

    def no_sklearn(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("sklearn"):
            raise AssertionError("scikit-learn imported although the cache holds the digits")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    second = data.load_digits(plan, 64)
    assert second.notes[0].startswith("decoded data cache: read from")
    for name in ("train", "val", "test", "probe"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.inputs[0].equal(b.inputs[0]) and a.labels.equal(b.labels), name
