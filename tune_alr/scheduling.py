"""Ray Tune's schedulers and searchers on an experiment, and its search space.

    Experiment(..., scheduler="asha", search="optuna", num_samples=12,
               space={"lr": "log:1e-4:1e-1", "feedback.interval": "int:10:200"})

* ``search="grid"`` (default): every (task, arm, seed), as without a scheduler; a
  scheduler then stops (ASHA, HyperBand, median) or exploits (PBT, PB2) among them.
* ``search="optuna"``: ``num_samples`` trials on one task, Optuna's TPE (seeded)
  choosing the arm (a categorical over ``policies``) and the values of ``space``, with
  the settings of the chosen arm for the rest. A policy's parameter in the space is
  only sampled when that policy is chosen (Optuna's define-by-run).
* ``scheduler``: ``fifo`` (none), ``asha``, ``hyperband``, ``median`` (stopping rules on
  validation accuracy), ``pbt``, ``pb2`` (population training over ``space``; a member
  continues from a donor's checkpoint with its policy's state at the perturbed values,
  ``trainables.loop.reapply_hyperparameters``). Ray Tune's own classes do the work;
  their time unit is the trial's report (``training_iteration``).

The space's entries are ``KEY=KIND:ARGS``: ``lr`` or ``POLICY.PARAM`` (a policy's own
parameter, e.g. ``feedback.interval``), or ``optimizer``; kinds ``log:LOW:HIGH``
(log-uniform), ``float:LOW:HIGH``, ``int:LOW:HIGH``, ``choice:A,B,C``. Searches and
population schedulers default to ``{"lr": "log:1e-4:1e-1"}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainables.config import TrialConfig

    from .experiment import Experiment
    from .settings import Cell

SCHEDULERS = ("fifo", "asha", "hyperband", "median", "pbt", "pb2")
SEARCHES = ("grid", "optuna")
POPULATION = ("pbt", "pb2")
METRIC, MODE = "val_acc", "max"
DEFAULT_SPACE = {"lr": "log:1e-4:1e-1"}
_KINDS = ("log", "float", "int", "choice")

#: Each scheduler's options (their defaults, in reports) that ``scheduler_params`` may set.
SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    "fifo": {},
    "asha": {"grace_period": 2, "reduction_factor": 3},
    "hyperband": {"max_t": 27, "reduction_factor": 3},
    "median": {"grace_period": 2, "min_samples_required": 3},
    "pbt": {"perturbation_interval": 2, "quantile_fraction": 0.25, "synch": False},
    "pb2": {"perturbation_interval": 2, "quantile_fraction": 0.25, "synch": False},
}


@dataclass(frozen=True)
class Dimension:
    """One searched setting: where it goes in a trial's config and its range."""

    key: str  # as given: "lr", "optimizer", "feedback.interval"
    kind: str
    low: float = math.nan
    high: float = math.nan
    choices: tuple[Any, ...] = ()

    @property
    def policy(self) -> str | None:
        """The policy whose parameter this is, or ``None`` for a trial setting."""
        return self.key.partition(".")[0] if "." in self.key else None

    @property
    def param(self) -> str:
        return self.key.partition(".")[2] if "." in self.key else self.key

    def config_path(self) -> str:
        """The trial config's key, nested keys joined by '/' (Ray Tune's convention)."""
        return f"policy_params/{self.param}" if self.policy else self.key

    def suggest(self, trial: Any) -> Any:
        """The value Optuna's ``trial`` suggests (define-by-run)."""
        name = self.config_path()
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high))
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "log")

    def domain(self) -> Any:
        """The Ray Tune domain (for PBT's mutations)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.choices))
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)
        if self.kind == "log":
            return tune.loguniform(self.low, self.high)
        return tune.uniform(self.low, self.high)


def _number(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"space {key!r}: {text!r} is not a number.") from None
    if not math.isfinite(value):
        raise ValueError(f"space {key!r}: bounds must be finite, got {text!r}.")
    return value


def parse_dimension(key: str, spec: Any) -> Dimension:
    """``"log:1e-4:1e-1"`` and the like (module docstring) as a :class:`Dimension`."""
    if not isinstance(key, str) or not key or key.count(".") > 1:
        raise ValueError(
            f"space keys are lr, optimizer or POLICY.PARAM (e.g. feedback.interval), got {key!r}."
        )
    if "." not in key and key not in ("lr", "optimizer"):
        raise ValueError(
            f"space key {key!r} is not searchable; accepted: lr, optimizer, or a policy's "
            "parameter as POLICY.PARAM (e.g. feedback.interval, meta.max_step)."
        )
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"space {key!r}: give KIND:ARGS with KIND one of {', '.join(_KINDS)} "
            f"(e.g. log:1e-4:1e-1, int:10:200, choice:sgd,adam), got {spec!r}."
        )
    kind, _, args = spec.partition(":")
    if kind not in _KINDS:
        raise ValueError(f"space {key!r}: unknown kind {kind!r}; accepted: {', '.join(_KINDS)}.")
    if kind == "choice":
        choices = tuple(c.strip() for c in args.split(",") if c.strip())
        if len(choices) < 2:
            raise ValueError(f"space {key!r}: choice needs two values or more, got {args!r}.")
        return Dimension(key, kind, choices=tuple(_json_value(c) for c in choices))
    parts = args.split(":")
    if len(parts) != 2:
        raise ValueError(f"space {key!r}: {kind} needs LOW:HIGH, got {args!r}.")
    low, high = _number(key, parts[0]), _number(key, parts[1])
    if not low < high or (kind == "log" and low <= 0):
        raise ValueError(
            f"space {key!r}: need LOW < HIGH{' and LOW > 0' if kind == 'log' else ''}, "
            f"got {low:g}:{high:g}."
        )
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ValueError(f"space {key!r}: int bounds must be integers, got {args!r}.")
    return Dimension(key, kind, low, high)


def _json_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def dimensions(exp: Experiment) -> list[Dimension]:
    """The experiment's searched settings, checked against its arms (``ValueError``)."""
    space = dict(exp.space) or (
        DEFAULT_SPACE if exp.search != "grid" or exp.scheduler in POPULATION else {}
    )
    out = [parse_dimension(k, v) for k, v in space.items()]
    policies = {a.policy for a in exp.arms}
    for d in out:
        if d.policy is not None and d.policy not in policies:
            raise ValueError(
                f"space {d.key!r} names policy {d.policy!r}, which no arm runs "
                f"(policies: {', '.join(sorted(policies))})."
            )
        if d.policy is not None and exp.scheduler in POPULATION and policies != {d.policy}:
            raise ValueError(
                f"space {d.key!r}: {exp.scheduler} mutates every member of the population, "
                f"so a policy's parameter needs every arm to run {d.policy!r}."
            )
    return out


def check(exp: Experiment) -> list[Dimension]:
    """Every scheduling setting of ``exp``, before Ray starts; its searched dimensions."""
    if not isinstance(exp.scheduler, str) or exp.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {exp.scheduler!r}; accepted: {', '.join(SCHEDULERS)}.")
    if not isinstance(exp.search, str) or exp.search not in SEARCHES:
        raise ValueError(f"unknown search {exp.search!r}; accepted: {', '.join(SEARCHES)}.")
    options = SCHEDULER_OPTIONS[exp.scheduler]
    unknown = sorted(set(exp.scheduler_params) - set(options))
    if unknown:
        raise ValueError(
            f"scheduler {exp.scheduler!r} has no option {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(options) or 'none'}."
        )
    for key, value in exp.scheduler_params.items():
        default = options[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"scheduler option {key} must be true or false, got {value!r}.")
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if isinstance(default, int) and not isinstance(default, bool):
            ok = ok and float(value) == int(value)
        if not ok or (key == "quantile_fraction" and not 0 < value <= 0.5):
            raise ValueError(
                f"scheduler option {key} must be a number > 0"
                + (" and <= 0.5" if key == "quantile_fraction" else "")
                + f", got {value!r}."
            )
    if (
        isinstance(exp.num_samples, bool)
        or not isinstance(exp.num_samples, int)
        or exp.num_samples < 1
    ):
        raise ValueError(f"num_samples must be an integer >= 1, got {exp.num_samples!r}.")
    if exp.search == "grid" and exp.num_samples != 1:
        raise ValueError(
            "num_samples is the number of trials of a search (--search optuna); the grid "
            "runs every task x arm x seed once (more seeds: --seeds)."
        )
    if exp.search == "optuna" and len(exp.tasks) != 1:
        raise ValueError(
            f"a search tunes one task at a time (its metric is that task's accuracy), got "
            f"tasks {list(exp.tasks)}; run one search per task."
        )
    if exp.search == "optuna" and exp.scheduler in POPULATION:
        raise ValueError(
            f"{exp.scheduler} is a search of its own (it perturbs the population); use it "
            "with --search grid."
        )
    return dimensions(exp)


def check_configs(exp: Experiment, configs: Sequence[TrialConfig]) -> None:
    """What the scheduler needs of the resolved trials: a population scheduler exploits
    the donor's latest checkpoint, which must be the report it ranked, so every report
    must carry one (``checkpoint_every`` 1); another cadence is refused, not overridden.
    Every member must run the same task, policy and optimizer: an exploit copies them too."""
    if exp.scheduler not in POPULATION:
        return
    cadences = sorted({c.checkpoint_every for c in configs if c.checkpoint_every != 1})
    if cadences:
        raise ValueError(
            f"{exp.scheduler} restores a member from the checkpoint of the report it ranked: "
            f"it needs checkpoint_every 1, got {', '.join(map(str, cadences))}; remove the "
            "setting or use another scheduler."
        )
    # An exploit copies the donor's whole config (not only the mutated LR) and its
    # checkpoint into the member: across tasks, policies or optimizers a member would go on
    # as another arm's trial while its results were still counted under its own arm.
    for field in ("task", "policy", "optimizer"):
        values = sorted({str(getattr(c, field)) for c in configs})
        if len(values) > 1:
            raise ValueError(
                f"{exp.scheduler} copies a donor's whole config into the member it exploits, "
                f"so every member must run the same {field}; got {', '.join(values)}. Run one "
                f"experiment per {field}, or choose among them with --search optuna."
            )


def _options(exp: Experiment) -> dict[str, Any]:
    return {**SCHEDULER_OPTIONS[exp.scheduler], **dict(exp.scheduler_params)}


def build_scheduler(exp: Experiment, dims: Sequence[Dimension]) -> Any:
    """Ray Tune's scheduler for ``exp`` (``None`` for FIFO)."""
    from ray.tune.schedulers import (
        ASHAScheduler,
        HyperBandScheduler,
        MedianStoppingRule,
        PopulationBasedTraining,
    )
    from ray.tune.schedulers.pb2 import PB2

    options = _options(exp)
    common: dict[str, Any] = {"time_attr": "training_iteration", "metric": METRIC, "mode": MODE}
    name = exp.scheduler
    if name == "fifo":
        return None
    if name == "asha":
        # max_t far beyond any run: trials end at their own last report, never cut there
        return ASHAScheduler(max_t=10**9, **common, **options)
    if name == "hyperband":
        return HyperBandScheduler(**common, **options)
    if name == "median":
        return MedianStoppingRule(**common, **options)
    if name == "pbt":
        mutations: dict[str, Any] = {}
        for d in dims:
            if d.policy is None:
                mutations[d.key] = d.domain()
            else:
                mutations.setdefault("policy_params", {})[d.param] = d.domain()
        return PopulationBasedTraining(
            hyperparam_mutations=mutations,
            resample_probability=0.0,
            require_attrs=False,  # a failed trial's last report has no val_acc
            **common,
            **options,
        )
    bounds: dict[str, Any] = {}
    for d in dims:
        if d.kind == "choice":
            raise ValueError(f"pb2 searches numbers only; space {d.key!r} is a choice.")
        if d.policy is None:
            bounds[d.key] = [d.low, d.high]
        else:
            bounds.setdefault("policy_params", {})[d.param] = [d.low, d.high]
    return PB2(hyperparam_bounds=bounds, require_attrs=False, **common, **options)


class DefineByRun:
    """Optuna's define-by-run space: the arm, then the dimensions that apply to it; the
    chosen arm's settings (flattened with '/') as the rest of the trial's config.

    A class, not a closure: Ray Tune pickles the searcher with its space at every
    experiment checkpoint.
    """

    def __init__(self, cells: Sequence[Cell], dims: Sequence[Dimension], seed: int) -> None:
        self.by_label = {c.label: dict(c.settings) for c in cells}
        self.dims = list(dims)
        self.seed = seed

    def __call__(self, trial: Any) -> dict[str, Any]:
        labels = list(self.by_label)
        label = trial.suggest_categorical("label", labels) if len(labels) > 1 else labels[0]
        settings = self.by_label[label]
        searched = set()
        for d in self.dims:
            if d.policy is None or d.policy == settings["policy"]:
                d.suggest(trial)
                searched.add(d.config_path())
        constants = _flatten({**settings, "seed": self.seed})
        out = {k: v for k, v in constants.items() if k not in searched and k != "label"}
        if len(labels) == 1:
            out["label"] = label
        return out


def define_by_run(cells: Sequence[Cell], dims: Sequence[Dimension], seed: int) -> DefineByRun:
    """The define-by-run space of a search over ``cells`` (see :class:`DefineByRun`)."""
    return DefineByRun(cells, dims, seed)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a/b`` keys. An empty mapping is left out (the trial's default
    is empty too): Ray Tune would set it after, and over, a searched ``a/b``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_search(exp: Experiment, cells: Sequence[Cell], dims: Sequence[Dimension]) -> Any:
    """Ray Tune's search algorithm for ``exp`` (``None`` for the grid)."""
    if exp.search == "grid":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # Optuna announces each study and trial at INFO; the progress table says enough.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = exp.seed_list[0]
    return OptunaSearch(space=define_by_run(cells, dims, seed), metric=METRIC, mode=MODE, seed=seed)


__all__ = [
    "DEFAULT_SPACE",
    "POPULATION",
    "SCHEDULERS",
    "SCHEDULER_OPTIONS",
    "SEARCHES",
    "DefineByRun",
    "Dimension",
    "build_scheduler",
    "build_search",
    "check",
    "define_by_run",
    "dimensions",
    "parse_dimension",
]
