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
        (
            pa.table(
                {"image": pa.array([[0] * 784] * 4, pa.list_(pa.uint8())), "label": [0, 3, 12, 1]}
            ),
            "labels out of range",
        ),
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


# --- What the driver's check and the loader refuse (each message: file, column, a few
# offending values, what is accepted). ---


def _image_table(values: pa.Array | list[Any], labels: pa.Array | list[Any]) -> pa.Table:
    return pa.table({"image": values, "label": labels})


def _uint8_images(n: int, width: int = 784) -> pa.Array:
    return pa.array([np.full(width, 7, np.uint8)] * n, type=pa.list_(pa.uint8()))


def _bad_mnist_tables() -> dict[str, tuple[pa.Table, list[str]]]:
    """name -> (train table, fragments the refusal names), all for task mnist."""
    floats = pa.array([np.full(784, 0.5, np.float32)] * 4, type=pa.list_(pa.float32()))
    int16 = pa.array([np.full(784, 300, np.int16)] * 4, type=pa.list_(pa.int16()))
    return {
        "empty split": (
            _image_table(_uint8_images(0), pa.array([], pa.int64())),
            ["0 rows", "at least one row"],
        ),
        "wrong image size": (
            _image_table(_uint8_images(4, width=100), [0, 1, 2, 3]),
            ["'image'", "100 values", "784"],
        ),
        "float pixels": (
            _image_table(floats, [0, 1, 2, 3]),
            ["'image'", "list<float", "0.5", "list<uint8> of 784 values"],
        ),
        "int16 pixels": (
            _image_table(int16, [0, 1, 2, 3]),
            ["'image'", "int16", "300", "list<uint8> of 784 values"],
        ),
        "float labels": (
            _image_table(_uint8_images(4), pa.array([1.0, 9.7, 2.0, 3.0])),
            ["'label'", "double", "9.7", "integers 0..9"],
        ),
        "string labels": (
            _image_table(_uint8_images(4), ["cat", "dog", "cat", "1"]),
            ["'label'", "string", "'cat'", "integers 0..9"],
        ),
        "null labels": (
            _image_table(_uint8_images(4), pa.array([0, None, 2, None], pa.int64())),
            ["'label'", "null", "rows [1, 3]", "integers 0..9"],
        ),
        "NaN labels": (
            _image_table(_uint8_images(4), pa.array([0.0, float("nan"), 2.0, 3.0])),
            ["'label'", "nan", "integers 0..9"],
        ),
        "labels out of range": (
            _image_table(_uint8_images(4), [0, 3, 12, 1]),
            ["'label'", "out of range", "[12]", "integers 0..9"],
        ),
    }


BAD_MNIST = _bad_mnist_tables()


def _write_mnist(root: Path, table: pa.Table) -> Path:
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    path = root / "mnist" / "train.parquet"
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_MNIST))
def test_check_local_refuses_bad_files_naming_them(case: str, tmp_path: Path) -> None:
    table, fragments = BAD_MNIST[case]
    path = _write_mnist(tmp_path, table)
    with pytest.raises(hub.DataUnavailable) as err:
        hub.check_local(hub.SOURCES["mnist"], tmp_path)
    message = str(err.value)
    assert "\n" not in message  # one line
    for fragment in [str(path), *fragments]:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("case", sorted(BAD_MNIST))
def test_the_loader_refuses_the_same_files(case: str, tmp_path: Path) -> None:
    """Inside a trial (no driver check) nothing is cast silently: 0.5 never becomes 0."""
    table, fragments = BAD_MNIST[case]
    path = _write_mnist(tmp_path, table)
    with pytest.raises(hub.DataUnavailable) as err:
        hub.load_raw(hub.SOURCES["mnist"], tmp_path)
    message = str(err.value)
    for fragment in [str(path), *fragments]:
        assert fragment in message, (fragment, message)


def test_text_columns_must_be_strings(tmp_path: Path) -> None:
    (tmp_path / "imdb").mkdir()
    path = tmp_path / "imdb" / "train.parquet"
    pq.write_table(pa.table({"text": [5, 6, 7], "label": [0, 1, 0]}), path)
    for check in (hub.check_local, hub.load_raw):
        with pytest.raises(hub.DataUnavailable) as err:
            check(hub.SOURCES["imdb"], tmp_path)
        message = str(err.value)
        for fragment in (str(path), "'text'", "int64", "[5, 6, 7]", "strings"):
            assert fragment in message, (check.__name__, fragment, message)


def test_check_local_reads_a_few_rows_the_loader_all_of_them(tmp_path: Path) -> None:
    """The driver's check looks at the first rows only (it must stay fast on 60,000
    images); the loader checks every row, so a bad row 500 still stops the trial."""
    images = [np.zeros(784, np.uint8)] * 1000
    images[500] = np.zeros(783, np.uint8)
    table = _image_table(pa.array(images, type=pa.list_(pa.uint8())), [i % 10 for i in range(1000)])
    path = _write_mnist(tmp_path, table)
    hub.check_local(hub.SOURCES["mnist"], tmp_path)  # the first rows are fine
    with pytest.raises(hub.DataUnavailable, match=r"row 500 has 783 values") as err:
        hub.load_raw(hub.SOURCES["mnist"], tmp_path)
    assert str(path) in str(err.value)


def _png(pixels: np.ndarray) -> dict[str, Any]:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return {"bytes": out.getvalue(), "path": None}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_encoded_images_are_decoded_never_cast(dtype: type, tmp_path: Path) -> None:
    """PNG files in a struct column (Hugging Face's Image storage): 8-bit ones load as they
    are; 16-bit ones are refused by both checks rather than cut to 8 bits."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 250, (28, 28)).astype(dtype) * (200 if dtype == np.uint16 else 1)
              for _ in range(20)]  # fmt: skip
    images = pa.array([_png(p) for p in pixels],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    path = _write_mnist(tmp_path, _image_table(images, [i % 10 for i in range(20)]))
    if dtype == np.uint8:
        hub.check_local(hub.SOURCES["mnist"], tmp_path)
        x, _ = hub.load_raw(hub.SOURCES["mnist"], tmp_path).splits["train"]
        assert x.dtype == np.uint8 and np.array_equal(x, np.stack(pixels))
        return
    for check in (hub.check_local, hub.load_raw):
        with pytest.raises(hub.DataUnavailable) as err:
            check(hub.SOURCES["mnist"], tmp_path)
        for fragment in (str(path), "'image'", "row 0 decodes to 784 uint16 values", "uint8"):
            assert fragment in str(err.value), (check.__name__, fragment, str(err.value))


def test_check_local_is_fast_on_the_real_files(shared_data: Path) -> None:
    start = time.perf_counter()
    for source in hub.SOURCES.values():
        hub.check_local(source, shared_data)
    assert time.perf_counter() - start < 10.0  # about 1 s here, on a loaded 2-core machine


def test_the_images_each_source_expects() -> None:
    assert hub.SOURCES["mnist"].expected_values == 784
    assert hub.SOURCES["cifar10"].expected_values == 3072
    assert hub.SOURCES["imdb"].expected_values is None


# --- Data not available: refused in the driver, before Ray starts. ---


def _fresh_offline_hf(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.delenv(hub.DATA_DIR_ENV, raising=False)


def test_check_available_offline_and_not_cached_refuses_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fresh_offline_hf(monkeypatch, tmp_path / "hf")
    start = time.perf_counter()
    with pytest.raises(hub.DataUnavailable) as err:
        hub.check_available(hub.SOURCES["mnist"], None)
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    for fragment in ("ylecun/mnist", "--data-dir", hub.DATA_DIR_ENV, "offline", "cache"):
        assert fragment in message, (fragment, message)


def test_check_available_with_a_data_dir_checks_the_files(tmp_path: Path) -> None:
    _write_mnist(tmp_path, BAD_MNIST["float pixels"][0])
    with pytest.raises(hub.DataUnavailable, match="list<uint8> of 784 values"):
        hub.check_available(hub.SOURCES["mnist"], tmp_path)


# Run in a fresh interpreter: ``datasets`` reads HF_HOME when imported. It writes a real
# ``datasets`` cache entry for ylecun/mnist (as a download would leave one), then asks
# check_available and load_raw for it with the hub offline.
_CACHED_HUB = """
import json, os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from datasets.packaged_modules.parquet.parquet import Parquet
from trainables import hub

pixel = pa.uint8() if sys.argv[1] == "uint8" else pa.float32()
images = pa.array([np.full(784, 3)] * 20, type=pa.list_(pixel))
pq.write_table(pa.table({"image": images, "label": list(range(10)) * 2}), "train.parquet")
builder = Parquet(dataset_name="mnist", data_files={"train": os.path.abspath("train.parquet")},
                  hash="0")
builder.download_and_prepare()
# The layout a hub download leaves: <cache>/ylecun___mnist/default/<version>/<hash>
config_dir = os.path.dirname(os.path.dirname(builder.cache_dir))
os.makedirs(os.path.join(os.environ["HF_DATASETS_CACHE"], "ylecun___mnist"))
os.rename(config_dir, os.path.join(os.environ["HF_DATASETS_CACHE"], "ylecun___mnist", "default"))
hub.check_available(hub.SOURCES["mnist"], None)
try:
    raw = hub.load_raw(hub.SOURCES["mnist"], None)
except hub.DataUnavailable as err:
    print(json.dumps({"refused": str(err)}))
else:
    x, y = raw.splits["train"]
    print(json.dumps({"origin": raw.origin, "shape": list(x.shape), "dtype": str(x.dtype)}))
"""


@pytest.mark.parametrize("pixel", ["uint8", "float32"])
def test_a_dataset_in_the_hf_cache_is_available_offline(pixel: str, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    home = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    env.pop(hub.DATA_DIR_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", _CACHED_HUB, pixel], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if pixel == "uint8":
        assert result == {"origin": "the Hugging Face hub (ylecun/mnist)", "shape": [20, 784],
                          "dtype": "uint8"}  # fmt: skip
    else:  # hub data gets the same refusals as local files
        assert "ylecun/mnist" in result["refused"] and "list<float>" in result["refused"]
