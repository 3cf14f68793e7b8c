"""One's own task, registered by a module that the driver and Ray's workers import."""

from __future__ import annotations

from pathlib import Path

import pytest

import tune_alr
from tune_alr.experiment import Experiment


@pytest.mark.slow
def test_a_task_of_ones_own_runs_in_rays_workers(ray_session: None, tmp_path: Path) -> None:
    exp = Experiment(
        name="own", tasks=["blobs"], policies=["constant", "feedback"], seeds=1,
        task_params={"blobs": {"hidden": 8}}, trial={"imports": ["_custom_task"]},
        output=tmp_path / "out", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", verbose=0,
    )  # fmt: skip
    results = tune_alr.run(exp)
    summary = results.summary()
    assert (summary["finished"] == 1).all(), results.trials()[["policy", "status", "error"]]
    assert (summary["val_acc_mean"] > 0.8).all()  # the blobs are well apart
    assert all(r.config["task_params"] == {"hidden": 8} for r in results.records)


def test_an_import_that_fails_is_named_before_ray() -> None:
    exp = Experiment(name="x", tasks=["blobs"], trial={"imports": ["no_such_module_here"]})
    with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
        exp.validate()
