"""Experiment spec -> Ray Tune ``Tuner`` -> :class:`Results`.

    import tune_alr
    exp = tune_alr.Experiment(name="mine", tasks=["digits"], policies=["constant", "feedback"])
    results = tune_alr.run(exp)
    results.summary()          # pandas DataFrame, one row per (task, policy)

``run`` validates the whole grid before Ray starts (a bad value raises ``ValueError``
naming it and what is accepted), creates the MLflow store, experiment and parent run
in the driver, runs one Ray Tune trial per (task, policy, seed) with the given
resources, and writes ``summary.csv``, ``trials.csv``, ``summary.md`` and plots into the
output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from trainables import tasks as task_registry
from trainables.config import TrialConfig

from . import hardware, optimizers, report, tracking

#: Storage URI schemes Ray Tune reaches through pyarrow.
_STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")

#: Trial settings the Experiment sets itself (the grid and its shared options).
_GRID_KEYS = (
    "task",
    "policy",
    "seed",
    "policy_params",
    "label",
    "task_params",
    "budget",
    "profile",
)


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
        optimizer, lr, batch_size, epochs: override the task defaults (``None`` keeps them).
        max_steps: cap on optimizer steps per trial.
        report_every: optimizer steps between reports (validation, checkpoint, MLflow);
            ``None``: the task's default.
        policy_params: per policy name, keyword arguments for ``policies.build``.
        task_params: per task name, the task's options (e.g. ``{"imdb": {"layers": 2}}``).
        task_trial: per task name, trial settings for that task only, over ``trial``
            (e.g. ``{"mnist": {"limit_train": 10000, "threads": 1}}``).
        budget: a fraction in (0, 1] that scales epochs and the data (training rows,
            and validation and test rows down to floors): compute scales about as its
            square. ``None`` runs the full settings.
        target: a validation accuracy; trials report steps and seconds to reach it.
        trial: any other ``TrialConfig`` field, the same for every trial (e.g.
            ``{"clip_grad": 1.0, "limit_train": 5000}``).
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
        verbose: Ray Tune's progress output, 0 (silent) to 3.
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
    verbose: int = 1

    # -- derived -----------------------------------------------------------------

    @property
    def seed_list(self) -> list[int]:
        if isinstance(self.seeds, bool):
            raise ValueError(f"seeds must be a count >= 1 or a list of seeds, got {self.seeds!r}.")
        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise ValueError(
                    f"seeds must be a count >= 1 or a list of seeds, got {self.seeds}."
                )
            return list(range(self.seeds))
        seeds = list(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ValueError(f"seeds must be integers >= 0, got {self.seeds!r}.")
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
            else Arm(label=p, policy=p, params=self.policy_params.get(p, {}))
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
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise ValueError(f"{label} must be a number >= 0, got {value!r}.")
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

    def shared_trial_settings(self) -> dict[str, Any]:
        """The TrialConfig fields every trial shares (``None`` = the task's default)."""
        profile = self.hardware_profile
        settings = {
            "batch_size": self.batch_size,
            "max_steps": self.max_steps,
            "report_every": self.report_every,
            "target": self.target,
            "profile": profile.to_dict() if profile is not None else None,
            **dict(self.trial),
        }
        clash = sorted(set(self.trial) & set(_GRID_KEYS))
        if clash:
            raise ValueError(
                f"trial settings {clash} are set by the grid; use tasks=, policies=, seeds= "
                "and policy_params= instead."
            )
        return settings

    def arm_settings(self, arm: Arm) -> dict[str, Any]:
        """The TrialConfig fields an arm sets."""
        optimizer = arm.optimizer or self.optimizer
        lr = arm.lr
        if lr is None and optimizer not in optimizers.ANCHORS:
            lr = self.lr
        return {
            "label": arm.label,
            "policy": arm.policy,
            "optimizer": optimizer,
            "lr": lr,
            "policy_params": dict(arm.params),
            "optimizer_params": {
                **dict(self.trial.get("optimizer_params") or {}),
                **dict(arm.optimizer_params),
            },
        }

    def task_settings(self, task: str) -> dict[str, Any]:
        """The TrialConfig fields that depend on the task: its options and the budget."""
        out: dict[str, Any] = {"task": task, "task_params": dict(self.task_params.get(task, {}))}
        # Every key any task overrides is set for all tasks: a lookup that found nothing
        # would replace the shared value with the task's default.
        for key in sorted({k for t in self.task_trial.values() for k in t}):
            out[key] = self.task_trial.get(task, {}).get(key, self.trial.get(key))
        if self.budget is not None:
            epochs = (
                out.get("epochs")
                or self.epochs
                or task_registry.get(task).defaults.get("epochs", 1)
            )
            out["epochs"] = max(1, round(epochs * self.budget))
            out["budget"] = self.budget
        else:
            out["epochs"] = out.get("epochs") or self.epochs
        return out

    def trial_configs(self) -> list[TrialConfig]:
        """Every grid point as a validated TrialConfig (raises ``ValueError``)."""
        shared = self.shared_trial_settings()
        names = {a.policy for a in self.arms}
        unknown = sorted(set(self.policy_params) - names)
        if unknown:
            raise ValueError(
                f"policy_params given for {unknown}, which are not in the policies {sorted(names)}."
            )
        for label, table in (("task_params", self.task_params), ("task_trial", self.task_trial)):
            unknown = sorted(set(table) - set(self.tasks))
            if unknown:
                raise ValueError(f"{label} given for {unknown}, which are not in tasks.")
        for task, settings in self.task_trial.items():
            clash = sorted(set(settings) & {*_GRID_KEYS, "task_params"})
            if clash:
                raise ValueError(f"task_trial[{task!r}] sets {clash}, which the grid sets.")
        if self.budget is not None and not (
            isinstance(self.budget, (int, float)) and 0 < self.budget <= 1
        ):
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget!r}.")
        from .policies import available

        for name in self.policies:
            if isinstance(name, str) and name not in available() and name not in optimizers.ANCHORS:
                raise ValueError(
                    f"unknown policy {name!r}; policies: {', '.join(available())}; anchor "
                    f"optimizers: {', '.join(optimizers.ANCHORS)}."
                )
        labels = [a.label for a in self.arms]
        if len(set(labels)) != len(labels):
            raise ValueError(f"arm labels must be unique, got {labels}.")
        return [
            TrialConfig.from_dict(
                {**shared, **self.task_settings(task), **self.arm_settings(arm), "seed": seed}
            )
            for task in self.tasks
            for arm in self.arms
            for seed in self.seed_list
        ]

    def validate(self) -> None:
        """Check everything that can be checked before Ray starts; raises ``ValueError``."""
        if not self.name or "/" in self.name or self.name.strip() != self.name:
            raise ValueError(
                f"name must be a non-empty folder name without '/', got {self.name!r}."
            )
        for label, values in (("tasks", self.tasks), ("policies", self.policies)):
            if isinstance(values, str) or not list(values):
                raise ValueError(f"{label} must be a non-empty list of names, got {values!r}.")
            names = [v.label if isinstance(v, Arm) else v for v in values]
            if len(set(names)) != len(names):
                raise ValueError(f"{label} has duplicates: {names!r}.")
        self.ray_resources()  # the profile or the plain resources
        self.trial_configs()  # every trial setting, target and budget included
        self._check_local_data()
        if self.max_concurrent is not None and (
            not isinstance(self.max_concurrent, int) or self.max_concurrent < 1
        ):
            raise ValueError(
                f"max_concurrent must be an integer >= 1, got {self.max_concurrent!r}."
            )
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ValueError(f"max_failures must be an integer >= 0, got {self.max_failures!r}.")
        tracking.check_tracking_uri(self.uri)
        if self.storage_is_uri:
            scheme = str(self.storage).split("://", 1)[0]
            if scheme not in _STORAGE_SCHEMES:
                raise ValueError(
                    f"storage URI {self.storage!r} has scheme {scheme!r}; accepted: "
                    f"{', '.join(_STORAGE_SCHEMES)}, or a folder path."
                )
        for label, folder in (("output", self.output_dir), ("storage", self.storage_dir)):
            _check_writable(label, folder)
        db = tracking.sqlite_path(self.uri)
        if db is not None:
            _check_writable("tracking store folder", db.parent)

    def _check_local_data(self) -> None:
        """Local Parquet copies: files, columns and labels, before any trial loads them."""
        from trainables import hub

        data_dir = hub.data_dir_from(self.trial.get("data_dir"))
        if data_dir is None:
            return
        for task in self.tasks:
            if task in hub.SOURCES:
                hub.check_local(hub.SOURCES[task], data_dir)


def _check_writable(label: str, folder: Path) -> None:
    """Raise ``ValueError`` unless ``folder`` exists or can be created, and is writable."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{label} folder {str(folder)!r} is inside a file ({str(probe)!r}).")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{label} folder {str(folder)!r} is not writable ({str(probe)!r}).")


@dataclass
class Results:
    """The outcome of :func:`run`: where everything went, and the tables."""

    experiment: Experiment
    experiment_dir: Path
    output_dir: Path
    tracking_uri: str
    parent_run_id: str | None
    files: dict[str, Path]
    records: list[report.TrialRecord]

    def trials(self) -> pd.DataFrame:
        """One row per trial."""
        return report.trials_frame(self.records)

    def summary(self) -> pd.DataFrame:
        """One row per (task, policy): mean and std over seeds of the final metrics."""
        return report.summarize(self.trials())


def _trial_name(trial: Any) -> str:
    c = trial.config
    return f"{c['task']}_{c.get('label') or c['policy']}_seed{c['seed']}"


def _trial_dirname(trial: Any) -> str:
    return f"{_trial_name(trial)}_{trial.trial_id}"


def _lookup(table: Mapping[str, Mapping[str, Any]], by: str, key: str) -> Any:
    """A ``sample_from`` function: ``table[config[by]].get(key)``."""

    def sample(config: Any) -> Any:
        return table[config[by]].get(key)

    return sample


def param_space(exp: Experiment) -> dict[str, Any]:
    """The Tuner's param space: a grid over task, arm and seed; the rest looked up."""
    from ray import tune

    exp.trial_configs()  # validates the grid
    # Only the settings the user gave travel; each trial fills its task's defaults.
    given = {k: v for k, v in exp.shared_trial_settings().items() if v is not None}
    by_arm = {a.label: exp.arm_settings(a) for a in exp.arms}
    by_task = {t: exp.task_settings(t) for t in exp.tasks}
    space: dict[str, Any] = {
        **given,
        "task": tune.grid_search(list(exp.tasks)),
        "label": tune.grid_search(list(by_arm)),
        "seed": tune.grid_search(exp.seed_list),
    }
    # The grid varies task and arm labels; what each implies is filled in per trial.
    for key in ("policy", "optimizer", "lr", "policy_params", "optimizer_params"):
        space[key] = tune.sample_from(_lookup(by_arm, "label", key))
    for key in sorted({k for settings in by_task.values() for k in settings} - {"task"}):
        space[key] = tune.sample_from(_lookup(by_task, "task", key))
    return space


def build_tuner(exp: Experiment, handle: tracking.Handle | None) -> Any:
    """The Ray Tune ``Tuner`` for ``exp`` (Ray must be initialised)."""
    from ray import tune

    import trainables

    space = param_space(exp)
    resources = exp.ray_resources()
    callbacks: list[tune.Callback] = [tracking.MLflowTracking(handle)] if handle else []
    return tune.Tuner(
        tune.with_resources(trainables.train, resources),
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=exp.max_concurrent,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_dirname,
            # A worker process per trial costs seconds of start-up and imports; reusing
            # it between trials with the same resources halves short experiments.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=exp.storage_path,
            failure_config=tune.FailureConfig(max_failures=exp.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
            callbacks=callbacks,
            verbose=exp.verbose,
        ),
    )


def run(exp: Experiment) -> Results:
    """Run ``exp`` on Ray Tune with MLflow tracking; see the module docstring."""
    exp.validate()
    import ray

    handle = tracking.prepare(
        exp.uri,
        experiment=exp.name,
        run_name=exp.name,
        tags={
            "tune_alr.tasks": ",".join(exp.tasks),
            "tune_alr.arms": ",".join(a.label for a in exp.arms),
        },
    )
    # Ray snapshots the experiment state whenever a trial has written num_to_keep
    # checkpoints; with a report (and checkpoint) every few seconds that is expected
    # here, cheap for these small states, and its warning would flood the progress.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    resources = exp.ray_resources()
    started_ray = _init_ray(exp)
    status = "FAILED"
    try:
        check_fits(resources, ray.cluster_resources(), strict=started_ray and not exp.address)
        _write_spec(exp, handle)
        results = _fit(exp, build_tuner(exp, handle), handle)
        status = "FINISHED"
        return results
    finally:
        _close_parent(handle, status, exp.output_dir)
        if started_ray:
            ray.shutdown()


#: The file in a Ray Tune experiment folder that lets ``resume`` rebuild the Experiment.
SPEC_FILE = "tune_alr_experiment.json"


def _spec(exp: Experiment, handle: tracking.Handle | None) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    fields = {f.name: getattr(exp, f.name) for f in dataclasses.fields(exp)}
    fields["policies"] = [dataclasses.asdict(p) if isinstance(p, Arm) else p for p in exp.policies]
    if isinstance(exp.profile, hardware.Profile):
        fields["profile"] = exp.profile.to_dict()
    # Relative folders are kept as the absolute ones they meant at the first run.
    fields["output"] = str(exp.output_dir.resolve())
    if not exp.storage_is_uri:
        fields["storage"] = str(exp.storage_dir.resolve())
    return {
        "experiment": plain(fields),
        "tracking": None if handle is None else dataclasses.asdict(handle),
    }


def _write_spec(exp: Experiment, handle: tracking.Handle | None) -> None:
    import pyarrow.fs

    text = json.dumps(_spec(exp, handle), indent=2)
    fs, root = pyarrow.fs.FileSystem.from_uri(
        exp.storage_path if exp.storage_is_uri else Path(exp.storage_path).as_uri()
    )
    folder = f"{root.rstrip('/')}/{exp.name}"
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{SPEC_FILE}") as out:
        out.write(text.encode())


def read_spec(path: str) -> tuple[Experiment, tracking.Handle | None]:
    """The Experiment and MLflow handle that ``run`` saved in its Ray Tune folder."""
    import pyarrow.fs

    uri = path if "://" in path else Path(path).resolve().as_uri()
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{SPEC_FILE}") as f:
            spec = json.loads(f.read().decode())
    except (FileNotFoundError, OSError) as err:
        raise ValueError(
            f"{path!r} is not a tune-alr experiment folder (no {SPEC_FILE}); give the "
            "folder Ray Tune wrote, e.g. results/<name>/ray/<name>."
        ) from err
    fields = dict(spec["experiment"])
    fields["policies"] = [
        Arm(**p) if isinstance(p, Mapping) else p for p in fields.get("policies", [])
    ]
    tracked = spec.get("tracking")
    return Experiment(**fields), (tracking.Handle(**tracked) if tracked else None)


def resume(path: str | os.PathLike[str]) -> Results:
    """Finish an interrupted experiment from its Ray Tune folder (``Tuner.restore``).

    Trials that finished are kept as they are; unfinished and errored ones continue from
    their last checkpoints; MLflow logging continues in the same parent and child runs.
    Ray Tune's run settings (progress output included) are those of the first run.
    Raises ``ValueError`` if ``path`` is not an experiment folder ``run`` wrote.
    """
    from ray import tune

    import trainables

    exp, handle = read_spec(os.fspath(path))
    if not tune.Tuner.can_restore(os.fspath(path)):
        raise ValueError(f"Ray Tune cannot restore {os.fspath(path)!r} (no experiment state).")
    import ray

    if handle is not None:
        tracking.reopen_parent(handle)
    started_ray = _init_ray(exp)
    status = "FAILED"
    try:
        tuner = tune.Tuner.restore(
            os.fspath(path),
            trainable=tune.with_resources(trainables.train, exp.ray_resources()),
            # Trials not started yet hold placeholders for the looked-up settings,
            # which only a re-given param space fills.
            param_space=param_space(exp),
            resume_unfinished=True,
            resume_errored=True,
        )
        results = _fit(exp, tuner, handle)
        status = "FINISHED"
        return results
    finally:
        _close_parent(handle, status, exp.output_dir)
        if started_ray:
            ray.shutdown()


def _fit(exp: Experiment, tuner: Any, handle: tracking.Handle | None) -> Results:
    """Run ``tuner`` (the driver's system metrics logged meanwhile) and collect its trials."""
    with tracking.system_metrics(handle):
        grid = tuner.fit()
    return collect(exp, _local_copy(exp, grid.experiment_path), handle, trial_folders(grid))


def _init_ray(exp: Experiment) -> bool:
    """Start or join Ray for ``exp`` unless it is up; whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    local = exp.address is None
    ray.init(
        address=exp.address,
        include_dashboard=False,
        configure_logging=False,
        # On one machine, that machine plays the asked-for node type.
        resources={exp.node_type_resource: 1.0} if local and exp.node_type_resource else None,
    )
    return True


def check_fits(
    resources: Mapping[str, float], cluster: Mapping[str, float], *, strict: bool
) -> None:
    """Raise ``ValueError`` (``strict``) or warn when no trial could ever be placed.

    Ray would otherwise keep such trials pending forever. On a cluster that may scale
    up (``strict=False``) the resources may still come, so it only warns.
    """
    names = {"cpu": "CPU", "gpu": "GPU"}
    short = []
    for key, amount in resources.items():
        have = float(cluster.get(names.get(key, key), 0.0))
        if amount > have + 1e-9:
            if key == "memory":
                short.append(f"memory {amount / 2**20:.0f} MiB (Ray has {have / 2**20:.0f} MiB)")
            else:
                short.append(f"{names.get(key, key)} {amount:g} (Ray has {have:g})")
    if not short:
        return
    message = (
        f"a trial asks for {', '.join(short)}: no trial could start. Use a smaller profile, "
        "fewer cpus/gpus per trial, or a cluster whose node types offer these resources "
        "(see cluster/README.md)."
    )
    if strict:
        raise ValueError(message)
    import warnings

    warnings.warn(message + " Waiting for the cluster to scale up.", RuntimeWarning, stacklevel=2)


def _close_parent(handle: tracking.Handle | None, status: str, output: Path) -> None:
    """End the MLflow parent run with the summary files; a failure only warns."""
    if handle is None:
        return
    try:
        tracking.finish_parent(handle, status, summary_files(output))
    except Exception as err:  # tracking must not hide the run's own outcome
        import warnings

        warnings.warn(f"could not close the MLflow parent run: {err}", RuntimeWarning, stacklevel=3)


def summary_files(output: Path) -> list[Path]:
    return sorted(p for p in output.glob("*") if p.suffix in (".csv", ".md", ".png"))


def _local_copy(exp: Experiment, experiment_path: str) -> Path:
    """The experiment folder on this machine (copied from a storage URI)."""
    if not exp.storage_is_uri:
        return Path(experiment_path)
    import pyarrow.fs

    local = exp.storage_dir / exp.name
    local.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(experiment_path, str(local.resolve()))
    return local


def trial_folders(grid: Any) -> set[str]:
    """The trial folder names of a Ray Tune ``ResultGrid`` (this run's trials only)."""
    return {PurePosixPath(str(result.path)).name for result in grid}


def collect(
    exp: Experiment,
    experiment_dir: Path,
    handle: tracking.Handle | None,
    only: set[str] | None = None,
) -> Results:
    """Read the experiment folder (``only`` these trial folders) and write the summaries."""
    records = report.load_trials(experiment_dir, only)
    files = report.write_outputs(records, exp.output_dir, title=exp.name)
    return Results(
        experiment=exp,
        experiment_dir=experiment_dir,
        output_dir=exp.output_dir,
        tracking_uri=exp.uri,
        parent_run_id=handle.parent_run_id if handle else None,
        files=files,
        records=records,
    )


__all__ = [
    "SPEC_FILE",
    "Arm",
    "Experiment",
    "Results",
    "build_tuner",
    "check_fits",
    "collect",
    "resume",
    "run",
]
