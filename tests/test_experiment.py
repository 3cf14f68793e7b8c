"""A real Ray Tune run into a real sqlite MLflow store, and the CLI around it."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

import tune_alr
from tune_alr import cli
from tune_alr.experiment import Experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(ray_session: None, tmp_path_factory: pytest.TempPathFactory):
    """4 tiny trials: 2 policies x 2 seeds, 30 steps each, reports every 10 steps, edge caps."""
    root = tmp_path_factory.mktemp("exp")
    exp = Experiment(
        name="tiny",
        tasks=["digits"],
        policies=["constant", "feedback"],
        seeds=2,
        max_steps=30,
        report_every=10,
        policy_params={"feedback": {"interval": 5, "early_interval": None}},
        profile="edge",
        output=root / "out",
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        verbose=0,
    )
    return exp, tune_alr.run(exp)


def test_summary_has_one_row_per_task_and_policy(finished) -> None:
    _, results = finished
    summary = results.summary()
    assert sorted(summary["policy"]) == ["constant", "feedback"]
    assert (summary["seeds"] == 2).all() and (summary["finished"] == 2).all()
    assert (summary["steps_mean"] == 30).all()
    assert summary["val_acc_mean"].between(0.0, 1.0).all()
    for name in ("summary.csv", "summary.md", "trials.csv", "lr_digits.png", "val_digits.png"):
        assert (results.output_dir / name).is_file(), name
    # What the trials used: a Ray worker with torch holds hundreds of MiB, under edge's cap.
    assert summary["cpu_s_mean"].between(0.01, 60).all()
    assert summary["peak_rss_mb_mean"].between(100, 1024).all()
    assert summary["policy_ms_per_step_mean"].between(0, 50).all()
    on_disk = pd.read_csv(results.output_dir / "summary.csv")
    assert {"cpu_s_mean", "peak_rss_mb_mean", "policy_ms_per_step_mean"} <= set(on_disk.columns)


def test_trials_ran_under_the_edge_caps(finished) -> None:
    _, results = finished
    for record in results.records:
        first = record.results[0]
        assert first["profile"] == "edge"
        assert first["caps/threads"] == 1 and first["caps/memory_mb"] == 1024
        assert first["caps/cores"] in (0, 1)  # 0 only when another job holds the cores
        assert first["node_id"] and first["node_ip"]
        for result in record.results:
            assert result["proc/rss_mb"] <= result["proc/peak_rss_mb"] < 1024
            assert result["proc/cpu_s"] > 0


def test_mlflow_has_a_parent_and_four_finished_children(finished) -> None:
    from mlflow.tracking import MlflowClient

    exp, results = finished
    client = MlflowClient(exp.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    # the training view, not MLflow 3's GenAI overview
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.get_run(results.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.csv"}
    # the parent: the experiment's settings as params, summary.md as its description,
    # the standard source and user tags
    assert parent.data.params["policies"] == "['constant', 'feedback']"
    assert parent.data.params["max_steps"] == "30" and parent.data.params["seeds"] == "2"
    assert parent.data.tags["mlflow.note.content"].startswith("# tiny")
    assert parent.data.tags["mlflow.user"] and parent.data.tags["mlflow.source.name"]
    assert parent.data.tags["tune_alr.version"] == tune_alr.__version__
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [
        "digits/constant/seed0", "digits/constant/seed1",
        "digits/feedback/seed0", "digits/feedback/seed1",
    ]  # fmt: skip
    for run in children:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "lr")
        assert sorted(m.step for m in history) == list(range(1, 31))  # one per optimizer step
        metrics = set(run.data.metrics)
        assert {"val_acc", "val_loss", "lr", "train_loss", "policy/factor"} <= metrics
        assert "proc/peak_rss_mb" in metrics and "time/wall_s" in metrics
        # no Ray bookkeeping, no constants among the metrics; no 'None' params
        assert not metrics & {"pid", "timestamp", "iterations_since_restore", "total_steps",
                              "training_iteration", "time_total_s", "step"}  # fmt: skip
        assert not any(m.startswith("caps/") for m in metrics)
        unprefixed = {m for m in metrics if "/" not in m}
        assert unprefixed <= {"val_acc", "val_loss", "lr", "train_loss", "best_val_acc",
                              "test_acc", "test_loss", "epochs_to_stable"}, unprefixed  # fmt: skip
        assert "None" not in run.data.params.values()
        assert run.data.params["total_steps"] == "30"
        assert run.data.tags["tune_alr.caps.threads"] == "1"
        assert run.data.tags["mlflow.user"] and run.data.tags["tune_alr.profile"] == "edge"
        assert run.data.params["profile.memory_mb"] == "1024"
        assert run.data.metrics["epochs_to_stable"] > 0
        assert run.data.params["lr"] == "0.001" and run.data.params["optimizer"] == "adam"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"lr_curve.png", "val_curve.png"}
    feedback = next(r for r in children if r.info.run_name == "digits/feedback/seed0")
    assert feedback.data.params["policy_params.interval"] == "5"


def test_ray_tunes_json_and_csv_loggers_write_and_its_tensorboard_logger_does_not(
    finished,
) -> None:
    """MLflow is the tracker: no TensorBoard event files (their logger cost the driver
    12% of its CPU), while ``params.json``/``result.json``/``progress.csv`` stay."""
    _, results = finished
    folders = [p.parent for p in results.experiment_dir.glob("*/params.json")]
    assert len(folders) == 4
    for folder in folders:
        assert (folder / "result.json").stat().st_size > 0
        assert (folder / "progress.csv").stat().st_size > 0
        assert not list(folder.glob("events.out.tfevents*"))
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ  # set only during fit


def test_report_rebuilds_the_summary_from_the_folder(
    finished, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, results = finished
    code = cli.main(["report", str(results.experiment_dir), "--output", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "summary.csv").read_text() == (
        results.output_dir / "summary.csv"
    ).read_text()
    assert "feedback" in capsys.readouterr().out
    # by default into results/<name>, never into Ray's folder
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in results.experiment_dir.iterdir())
    assert cli.main(["report", str(results.experiment_dir)]) == 0
    assert (tmp_path / "results" / "tiny" / "summary.csv").is_file()
    assert sorted(p.name for p in results.experiment_dir.iterdir()) == before


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["run", "--tasks", "imagenet"], "unknown task 'imagenet'"),
        (["run", "--policies", "constant,magic"], "unknown policy 'magic'"),
        (["run", "--optimizer", "adagrad"], "unknown optimizer 'adagrad'"),
        (["run", "--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
        (["run", "--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
        (["run", "--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["run", "--seeds", "0"], "seeds must be a count from 1 to 10000"),
        (["run", "--seeds", "1000000"], "seeds must be a count from 1 to 10000"),
        (["run", "--seeds", "0,3,0"], "seeds must differ: [0] given more than once"),
        (["run", "--tracking-uri", "mlflow.db"], "malformed tracking URI 'mlflow.db'"),
        (["run", "--policy-param", "feedback.factor=3"], "factor must be in the open interval"),
        (["run", "--policy-param", "factor=3"], "must look like policy.name=value"),
        (["run", "--set", "colour=red"], "unknown trial setting 'colour'; accepted:"),
        (["run", "--set", "task_params={}"], "give it as task_params={task: {...}} (--task-param"),
        (["run", "--lr", "0.1", "--set", "lr=0.2"], "lr is given twice with different values"),
        (["run", "--preset", "plan2", "--lr", "0.1"], "would be ignored: every trial takes lr"),
        (["run", "--task-param", "digits.layers=2"], "task 'digits' has no option 'layers'"),
        (["run", "--policy-param", "feedback.guard=maybe"], "guard must be a boolean"),
        (["run", "--output", "a_file/out"], "is inside a file"),
        (["report", "/nonexistent/folder"], "does not exist"),
        (["bench", "--tasks", "cifar10"], "unknown workload 'cifar10'; accepted: digits"),
        (["bench", "--anchors", "lion"], "unknown anchor 'lion'; accepted: sf-adamw"),
        (["bench", "--grid", "0.1,-1"], "grid LRs must be numbers > 0, got -1.0"),
        (["bench", "--pbt", "1"], "pbt must be 0 (off) or an integer >= 2, got 1"),
        (["run", "--profile", "phone"], "unknown profile 'phone'; available: edge"),
        (["run", "--profile", "edge,ram=2"], "bad profile setting 'ram=2'"),
        (["run", "--profile", "edge", "--cpus-per-trial", "2"], "either profile= or"),
        (["run", "--cpus-per-trial", "-1"], "cpus_per_trial must be a finite number >= 0"),
        (["run", "--cpus-per-trial", "nan"], "cpus_per_trial must be a finite number >= 0"),
        (["run", "--profile", "cpus=nan"], "profile cpus must be a finite number >= 0, got nan"),
        (["run", "--profile", "edge,memory_mb=nan"], "profile memory_mb must be a number of"),
        (
            ["run", "--policies", "meta", "--policy-param", "meta.hidden=1000000000000"],
            "hidden must be at most 4096",
        ),
        (["run", "--name", "two\nlines"], "no control characters"),
        (["run", "--tracking-uri", "sqlite:///a_folder/"], "names no database file"),
        (
            ["run", "--tracking-uri", "sqlite:///corrupt.db"],
            "the tracking store sqlite:///corrupt.db cannot be used: ",
        ),
        (
            ["run", "--tracking-uri", "http://alice:s3cret@127.0.0.1:9"],
            "the tracking store http://127.0.0.1:9 is unreachable",
        ),
        (["run", "--node-type", "GPU"], "must name a custom Ray resource"),
        (["run", "--seeds", "-2"], "seeds must be a count from 1 to 10000"),
        (["run", "--storage", "ftp://x/y"], "has scheme 'ftp'; accepted: s3"),
        (["run", "--tasks", "mnist", "--data-dir", "nope"], "data dir 'nope' does not exist"),
        (["run", "--tasks", "mnist"], "dataset 'ylecun/mnist' for task 'mnist' is not available"),
        (["run", "--tasks", "mnist", "--data-dir", "nocols"], "lacks the column(s) ['image']"),
        (["run", "--tasks", "mnist", "--data-dir", "badlabels"], "labels out of range"),
        (["check-cluster", "bad.yaml"], "'ssh_usr' was unexpected) (at auth)"),
        (["check-cluster", "missing.yaml"], "cluster file 'missing.yaml' does not exist"),
        (["resume", "a_file"], "is not a tune-alr experiment folder"),
        (["ui", "--tracking-uri", "nonsense"], "malformed tracking URI"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNE_ALR_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "corrupt.db").write_bytes(b"this is not an sqlite database " * 64)
    for name, table in (
        ("nocols", pa.table({"pixels": [[0] * 784], "label": [1]})),
        (
            "badlabels",
            pa.table(
                {"image": pa.array([[0] * 784] * 3, pa.list_(pa.uint8())), "label": [0, 12, 1]}
            ),
        ),
    ):
        (tmp_path / name / "mnist").mkdir(parents=True)
        pq.write_table(table, tmp_path / name / "mnist" / "train.parquet")
    aws = (Path(__file__).parents[1] / "cluster" / "aws.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(aws.replace("ssh_user", "ssh_usr"))
    before = sorted(os.listdir(tmp_path))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tune-alr: error: ") and fragment in err and "\n" not in err
    assert "s3cret" not in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, Ray never started
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_cli_list(capsys) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "feedback" in out
    assert "anchors:  sf-adamw, sf-sgd, prodigy, dadapt-adam, dog" in out
    assert "bench workloads: digits, mnist-anchor, agnews-anchor" in out


def test_a_second_run_under_the_same_name_reports_only_its_own_trials(
    ray_session: None, tmp_path: Path
) -> None:
    """Ray Tune keeps both runs' trials in one folder; each run's tables hold its own."""
    exp = Experiment(name="twice", policies=["constant"], seeds=1, max_steps=10,
                     output=tmp_path / "out", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                     verbose=0)  # fmt: skip
    first = tune_alr.run(exp)
    second = tune_alr.run(exp)
    assert len(list(second.experiment_dir.glob("*/params.json"))) == 2  # both are on disk
    assert len(first.records) == len(second.records) == 1
    assert first.records[0].trial_id != second.records[0].trial_id
    assert second.summary()["seeds"].tolist() == [1]


def test_a_storage_uri_is_handed_to_ray_and_copied_back(ray_session: None, tmp_path: Path) -> None:
    """``file://`` takes the same path as ``s3://`` or ``gs://``: through pyarrow."""
    store = tmp_path / "bucket"
    exp = Experiment(
        name="uri",
        policies=["constant"],
        seeds=1,
        max_steps=10,
        report_every=5,
        storage=f"file://{store}",
        output=tmp_path / "out",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        verbose=0,
    )
    results = tune_alr.run(exp)
    assert list(store.glob("uri/*/result.json"))  # Ray wrote to the URI's folder
    assert results.experiment_dir == tmp_path / "out" / "ray" / "uri"  # the local copy
    assert results.summary()["finished"].tolist() == [1]


def test_an_unknown_storage_scheme_is_refused_before_ray() -> None:
    with pytest.raises(ValueError, match="storage URI 'ftp://x/y' has scheme 'ftp'; accepted: s3"):
        Experiment(storage="ftp://x/y").validate()
