"""The configuration of one trial, validated before anything runs.

Ray Tune hands a trainable a plain dict; :meth:`TrialConfig.from_dict` turns it into a
typed, frozen config, filling the task's defaults and rejecting bad values with a
``ValueError`` that names the value and what is accepted. The experiment driver calls
the same function on every grid point before Ray starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tune_alr import hardware, optimizers
from tune_alr.policies import build
from tune_alr.policies.base import check_int, check_positive

from . import tasks
from .data import DataRequest, SplitPlan

OPTIMIZERS = tuple(optimizers.available())
DEVICES = ("auto", "cpu", "cuda")


def import_modules(names: Any, paths: Any = ()) -> None:
    """Import each named module (its ``tasks.register`` / ``policies.register`` calls run),
    searching ``paths`` too; ``ValueError`` naming one that cannot be imported."""
    for label, values in (("imports", names), ("import_paths", paths)):
        if isinstance(values, str) or not all(isinstance(n, str) and n for n in values):
            raise ValueError(f"{label} must be a list of names, got {values!r}.")
    for path in paths:
        if path not in sys.path:
            sys.path.append(path)
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(
                f"cannot import {name!r} ({type(err).__name__}: {err}); a module named in "
                "imports must be importable by the driver and by Ray's workers: installed, "
                "on PYTHONPATH, or in a folder they share (import_paths)."
            ) from None


def module_root(name: str) -> str:
    """The ``sys.path`` folder an imported module was found in (``a.b`` in ``/x/a/b.py``:
    ``/x``), so that a worker on this machine finds it there too."""
    module = sys.modules[name]
    path = Path(module.__file__ or "").resolve()
    depth = name.count(".") + (1 if path.name == "__init__.py" else 0)
    return str(path.parents[depth])


class _CheckingOptimizer(torch.optim.Optimizer):
    """A one-parameter optimizer that policies are built on to check their settings; it
    is never stepped (``step`` is the base class's, which raises).

    Why not ``torch.optim.SGD``: every ``Optimizer.add_param_group`` is wrapped by
    ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` (1.4 s on this
    project's 2-core machine), and the driver checks every trial's settings before Ray
    starts, where nothing else needs it. This class adds its one group as the base class
    does, without that wrapper.
    """

    def __init__(self) -> None:
        super().__init__([torch.nn.Parameter(torch.zeros(1))], {"lr": 1.0})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        group = {**self.defaults, **param_group}
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        self.param_groups.append(group)


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs (:meth:`from_dict` fills the task's defaults).

    ``checkpoint_every``: reports between checkpoints (every ``checkpoint_every``-th
    report carries one, and the last; ``trainables.loop``). A trial that crashes resumes
    from its last checkpoint and repeats the reports after it, exactly; Population Based
    Training needs one at every report (``tune_alr.tuning.population`` sets 1). The
    default, 1, was chosen by measurement (``benchmarks/trial_cost.py --checkpoint-every
    1,2,4``): with the copy into Ray Tune's storage off the training thread
    (``trainables.ray_trainable``), what a checkpoint still costs the trial is writing it,
    about 6 ms for the plan-2 MNIST CNN with Adam (0.5% of a 25-step report window) and
    3-4 ms for the digits CNN; a larger cadence saved nothing measurable against the
    run-to-run spread of a shared 2-core machine, and would make a crash replay reports.
    Raise it for large models reported often (a 2.6M-weight text model writes 32 MB,
    about 30 ms, per checkpoint).
    """

    task: str
    policy: str
    seed: int = 0
    optimizer: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    max_steps: int | None = None
    report_every: int = 50
    checkpoint_every: int = 1
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    optimizer_params: Mapping[str, Any] = field(default_factory=dict)
    clip_grad: float | None = None
    probe_size: int = 256
    data_seed: int = 0
    limit_train: int | None = None
    threads: int | None = None
    max_bad_steps: int = 20
    diverge_factor: float | None = 10.0
    task_params: Mapping[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    budget: float | None = None
    val_size: int = 2000
    test_size: int | None = 5000
    target: float | None = None
    label: str | None = None
    profile: Mapping[str, Any] | None = None
    device: str = "auto"
    imports: tuple[str, ...] = ()
    import_paths: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TrialConfig:
        """Validate ``config`` and fill what it leaves out; raises ``ValueError``.

        A key absent from ``config`` takes the task's default (then the field's); a key
        present is used as given, ``None`` included (``clip_grad: None``: no clipping;
        ``lr: None`` is an error). An anchor optimizer given without an LR runs at its
        authors' default LR. Experiments send every field resolved
        (``tune_alr.settings``), so this filling serves direct callers of the loop.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"unknown trial setting(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(sorted(known))}."
            )
        for required in ("task", "policy"):
            if required not in config:
                raise ValueError(f"a trial config needs {required!r}.")
        # A task or policy of the user's registers itself when its module is imported:
        # first, so that its name is known below, in the driver and in every worker.
        import_modules(config.get("imports") or (), config.get("import_paths") or ())
        task = tasks.get(config["task"])
        merged = {**task.defaults, **config}
        if "lr" not in config and "optimizer" in config and config["optimizer"] in OPTIMIZERS:
            # Prodigy at the task's Adam LR of 1e-3 would be 1000x too timid.
            anchor_lr = optimizers.default_lr(config["optimizer"])
            if anchor_lr is not None:
                merged["lr"] = anchor_lr
        merged["imports"] = tuple(merged.get("imports") or ())
        merged["import_paths"] = tuple(merged.get("import_paths") or ())
        return cls(**merged).validated()

    def validated(self) -> TrialConfig:
        """Check every field; returns ``self``."""
        tasks.get(self.task)
        # Build the policy once on a throw-away optimizer: checks names and values.
        dummy = _CheckingOptimizer()
        build(self.policy, dummy, total_steps=self.max_steps or 1000, **dict(self.policy_params))
        check_int("seed", self.seed, minimum=0)
        optimizers.check(self.optimizer)  # known, and its package installed
        if not isinstance(self.optimizer_params, Mapping):
            raise ValueError(f"optimizer_params must be a dict, got {self.optimizer_params!r}.")
        check_positive("lr", self.lr)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("epochs", self.epochs, minimum=1)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, minimum=1)
        check_int("report_every", self.report_every, minimum=1)
        check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        if self.clip_grad is not None:
            check_positive("clip_grad", self.clip_grad)
        check_int("probe_size", self.probe_size, minimum=1)
        check_int("data_seed", self.data_seed, minimum=0)
        if self.limit_train is not None:
            check_int("limit_train", self.limit_train, minimum=1)
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        check_int("max_bad_steps", self.max_bad_steps, minimum=1)
        if self.diverge_factor is not None:
            check_positive("diverge_factor", self.diverge_factor)
            if self.diverge_factor <= 1:
                raise ValueError(
                    f"diverge_factor must be > 1 (or None), got {self.diverge_factor!r}."
                )
        tasks.get(self.task).resolve_params(dict(self.task_params))
        if self.budget is not None and not (
            isinstance(self.budget, (int, float)) and 0 < self.budget <= 1
        ):
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget!r}.")
        if self.target is not None and not (
            isinstance(self.target, (int, float)) and 0 < self.target <= 1
        ):
            raise ValueError(
                f"target must be a validation accuracy in (0, 1], got {self.target!r}."
            )
        if self.label is not None and (
            not isinstance(self.label, str)
            or not self.label
            or "/" in self.label
            or not self.label.isprintable()
        ):
            raise ValueError(
                f"label must be a name without '/' or control characters, got {self.label!r}."
            )
        check_int("val_size", self.val_size, minimum=1)
        if self.test_size is not None:
            check_int("test_size", self.test_size, minimum=1)
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ValueError(
                f"data dir {self.data_dir!r} does not exist; give a folder laid out as "
                "<dir>/<task>/{train,test}.parquet (see ../shared/data/README.md)."
            )
        if self.profile is not None:
            if not isinstance(self.profile, Mapping):
                raise ValueError(
                    f"profile must be a dict of profile settings, got {self.profile!r}."
                )
            hardware.Profile.from_dict(self.profile)
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; accepted: {', '.join(DEVICES)}.")
        return self

    def hardware_profile(self) -> hardware.Profile | None:
        """The trial's hardware profile, if it has one."""
        return None if self.profile is None else hardware.Profile.from_dict(self.profile)

    def torch_device(self) -> torch.device:
        """``cuda`` when ``device`` is ``auto`` and Ray gave this trial a GPU, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but this process sees no CUDA device.")
        return torch.device(self.device)

    def split_plan(self) -> SplitPlan:
        """How the task's data is cut into train / validation / test."""
        return SplitPlan(
            data_seed=self.data_seed,
            val_size=self.val_size,
            test_size=self.test_size,
            limit_train=self.limit_train,
            budget=self.budget,
        )

    def task_options(self) -> dict[str, Any]:
        """The task's options: its defaults with ``task_params`` applied."""
        return tasks.get(self.task).resolve_params(dict(self.task_params))

    def data_request(self) -> DataRequest:
        """What the task's loader is asked for."""
        return DataRequest(
            task=self.task,
            data_dir=self.data_dir,
            plan=self.split_plan(),
            probe_size=self.probe_size,
            params=self.task_options(),
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (what Ray Tune passes around and MLflow logs as params)."""
        out = dataclasses.asdict(self)
        out["policy_params"] = dict(self.policy_params)
        out["optimizer_params"] = dict(self.optimizer_params)
        out["task_params"] = dict(self.task_params)
        out["imports"] = list(self.imports)
        out["import_paths"] = list(self.import_paths)
        if self.profile is not None:
            out["profile"] = dict(self.profile)
        return out
