"""The one training loop: ``train(config, report)``. It knows nothing of Ray or MLflow.

Every ``report_every`` optimizer steps (and at the end) it evaluates the validation
split and calls

    report(metrics: dict, checkpoint_dir: str | None)

Every ``checkpoint_every``-th report (the reports at steps that are multiples of
``report_every * checkpoint_every``) and the last one carry a checkpoint: a temporary
folder, deleted when ``report`` returns, so a ``report`` that wants to keep the checkpoint
copies or moves it (``trainables.ray_trainable`` moves it aside for ``tune.report``); the
other reports get ``None``, as does a diverged run's last. ``resume`` takes the
:class:`~trainables.checkpoint.TrainState` that :func:`load_checkpoint` returns (or a
dict of its fields) and continues the run exactly: same step counter, same data order,
same LR sequence. A run resumed from its last checkpoint after a crash repeats the reports
after it, with the same values (the LR traces bit for bit; ``tune_alr.tracking`` and
``TrialRecord.lr_path`` keep one of each).

Evaluation (:class:`Evaluator`) runs in ``torch.inference_mode``; on the CPU, image
batches (4-D inputs) go through a channels-last copy of the model, :data:`EVAL_BATCH_IMAGES`
at a time (measured by ``benchmarks/trial_cost.py``: about 0.2x a training step's cost per
image, against 0.4-0.7x in the model's own layout at 512); other inputs go through the
model itself, :data:`EVAL_BATCH` at a time. The loss and accuracy are those of the
model's own layout up to the order of float summation.

The metrics of each report:

* ``step``, ``epoch`` (fractional), ``train_loss`` (mean since the last report),
  ``val_loss``, ``val_acc``, ``lr`` (the step size of the last step: the group's LR, or
  for an anchor optimizer its own effective step size, see ``tune_alr.optimizers``),
  ``samples_per_s`` (over the window, evaluation included), ``window_s`` (the window's
  wall seconds), ``wall_s`` (training wall time, summed over restarts),
  ``loop_s`` (the loop's wall time so far, the earlier reports' cost included),
  ``skipped_steps`` (non-finite losses or gradients whose update was skipped);
* ``lr_trace``: the LR (step size) applied at each optimizer step since the last report, and
  ``lr_trace_start``, the step number of its first entry (steps count from 1);
* ``policy/<name>``: the policy's own numeric diagnostics (its factor, checks, ...);
* ``policy_ms_per_step``: time inside ``policy.step`` (its probes included) per step;
* ``proc/*``: what the process used (``tune_alr.monitor``: CPU percent, CPU seconds
  summed over restarts, resident memory and its peak, GPU memory where CUDA is used);
* ``profile``, ``caps/*`` and ``caps_notes`` (first report of each start or restart): the
  hardware caps the trial ran under (``tune_alr.hardware``);
* ``status``: ``"running"``, then ``"finished"`` or ``"diverged"`` (with
  ``diverged_reason``) in the last report,
  which also carries ``best_val_acc`` and, where the task has a test split,
  ``test_loss`` and ``test_acc``;
* ``steps_to_target``, ``wall_s_to_target``: from the first report whose ``val_acc``
  reached ``target`` on, when a target is set (time to target at report granularity);
* ``data_notes`` (the same reports, when the loader has any): where the data came from
  and how it was cut;
* ``reapplied``, ``restored_lr`` (the first report after a resume whose config differs
  from the checkpoint's, as after a PBT exploit): the hyperparameters re-applied and the
  step size the checkpoint held before (see :func:`reapply_hyperparameters`);
* where the wall time went, in seconds (``benchmarks/trial_cost.py`` sums them):

  - ``time/steps_s``: the window's training steps (batch, forward, backward, optimizer),
    ``policy.step`` excluded;
  - ``time/policy_s``: the window's time inside ``policy.step`` (its probes included);
  - ``time/eval_s``: the window's evaluations: validation, the untrained model's (first
    report of a process), the test split's (last report);
  - ``time/checkpoint_s``: writing this report's checkpoint (0 without one);
  - ``time/report_s``: the previous report's ``report`` call, its checkpoint folder's
    removal included (under Ray Tune, ``trainables.ray_trainable`` sends reports from a
    thread of its own: the call waits only for the report before it to be taken); 0 in
    a process's first report;
  - ``time/data_s``, ``time/model_s`` (first report of each start or restart): loading
    the data (the decoded-data cache included, :mod:`trainables.cache`), and building
    the model, optimizer and policy (and restoring a checkpoint);
  - ``time/process_s``: seconds since :func:`train` was called in this process (what
    the loop's other ``time/*`` figures of this process add up to, but for the
    ``report`` call in progress and the process's start before ``train``).
"""

from __future__ import annotations

import copy
import math
import os
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tune_alr import hardware, optimizers
from tune_alr.monitor import ResourceSampler
from tune_alr.policies import Policy, build

from . import tasks
from .checkpoint import CHECKPOINT_FILE as CHECKPOINT_FILE
from .checkpoint import TrainState
from .config import TrialConfig
from .data import Split, TaskData

Report = Callable[[dict[str, Any], "str | None"], None]

#: Evaluation batch for inputs that are not CPU image batches (texts, GPU).
EVAL_BATCH = 512
#: Evaluation batch for CPU image batches in channels-last layout: per image, 128 ran
#: at about the cost of 32-256 and 0.5x that of 512 (the CNNs' activations at 512 leave
#: the caches), measured on the plan-2 MNIST CNN on one thread (benchmarks/trial_cost.py).
EVAL_BATCH_IMAGES = 128


class Evaluator:
    """Mean cross-entropy and accuracy of a model on a split, as cheaply as measured.

    On the CPU, a split whose first input is a 4-D float tensor (images) is evaluated by
    a channels-last copy of the model (kept per model, its weights and buffers refreshed
    from the model at each call), :data:`EVAL_BATCH_IMAGES` images at a time: PyTorch's
    CPU convolutions and pooling run several times faster in that layout than in the
    default one (the loop trains a CPU model with 2-D convolutions in channels-last too;
    a model given in the default layout is evaluated the same way). Anything
    else (texts, a GPU, a model that cannot be copied) runs through the model itself,
    :data:`EVAL_BATCH` rows at a time. Always in ``torch.inference_mode`` and eval mode
    (the model's mode is restored after).
    """

    def __init__(self) -> None:
        self._twins: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, model: nn.Module, split: Split) -> tuple[float, float]:
        twin = self._twin(model, split)
        if twin is None:
            return _evaluate(model, split, EVAL_BATCH, None)
        twin.load_state_dict(model.state_dict())
        return _evaluate(twin, split, EVAL_BATCH_IMAGES, torch.channels_last)

    def _twin(self, model: nn.Module, split: Split) -> nn.Module | None:
        first = split.inputs[0] if split.inputs else None
        if (
            first is None
            or first.dim() != 4
            or not first.is_floating_point()
            or first.device.type != "cpu"
            or any(p.device.type != "cpu" for p in model.parameters())
        ):
            return None
        if model not in self._twins:
            try:
                twin = copy.deepcopy(model)
            except Exception:  # a model that will not copy is evaluated as it is
                self._twins[model] = None
                return None
            for t in (*twin.parameters(), *twin.buffers()):
                t.requires_grad_(False)
            # (Module.to takes memory_format; its type stubs do not say so.)
            twin = twin.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self._twins[model] = twin.eval()
        return self._twins[model]


def _evaluate(
    model: nn.Module, split: Split, batch_size: int, layout: torch.memory_format | None
) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(split), batch_size):
                stop = start + batch_size
                inputs = [t[start:stop].to(device) for t in split.inputs]
                if layout is not None:
                    inputs[0] = inputs[0].contiguous(memory_format=layout)
                labels = split.labels[start:stop].to(device)
                logits = model(*inputs)
                total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(dim=1) == labels).sum())
    finally:
        model.train(was_training)
    n = max(1, len(split))
    return total_loss / n, correct / n


_DEFAULT_EVALUATOR = Evaluator()


def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (see :class:`Evaluator`)."""
    return _DEFAULT_EVALUATOR(model, split)


class Stopped(Exception):
    """The run was ended by ``train``'s ``should_stop``."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(directory: str | os.PathLike[str]) -> TrainState:
    """The state saved by :func:`train` in ``directory`` (see :meth:`TrainState.load`)."""
    return TrainState.load(directory)


def reapply_hyperparameters(
    cfg: TrialConfig, saved: Mapping[str, Any], policy: Policy, total_steps: int
) -> list[str]:
    """Re-apply ``cfg``'s hyperparameters over a checkpoint taken under ``saved``.

    Population Based Training continues a trial from a donor's checkpoint under the
    donor's config perturbed (e.g. ``lr`` x 1.2). The checkpoint holds the donor's
    optimizer and policy, LRs included; without this the perturbation would be lost.

    * ``lr``: the policy's base LRs are scaled by ``cfg.lr / saved lr``; its own state
      (factor, history) is the donor's, so the LR continues as perturbed base x factor.
    * ``optimizer_params``: written into every parameter group that has the key.
    * ``policy_params``: the attributes a changed parameter sets at construction
      (found by building the policy under both) take the new values; the rest of the
      state stays the donor's.

    Returns the names re-applied (empty for an ordinary restart).
    """
    changed: list[str] = []
    old_lr = saved.get("lr")
    if cfg.lr is not None and old_lr and not math.isclose(cfg.lr, old_lr, rel_tol=1e-12):
        policy.rebase([base * cfg.lr / old_lr for base in policy.base_lrs])
        changed.append("lr")
    old_opt = dict(saved.get("optimizer_params") or {})
    for key, value in cfg.optimizer_params.items():
        if old_opt.get(key) != value:
            for group in policy.optimizer.param_groups:
                if key in group:
                    group[key] = tuple(value) if isinstance(group[key], tuple) else value
            changed.append(f"optimizer_params.{key}")
    old_pol = dict(saved.get("policy_params") or {})
    if old_pol != dict(cfg.policy_params):

        def fresh(params: Mapping[str, Any]) -> dict[str, Any]:
            dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            return build(cfg.policy, dummy, total_steps=total_steps, **params).state_dict()

        before, after = fresh(old_pol), fresh(cfg.policy_params)
        state = policy.state_dict()
        for key, value in after.items():
            if key in state and _differs(before.get(key), value):
                state[key] = value
        policy.load_state_dict(state)
        changed.extend(f"policy_params.{k}" for k in sorted(set(old_pol) | set(cfg.policy_params))
                       if old_pol.get(k) != cfg.policy_params.get(k))  # fmt: skip
    return changed


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except (RuntimeError, ValueError):  # tensors: compare by value
        return not torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(
    config: Mapping[str, Any] | TrialConfig,
    report: Report,
    *,
    resume: TrainState | Mapping[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train one model under one policy; returns the last metrics reported.

    The trial runs under its hardware profile's caps (threads, cores, GPU memory) and
    the memory guard, which ends it with ``MemoryCapExceeded`` past its cap.

    Args:
        config: a :class:`TrialConfig` or a dict for :meth:`TrialConfig.from_dict`.
        report: called as ``report(metrics, checkpoint_dir)`` at each report.
        resume: a checkpoint from :func:`load_checkpoint` to continue from (or a dict of
            its fields, as :func:`torch.load` reads a ``checkpoint.pt``).
        should_stop: asked after every optimizer step; when it answers ``True`` the run
            ends at once with :class:`Stopped` (no further report), as when a scheduler
            stops a trial whose reports are sent ahead (``trainables.ray_trainable``).
    """
    started = time.perf_counter()
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    state = TrainState.from_dict(resume) if isinstance(resume, Mapping) else resume
    profile = cfg.hardware_profile()
    with hardware.applied(profile, threads=cfg.threads) as caps:
        sampler = ResourceSampler(memory_limit_mb=caps.memory_mb, profile=caps.profile)
        with sampler:
            return _train(cfg, report, state, caps, sampler, started, should_stop)


@dataclass
class _Window:
    """What the loop gathers between two reports (a fresh one after each report)."""

    start: int  # the step number of lr_trace's first entry (steps count from 1)
    lr_trace: list[float] = field(default_factory=list)  # the step size of each step
    loss: float = 0.0  # training losses of the steps that updated, summed
    n: int = 0  # steps that updated
    samples: int = 0  # training rows seen
    t0: float = field(default_factory=time.perf_counter)
    # Where the window's time went (the time/* metrics).
    steps_s: float = 0.0  # training steps, policy.step excluded
    policy_s: float = 0.0  # inside policy.step
    eval_s: float = 0.0  # evaluations
    report_s: float = 0.0  # the previous report's report() call


@dataclass
class _Trial:
    """One trial's objects and counters, handed from step to step of :func:`_train`."""

    cfg: TrialConfig
    caps: hardware.Applied
    sampler: ResourceSampler
    device: torch.device
    data: TaskData
    model: nn.Module
    opt_run: optimizers.Run  # the optimizer, and what it keeps besides (anchors, averages)
    policy: Policy
    evaluator: Evaluator
    order: torch.Generator  # the data order, and nothing else
    batch_size: int
    steps_per_epoch: int
    total_steps: int

    # Saved in every checkpoint (the counters are summed over restarts).
    step: int = 0
    position: int = 0  # rows of the current epoch's permutation used
    permutation: torch.Tensor | None = None  # None between epochs: the next step draws one
    wall_s: float = 0.0
    skipped: int = 0
    best_val_acc: float = -math.inf
    reached: tuple[int, float] | None = None  # (step, wall_s) when val_acc first >= target
    policy_s: float = 0.0  # time inside policy.step, probes included: the policy's own cost
    initial_val_loss: float | None = None  # None until measured (or restored)
    cpu_s_before: float = 0.0  # CPU seconds of earlier runs of this trial (restarts)
    loop_s_before: float = 0.0  # loop wall time of earlier runs

    # This process only.
    bad_run: int = 0  # non-finite steps in a row
    reapplied: list[str] = field(default_factory=list)  # what a PBT exploit changed
    restored_lr: float = math.nan  # the step size the checkpoint held
    first_step: int = 1  # the first step this process takes
    cpu_reported: float = 0.0  # this process's CPU seconds at its last report
    loop_t0: float = 0.0
    window: _Window = field(default_factory=lambda: _Window(start=1))
    started: float = 0.0  # when train() was called (this process)
    data_s: float = 0.0  # loading the data (this process)
    model_s: float = 0.0  # building model, optimizer and policy, and restoring (this process)

    def evaluate(self, split: Split) -> tuple[float, float]:
        """Loss and accuracy on ``split`` of the weights the optimizer stands for."""
        t0 = time.perf_counter()
        try:
            return _evaluate_run(self.opt_run, split, self.evaluator)
        finally:
            self.window.eval_s += time.perf_counter() - t0


def _evaluate_run(
    opt_run: optimizers.Run, split: Split, evaluator: Evaluator
) -> tuple[float, float]:
    with opt_run.eval_model() as weights:  # Schedule-Free's x, DoG's average
        return evaluator(weights, split)


def _train(
    cfg: TrialConfig,
    report: Report,
    resume: TrainState | None,
    caps: hardware.Applied,
    sampler: ResourceSampler,
    started: float,
    should_stop: Callable[[], bool] | None,
) -> dict[str, Any]:
    """Set up (or restore), then step, and report every so often, until the run ends."""
    trial = _setup(cfg, caps, sampler)
    trial.started = started
    if resume is not None:
        t0 = time.perf_counter()
        _restore(trial, resume)
        trial.model_s += time.perf_counter() - t0
    # The untrained model's validation loss: a later one far above it has exploded.
    # A checkpoint carries the one measured before its run's first step.
    if trial.initial_val_loss is None:
        trial.initial_val_loss = trial.evaluate(trial.data.val)[0]
    trial.model.train()
    trial.opt_run.train_mode()
    trial.first_step = trial.step + 1
    trial.window = _Window(start=trial.first_step, eval_s=trial.window.eval_s)
    trial.loop_t0 = trial.window.t0
    status, last = "running", {}  # last: the metrics of the latest report

    while status == "running":
        if trial.step < trial.total_steps:
            _train_step(trial)
            if should_stop is not None and should_stop():
                raise Stopped(f"stopped after step {trial.step}")
        # Report every report_every steps, at the end, and as soon as the run is stuck.
        at_end = trial.step >= trial.total_steps
        stuck = trial.bad_run >= cfg.max_bad_steps
        if not (at_end or stuck or trial.step % cfg.report_every == 0):
            continue
        val_loss, val_acc = trial.evaluate(trial.data.val)
        reason = _divergence(trial, val_loss)
        elapsed = _tally(trial, val_acc)
        last = _metrics(trial, val_loss, val_acc, elapsed, reason)
        status = last["status"]
        report_s = _report(trial, last, report, _checkpoint_due(trial, status))
        trial.window = _Window(start=trial.step + 1, report_s=report_s)
    return last


def _checkpoint_due(trial: _Trial, status: str) -> bool:
    """Whether this report carries a checkpoint: every ``checkpoint_every``-th report
    (counted by step, so the same reports in every run and restart) and the last one; a
    diverged run's last never (no checkpoint holds non-finite weights)."""
    if status == "diverged":
        return False
    if status != "running":
        return True
    cfg = trial.cfg
    return trial.step % cfg.report_every == 0 and (
        (trial.step // cfg.report_every) % cfg.checkpoint_every == 0
    )


def _setup(cfg: TrialConfig, caps: hardware.Applied, sampler: ResourceSampler) -> _Trial:
    """Seed, load the data, build the model, its optimizer and the policy."""
    assert cfg.lr is not None and cfg.batch_size is not None and cfg.epochs is not None
    assert cfg.optimizer is not None
    device = cfg.torch_device()
    task = tasks.get(cfg.task)

    # Seeds are paired across policies: the same seed gives the same initial weights
    # and the same data order whatever the policy.
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    data = task.load(cfg.data_request())
    t1 = time.perf_counter()
    model = task.model(data, cfg.task_options()).to(device)
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # PyTorch's CPU convolutions and pooling run faster in the channels-last layout:
        # a training step of the plan-2 CNN (MNIST, CIFAR-10) and of the digits CNN took
        # 1.1-1.5x less time, one thread, batch 32 (benchmarks/trial_cost.py measures the
        # trial). The arithmetic is the same up to the order of float summation.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # Data and model are in memory: the first place a cap can bite. Read now, not at the
    # sampling thread's next tick: a short run can end before that.
    sampler.check(fresh=True)
    bn_order = torch.Generator().manual_seed(cfg.seed + 1)  # never touches the data order
    batch_size = cfg.batch_size

    def bn_batches() -> Iterator[tuple[torch.Tensor, ...]]:
        # Schedule-Free re-measures BatchNorm statistics on a few training batches.
        rows = torch.randperm(len(data.train), generator=bn_order)
        for k in range(optimizers.BN_BATCHES):
            chunk = rows[k * batch_size : (k + 1) * batch_size]
            if len(chunk):
                yield data.train.take(chunk).to(device).inputs

    opt_run = optimizers.build(
        cfg.optimizer, model, cfg.lr, cfg.optimizer_params, bn_batches=bn_batches
    )
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    evaluator = Evaluator()

    def probe() -> float:
        return _evaluate_run(opt_run, data.probe, evaluator)[0]

    policy = build(
        cfg.policy, opt_run.optimizer, evaluate=probe, total_steps=total_steps,
        **cfg.policy_params,
    )  # fmt: skip
    return _Trial(
        cfg=cfg,
        caps=caps,
        sampler=sampler,
        device=device,
        data=data,
        model=model,
        opt_run=opt_run,
        policy=policy,
        evaluator=evaluator,
        order=torch.Generator().manual_seed(cfg.seed),
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        data_s=t1 - t0,
        model_s=time.perf_counter() - t1,
    )


def _restore(trial: _Trial, state: TrainState) -> None:
    """Continue from ``state``: weights, optimizer, policy, RNGs and counters."""
    trial.model.load_state_dict(state.model)
    trial.opt_run.optimizer.load_state_dict(state.optimizer)
    # After the optimizer: the policy writes its restored LR into the groups.
    trial.policy.load_state_dict(state.policy)
    trial.opt_run.load_state_dict(state.optimizer_run)
    # Population Based Training restores a donor's checkpoint under a perturbed config.
    trial.restored_lr = trial.opt_run.step_size()
    trial.reapplied = reapply_hyperparameters(
        trial.cfg, state.config, trial.policy, trial.total_steps
    )
    trial.order.set_state(state.order_rng)
    torch.set_rng_state(state.torch_rng)
    if trial.device.type == "cuda" and state.cuda_rng is not None:
        torch.cuda.set_rng_state(state.cuda_rng)
    random.setstate(state.python_rng)
    np.random.set_state(state.numpy_rng)
    trial.step, trial.position, trial.permutation = state.step, state.position, state.permutation
    trial.wall_s, trial.skipped = state.wall_s, state.skipped
    trial.best_val_acc, trial.reached = state.best_val_acc, state.reached
    trial.policy_s = state.policy_s
    trial.initial_val_loss = state.initial_val_loss
    trial.cpu_s_before, trial.loop_s_before = state.cpu_s, state.loop_s


def _next_batch(trial: _Trial) -> Split:
    """The next training batch, in a fresh seeded permutation each epoch."""
    n_train = len(trial.data.train)
    if trial.permutation is None:
        trial.permutation = torch.randperm(n_train, generator=trial.order)
    rows = trial.permutation[trial.position : trial.position + trial.batch_size]
    trial.position += trial.batch_size
    if trial.position >= n_train:
        trial.permutation, trial.position = None, 0
    return trial.data.train.take(rows).to(trial.device)


def _train_step(trial: _Trial) -> None:
    """One optimizer step: batch, forward, backward, clip, step (when finite), policy."""
    window, optimizer = trial.window, trial.opt_run.optimizer
    t_start = time.perf_counter()
    batch = _next_batch(trial)
    logits = trial.model(*batch.inputs)
    loss = F.cross_entropy(logits, batch.labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # .item() is a sync point on a GPU; the policy needs the value every step.
    loss_value = loss.item()
    finite = math.isfinite(loss_value)
    if finite and trial.cfg.clip_grad is not None:
        norm = torch.nn.utils.clip_grad_norm_(trial.model.parameters(), trial.cfg.clip_grad)
        finite = bool(torch.isfinite(norm))
    if finite:
        # A non-finite loss or gradient never reaches the weights: skip the update.
        optimizer.step()
        trial.opt_run.after_step()
        trial.bad_run = 0
        window.loss += loss_value
        window.n += 1
    else:
        trial.skipped += 1
        trial.bad_run += 1
    # After the step: anchors set their step size inside it.
    window.lr_trace.append(trial.opt_run.step_size())
    t0 = time.perf_counter()
    trial.policy.step(loss_value)
    t1 = time.perf_counter()
    trial.policy_s += t1 - t0
    window.policy_s += t1 - t0
    trial.step += 1
    window.samples += len(batch)
    trial.sampler.check()
    window.steps_s += time.perf_counter() - t_start - (t1 - t0)


def _divergence(trial: _Trial, val_loss: float) -> str | None:
    """Why the run has diverged, or ``None`` while it has not."""
    cfg = trial.cfg
    if trial.bad_run >= cfg.max_bad_steps:
        return (
            f"{trial.bad_run} optimizer steps in a row had a non-finite loss or gradient "
            f"(max_bad_steps={cfg.max_bad_steps}); their updates were skipped"
        )
    if not _finite_params(trial.model):
        return "the weights became non-finite"
    if not math.isfinite(val_loss):
        return "the validation loss is not finite"
    # (initial is measured before the first step: ``is not None`` only narrows its type.)
    factor, initial = cfg.diverge_factor, trial.initial_val_loss
    if factor is not None and initial is not None and val_loss > factor * initial:
        return f"the validation loss {val_loss:.3g} exceeds {factor:g}x its initial {initial:.3g}"
    return None


def _tally(trial: _Trial, val_acc: float) -> float:
    """Close the window's clock and update the run's totals; returns the window's seconds."""
    elapsed = time.perf_counter() - trial.window.t0  # the evaluation included
    trial.wall_s += elapsed
    trial.best_val_acc = max(trial.best_val_acc, val_acc)
    target = trial.cfg.target
    if target is not None and trial.reached is None and val_acc >= target:
        trial.reached = (trial.step, trial.wall_s)
    return elapsed


def _metrics(
    trial: _Trial, val_loss: float, val_acc: float, elapsed: float, reason: str | None
) -> dict[str, Any]:
    """The report's metrics (the module docstring lists them), ``status`` included."""
    step, window = trial.step, trial.window
    metrics: dict[str, Any] = {
        "step": step,
        "epoch": step / trial.steps_per_epoch,
        "train_loss": window.loss / window.n if window.n else math.nan,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": trial.opt_run.step_size(),
        "samples_per_s": window.samples / elapsed if elapsed > 0 else math.nan,
        "wall_s": trial.wall_s,
        "window_s": elapsed,
        "loop_s": trial.loop_s_before + (time.perf_counter() - trial.loop_t0),
        "skipped_steps": trial.skipped,
        "total_steps": trial.total_steps,
        "num_classes": trial.data.num_classes,  # chance level, for stoppers
        "lr_trace": window.lr_trace,
        "lr_trace_start": window.start,
        "policy_ms_per_step": 1000.0 * trial.policy_s / step if step else math.nan,
        **{f"policy/{k}": v for k, v in trial.policy.diagnostics().items()},
        **trial.sampler.snapshot(),
    }
    # The CPU this process spent since its last report: summed over a trial's reports it
    # is the compute the trial ran itself, where ``proc/cpu_s`` (cumulative, restored from
    # the checkpoint) also holds a PBT donor's CPU before the exploit.
    metrics["proc/cpu_window_s"] = metrics["proc/cpu_s"] - trial.cpu_reported
    trial.cpu_reported = metrics["proc/cpu_s"]
    metrics["proc/cpu_s"] += trial.cpu_s_before
    if trial.reached is not None:
        metrics["steps_to_target"], metrics["wall_s_to_target"] = trial.reached
    status = "running"
    if reason is not None or step >= trial.total_steps:
        status = "finished" if reason is None else "diverged"
        if reason is not None:
            metrics["diverged_reason"] = f"{reason} at step {step} (lr {metrics['lr']:.3g})"
        metrics["best_val_acc"] = trial.best_val_acc
        if trial.data.test is not None:
            metrics["test_loss"], metrics["test_acc"] = trial.evaluate(trial.data.test)
    metrics["time/steps_s"] = window.steps_s
    metrics["time/policy_s"] = window.policy_s
    metrics["time/eval_s"] = window.eval_s  # the test split's included
    metrics["time/report_s"] = window.report_s
    metrics["time/process_s"] = time.perf_counter() - trial.started
    if window.start == trial.first_step:
        # Once per process: where the data came from, and the caps it ran under.
        if trial.data.notes:
            metrics["data_notes"] = "; ".join(trial.data.notes)
        metrics["time/data_s"] = trial.data_s
        metrics["time/model_s"] = trial.model_s
        metrics.update(trial.caps.metrics())
        if trial.reapplied:
            metrics["reapplied"] = ",".join(trial.reapplied)
            metrics["restored_lr"] = trial.restored_lr  # the step size the checkpoint held
    metrics["status"] = status
    return metrics


def _checkpoint(trial: _Trial, metrics: Mapping[str, Any]) -> TrainState:
    """What a resume needs to continue exactly where ``metrics`` were reported."""
    return TrainState(
        model=trial.model.state_dict(),
        optimizer=trial.opt_run.optimizer.state_dict(),
        policy=trial.policy.state_dict(),
        optimizer_run=trial.opt_run.state_dict(),
        order_rng=trial.order.get_state(),
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state() if trial.device.type == "cuda" else None,
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),
        step=trial.step,
        position=trial.position,
        permutation=trial.permutation,
        wall_s=trial.wall_s,
        loop_s=metrics["loop_s"],
        skipped=trial.skipped,
        best_val_acc=trial.best_val_acc,
        reached=trial.reached,
        policy_s=trial.policy_s,
        initial_val_loss=trial.initial_val_loss,
        cpu_s=metrics["proc/cpu_s"],
        config=trial.cfg.to_dict(),
    )


def _report(trial: _Trial, metrics: dict[str, Any], report: Report, checkpoint: bool) -> float:
    """Hand ``metrics`` (and a checkpoint, when ``checkpoint``) to ``report``; the
    checkpoint is deleted after. Returns the seconds the ``report`` call took."""
    t0 = time.perf_counter()
    checkpoint_dir = tempfile.mkdtemp(prefix="tune-alr-ckpt-") if checkpoint else None
    try:
        if checkpoint_dir is not None:
            _checkpoint(trial, metrics).save(checkpoint_dir)
        t1 = time.perf_counter()
        metrics["time/checkpoint_s"] = t1 - t0 if checkpoint_dir is not None else 0.0
        report(metrics, checkpoint_dir)
    finally:
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return time.perf_counter() - t1
