"""Settings resolution: what each trial runs, from everything the user gave.

One function, :func:`resolve`, turns an :class:`~tune_alr.experiment.Experiment` into the
complete settings of each (task, arm) cell of its grid; ``run``, ``resume``, ``bench``,
the tuned searches and the presets all go through it, and every trial receives its
settings complete (no field is left for the trial to guess).

Precedence, lowest first (a later level overrides an earlier one, field by field):

=====  ==========================================================  =====================
level  where                                                       CLI
=====  ==========================================================  =====================
1      ``TrialConfig``'s own defaults                              (none)
2      the task's defaults (``trainables.tasks``)                  (none)
3      an anchor optimizer's published LR, when the arm's          (none)
       optimizer is an anchor and no level below sets its LR
4      the experiment: its fields (``lr``, ``optimizer``,          ``--lr``, ``--set``,
       ``batch_size``, ``epochs``, ``max_steps``, ``report_every``,  ...
       ``target``, ``budget``, ``profile``) and ``trial[...]``;
       ``$TUNE_ALR_DATA_DIR`` for ``data_dir`` below them
5      the task: ``task_trial[task]`` and ``task_params[task]``    ``--task-param``
6      the arm: ``Arm.optimizer``, ``Arm.lr``, ``Arm.params`` over  ``--policy-param``
       ``policy_params[policy]``, ``Arm.optimizer_params``
=====  ==========================================================  =====================

Rules that keep this honest:

* The same setting given twice on one level with different values (``lr=0.1`` and
  ``trial={"lr": 0.2}``), or by a task and an arm with different values, raises
  ``ValueError`` naming both places.
* A setting given on level 4 or 5 that no trial takes (every arm overrides it) raises
  ``ValueError``: nothing is silently ignored.
* ``optimizer_params`` and ``policy_params`` merge key by key across levels.
* An arm that names an anchor optimizer itself (``Arm(optimizer="prodigy")`` or the
  name ``"prodigy"`` among the policies) runs at that optimizer's published LR unless
  the arm gives one: the experiment's and the tasks' ``lr`` are meant for the optimizer
  they choose.
* ``budget`` scales the resolved ``epochs`` last (``max(1, round(epochs * budget))``).
* ``None`` given explicitly is a value: ``trial={"clip_grad": None}`` means no clipping.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainables import tasks as task_registry
from trainables.config import TrialConfig, import_modules, module_root
from trainables.hub import DATA_DIR_ENV

from . import optimizers

if TYPE_CHECKING:
    from .experiment import Arm, Experiment

#: Fields each trial gets from the grid, never from ``trial`` or ``task_trial``.
GRID_FIELDS = {
    "task": "tasks=",
    "policy": "policies=",
    "label": "policies= (an Arm's label)",
    "seed": "seeds=",
}
#: Fields that have their own place in the Experiment (pointers for the error message).
OWN_PLACE = {
    "policy_params": "policy_params={policy: {...}} (--policy-param POLICY.NAME=VALUE)",
    "task_params": "task_params={task: {...}} (--task-param TASK.NAME=VALUE)",
    "budget": "Experiment.budget (--budget)",
    "profile": "Experiment.profile (--profile)",
}
#: Experiment fields that are trial settings (``None``: not given), with their CLI flag.
EXPERIMENT_FIELDS = {
    "optimizer": "--optimizer",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "epochs": "--epochs",
    "max_steps": "--max-steps",
    "report_every": "--report-every",
    "target": "--target",
}
_MERGED = ("optimizer_params", "policy_params")


@dataclass(frozen=True)
class Given:
    """A value and where it came from (for messages)."""

    value: Any
    place: str
    level: int


@dataclass
class Cell:
    """The resolved settings of one (task, arm): every ``TrialConfig`` field but the seed.

    ``sources`` names where each field's value came from.
    """

    task: str
    label: str
    settings: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def config(self, seed: int) -> dict[str, Any]:
        """The trial's complete settings for ``seed``."""
        return {**self.settings, "seed": seed}


def _trial_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TrialConfig)]


def _check_trial_keys(values: Mapping[str, Any], place: str) -> None:
    """Refuse unknown keys and keys that belong elsewhere, naming where they go."""
    known = set(_trial_fields())
    for key in values:
        if key in GRID_FIELDS:
            raise ValueError(f"{place} sets {key!r}, which the grid sets: use {GRID_FIELDS[key]}.")
        if key in OWN_PLACE:
            raise ValueError(f"{place} sets {key!r}; give it as {OWN_PLACE[key]}.")
        if key not in known:
            accepted = sorted(known - set(GRID_FIELDS) - set(OWN_PLACE))
            raise ValueError(
                f"{place} has an unknown trial setting {key!r}; accepted: {', '.join(accepted)}."
            )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays: compare by identity of meaning, conservatively
        return a is b


def experiment_level(exp: Experiment) -> dict[str, Given]:
    """Level 4: the experiment's fields and ``trial``; a key given twice must agree."""
    out: dict[str, Given] = {}
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        # Below the experiment's own settings, and sent to the trials explicitly so that
        # workers on other machines train on the same data the driver checked.
        out["data_dir"] = Given(env_dir, f"${DATA_DIR_ENV}", 3)
    for key, flag in EXPERIMENT_FIELDS.items():
        value = getattr(exp, key)
        if value is not None:
            out[key] = Given(value, f"Experiment.{key} ({flag})", 4)
    if exp.budget is not None:
        out["budget"] = Given(exp.budget, "Experiment.budget (--budget)", 4)
    profile = exp.hardware_profile
    if profile is not None:
        out["profile"] = Given(profile.to_dict(), "Experiment.profile (--profile)", 4)
    trial = dict(exp.trial)
    _check_trial_keys(trial, "trial")
    imports = trial.get("imports") or ()
    if imports and "import_paths" not in trial:
        # Where the driver found them: Ray's workers on this machine look there too.
        roots = sorted({module_root(name) for name in imports})
        out["import_paths"] = Given(roots, "the imports' folders", 3)
    for key, value in trial.items():
        place = f"trial[{key!r}] (--set {key}=...)"
        have = out.get(key)
        if have is not None and have.level == 4 and not _same(have.value, value):
            raise ValueError(
                f"{key} is given twice with different values: {have.place} = {have.value!r} "
                f"and {place} = {value!r}."
            )
        out[key] = Given(value, place, 4)
    return out


def task_level(exp: Experiment, task: str) -> dict[str, Given]:
    """Level 5: ``task_trial[task]`` and ``task_params[task]``."""
    settings = dict(exp.task_trial.get(task, {}))
    _check_trial_keys(settings, f"task_trial[{task!r}]")
    out = {k: Given(v, f"task_trial[{task!r}][{k!r}]", 5) for k, v in settings.items()}
    if task in exp.task_params:
        out["task_params"] = Given(dict(exp.task_params[task]), f"task_params[{task!r}]", 5)
    return out


def arm_level(arm: Arm) -> dict[str, Given]:
    """Level 6: what the arm sets."""
    where = f"arm {arm.label!r}"
    out: dict[str, Given] = {"label": Given(arm.label, where, 6)}
    out["policy"] = Given(arm.policy, where, 6)
    if arm.optimizer is not None:
        out["optimizer"] = Given(arm.optimizer, f"{where} optimizer", 6)
    if arm.lr is not None:
        out["lr"] = Given(arm.lr, f"{where} lr", 6)
    if arm.optimizer_params:
        out["optimizer_params"] = Given(dict(arm.optimizer_params), f"{where} optimizer_params", 6)
    if arm.params:
        out["policy_params"] = Given(dict(arm.params), f"{where} params", 6)
    return out


def _shared_policy_params(exp: Experiment, arm: Arm) -> Given | None:
    """``policy_params[arm.policy]``: level 4, under the arm's own params."""
    shared = exp.policy_params.get(arm.policy)
    return Given(dict(shared), f"policy_params[{arm.policy!r}]", 4) if shared else None


def _names_anchor(arm: Arm) -> bool:
    return arm.optimizer is not None and arm.optimizer in optimizers.ANCHORS


class _Usage:
    """Which user-given (level 4/5) settings some trial took: the rest would be ignored."""

    def __init__(self) -> None:
        self.given: dict[tuple[str, str], Given] = {}  # (key, place) -> given
        self.used: set[tuple[str, str]] = set()
        self.winners: dict[tuple[str, str], set[str]] = {}

    def offer(self, key: str, given: Given) -> None:
        if given.level in (4, 5):
            self.given.setdefault((key, given.place), given)

    def took(self, key: str, winner: Given, offered: list[Given]) -> None:
        for g in offered:
            if g.level in (4, 5):
                if g is winner:
                    self.used.add((key, g.place))
                else:
                    self.winners.setdefault((key, g.place), set()).add(winner.place)

    def check(self) -> None:
        for (key, place), given in self.given.items():
            if (key, place) in self.used:
                continue
            others = ", ".join(sorted(self.winners.get((key, place), {"nothing"})))
            raise ValueError(
                f"{key} = {given.value!r} from {place} would be ignored: every trial takes "
                f"{key} from elsewhere ({others}). Remove it, or drop the overrides."
            )


def _conflict(key: str, a: Given, b: Given) -> ValueError:
    return ValueError(
        f"{key} is given twice with different values: {a.place} = {a.value!r} and "
        f"{b.place} = {b.value!r}."
    )


def _disagree(a: Given, b: Given) -> bool:
    """Two givens that must agree: the same level, or a task's against an arm's."""
    clash = a.level == b.level or {a.level, b.level} == {5, 6}
    return clash and not _same(a.value, b.value)


def _merge_dicts(key: str, offered: list[Given], usage: _Usage) -> tuple[dict[str, Any], str]:
    """``optimizer_params`` / ``policy_params``: merged key by key, the higher level winning."""
    by_sub: dict[str, list[Given]] = {}
    for layer in offered:
        for sub, value in layer.value.items():
            given = Given(value, f"{layer.place} key {sub!r}", layer.level)
            by_sub.setdefault(sub, []).append(given)
    merged: dict[str, Any] = {}
    places: set[str] = set()
    for sub, givens in by_sub.items():
        name = f"{key}.{sub}"
        givens.sort(key=lambda g: g.level)
        for i, a in enumerate(givens):
            usage.offer(name, a)
            for b in givens[i + 1 :]:
                if _disagree(a, b):
                    raise _conflict(name, a, b)
        usage.took(name, givens[-1], givens)
        merged[sub] = givens[-1].value
        places.add(givens[-1].place)
    return merged, ", ".join(sorted(places)) or "default"


def _defaults(task: str) -> dict[str, Given]:
    """Levels 1 and 2: ``TrialConfig``'s defaults under the task's."""
    out = {}
    for f in dataclasses.fields(TrialConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = Given(f.default, "TrialConfig default", 1)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = Given(f.default_factory(), "TrialConfig default", 1)
    for key, value in task_registry.get(task).defaults.items():
        out[key] = Given(value, f"task {task!r} default", 2)
    return out


def _cell(
    exp: Experiment,
    task: str,
    arm: Arm,
    levels: tuple[dict[str, Given], dict[str, Given], dict[str, Given]],
    usage: _Usage,
) -> Cell:
    experiment, task_set, arm_set = levels
    defaults = _defaults(task)
    settings: dict[str, Any] = {"task": task}
    sources: dict[str, str] = {"task": "tasks="}
    # Fields in TrialConfig's order: ``optimizer`` is resolved before ``lr`` needs it.
    for key in _trial_fields():
        if key in ("task", "seed"):
            continue
        shared = _shared_policy_params(exp, arm) if key == "policy_params" else None
        offered = [
            g
            for g in (
                defaults.get(key),
                experiment.get(key),
                shared,
                task_set.get(key),
                arm_set.get(key),
            )
            if g is not None
        ]
        applicable = offered
        if key == "lr" and settings["optimizer"] in optimizers.ANCHORS:
            if _names_anchor(arm):
                # An anchor the arm chose runs at its own LR unless the arm gives one:
                # the experiment's and the task's LR are for the optimizer they choose.
                applicable = [g for g in offered if g.level not in (4, 5)]
            anchor_lr = optimizers.default_lr(settings["optimizer"])
            if anchor_lr is not None:
                level3 = Given(anchor_lr, f"{settings['optimizer']} default", 3)
                applicable = sorted([*applicable, level3], key=lambda g: g.level)
        if key in _MERGED:
            settings[key], sources[key] = _merge_dicts(key, offered, usage)
            continue
        for i, a in enumerate(applicable):
            for b in applicable[i + 1 :]:
                if a.level >= 4 and _disagree(a, b):
                    raise _conflict(key, a, b)
        for g in offered:
            usage.offer(key, g)
        winner = applicable[-1]
        usage.took(key, winner, offered)
        settings[key], sources[key] = winner.value, winner.place
    settings["policy_params"] = _absolute_controller(settings["policy"], settings["policy_params"])
    if exp.budget is not None:
        # Last: the budget scales the epochs however they were set.
        settings["epochs"] = max(1, round(settings["epochs"] * exp.budget))
    return Cell(task=task, label=arm.label, settings=settings, sources=sources)


def _absolute_controller(policy: str, params: dict[str, Any]) -> dict[str, Any]:
    """meta's ``controller`` given as a relative path, made absolute here: a trial runs in
    its own working directory (Ray Tune's trial folder), where the path would not lead."""
    controller = params.get("controller")
    if policy != "meta" or not isinstance(controller, (str, os.PathLike)):
        return params
    if os.fspath(controller) in ("scratch", "meta-trained"):
        return params
    return {**params, "controller": os.path.abspath(os.fspath(controller))}


def resolve(exp: Experiment) -> list[Cell]:
    """The resolved settings of every (task, arm) of ``exp``; raises ``ValueError``.

    Checks the precedence rules of the module docstring; the values themselves are
    validated by ``TrialConfig.from_dict`` (see :func:`trial_configs`).
    """
    arms = exp.arms
    names = {a.policy for a in arms}
    unknown = sorted(set(exp.policy_params) - names)
    if unknown:
        raise ValueError(
            f"policy_params given for {unknown}, which are not in the policies {sorted(names)}."
        )
    for label, table in (("task_params", exp.task_params), ("task_trial", exp.task_trial)):
        unknown = sorted(set(table) - set(exp.tasks))
        if unknown:
            raise ValueError(f"{label} given for {unknown}, which are not in tasks.")
    # The user's own tasks and policies register themselves on import (TrialConfig.imports).
    import_modules(exp.trial.get("imports") or (), exp.trial.get("import_paths") or ())
    usage = _Usage()
    experiment = experiment_level(exp)
    cells = []
    for task in exp.tasks:
        task_registry.get(task)
        task_set = task_level(exp, task)
        for arm in arms:
            cells.append(_cell(exp, task, arm, (experiment, task_set, arm_level(arm)), usage))
    usage.check()
    return cells


def trial_configs(exp: Experiment, cells: list[Cell] | None = None) -> list[TrialConfig]:
    """Every trial's validated ``TrialConfig`` (task, arm, seed order); ``ValueError``.

    Each (task, arm) is validated once: the seed changes nothing that validation
    checks, so the other seeds' configs are copies with their seed.
    """
    seeds = exp.seed_list
    out = []
    for cell in cells if cells is not None else resolve(exp):
        first = TrialConfig.from_dict(cell.config(seeds[0]))
        out += [dataclasses.replace(first, seed=seed) for seed in seeds]
    return out


__all__ = ["Cell", "Given", "resolve", "trial_configs"]
