"""Meta-training the meta policy's controller across tasks, on Ray: ``tune-alr meta-train``.

    import tune_alr
    outcome = tune_alr.meta_train(generations=60, population=16)
    build("meta", optimizer, controller=outcome.controller_path)

What is learned: the controller's starting weights (``tune_alr.policies.meta``), with the
policy exactly as a user runs it, online adaptation on, during every inner run.

* **Inner runs** (:mod:`tune_alr.meta_problems`): small generated problems (Gaussian
  mixtures, teacher networks, regression, images, sequences; linear, MLP, CNN and LSTM
  models of several depths and widths; SGD, SGD with momentum, Adam, RMSprop), each
  started at ``10**u`` times its best constant LR, ``u`` uniform in ``start_decades``
  (5 decades by default: 3.5 below to 1.5 above). Each inner run is one Ray task of one
  CPU, so the same command runs on 2 cores or on a ``ray up`` cluster (``address``).
* **Objective** of a controller on a run: ``(1 - final_weight) * mean_k log L_k +
  final_weight * log L_K`` over the validation losses ``L_k`` at 8 evenly spaced
  checkpoints (the whole run, not one step: warming up, climbing from a start too low,
  backing off from one too high and decaying all count), minus the same score of the
  problem's best constant LR (its *reference*, found on a half-decade grid once per
  problem and cached): 0 is as good as the best constant LR, and every problem weighs
  alike. A diverged checkpoint counts as the untrained loss times e. The objective of a
  generation is the mean over its sampled runs (the same runs for every candidate).
* **Outer optimiser**: evolution strategies (Salimans et al., 2017) on the controller's
  weights (89 numbers with all nine features, the default): ``population / 2``
  antithetic pairs ``w +- sigma * eps``, rank-based fitness shaping (centred ranks), Adam
  on the mean. Chosen for a controller this small and an objective this noisy: it
  needs no gradient through hundreds of training steps, ranks make one diverged run no
  louder than a bad one, antithetic pairs on common runs cancel most of the noise
  between candidates, and a generation is one batch of independent Ray tasks. (CMA-ES
  through optuna's ``CmaEsSampler`` needs the ``cmaes`` package, which the pinned stack
  does not carry.)
* **Selection**: every ``validate_every`` generations the mean weights are scored on
  fixed runs of held-out problems (other seeds, same distribution); the best of those is
  the result (``controller.json``), written as soon as it is found.

MLflow (:mod:`tune_alr.tracking`): one run in the experiment ``name`` holding the
settings as params, per generation the metrics ``objective`` (the mean weights on the
generation's runs), ``objective/population``, ``objective/best_candidate``,
``objective/validation`` and ``time/generation_s``, and the controller file and the
history as artifacts.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import credentials, tracking

if TYPE_CHECKING:  # the heavy imports (torch, numpy) wait until a job runs
    import numpy as np

    from .meta_problems import ProblemSpec
    from .policies.meta import ControllerSpec

#: The validation runs' starts, in decades from each held-out problem's best constant LR.
VALIDATION_STARTS = (-3.0, -1.0, 1.0)
CHECKPOINTS = 8


# -- one inner run, as a Ray task -------------------------------------------------------


def run_task(
    problem: Mapping[str, Any],
    lr: float,
    policy: str,
    params: Mapping[str, Any] | None,
    total_known: bool,
) -> dict[str, Any]:
    """One inner run (``meta_problems.rollout``) on one thread: its checkpoint losses."""
    import torch

    from .meta_problems import ProblemSpec, rollout

    torch.set_num_threads(1)
    out = rollout(
        ProblemSpec.from_dict(problem),
        lr,
        policy=policy,
        total_known=total_known,
        checkpoints=CHECKPOINTS,
        params=params,
    )
    return {"losses": list(out.losses), "final_lr": out.final_lr, "finite": out.finite}


Job = tuple[Mapping[str, Any], float, str, Mapping[str, Any] | None, bool]
Runner = Callable[[list[Job]], list[dict[str, Any]]]


def ray_runner() -> Runner:
    """Run jobs as Ray tasks of one CPU each (Ray must be initialised)."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=0)(run_task)

    def run(jobs: list[Job]) -> list[dict[str, Any]]:
        return list(ray.get([remote.remote(*job) for job in jobs]))

    return run


def local_runner(jobs: list[Job]) -> list[dict[str, Any]]:
    """Run jobs one after another in this process."""
    return [run_task(*job) for job in jobs]


# -- references and the objective -------------------------------------------------------


def score(losses: Sequence[float], final_weight: float) -> float:
    """``(1 - w) * mean_k log L_k + w * log L_K`` of one run's checkpoint losses."""
    import numpy as np

    from .meta_problems import log_losses

    logs = log_losses(losses)
    return (1.0 - final_weight) * float(np.mean(logs)) + final_weight * logs[-1]


@dataclass(frozen=True)
class Reference:
    """A problem's best constant LR on its grid: by score, and the lowest final loss."""

    lr: float
    score: float
    final_loss: float

    def to_dict(self) -> dict[str, float]:
        return {"lr": self.lr, "score": self.score, "final_loss": self.final_loss}


def references(
    problems: Sequence[ProblemSpec],
    runner: Runner,
    final_weight: float,
    cache: Path | None = None,
) -> dict[str, Reference]:
    """Each problem's :class:`Reference` (grid runs of the ``constant`` policy), read from
    ``cache`` where it holds them for the same ``final_weight`` and written back."""
    from .meta_problems import DISTRIBUTION_VERSION, LR_GRIDS

    known: dict[str, Reference] = {}
    key = {
        "final_weight": final_weight,
        "distribution": DISTRIBUTION_VERSION,
        "checkpoints": CHECKPOINTS,
    }
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            known = {k: Reference(**v) for k, v in saved.get("references", {}).items()}
    todo = [p for p in problems if p.name not in known]
    jobs: list[Job] = [
        (p.to_dict(), lr, "constant", None, True) for p in todo for lr in LR_GRIDS[p.optimizer]
    ]
    results = iter(runner(jobs))
    for p in todo:
        runs = {lr: next(results) for lr in LR_GRIDS[p.optimizer]}
        scores = {lr: score(r["losses"], final_weight) for lr, r in runs.items()}
        best = min(scores, key=scores.__getitem__)
        finals = [r["losses"][-1] for r in runs.values() if math.isfinite(r["losses"][-1])]
        known[p.name] = Reference(best, scores[best], min(finals) if finals else math.inf)
    if cache is not None and todo:
        cache.parent.mkdir(parents=True, exist_ok=True)
        payload = {**key, "references": {k: v.to_dict() for k, v in sorted(known.items())}}
        cache.write_text(json.dumps(payload, indent=1))
    return {p.name: known[p.name] for p in problems}


@dataclass(frozen=True)
class Task:
    """One inner run: a problem, its start (decades from its best constant LR), and
    whether the policy is told the run's length."""

    problem: ProblemSpec
    decades: float
    total_known: bool = True

    def lr(self, reference: Reference) -> float:
        return reference.lr * 10.0**self.decades


@dataclass(frozen=True)
class TaskResult:
    objective: float  # score - the reference's score
    final_ratio: float  # final loss / the grid's lowest final loss
    finite: bool


def evaluate(
    controllers: Sequence[Mapping[str, Any]],
    tasks: Sequence[Task],
    refs: Mapping[str, Reference],
    runner: Runner,
    *,
    final_weight: float,
    params: Mapping[str, Any] | None = None,
) -> list[list[TaskResult]]:
    """Every controller (a controller file's contents) on every task, as one batch."""
    jobs: list[Job] = []
    for controller in controllers:
        for task in tasks:
            ref = refs[task.problem.name]
            settings = {**dict(params or {}), "controller": dict(controller)}
            jobs.append((task.problem.to_dict(), task.lr(ref), "meta", settings, task.total_known))
    results = iter(runner(jobs))
    table = []
    for _ in controllers:
        row = []
        for task in tasks:
            ref = refs[task.problem.name]
            r = next(results)
            final = r["losses"][-1]
            ratio = final / ref.final_loss if math.isfinite(final) else math.inf
            row.append(
                TaskResult(score(r["losses"], final_weight) - ref.score, ratio, bool(r["finite"]))
            )
        table.append(row)
    return table


def validation_tasks(
    problems: Sequence[ProblemSpec], starts: Sequence[float] = VALIDATION_STARTS
) -> list[Task]:
    """The fixed held-out runs: each problem from each start (decades from its best)."""
    return [Task(p, d, True) for p in problems for d in starts]


# -- evolution strategies -----------------------------------------------------------------


def centred_ranks(values: np.ndarray) -> np.ndarray:
    """Utilities in [-0.5, 0.5]: the lowest value (the best) gets 0.5, the highest -0.5."""
    import numpy as np

    order = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return 0.5 - order / max(1, len(values) - 1)


@dataclass
class Adam:
    """Adam ascent on a vector (the ES mean)."""

    lr: float
    m: np.ndarray
    v: np.ndarray
    t: int = 0

    def step(self, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
        import numpy as np

        self.t += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad * grad
        m_hat = self.m / (1 - 0.9**self.t)
        v_hat = self.v / (1 - 0.999**self.t)
        return x + self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


#: Where the ES mean starts (:func:`initial_weights`).
STARTS = ("prior", "constant")
#: With ``learn_initial``, the ES coordinate of the controller's learned start is this
#: many decades per unit (so that ``sigma`` perturbs it by ``2 * sigma`` decades), and the
#: start is kept within :data:`INITIAL_RANGE` decades of the LR given.
INITIAL_GAIN = 2.0
INITIAL_RANGE = (-3.0, 1.0)


def initial_weights(
    features: Sequence[str], hidden: int, seed: int, start: str = "prior"
) -> np.ndarray:
    """Where the ES starts: a blank controller, with or without a hypergradient prior.

    The hidden layer is initialised as ``torch.nn.Linear`` is. ``start="constant"``: the
    output layer is zero, so the start is a constant LR (as ``controller="scratch"``,
    over these features), and every move away from it is one the ES found to pay over
    whole runs. ``start="prior"``: the first hidden unit reads ``-2 * cos_ema`` only and
    is the one unit wired to the output (0.1), so that the start raises the LR while
    consecutive updates agree and lowers it when they oppose (about ``0.05 * tanh(-2
    cos_ema)`` per step): the sign of the greedy hypergradient, which the ES then shapes
    over whole runs (without ``cos_ema`` among the features, the output layer is zero).
    """
    import numpy as np

    if start not in STARTS:
        raise ValueError(f"start must be one of {list(STARTS)}, got {start!r}.")

    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(len(features))
    w1 = rng.uniform(-bound, bound, size=(hidden, len(features)))
    b1 = rng.uniform(-bound, bound, size=hidden)
    w2 = np.zeros(hidden)
    if start == "prior" and "cos_ema" in features:
        w1[0] = 0.0
        b1[0] = 0.0
        w1[0, list(features).index("cos_ema")] = -2.0
        w2[0] = 0.1
    return np.concatenate([w1.reshape(-1), b1, w2, np.zeros(1)])


# -- the job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaTrainResult:
    """What :func:`meta_train` produced."""

    controller_path: Path
    history_path: Path
    best_generation: int
    best_validation: float
    scratch_validation: float
    wall_s: float
    run_id: str
    history: list[dict[str, float]] = field(default_factory=list)


def _check(name: str, value: Any, ok: bool, accepted: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {accepted}, got {value!r}.")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_settings(
    *,
    generations: Any,
    population: Any,
    problems: Any,
    train_problems: Any,
    val_problems: Any,
    sigma: Any,
    step_size: Any,
    hidden: Any,
    features: Any,
    final_weight: Any,
    start_decades: Any,
    validate_every: Any,
    seed: Any,
    num_cpus: Any,
    start: Any = "prior",
    validation_starts: Any = VALIDATION_STARTS,
) -> None:
    """``ValueError`` naming the first bad setting (before Ray or MLflow start)."""
    from .policies.meta import FEATURE_NAMES, MAX_HIDDEN

    _check("generations", generations, _is_int(generations, 1), "an integer >= 1")
    _check(
        "population",
        population,
        _is_int(population, 2) and population % 2 == 0,
        "an even integer >= 2 (antithetic pairs)",
    )
    _check("problems", problems, _is_int(problems, 1), "an integer >= 1 (runs per generation)")
    _check("train_problems", train_problems, _is_int(train_problems, 1), "an integer >= 1")
    _check(
        "problems",
        problems,
        problems <= train_problems,
        f"at most train_problems ({train_problems})",
    )
    _check("val_problems", val_problems, _is_int(val_problems, 1), "an integer >= 1")
    _check("sigma", sigma, _is_number(sigma) and sigma > 0, "a finite number > 0")
    _check("step_size", step_size, _is_number(step_size) and step_size > 0, "a finite number > 0")
    _check(
        "hidden",
        hidden,
        _is_int(hidden, 1) and hidden <= MAX_HIDDEN,
        f"an integer from 1 to {MAX_HIDDEN}",
    )
    _check(
        "features",
        features,
        isinstance(features, (list, tuple))
        and bool(features)
        and all(f in FEATURE_NAMES for f in features)
        and len(set(features)) == len(features),
        f"distinct names among {list(FEATURE_NAMES)}",
    )
    _check(
        "final_weight",
        final_weight,
        _is_number(final_weight) and 0 <= final_weight <= 1,
        "a number in [0, 1]",
    )
    _check(
        "start_decades",
        start_decades,
        isinstance(start_decades, (list, tuple))
        and len(start_decades) == 2
        and all(_is_number(d) for d in start_decades)
        and start_decades[0] < start_decades[1],
        "two numbers (low, high) with low < high",
    )
    _check(
        "validation_starts",
        validation_starts,
        isinstance(validation_starts, (list, tuple))
        and bool(validation_starts)
        and all(_is_number(d) for d in validation_starts),
        "a non-empty list of numbers (decades from each held-out problem's best LR)",
    )
    _check("start", start, start in STARTS, f"one of {list(STARTS)}")
    _check("validate_every", validate_every, _is_int(validate_every, 1), "an integer >= 1")
    _check("seed", seed, _is_int(seed, 0), "an integer >= 0")
    _check(
        "num_cpus",
        num_cpus,
        num_cpus is None or (_is_number(num_cpus) and num_cpus > 0),
        "a number > 0 (or None: every core)",
    )


def meta_train(
    *,
    generations: int = 60,
    population: int = 12,
    problems: int = 5,
    train_problems: int = 40,
    val_problems: int = 10,
    sigma: float = 0.04,
    step_size: float = 0.02,
    hidden: int = 8,
    features: Sequence[str] | None = None,
    final_weight: float = 0.25,
    start_decades: Sequence[float] = (-3.5, 1.5),
    validation_starts: Sequence[float] = VALIDATION_STARTS,
    start: str = "prior",
    learn_initial: bool = False,
    no_total_share: float = 0.2,
    validate_every: int = 5,
    seed: int = 0,
    max_minutes: float | None = None,
    name: str = "meta-train",
    output: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    num_cpus: float | None = None,
    verbose: bool = True,
) -> MetaTrainResult:
    """Meta-train the meta policy's controller; returns where the best one was written.

    Args:
        generations: ES generations.
        population: candidates per generation (``population / 2`` antithetic pairs); the
            mean weights are scored on the same runs besides.
        problems: inner runs per generation (each a training problem and a start LR),
            the same for every candidate.
        train_problems, val_problems: sizes of the training pool and of the held-out
            pool (other seeds) that selects the result.
        sigma: the ES perturbation's standard deviation.
        step_size: Adam's LR on the ES mean.
        hidden, features: the controller's width and inputs (names among the meta
            policy's ``FEATURE_NAMES``; ``None``: all of them).
        final_weight: the weight of the final checkpoint in a run's score.
        start_decades: the range of the start LRs, in decades from each problem's best.
        validation_starts: the held-out runs' starts, in decades from each held-out
            problem's best constant LR.
        start: where the ES mean starts: ``"prior"`` (the greedy hypergradient's sign)
            or ``"constant"`` (a constant LR); see :func:`initial_weights`.
        learn_initial: also learn where the LR starts (the controller file's
            ``initial_decades``, from 0: the LR given), within :data:`INITIAL_RANGE`.
        no_total_share: the share of runs whose policy is not told the run's length.
        validate_every: generations between scores on the held-out runs (the last
            generation is always scored).
        seed: the seed of the pools, the sampled runs, the perturbations, the start.
        max_minutes: stop after the generation that passes this wall time (the last
            generation run is then scored on the held-out runs); ``None``: no limit.
        name: the MLflow experiment and run name.
        output: the folder of ``controller.json``, ``history.csv`` and the references'
            cache ``references.json`` (default ``results/<name>``).
        tracking_uri: the MLflow store (default ``sqlite:///<cwd>/mlflow.db``).
        address: a Ray cluster to join (default: start Ray here, on 127.0.0.1).
        num_cpus: CPUs of a Ray started here (default: every core).
        verbose: print a line per generation.

    Raises:
        ValueError: a bad setting (named), before Ray or MLflow start.
    """
    from .policies.meta import FEATURE_NAMES, controller_size

    features = tuple(FEATURE_NAMES if features is None else features)
    check_settings(
        generations=generations,
        population=population,
        problems=problems,
        train_problems=train_problems,
        val_problems=val_problems,
        sigma=sigma,
        step_size=step_size,
        hidden=hidden,
        features=features,
        final_weight=final_weight,
        start_decades=tuple(start_decades),
        validate_every=validate_every,
        seed=seed,
        num_cpus=num_cpus,
        start=start,
        validation_starts=validation_starts,
    )
    _check("learn_initial", learn_initial, isinstance(learn_initial, bool), "True or False")
    _check(
        "no_total_share",
        no_total_share,
        _is_number(no_total_share) and 0 <= no_total_share <= 1,
        "a number in [0, 1]",
    )
    _check(
        "max_minutes",
        max_minutes,
        max_minutes is None or (_is_number(max_minutes) and max_minutes > 0),
        "a number of minutes > 0 (or None: no limit)",
    )
    uri = tracking.check_tracking_uri(tracking_uri or tracking.default_tracking_uri())
    tracking.check_store(uri)
    folder = Path(output) if output is not None else Path("results") / name
    folder.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "generations": generations,
        "population": population,
        "problems": problems,
        "train_problems": train_problems,
        "val_problems": val_problems,
        "sigma": sigma,
        "step_size": step_size,
        "hidden": hidden,
        "features": ",".join(features),
        "final_weight": final_weight,
        "start_decades": list(start_decades),
        "no_total_share": no_total_share,
        "validate_every": validate_every,
        "seed": seed,
        "weights": controller_size(len(features), hidden) + int(learn_initial),
        "checkpoints": CHECKPOINTS,
        "validation_starts": [float(d) for d in validation_starts],
        "max_minutes": max_minutes,
        "start": start,
        "learn_initial": learn_initial,
    }
    from .runner import parent_run, ray_session

    init: dict[str, Any] = {} if num_cpus is None else {"num_cpus": num_cpus}
    with (
        credentials.scrubbed_output(),
        parent_run(
            uri, experiment=name, run_name=name, tags={"tune_alr.job": "meta-train"}
        ) as parent,
        ray_session(address, **init),
    ):
        tracking.log_params(parent.handle, parent.handle.parent_run_id, settings)
        job = _Job(folder, features, hidden, settings, parent.handle, verbose)
        result = job.run(ray_runner())
        parent.files = [result.controller_path, result.history_path]
        return result


class _Job:
    """One meta-training: the pools, the ES state, the logging."""

    def __init__(
        self,
        folder: Path,
        features: tuple[str, ...],
        hidden: int,
        settings: dict[str, Any],
        handle: tracking.Handle,
        verbose: bool,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.folder = folder
        self.features = features
        self.hidden = hidden
        self.s = settings
        self.handle = handle
        self.verbose = verbose
        self.client = MlflowClient(tracking_uri=credentials.connection_uri(handle.tracking_uri))
        self.controller_path = folder / "controller.json"
        self.history_path = folder / "history.csv"

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.handle.parent_run_id, metrics=batch)

    def spec(
        self, vector: np.ndarray, provenance: Mapping[str, Any] | None = None
    ) -> ControllerSpec:
        """The controller of an ES vector: its weights, then (``learn_initial``) one
        coordinate of its start, :data:`INITIAL_GAIN` decades a unit."""
        from .policies.meta import controller_spec

        initial = 0.0
        if self.s["learn_initial"]:
            vector, last = vector[:-1], float(vector[-1])
            initial = min(INITIAL_RANGE[1], max(INITIAL_RANGE[0], INITIAL_GAIN * last))
        return controller_spec(
            self.features, vector, hidden=self.hidden, provenance=provenance,
            initial_decades=initial,
        )  # fmt: skip

    def controller(self, vector: np.ndarray) -> dict[str, Any]:
        """The controller file's contents for an ES vector."""
        return self.spec(vector).to_json()

    def run(self, runner: Runner) -> MetaTrainResult:
        import numpy as np

        from .meta_problems import sample_problems
        from .policies.meta import load_controller

        s = self.s
        t0 = time.perf_counter()
        rng = np.random.default_rng(s["seed"])
        train = sample_problems(s["train_problems"], s["seed"])
        held_out = sample_problems(s["val_problems"], s["seed"] + 10_000)
        self.say(
            f"meta-train: references of {len(train) + len(held_out)} problems "
            f"(constant LRs on half-decade grids)..."
        )
        refs = references(
            [*train, *held_out], runner, s["final_weight"], self.folder / "references.json"
        )
        val_tasks = validation_tasks(held_out, s["validation_starts"])
        fw = s["final_weight"]

        def validate(weights_list: list[dict[str, Any]]) -> list[tuple[float, float]]:
            rows = evaluate(weights_list, val_tasks, refs, runner, final_weight=fw)
            return [
                (
                    float(np.mean([r.objective for r in row])),
                    float(np.mean([r.final_ratio <= 1.15 for r in row])),
                )
                for row in rows
            ]

        scratch = load_controller("scratch").to_json()
        mean = initial_weights(self.features, self.hidden, s["seed"], s["start"])
        if s["learn_initial"]:
            mean = np.append(mean, 0.0)  # the learned start begins at the LR given
        (scratch_val, scratch_ok), (start_val, start_ok) = validate(
            [scratch, self.controller(mean)]
        )
        self.say(
            f"held-out objective: scratch {scratch_val:.4f} ({100 * scratch_ok:.0f}% within "
            f"15%), start {start_val:.4f}"
        )
        self.log(
            0,
            {
                "objective/validation": start_val,
                "objective/validation_scratch": scratch_val,
                "validation/within_15pct": start_ok,
            },
        )
        best = (start_val, 0, mean.copy())
        self.write(best, scratch_val, time.perf_counter() - t0)
        adam = Adam(s["step_size"], np.zeros_like(mean), np.zeros_like(mean))
        pairs = s["population"] // 2
        low, high = s["start_decades"]
        history: list[dict[str, float]] = []
        last = s["generations"]
        loop_t0 = time.perf_counter()
        for gen in range(1, s["generations"] + 1):
            g0 = time.perf_counter()
            pace = (g0 - loop_t0) / max(1, gen - 1)  # mean seconds per generation so far
            # Stop when this generation, at that pace, would end past the limit.
            out_of_time = s["max_minutes"] is not None and g0 - t0 + pace > 60 * s["max_minutes"]
            if out_of_time and gen > 1:
                last = gen - 1
                break
            chosen = rng.choice(len(train), size=s["problems"], replace=False)
            tasks = [
                Task(
                    train[i],
                    float(rng.uniform(low, high)),
                    bool(rng.random() >= s["no_total_share"]),
                )
                for i in chosen
            ]
            eps = rng.standard_normal((pairs, len(mean)))
            candidates = [mean] + [mean + sign * s["sigma"] * e for e in eps for sign in (1, -1)]
            table = evaluate(
                [self.controller(c) for c in candidates], tasks, refs, runner, final_weight=fw
            )
            values = np.array([np.mean([r.objective for r in row]) for row in table])
            utility = centred_ranks(values[1:])
            plus, minus = utility[0::2], utility[1::2]
            grad = ((plus - minus)[:, None] * eps).sum(0) / (pairs * s["sigma"])
            mean = adam.step(mean, grad)
            row = {
                "generation": gen,
                "objective": float(values[0]),
                "objective/population": float(values[1:].mean()),
                "objective/best_candidate": float(values[1:].min()),
                "es/grad_norm": float(np.linalg.norm(grad)),
                "es/weight_norm": float(np.linalg.norm(mean)),
            }
            line = (
                f"gen {gen}/{s['generations']}  objective {values[0]:.4f}  (population "
                f"{row['objective/population']:.4f}, best {row['objective/best_candidate']:.4f})"
            )
            if gen % s["validate_every"] == 0 or gen == s["generations"]:
                ((val, ok),) = validate([self.controller(mean)])
                row["objective/validation"] = val
                row["validation/within_15pct"] = ok
                line += f"  held-out {val:.4f} ({100 * ok:.0f}% within 15%)"
                if val < best[0]:
                    best = (val, gen, mean.copy())
                    self.write(best, scratch_val, time.perf_counter() - t0)
                    line += " *"
            row["time/generation_s"] = time.perf_counter() - g0
            history.append(row)
            self.log(gen, {k: v for k, v in row.items() if k != "generation"})
            self.say(f"{line}  {row['time/generation_s']:.1f} s")
        if last < s["generations"] and last % s["validate_every"] != 0:
            ((val, ok),) = validate([self.controller(mean)])  # stopped by time: score the end
            history[-1]["objective/validation"] = val
            history[-1]["validation/within_15pct"] = ok
            self.log(last, {"objective/validation": val, "validation/within_15pct": ok})
            self.say(f"stopped by the time limit after generation {last}: held-out {val:.4f}")
            if val < best[0]:
                best = (val, last, mean.copy())
        wall = time.perf_counter() - t0
        self.s["generations_run"] = last
        self.write(best, scratch_val, wall)
        self.write_history(history)
        self.log(last, {"objective/best_validation": best[0], "time/wall_s": wall})
        self.client.set_tag(self.handle.parent_run_id, "tune_alr.best_generation", str(best[1]))
        self.say(
            f"best held-out objective {best[0]:.4f} at generation {best[1]} (scratch "
            f"{scratch_val:.4f}); {wall:.0f} s; controller: {self.controller_path}"
        )
        return MetaTrainResult(
            self.controller_path,
            self.history_path,
            best[1],
            best[0],
            scratch_val,
            wall,
            self.handle.parent_run_id,
            history,
        )

    def write(self, best: tuple[float, int, np.ndarray], scratch_val: float, wall: float) -> None:
        from .meta_problems import DISTRIBUTION_VERSION, FAMILIES, OPTIMIZERS, STEPS
        from .provenance import provenance

        val, gen, weights = best
        record = {
            **provenance(),
            "job": "tune-alr meta-train",
            "settings": self.s,
            "distribution": {
                "families": list(FAMILIES),
                "optimizers": list(OPTIMIZERS),
                "models": "linear; MLP 1-3 x 16-64 (tanh, ReLU); CNN 1-2 conv x 4-8; "
                "LSTM 1-2 x 8-16",
                "steps": list(STEPS),
                "version": DISTRIBUTION_VERSION,
                "module": "tune_alr.meta_problems",
            },
            "selected": {
                "generation": gen,
                "validation_objective": val,
                "scratch_validation_objective": scratch_val,
            },
            "wall_s": round(wall, 1),
            "mlflow_run_id": self.handle.parent_run_id,
        }
        data = self.spec(weights).to_json(record)
        tmp = self.controller_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.controller_path)

    def write_history(self, history: list[dict[str, float]]) -> None:
        keys = sorted({k for row in history for k in row}, key=lambda k: (k != "generation", k))
        with self.history_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)


# -- the command ------------------------------------------------------------------------


def add_meta_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``meta-train`` to ``tune-alr``'s subcommands (``sub``: ``add_subparsers()``)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "meta-train",
        help="meta-train the meta policy's controller over generated problems (Ray tasks)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--generations", type=int, default=60, help="ES generations (default: 60)")
    p.add_argument(
        "--population",
        type=int,
        default=12,
        help="candidates per generation, an even number (default: 12)",
    )
    p.add_argument("--problems", type=int, default=5, help="inner runs per generation (default: 5)")
    p.add_argument(
        "--train-problems", type=int, default=40, help="training problems in the pool (default: 40)"
    )
    p.add_argument(
        "--val-problems",
        type=int,
        default=10,
        help="held-out problems that select the result (default: 10)",
    )
    p.add_argument("--sigma", type=float, default=0.04, help="ES noise (default: 0.04)")
    p.add_argument(
        "--step-size", type=float, default=0.02, help="Adam's LR on the ES mean (default: 0.02)"
    )
    p.add_argument("--hidden", type=int, default=8, help="controller width (default: 8)")
    p.add_argument(
        "--features", help="controller inputs, comma-separated (default: all the policy's)"
    )
    p.add_argument(
        "--final-weight",
        type=float,
        default=0.25,
        help="weight of the final loss in a run's score (default: 0.25)",
    )
    p.add_argument(
        "--start-decades",
        default="-3.5,1.5",
        help="range of the inner runs' start LRs, LOW,HIGH in decades from each problem's "
        "best constant LR (default: -3.5,1.5); write --start-decades=-2.5,1.5",
    )
    p.add_argument(
        "--validation-starts",
        default=",".join(f"{d:g}" for d in VALIDATION_STARTS),
        help="the held-out runs' starts, comma-separated decades (default: "
        f"{','.join(f'{d:g}' for d in VALIDATION_STARTS)})",
    )
    p.add_argument(
        "--start",
        choices=STARTS,
        default="prior",
        help="where the ES mean starts: the greedy hypergradient's sign (prior) or a "
        "constant LR (default: prior)",
    )
    p.add_argument(
        "--learn-initial",
        action="store_true",
        help="also learn where the LR starts, in decades from the LR given (a learned "
        "warm-up; written to the controller file as initial_decades)",
    )
    p.add_argument(
        "--validate-every",
        type=int,
        default=5,
        help="generations between held-out scores (default: 5)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop after the generation that passes this wall time (default: none)",
    )
    p.add_argument("--name", default="meta-train", help="MLflow experiment (default: meta-train)")
    p.add_argument("--output", help="folder for controller.json (default: results/<name>)")
    p.add_argument(
        "--tracking-uri", help="MLflow store (default: sqlite:///./mlflow.db in the current folder)"
    )
    p.add_argument("--address", help="Ray cluster address (default: start Ray here)")
    p.add_argument("--num-cpus", type=float, help="CPUs of a Ray started here (default: all)")
    p.add_argument("--quiet", action="store_true", help="no line per generation")
    return p


def _decades(name: str, text: str) -> list[float]:
    """``"-2.5,1.5"`` as numbers; ``ValueError`` naming the option otherwise."""
    try:
        return [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"{name} must be comma-separated numbers (decades), got {text!r}."
        ) from None


def meta_train_command(args: argparse.Namespace) -> int:
    """Run ``tune-alr meta-train`` from parsed arguments; 0 on success."""
    features = None
    if args.features is not None:
        features = [f.strip() for f in str(args.features).split(",") if f.strip()]
    result = meta_train(
        generations=args.generations,
        population=args.population,
        problems=args.problems,
        train_problems=args.train_problems,
        val_problems=args.val_problems,
        sigma=args.sigma,
        step_size=args.step_size,
        hidden=args.hidden,
        features=features,
        final_weight=args.final_weight,
        start_decades=tuple(_decades("--start-decades", args.start_decades)),
        validation_starts=_decades("--validation-starts", args.validation_starts),
        start=args.start,
        learn_initial=args.learn_initial,
        validate_every=args.validate_every,
        seed=args.seed,
        max_minutes=args.max_minutes,
        name=args.name,
        output=args.output,
        tracking_uri=args.tracking_uri,
        address=args.address,
        num_cpus=args.num_cpus,
        verbose=not args.quiet,
    )
    print(
        f"controller: {result.controller_path.resolve()} (held-out objective "
        f"{result.best_validation:.4f}, scratch {result.scratch_validation:.4f}; "
        f"generation {result.best_generation}; {result.wall_s:.0f} s)"
    )
    print(
        f"use it: build('meta', optimizer, controller={str(result.controller_path)!r}) or "
        f"--policy-param meta.controller={result.controller_path.resolve()}"
    )
    print(f"MLflow run {result.run_id}", file=sys.stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tune_alr.metatrain [options]``: the ``meta-train`` command on its own."""
    root = argparse.ArgumentParser(prog="python -m tune_alr.metatrain")
    sub = root.add_subparsers(dest="command", required=True)
    add_meta_train_parser(sub)
    args = root.parse_args(["meta-train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return meta_train_command(args)
    except ValueError as err:
        print(f"meta-train: error: {err}", file=sys.stderr)
        return 2


__all__ = [
    "CHECKPOINTS",
    "INITIAL_GAIN",
    "INITIAL_RANGE",
    "STARTS",
    "VALIDATION_STARTS",
    "MetaTrainResult",
    "Reference",
    "Task",
    "TaskResult",
    "add_meta_train_parser",
    "centred_ranks",
    "evaluate",
    "local_runner",
    "main",
    "meta_train",
    "meta_train_command",
    "ray_runner",
    "references",
    "run_task",
    "score",
    "validation_tasks",
]


if __name__ == "__main__":
    sys.exit(main())
