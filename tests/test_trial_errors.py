"""Errors inside a real Ray Tune trial: what a retry would repeat ends the trial at once.

``trainables.train`` turns a ``ValueError`` (bad data or settings, ``DataUnavailable``
included) or the memory guard's ``MemoryCapExceeded`` into a last result
``{"status": "failed", "error": ...}``; Ray, given ``max_failures=2``, does not restart
it. Any other error still raises, and Ray restarts the trial.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainables import ray_trainable
from tune_alr.monitor import MemoryCapExceeded

CONFIG = {"task": "mnist", "policy": "constant", "epochs": 1, "max_steps": 10,
          "report_every": 5, "val_size": 50, "test_size": 50}  # fmt: skip


def _rows(trial_dir: Path) -> list[dict[str, Any]]:
    text = (trial_dir / "result.json").read_text() if (trial_dir / "result.json").is_file() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _tuner(trainable: Any, param_space: dict[str, Any], storage: Path) -> Any:
    from ray import tune

    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=param_space,
        run_config=tune.RunConfig(
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=0,
        ),
    )


@pytest.mark.slow
def test_bad_data_inside_a_trial_fails_it_once_without_retries(
    ray_session: None, tmp_path: Path
) -> None:
    """Images of 100 values for MNIST (784 expected), past no driver check: one attempt,
    a last result that says why, no error.txt, and seconds of wall time."""
    import trainables

    (tmp_path / "data/mnist").mkdir(parents=True)
    images = pa.array([np.zeros(100, np.uint8)] * 40, type=pa.list_(pa.uint8()))
    pq.write_table(pa.table({"image": images, "label": [i % 10 for i in range(40)]}),
                   tmp_path / "data/mnist/train.parquet")  # fmt: skip
    start = time.perf_counter()
    grid = _tuner(
        trainables.train, {**CONFIG, "data_dir": str(tmp_path / "data")}, tmp_path / "ray"
    ).fit()
    elapsed = time.perf_counter() - start

    (result,) = grid
    trial_dir = Path(result.path)
    assert result.error is None and not (trial_dir / "error.txt").exists()
    rows = _rows(trial_dir)
    assert len(rows) == 1  # one attempt, one result: its last
    last = rows[0]
    assert last["status"] == "failed" and result.metrics["status"] == "failed"
    assert last["error"].startswith("DataUnavailable: ")
    assert "column 'image': row 0 has 100 values" in last["error"]
    assert "list<uint8> of 784 values" in last["error"]
    assert "\n" not in last["error"] and len(last["error"]) <= ray_trainable.ERROR_CHARS
    assert result.checkpoint is None
    assert elapsed < 60, elapsed  # about 6 s here; three attempts would add a restart each


def _flaky_trainable(attempts_file: str) -> Any:
    """A trainable that registers task ``digits-flaky`` in its worker, then runs
    ``trainables.train``. The task's loader appends a line to ``attempts_file`` and, on
    the first attempt only, raises the error the config's ``first_error`` names."""

    def flaky(config: dict[str, Any]) -> None:
        import dataclasses

        import trainables
        from trainables import tasks
        from tune_alr.monitor import MemoryCapExceeded

        errors = {
            "RuntimeError": RuntimeError("a transient fault"),
            "ValueError": ValueError("a bad setting"),
            "MemoryCapExceeded": MemoryCapExceeded("past its memory cap"),
        }
        config = dict(config)
        kind = config.pop("first_error")
        digits = tasks.get("digits")

        def load(request: Any) -> Any:
            with open(attempts_file, "a+") as f:
                f.seek(0)
                attempt = len(f.read().splitlines()) + 1
                f.write(f"{kind}\n")
            if attempt == 1:
                raise errors[kind]
            return digits.load(request)

        tasks.register(dataclasses.replace(digits, name="digits-flaky", load=load))
        trainables.train(config)

    return flaky


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "attempts", "status"),
    [
        ("ValueError", 1, "failed"),
        ("MemoryCapExceeded", 1, "failed"),
        ("RuntimeError", 2, "finished"),  # retried: the second attempt runs through
    ],
)
def test_only_deterministic_errors_skip_the_retries(
    kind: str, attempts: int, status: str, ray_session: None, tmp_path: Path
) -> None:
    attempts_file = tmp_path / "attempts.txt"
    config = {**CONFIG, "task": "digits-flaky", "first_error": kind}
    (result,) = _tuner(_flaky_trainable(str(attempts_file)), config, tmp_path / "ray").fit()
    assert attempts_file.read_text().splitlines() == [kind] * attempts
    assert result.metrics["status"] == status
    if status == "failed":
        assert result.metrics["error"].startswith(f"{kind}: ")
        assert not (Path(result.path) / "error.txt").exists()


def test_error_line_is_one_short_line() -> None:
    err = MemoryCapExceeded("resident memory\n  700 MiB\tpast the cap " + "x" * 900)
    line = ray_trainable.error_line(err)
    assert line.startswith("MemoryCapExceeded: resident memory 700 MiB past the cap x")
    assert len(line) == ray_trainable.ERROR_CHARS and line.endswith("...")
    assert ray_trainable.error_line(ValueError("short")) == "ValueError: short"
