"""Meta-training the meta controller (``tune-alr meta-train``) and loading controllers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_alr.policies import build
from tune_alr.policies.meta import (
    FEATURE_NAMES,
    PLAN2_FEATURES,
    controller_size,
    controller_spec,
    load_controller,
    meta_trained_controller,
    scratch_weights,
)


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=lr)


def _parse(argv: list[str]) -> argparse.Namespace:
    """``tune-alr meta-train ARGV`` as the ``tune-alr`` command parses it."""
    from tune_alr.cli import parser

    return parser().parse_args(["meta-train", *argv])


# -- the command, end to end -------------------------------------------------------------


@pytest.mark.slow
def test_meta_train_end_to_end(ray_session: None, tmp_path: Path) -> None:
    """2 generations of 4 candidates on tiny pools, into a real sqlite MLflow store; the
    controller file it writes is one ``build("meta", ..., controller=path)`` loads."""
    from mlflow.tracking import MlflowClient

    from tune_alr.metatrain import meta_train_command

    db = tmp_path / "mlflow.db"
    out = tmp_path / "out"
    args = _parse(
        [
            "--generations",
            "2",
            "--population",
            "4",
            "--problems",
            "2",
            "--train-problems",
            "3",
            "--val-problems",
            "1",
            "--validate-every",
            "1",
            "--start",
            "constant",
            "--learn-initial",
            "--start-decades=-2,1",
            "--validation-starts=-1,0",
            "--output",
            str(out),
            "--tracking-uri",
            f"sqlite:///{db}",
            "--quiet",
        ]
    )
    assert meta_train_command(args) == 0

    path = out / "controller.json"
    data = json.loads(path.read_text())
    assert data["features"] == list(FEATURE_NAMES) and data["hidden"] == 8
    provenance = data["provenance"]
    for key in ("command", "commit", "date", "wall_s", "distribution", "settings"):
        assert key in provenance, key
    assert provenance["settings"]["generations"] == 2
    assert provenance["settings"]["population"] == 4
    # Every setting given reaches the job and its record.
    assert provenance["settings"]["start"] == "constant"
    assert provenance["settings"]["start_decades"] == [-2.0, 1.0]
    assert provenance["settings"]["validation_starts"] == [-1.0, 0.0]
    assert provenance["settings"]["learn_initial"] is True
    assert provenance["settings"]["weights"] == controller_size(len(FEATURE_NAMES), 8) + 1
    assert data["version"] == 2 and -3.0 <= data["initial_decades"] <= 1.0
    policy = build("meta", _optimizer(), controller=str(path))
    assert policy.factor == pytest.approx(10 ** data["initial_decades"])  # the learned start
    assert policy.controller_features == tuple(FEATURE_NAMES)
    assert policy.weights.size == controller_size(len(FEATURE_NAMES), 8)
    assert (out / "history.csv").read_text().count("\n") == 3  # header + 2 generations
    assert json.loads((out / "references.json").read_text())["references"]

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("meta-train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["population"] == "4" and run.data.params["generations"] == "2"
    objective = client.get_metric_history(run.info.run_id, "objective")
    assert [m.step for m in objective] == [1, 2]
    assert all(math.isfinite(m.value) for m in objective)
    assert client.get_metric_history(run.info.run_id, "objective/validation")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"controller.json", "history.csv"} <= artifacts


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--population", "3"], "population must be an even integer >= 2"),
        (["--generations", "0"], "generations must be an integer >= 1, got 0"),
        (["--problems", "50"], "problems must be at most train_problems (40), got 50"),
        (["--sigma", "-1"], "sigma must be a finite number > 0, got -1.0"),
        (["--features", "cos,bogus"], "features must be distinct names among"),
        (["--hidden", "0"], "hidden must be an integer from 1 to 4096, got 0"),
        (["--max-minutes", "0"], "max_minutes must be a number of minutes > 0"),
        (["--tracking-uri", "nope://x"], "malformed tracking URI 'nope://x'"),
        (["--start-decades=1,-1"], "start_decades must be two numbers (low, high) with low"),
        (["--start-decades=-2"], "start_decades must be two numbers (low, high)"),
        (["--start-decades=a,b"], "--start-decades must be comma-separated numbers"),
        (["--validation-starts="], "validation_starts must be a non-empty list of numbers"),
    ],
)
def test_meta_train_refuses_bad_settings_before_ray(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tune_alr import cli

    assert cli.main(["meta-train", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_an_unknown_es_start_is_refused_by_argparse_and_by_python() -> None:
    from tune_alr.metatrain import meta_train

    with pytest.raises(SystemExit):
        _parse(["--start", "zeros"])
    with pytest.raises(ValueError, match=r"start must be one of \['prior', 'constant'\]"):
        meta_train(start="zeros")


def test_the_es_starts_as_a_constant_lr_or_as_the_hypergradient_prior() -> None:
    """``start="constant"`` is a zero output layer (the controller moves no LR);
    ``"prior"`` lowers the LR while consecutive updates oppose (cos_ema > 0)."""
    from tune_alr.metatrain import initial_weights
    from tune_alr.policies.meta import controller_output, unpack

    n, hidden = len(FEATURE_NAMES), 8
    constant = initial_weights(FEATURE_NAMES, hidden, 0, "constant")
    assert not unpack(constant, n, hidden)["w2"].any()
    opposing = np.zeros(n)
    opposing[FEATURE_NAMES.index("cos_ema")] = 0.5
    assert controller_output(constant, opposing, hidden)[0] == 0.0
    prior = initial_weights(FEATURE_NAMES, hidden, 0, "prior")
    assert controller_output(prior, opposing, hidden)[0] < 0.0
    assert controller_output(prior, -opposing, hidden)[0] > 0.0
    # The hidden layers are the same draw: only the output wiring differs.
    w1_c, w1_p = unpack(constant, n, hidden)["w1"], unpack(prior, n, hidden)["w1"]
    assert np.array_equal(w1_c[1:], w1_p[1:])


def test_meta_train_is_a_lazy_export() -> None:
    import tune_alr
    from tune_alr.metatrain import meta_train

    assert tune_alr.meta_train is meta_train and "meta_train" in tune_alr.__all__


# -- the pieces of the outer loop ---------------------------------------------------------


def test_centred_ranks_reward_the_lowest_objective() -> None:
    from tune_alr.metatrain import centred_ranks

    utility = centred_ranks(np.array([0.3, -1.0, 5.0, 0.0]))
    assert utility.tolist() == pytest.approx([-1 / 6, 0.5, -0.5, 1 / 6])


def test_the_objective_is_relative_to_the_best_constant_lr() -> None:
    """On one tiny problem, in this process: the reference is the grid's best score, a
    controller's objective is its score minus that (0 = as good as the best LR)."""
    from tune_alr.meta_problems import LR_GRIDS, ProblemSpec
    from tune_alr.metatrain import Task, evaluate, local_runner, references, score

    problem = ProblemSpec("mixture", "linear", 1, 16, "tanh", "sgd", 32, 40, 8, 2, seed=7)
    refs = references([problem], local_runner, final_weight=0.25)
    ref = refs[problem.name]
    assert ref.lr in LR_GRIDS["sgd"] and math.isfinite(ref.score)
    constant = local_runner([(problem.to_dict(), ref.lr, "constant", None, True)])[0]
    assert score(constant["losses"], 0.25) == pytest.approx(ref.score)
    (row,) = evaluate(
        [load_controller("scratch").to_json()],
        [Task(problem, 0.0)],
        refs,
        local_runner,
        final_weight=0.25,
    )
    assert row[0].finite and math.isfinite(row[0].objective)
    assert row[0].objective >= -0.5  # cannot beat the best LR by much in 40 steps


def test_the_training_distribution_avoids_the_evaluation_tasks() -> None:
    from tune_alr.meta_problems import FAMILIES, OPTIMIZERS, make_data, sample_problems

    pool = sample_problems(40, seed=0)
    assert {p.family for p in pool} == set(FAMILIES)
    assert {p.optimizer for p in pool} == set(OPTIMIZERS)
    assert {p.model for p in pool} == {"linear", "mlp", "cnn", "lstm"}
    assert len({(p.model, p.depth, p.width) for p in pool}) >= 10  # depths and widths
    assert sample_problems(40, seed=0) == pool  # reproducible
    data = make_data(pool[3])  # images: generated 8x8, not the digits
    assert data.x.shape[1:] == (1, 8, 8) and len(data.x) == 2048


# -- loading controllers --------------------------------------------------------------------


def test_the_shipped_controller_is_meta_trained_and_loads() -> None:
    spec = meta_trained_controller()
    # read by name: the shipped controller reads no alignment feature (README says why)
    assert spec.features == (
        "log_lr_decades", "loss_trend", "grad_norm_ratio", "loss_level", "curvature", "progress"
    )  # fmt: skip
    assert -1.0 < spec.initial_decades < 0.0  # a learned warm-up: it starts below the LR given
    scratch = load_controller("scratch")
    assert spec.weights.shape != scratch.weights.shape or not np.array_equal(
        spec.weights, scratch.weights
    )
    assert np.any(spec.weights[-spec.hidden - 1 :] != 0)  # its output layer is not blank
    provenance = spec.provenance
    for key in ("command", "commit", "date", "wall_s", "distribution", "settings", "selected"):
        assert key in provenance, key
    policy = build("meta", _optimizer(), controller="meta-trained")
    assert policy.controller_source == "'meta-trained'"
    np.testing.assert_array_equal(policy.weights, spec.weights)
    assert build("meta", _optimizer()).controller_source == "'meta-trained'"  # the default


def test_the_shipped_controller_is_package_data() -> None:
    """The file is where the wheel's package data puts it (pyproject.toml says so)."""
    import tomllib

    root = Path(__file__).parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["tune_alr.policies"]
    assert "controllers/*.json" in patterns
    assert (root / "tune_alr/policies/controllers/meta-trained.json").is_file()


def test_a_file_loads_by_path_and_as_a_dict(tmp_path: Path) -> None:
    weights = np.linspace(-0.5, 0.5, controller_size(3, 4))
    spec = controller_spec(("cos", "cos_ema", "progress"), weights, hidden=4)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(spec.to_json({"note": "test"})))
    for given in (path, str(path), json.loads(path.read_text())):
        policy = build("meta", _optimizer(), controller=given)
        np.testing.assert_array_equal(policy.weights, weights)  # floats round-trip exactly
        assert policy.controller_features == ("cos", "cos_ema", "progress")
        assert policy.controller_index == [4, 3, 7]


def test_a_learned_start_sets_the_first_lr_and_version_1_files_start_where_given(
    tmp_path: Path,
) -> None:
    weights = np.zeros(controller_size(3, 2))
    spec = controller_spec(("cos", "cos_ema", "progress"), weights, hidden=2, initial_decades=-1)
    data = spec.to_json()
    assert data["version"] == 2 and data["initial_decades"] == -1.0
    optimizer = _optimizer(lr=0.3)
    policy = build("meta", optimizer, controller=data)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.03)  # 10**-1 x the LR given
    # and it round-trips through a resume
    again = build("meta", _optimizer(lr=0.3), controller=data)
    again.load_state_dict(policy.state_dict())
    assert again.factor == pytest.approx(0.1)
    # a version 1 file (as shipped before) has no learned start
    old = {k: v for k, v in data.items() if k != "initial_decades"} | {"version": 1}
    optimizer = _optimizer(lr=0.3)
    build("meta", optimizer, controller=old)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"initial_decades": "low"}, "'initial_decades' must be a number from -6 to 6"),
        ({"initial_decades": 9.0}, "got 9.0"),
        ({"initial_decades": True}, "got True"),
        ({"version": 1}, "'initial_decades' came with version 2"),
        ({"version": 3}, "version 3; expected 'tune-alr meta controller', version 1 or 2"),
    ],
)
def test_bad_learned_starts_are_refused_by_name(changes: dict, fragment: str) -> None:
    n = len(FEATURE_NAMES)
    data = controller_spec(FEATURE_NAMES, np.zeros(controller_size(n, 2)), hidden=2).to_json()
    data.update(changes)
    with pytest.raises(ValueError) as err:
        build("meta", _optimizer(), controller=data)
    assert fragment in str(err.value)
    del data["initial_decades"]
    data["version"] = 2
    with pytest.raises(ValueError, match="a version 2 file needs 'initial_decades'"):
        build("meta", _optimizer(), controller=data)


def _write(tmp_path: Path, **changes: object) -> str:
    """A valid controller file of eight features and 2 hidden units, with ``changes``."""
    data = controller_spec(FEATURE_NAMES[:8], np.zeros(controller_size(8, 2)), hidden=2).to_json()
    data.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda tmp: "nope", "controller must be 'meta-trained' (the shipped meta-trained"),
        (lambda tmp: "nope", "got 'nope' (no such file)"),
        (lambda tmp: "", "or such a file's contents as a dict; got ''"),
        (lambda tmp: 3, "got 3"),
        (lambda tmp: str(tmp / "missing.json"), "missing.json' (no such file)"),
        (
            lambda tmp: _write(tmp, features=[*FEATURE_NAMES[:7], "gradient_noise"]),
            "unknown feature(s) ['gradient_noise']",
        ),
        (lambda tmp: _write(tmp, hidden=3), "weights w1 have shape (2, 8), expected (3, 8)"),
        (lambda tmp: _write(tmp, format="something else"), "is not a tune-alr meta controller"),
        (lambda tmp: _write(tmp, weights={"w1": [[1.0]]}), "must hold exactly w1, b1, w2, b2"),
    ],
)
def test_bad_controllers_are_refused_by_name(make, fragment: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        build("meta", _optimizer(), controller=make(tmp_path))
    assert fragment in str(err.value)


def test_broken_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json' cannot be read"):
        build("meta", _optimizer(), controller=str(path))


@pytest.mark.parametrize("params", [{"hidden": 4}, {"seed": 3}])
def test_scratch_only_settings_with_a_loaded_controller_are_refused(params: dict) -> None:
    with pytest.raises(ValueError, match=f"{next(iter(params))}=.* controller='scratch'"):
        build("meta", _optimizer(), controller="meta-trained", **params)
    build("meta", _optimizer(), controller="scratch", **params)  # where they apply


def test_scratch_is_plan2s_blank_start() -> None:
    policy = build("meta", _optimizer(), controller="scratch")
    assert policy.controller_features == PLAN2_FEATURES and policy.hidden == 12
    np.testing.assert_array_equal(policy.weights, scratch_weights(12, 0))
    assert not np.any(policy.weights[-13:])  # output layer zero: a constant LR to start


# The LR sequence of meta as released before meta-training (commit b8622e2, before
# ``controller`` existed), on SGD at 0.3 on an ill-conditioned quadratic, meta_lr 1e-2,
# a constant loss of 1.0: recorded from that code. ``controller="scratch"`` must follow it.
PREVIOUS_RELEASE = [
    0.3,
    0.3,
    0.29658645757248525,
    0.29337633393298174,
    0.2934798537988824,
    0.2988718115433109,
    0.30906836299004165,
    0.3225616400799598,
    0.33808359307685965,
    0.35497770695894076,
    0.37298101858944527,
    0.3920119598707109,
]


def test_scratch_reproduces_the_previous_release() -> None:
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    curvature = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    optimizer = torch.optim.SGD([theta], lr=0.3)
    policy = build("meta", optimizer, controller="scratch", meta_lr=1e-2)
    trace = []
    for _ in PREVIOUS_RELEASE:
        optimizer.zero_grad()
        (0.5 * curvature * theta**2).sum().backward()
        optimizer.step()
        policy.step(1.0)
        trace.append(policy.get_last_lr()[0])
    assert trace == pytest.approx(PREVIOUS_RELEASE, rel=1e-12)


def test_an_old_state_dict_is_refused_clearly() -> None:
    """A state saved before the features changed (its controller: 5 inputs, 12 hidden)."""
    policy = build("meta", _optimizer(), controller="scratch")
    state = policy.state_dict()
    old = {
        k: v
        for k, v in state.items()
        if k
        not in (
            "controller_features",
            "controller_index",
            "weights",
            "adam_m",
            "adam_v",
            "controller_source",
        )
    }
    old["controller"] = {
        "w1": np.zeros((12, 5)),
        "b1": np.zeros(12),
        "w2": np.zeros(12),
        "b2": np.zeros(1),
    }
    with pytest.raises(ValueError) as err:
        build("meta", _optimizer()).load_state_dict(old)
    message = str(err.value)
    assert "saved by an earlier tune-alr" in message and "(5 features, 12 hidden)" in message


def test_resume_continues_the_lr_sequence_of_the_meta_trained_controller() -> None:
    """N steps, save through torch.save, load into a fresh policy, M more: bit for bit."""
    import io

    def run(steps: int, state: dict | None = None, start: int = 0):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        policy = build("meta", optimizer, controller="meta-trained", total_steps=40)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            policy.load_state_dict(state["policy"])
        g = torch.Generator().manual_seed(1)
        x, w = torch.randn(400, 4, generator=g), torch.randn(4, 1, generator=g)
        trace = []
        for k in range(start, start + steps):
            xb = x[k * 8 : k * 8 + 8]
            loss = torch.nn.functional.mse_loss(model(xb), xb @ w)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            policy.step(loss.item())
            trace.append(policy.get_last_lr()[0])
        buffer = io.BytesIO()
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "policy": policy.state_dict(),
            },
            buffer,
        )
        buffer.seek(0)
        return trace, torch.load(buffer, weights_only=False)

    whole, _ = run(40)
    first, state = run(15)
    rest, _ = run(25, state, start=15)
    assert first + rest == whole
    assert len(set(whole)) > 10
