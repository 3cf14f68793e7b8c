"""Real tasks through the real loader: generated Parquet in the shared schema, always;
the real files in ../shared/data when present."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainables import TrialConfig, hub, tasks
from trainables.loop import train
from trainables.text import PAD_ID, UNK_ID, encode, train_tokenizer

WORDS = {
    0: "dreadful boring awful waste dull",
    1: "wonderful superb moving brilliant gem",
    2: "market shares profit bank economy",
    3: "match goal season coach league",
}


def _images(rng: np.random.Generator, n: int, width: int, classes: int) -> pa.Table:
    labels = rng.integers(0, classes, n)
    # class-dependent brightness, so a model can learn it in a few steps
    base = (labels[:, None] * (200 // classes)).astype(np.int64)
    pixels = np.clip(base + rng.integers(0, 40, (n, width)), 0, 255).astype(np.uint8)
    return pa.table({"image": pa.array(list(pixels), type=pa.list_(pa.uint8())),
                     "label": pa.array(labels, type=pa.int64())})  # fmt: skip


def _texts(rng: np.random.Generator, n: int, classes: int, offset: int) -> pa.Table:
    labels = rng.integers(0, classes, n)
    vocab = [WORDS[offset + int(y)].split() for y in labels]
    texts = [" ".join(rng.choice(v, 12)) + " the a of" for v in vocab]
    return pa.table({"text": texts, "label": pa.array(labels, type=pa.int64())})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<dir>/<task>/{train,test}.parquet`` in the schema of ../shared/data."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    layout: dict[str, dict[str, pa.Table]] = {
        "mnist": {"train": _images(rng, 600, 784, 10), "test": _images(rng, 200, 784, 10)},
        "cifar10": {"train": _images(rng, 600, 3072, 10), "test": _images(rng, 200, 3072, 10)},
        "imdb": {"train": _texts(rng, 600, 2, 0), "test": _texts(rng, 200, 2, 0)},
        "ag_news": {"test": _texts(rng, 800, 4, 0)},  # as in ../shared/data: test only
    }
    for task, splits in layout.items():
        (root / task).mkdir()
        for split, table in splits.items():
            pq.write_table(table, root / task / f"{split}.parquet")
    return root


def _run(task: str, data_dir: Path, **extra: Any) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = []
    config = {"task": task, "policy": "constant", "data_dir": str(data_dir), "epochs": 50,
              "max_steps": 40, "report_every": 20, "val_size": 100, "test_size": 100,
              **extra}  # fmt: skip
    train(config, lambda m, _: reports.append(m))
    return reports


@pytest.mark.parametrize("task", ["mnist", "cifar10", "imdb", "ag_news"])
def test_each_task_trains_on_generated_parquet(task: str, tiny_dir: Path) -> None:
    reports = _run(
        task, tiny_dir, task_params={"max_len": 16} if task in ("imdb", "ag_news") else {}
    )
    first, last = reports[0], reports[-1]
    assert last["status"] == "finished" and last["step"] == 40
    for key in ("train_loss", "val_loss", "val_acc"):
        assert all(math.isfinite(r[key]) for r in reports), key
    assert last["val_loss"] < first["val_loss"]  # the loss falls
    assert "local Parquet" in first["data_notes"]
    if task == "ag_news":
        assert "no test split is left" in first["data_notes"] and "test_acc" not in last
    else:
        assert math.isfinite(last["test_acc"])


def test_mnist_plan2_model_and_budget(tiny_dir: Path) -> None:
    cfg = TrialConfig.from_dict({"task": "mnist", "policy": "constant", "data_dir": str(tiny_dir),
                                 "task_params": {"model": "plan2"}, "budget": 0.5,
                                 "val_size": 100})  # fmt: skip
    data = tasks.get("mnist").load(cfg.data_request())
    model = tasks.get("mnist").model(data, cfg.task_options())
    assert type(model).__name__ == "Plan2CNN"
    # validation: 100 rows, stratified (per-class rounding); training: half of the rest
    assert abs(len(data.val) - 100) <= 5
    assert len(data.train) == math.ceil((600 - len(data.val)) / 2)
    assert data.train.inputs[0].shape[1:] == (1, 28, 28)


def test_offline_without_data_dir_fails_fast_naming_both_options(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv(hub.DATA_DIR_ENV, raising=False)
    start = time.perf_counter()
    with pytest.raises(hub.DataUnavailable) as err:
        train({"task": "mnist", "policy": "constant"}, lambda m, _: None)
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    assert "ylecun/mnist" in message and "--data-dir" in message and "hub" in message


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        (pa.table({"pixels": [[0] * 784], "label": [1]}), "lacks the column(s) ['image']"),
        (pa.table({"image": [[0] * 784] * 4, "label": [0, 3, 12, 1]}), "labels out of range"),
    ],
)
def test_bad_parquet_is_a_clear_error(table: pa.Table, fragment: str, tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    pq.write_table(table, tmp_path / "mnist" / "train.parquet")
    with pytest.raises(ValueError) as err:
        _run("mnist", tmp_path)
    assert fragment in str(err.value)


def test_missing_data_dir_is_rejected_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        TrialConfig.from_dict({"task": "mnist", "policy": "constant",
                               "data_dir": str(tmp_path / "nope")})  # fmt: skip


def test_tokenizer_learns_from_train_only_and_maps_unknown_words() -> None:
    tokenizer = train_tokenizer(["the cat sat", "the cat ran", "a dog"], vocab_size=100)
    vocab = tokenizer.get_vocab()
    assert vocab["[PAD]"] == PAD_ID and vocab["[UNK]"] == UNK_ID
    assert "the" in vocab and "cat" in vocab
    assert "dog" not in vocab  # seen once: below min_frequency=2
    ids, lengths = encode(tokenizer, ["The CAT zebra", ""], max_len=5)
    the, cat = vocab["the"], vocab["cat"]
    assert ids.tolist() == [[the, cat, UNK_ID, PAD_ID, PAD_ID], [PAD_ID] * 5]
    assert lengths.tolist() == [3, 1]


def test_bad_task_options() -> None:
    with pytest.raises(ValueError, match="task option model must be one of plan1, plan2"):
        TrialConfig.from_dict({"task": "mnist", "policy": "constant",
                               "task_params": {"model": "resnet"}})  # fmt: skip
    with pytest.raises(ValueError, match="task option max_len must be an integer >= 1"):
        TrialConfig.from_dict({"task": "imdb", "policy": "constant",
                               "task_params": {"max_len": 0}})  # fmt: skip
    with pytest.raises(ValueError, match="task 'imdb' has no option 'hiden'"):
        TrialConfig.from_dict({"task": "imdb", "policy": "constant",
                               "task_params": {"hiden": 3}})  # fmt: skip


@pytest.mark.parametrize("task", ["mnist", "cifar10", "imdb", "ag_news"])
def test_each_task_on_the_real_files(task: str, shared_data: Path) -> None:
    params = {"task_params": {"max_len": 64}} if task == "imdb" else {}
    reports = _run(task, shared_data, budget=0.05, val_size=300, test_size=300, lr=3e-3,
                   max_steps=100, report_every=50, **params)  # fmt: skip
    assert reports[-1]["status"] == "finished" and reports[-1]["step"] == 100
    assert all(math.isfinite(r[k]) for r in reports for k in ("train_loss", "val_loss"))
    # the mean training loss of steps 51-100 is below that of steps 1-50
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
