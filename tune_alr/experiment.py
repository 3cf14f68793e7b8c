"""The experiment spec: what to run (tasks x arms x seeds) and how, checked before Ray.

    import tune_alr
    exp = tune_alr.Experiment(name="mine", tasks=["digits"], policies=["constant", "feedback"])
    results = tune_alr.run(exp)          # tune_alr.runner
    results.summary()                    # pandas DataFrame, one row per (task, policy)

:class:`Experiment` holds the user's settings; :meth:`Experiment.validate` checks all
of them before Ray starts (a bad value raises ``ValueError`` naming it and what is
accepted). What each trial runs is resolved by :mod:`tune_alr.settings`; the Ray Tune
side is in :mod:`tune_alr.tuner` and :mod:`tune_alr.runner`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.config import TrialConfig

from . import credentials, hardware, optimizers, settings, storage, tracking

#: More seeds than this is a typo, not an experiment (each seed is a trial per arm).
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class Arm:
    """One compared configuration: a policy with its own optimizer, LR and parameters.

    A plain policy name in ``Experiment.policies`` is the arm of that name with the
    experiment's optimizer and LR. Arms let one experiment compare, e.g., ``meta`` on
    SGD against fixed-LR SGD, Adam and RMSprop (plan 2).

    Args:
        label: the name in tables, plots and MLflow run names (no '/').
        policy: the policy (``tune_alr.policies.available()``).
        optimizer, lr: override the experiment's (``None`` keeps them). An anchor
            optimizer (``tune_alr.optimizers.ANCHORS``) never takes the experiment's LR,
            which is meant for PyTorch's optimizers: without ``lr`` it runs at its
            published default.
        params: keyword arguments for the policy.
        optimizer_params: keyword arguments for the optimizer (over the experiment's
            ``trial["optimizer_params"]``), e.g. ``{"warmup_steps": 30}``.
    """

    label: str
    policy: str
    optimizer: str | None = None
    lr: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    optimizer_params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """What to run: the grid tasks x policies x seeds, and how.

    Args:
        name: the experiment's name (Ray Tune folder, MLflow experiment, output folder).
        tasks: task names (``trainables.tasks.available()``).
        policies: policy names (``tune_alr.policies.available()``), anchor optimizer
            names (``tune_alr.optimizers.ANCHORS``, run at their published defaults) or
            :class:`Arm` s.
        seeds: a number of seeds (0..n-1) or the seeds themselves. Seeds are paired:
            the same seed gives the same initial weights and data order for every policy.
        optimizer, lr, batch_size, epochs: override the task defaults (``None``: not
            given). An arm that names its own optimizer or LR overrides these; a setting
            that no trial would take raises ``ValueError`` (see ``tune_alr.settings`` for
            the whole precedence).
        max_steps: cap on optimizer steps per trial.
        report_every: optimizer steps between reports (validation, checkpoint, MLflow);
            ``None``: the task's default.
        policy_params: per policy name, keyword arguments for ``policies.build``, for
            every arm of that policy (an :class:`Arm`'s own ``params`` win key by key).
        task_params: per task name, the task's options (e.g. ``{"imdb": {"layers": 2}}``).
        task_trial: per task name, trial settings for that task only, over ``trial``
            (e.g. ``{"mnist": {"limit_train": 10000, "threads": 1}}``).
        budget: a fraction in (0, 1] that scales epochs and the data (training rows,
            and validation and test rows down to floors): compute scales about as its
            square. ``None`` runs the full settings.
        target: a validation accuracy; trials report steps and seconds to reach it, and
            with paired seeds every arm is compared with ``baseline``.
        baseline: the arm (label) the others are compared with; ``None``: ``constant``
            where present, else the first arm.
        trial: any other ``TrialConfig`` field, the same for every trial (e.g.
            ``{"clip_grad": 1.0, "limit_train": 5000}``); ``None`` is a value here
            (``{"clip_grad": None}``: no clipping). A key also given as a field above
            must agree with it.
        profile: a hardware profile (``tune_alr.hardware``): a name such as ``"edge"``,
            a spec such as ``"cpus=1,threads=1,memory_mb=512"`` or a ``Profile``. It sets
            each trial's Ray resources and the caps enforced inside it (threads, cores,
            memory guard, GPU memory fraction). ``None``: plain resources, no caps.
        node_type: a custom Ray resource a cluster node type declares (e.g.
            ``"constrained"``): trials run only on nodes that have it. Overrides the
            profile's. On a Ray started here, this machine is given that resource.
        cpus_per_trial, gpus_per_trial: Ray resources of each trial without a profile
            (``None``: 1 CPU, no GPU); give these or ``profile``, not both.
        max_concurrent: cap on trials running at once (``None``: as resources allow).
        max_failures: restarts of a failed trial (from its last checkpoint) before it
            counts as failed.
        output: folder for the summary files; default ``results/<name>``.
        storage: Ray Tune storage: a folder (default ``<output>/ray``) or a URI such as
            ``s3://bucket/tune-alr`` or ``gs://...``. On a cluster of several machines it
            must be shared by all (cloud storage, or NFS at the same path everywhere):
            trials on workers write their checkpoints there. A URI's experiment folder
            is copied to ``<output>/ray`` to build the tables.
        tracking_uri: MLflow store; default ``sqlite:///<cwd>/mlflow.db``.
        address: a Ray cluster address (``"auto"``, ``ray://host:10001``) or ``None`` to
            start Ray on this machine.
        scheduler: Ray Tune's trial scheduler: ``fifo`` (none), ``asha``, ``hyperband``,
            ``median``, ``pbt`` or ``pb2`` (``tune_alr.scheduling``), on validation
            accuracy; ``scheduler_params`` sets its options (e.g. ``{"grace_period": 3}``,
            in reports).
        search: ``grid`` (every task x arm x seed) or ``optuna`` (``num_samples`` trials
            on one task, TPE choosing the arm and the values of ``space``).
        num_samples: the trials of a search.
        space: searched settings, ``{"lr": "log:1e-4:1e-1", "feedback.interval":
            "int:10:200"}`` (``tune_alr.scheduling``); searches and PBT/PB2 default to
            the LR over 1e-4..1e-1.
        stopper: a Ray Tune stopper, e.g. ``tune_alr.PolicyStopper(target=0.97)``.
        verbose: what the terminal shows: 0 nothing, 1 tune-alr's progress table (a row
            per running trial, every 15 s, and each trial once when it ends), 2 or 3
            Ray Tune's own output at that verbosity (its config and result boxes).
    """

    name: str = "tune-alr"
    tasks: Sequence[str] = ("digits",)
    policies: Sequence[str | Arm] = ("constant", "feedback")
    seeds: int | Sequence[int] = 3
    optimizer: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    max_steps: int | None = None
    report_every: int | None = None
    policy_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    task_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    task_trial: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    budget: float | None = None
    target: float | None = None
    baseline: str | None = None
    trial: Mapping[str, Any] = field(default_factory=dict)
    profile: str | hardware.Profile | Mapping[str, Any] | None = None
    node_type: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    max_failures: int = 2
    output: str | os.PathLike[str] | None = None
    storage: str | os.PathLike[str] | None = None
    tracking_uri: str | None = None
    address: str | None = None
    scheduler: str = "fifo"
    scheduler_params: Mapping[str, Any] = field(default_factory=dict)
    search: str = "grid"
    num_samples: int = 1
    space: Mapping[str, str] = field(default_factory=dict)
    stopper: Any = None
    verbose: int = 1

    # -- derived -----------------------------------------------------------------

    @property
    def seed_list(self) -> list[int]:
        if isinstance(self.seeds, bool):
            raise ValueError(f"seeds must be a count >= 1 or a list of seeds, got {self.seeds!r}.")
        if isinstance(self.seeds, int):
            if not 1 <= self.seeds <= MAX_SEEDS:
                raise ValueError(
                    f"seeds must be a count from 1 to {MAX_SEEDS} or a list of seeds, "
                    f"got {self.seeds}."
                )
            return list(range(self.seeds))
        if isinstance(self.seeds, (str, bytes)) or not isinstance(self.seeds, Sequence):
            raise ValueError(f"seeds must be a count or a list of seeds, got {self.seeds!r}.")
        seeds = list(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ValueError(f"seeds must be integers >= 0, got {self.seeds!r}.")
        if len(seeds) > MAX_SEEDS:
            raise ValueError(f"at most {MAX_SEEDS} seeds, got {len(seeds)}.")
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            raise ValueError(
                f"seeds must differ: {twice} given more than once would count one run twice."
            )
        return seeds

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output is not None else Path("results") / self.name

    @property
    def storage_is_uri(self) -> bool:
        return isinstance(self.storage, str) and "://" in self.storage

    @property
    def storage_dir(self) -> Path:
        """The local storage folder (for a URI storage: where its copy goes)."""
        if self.storage is not None and not self.storage_is_uri:
            return Path(self.storage)
        return self.output_dir / "ray"

    @property
    def storage_path(self) -> str:
        """What Ray Tune gets: the URI as given, or the folder's absolute path."""
        if self.storage_is_uri:
            return str(self.storage).rstrip("/")
        return str(self.storage_dir.resolve())

    @property
    def uri(self) -> str:
        return self.tracking_uri or tracking.default_tracking_uri()

    @property
    def arms(self) -> list[Arm]:
        """The compared configurations, plain names turned into arms.

        A policy name is that policy on the experiment's optimizer and LR; an anchor
        optimizer's name (``tune_alr.optimizers.ANCHORS``, e.g. ``"prodigy"``) is that
        optimizer at its published defaults under the ``constant`` policy.
        """
        return [
            p
            if isinstance(p, Arm)
            else Arm(label=p, policy="constant", optimizer=p)
            if p in optimizers.ANCHORS
            else Arm(label=p, policy=p)
            for p in self.policies
        ]

    @property
    def hardware_profile(self) -> hardware.Profile | None:
        """The resolved profile (``node_type`` applied), or ``None``; raises ``ValueError``."""
        if self.profile is None:
            return None
        if self.cpus_per_trial is not None or self.gpus_per_trial is not None:
            raise ValueError(
                "give either profile= or cpus_per_trial=/gpus_per_trial=, not both "
                f"(profile {self.profile!r} sets the trial's resources)."
            )
        profile = hardware.resolve(self.profile)
        if self.node_type is not None:
            profile = profile.replace(node_type=self.node_type)
        return profile

    @property
    def node_type_resource(self) -> str | None:
        """The custom node resource trials need, if any."""
        profile = self.hardware_profile
        return profile.node_type if profile is not None else self.node_type

    def ray_resources(self) -> dict[str, float]:
        """What each trial asks Ray for."""
        profile = self.hardware_profile
        if profile is not None:
            return profile.ray_resources()
        for label, value in (
            ("cpus_per_trial", self.cpus_per_trial),
            ("gpus_per_trial", self.gpus_per_trial),
        ):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{label} must be a finite number >= 0, got {value!r}.")
        cpus = 1.0 if self.cpus_per_trial is None else float(self.cpus_per_trial)
        gpus = 0.0 if self.gpus_per_trial is None else float(self.gpus_per_trial)
        if cpus == 0 and gpus == 0:
            raise ValueError("a trial needs some resources: cpus_per_trial or gpus_per_trial > 0.")
        resources = {"cpu": cpus, "gpu": gpus}
        if self.node_type is not None:
            # Checked the same way as a profile's node type.
            hardware.Profile("check", cpus=cpus, gpus=gpus, node_type=self.node_type)
            resources[self.node_type] = hardware.NODE_TYPE_SHARE
        return resources

    def cells(self) -> list[settings.Cell]:
        """The resolved settings of each (task, arm) (``tune_alr.settings``)."""
        return settings.resolve(self)

    def trial_configs(self) -> list[TrialConfig]:
        """Every trial's validated ``TrialConfig`` (``ValueError``)."""
        return settings.trial_configs(self)

    def validate(self) -> list[settings.Cell]:
        """Check everything that can be checked before Ray starts; raises ``ValueError``.

        Returns the resolved cells, so that callers do not resolve twice.
        """
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(
                f"name must be a non-empty folder name without '/', got {self.name!r}."
            )
        if self.name.strip() != self.name or not self.name.isprintable():
            raise ValueError(
                f"name must have no leading or trailing spaces and no control characters "
                f"(newlines, tabs), got {self.name!r}."
            )
        for label, values in (("tasks", self.tasks), ("policies", self.policies)):
            if isinstance(values, str) or not list(values):
                raise ValueError(f"{label} must be a non-empty list of names, got {values!r}.")
            names = [v.label if isinstance(v, Arm) else v for v in values]
            if len(set(names)) != len(names):
                raise ValueError(f"{label} has duplicates: {names!r}.")
        from .policies import available

        for name in self.policies:
            if isinstance(name, str) and name not in available() and name not in optimizers.ANCHORS:
                raise ValueError(
                    f"unknown policy {name!r}; policies: {', '.join(available())}; anchor "
                    f"optimizers: {', '.join(optimizers.ANCHORS)}."
                )
        self.seed_list  # noqa: B018 (raises on bad seeds)
        labels = [a.label for a in self.arms]
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(
                f"baseline {self.baseline!r} is not one of the arms; accepted: {', '.join(labels)}."
            )
        if self.budget is not None and not (
            isinstance(self.budget, (int, float)) and 0 < self.budget <= 1
        ):
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget!r}.")
        self.ray_resources()  # the profile or the plain resources
        from . import scheduling

        scheduling.check(self)
        if self.stopper is not None and not callable(self.stopper):
            raise ValueError(
                f"stopper must be a Ray Tune stopper (e.g. tune_alr.PolicyStopper), "
                f"got {self.stopper!r}."
            )
        cells = self.cells()
        configs = settings.trial_configs(self, cells)  # every value of every trial
        scheduling.check_configs(self, configs)
        storage.check_local_data(cells)
        if self.max_concurrent is not None and (
            isinstance(self.max_concurrent, bool)
            or not isinstance(self.max_concurrent, int)
            or self.max_concurrent < 1
        ):
            raise ValueError(
                f"max_concurrent must be an integer >= 1, got {self.max_concurrent!r}."
            )
        if (
            isinstance(self.max_failures, bool)
            or not isinstance(self.max_failures, int)
            or self.max_failures < 0
        ):
            raise ValueError(f"max_failures must be an integer >= 0, got {self.max_failures!r}.")
        tracking.check_tracking_uri(self.uri)
        storage.check_storage(self)
        tracking.check_store(self.uri)  # last: it may wait for a server to answer
        return cells

    def power_note(self) -> str | None:
        """A warning when a target is set but the seeds are too few for any of the
        comparisons with the baseline to reach significance (``tune_alr.stats``)."""
        from .stats import power_note

        comparisons = (len(self.arms) - 1) * len(self.tasks)
        if self.target is None or comparisons < 1:
            return None
        return power_note(len(self.seed_list), comparisons)

    # -- the spec as plain data (saved beside Ray Tune's files, for resume) ------------

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-able data; relative folders made absolute as they were meant."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["policies"] = [
            dataclasses.asdict(p) if isinstance(p, Arm) else p for p in self.policies
        ]
        if isinstance(self.profile, hardware.Profile):
            fields["profile"] = self.profile.to_dict()
        # A stopper is an object: the saved spec keeps a PolicyStopper's settings.
        fields["stopper"] = stopper_settings(self.stopper)
        # The store's public form only: credentials never reach a file (credentials.py).
        if self.tracking_uri is not None:
            fields["tracking_uri"] = credentials.public_uri(self.tracking_uri)
        fields["output"] = str(self.output_dir.resolve())
        if not self.storage_is_uri:
            fields["storage"] = str(self.storage_dir.resolve())
        return _plain(fields)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Experiment:
        """The inverse of :meth:`to_dict`."""
        values = dict(fields)
        if isinstance(values.get("stopper"), Mapping):
            from .stopper import PolicyStopper

            values["stopper"] = PolicyStopper(**values["stopper"])
        values["policies"] = [
            Arm(**p) if isinstance(p, Mapping) else p for p in values.get("policies", [])
        ]
        return cls(**values)


def stopper_settings(stopper: Any) -> dict[str, Any] | None:
    """A ``PolicyStopper``'s settings, from which a resumed run rebuilds it; ``None`` for
    another kind of stopper (a resume then goes on without it, as its docstring says)."""
    from .stopper import PolicyStopper

    if not isinstance(stopper, PolicyStopper):
        return None
    return {
        "target": stopper.target,
        "chance_patience": stopper.chance_patience,
        "chance_margin": stopper.chance_margin,
        "pinned_patience": stopper.pinned_patience,
        "worse_by": stopper.worse_by,
    }


def _plain(value: Any) -> Any:
    """Paths to strings, mappings to dicts and sequences to lists, recursively."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["MAX_SEEDS", "Arm", "Experiment"]
