"""The one training loop: ``train(config, report)``. It knows nothing of Ray or MLflow.

Every ``report_every`` optimizer steps (and at the end) it evaluates the validation
split, writes a checkpoint into a temporary folder and calls

    report(metrics: dict, checkpoint_dir: str | None)

The folder is deleted when ``report`` returns, so a ``report`` that wants to keep the
checkpoint copies it (Ray Tune's ``tune.report`` does). ``resume`` takes the dict that
:func:`load_checkpoint` returns and continues the run exactly: same step counter, same
data order, same LR sequence.

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
  step size the checkpoint held before (see :func:`reapply_hyperparameters`).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tune_alr import hardware, optimizers
from tune_alr.monitor import ResourceSampler
from tune_alr.policies import Policy, build

from . import tasks
from .config import TrialConfig
from .data import Split

Report = Callable[[dict[str, Any], "str | None"], None]

CHECKPOINT_FILE = "checkpoint.pt"
EVAL_BATCH = 512


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    for batch in split.batches(EVAL_BATCH):
        batch = batch.to(device)
        logits = model(*batch.inputs)
        total_loss += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == batch.labels).sum())
    model.train(was_training)
    n = max(1, len(split))
    return total_loss / n, correct / n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The state saved by :func:`train` in ``directory``."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in checkpoint folder {directory}.")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


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
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model under one policy; returns the last metrics reported.

    The trial runs under its hardware profile's caps (threads, cores, GPU memory) and
    the memory guard, which ends it with ``MemoryCapExceeded`` past its cap.

    Args:
        config: a :class:`TrialConfig` or a dict for :meth:`TrialConfig.from_dict`.
        report: called as ``report(metrics, checkpoint_dir)`` at each report.
        resume: a checkpoint from :func:`load_checkpoint` to continue from.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    profile = cfg.hardware_profile()
    with hardware.applied(profile, threads=cfg.threads) as caps:
        sampler = ResourceSampler(memory_limit_mb=caps.memory_mb, profile=caps.profile)
        with sampler:
            return _train(cfg, report, resume, caps, sampler)


def _train(
    cfg: TrialConfig,
    report: Report,
    resume: Mapping[str, Any] | None,
    caps: hardware.Applied,
    sampler: ResourceSampler,
) -> dict[str, Any]:
    assert cfg.lr is not None and cfg.batch_size is not None and cfg.epochs is not None
    assert cfg.optimizer is not None
    device = cfg.torch_device()
    task = tasks.get(cfg.task)

    # Seeds are paired across policies: the same seed gives the same initial weights
    # and the same data order whatever the policy.
    seed_everything(cfg.seed)
    data = task.load(cfg)
    model = task.build_model(data, cfg).to(device)
    sampler.check()  # data and model are in memory: the first place a cap can bite
    bn_order = torch.Generator().manual_seed(cfg.seed + 1)  # never touches the data order
    batch_size = cfg.batch_size

    def bn_batches() -> Any:
        # Schedule-Free re-measures BatchNorm statistics on a few training batches.
        rows = torch.randperm(len(data.train), generator=bn_order)
        for k in range(optimizers.BN_BATCHES):
            chunk = rows[k * batch_size : (k + 1) * batch_size]
            if len(chunk):
                yield data.train.take(chunk).to(device).inputs

    run = optimizers.build(
        cfg.optimizer, model, cfg.lr, cfg.optimizer_params, bn_batches=bn_batches
    )
    optimizer = run.optimizer
    n_train = len(data.train)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    def evaluate_on(split: Split) -> tuple[float, float]:
        with run.eval_model() as weights:  # Schedule-Free's x, DoG's average
            return evaluate(weights, split)

    def probe() -> float:
        return evaluate_on(data.probe)[0]

    policy = build(
        cfg.policy, optimizer, evaluate=probe, total_steps=total_steps, **cfg.policy_params
    )
    order = torch.Generator().manual_seed(cfg.seed)

    step, position, wall_s, skipped, bad_run = 0, 0, 0.0, 0, 0
    permutation: torch.Tensor | None = None
    best_val_acc = -math.inf
    policy_s = 0.0  # time inside policy.step, probes included: the policy's own cost
    cpu_s_before = 0.0  # CPU seconds of earlier runs of this trial (restarts)
    loop_s_before = 0.0  # loop wall time of earlier runs
    reached: tuple[int, float] | None = None  # (step, wall_s) when val_acc first >= target
    reapplied: list[str] = []  # hyperparameters a PBT exploit changed over the checkpoint
    restored_lr = math.nan
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        # After the optimizer: the policy writes its restored LR into the groups.
        policy.load_state_dict(resume["policy"])
        run.load_state_dict(resume.get("optimizer_run", {}))
        # Population Based Training restores a donor's checkpoint under a perturbed config.
        restored_lr = run.step_size()
        reapplied = reapply_hyperparameters(cfg, resume.get("config", {}), policy, total_steps)
        order.set_state(resume["order_rng"])
        torch.set_rng_state(resume["torch_rng"])
        if device.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"])
        random.setstate(resume["python_rng"])
        np.random.set_state(resume["numpy_rng"])
        step, position, wall_s = resume["step"], resume["position"], resume["wall_s"]
        skipped, permutation = resume["skipped"], resume["permutation"]
        best_val_acc = resume["best_val_acc"]
        reached = resume["reached"]
        policy_s = resume.get("policy_s", 0.0)
        cpu_s_before = resume.get("cpu_s", 0.0)
        loop_s_before = resume.get("loop_s", 0.0)

    # The untrained model's validation loss: a later one far above it has exploded.
    initial_val_loss = (
        resume["initial_val_loss"]
        if resume and "initial_val_loss" in resume
        else evaluate_on(data.val)[0]
    )
    model.train()
    run.train_mode()
    lr_trace: list[float] = []
    trace_start = first_trace = step + 1
    window_loss, window_n, window_samples = 0.0, 0, 0
    window_t0 = loop_t0 = time.perf_counter()
    status = "running"
    last: dict[str, Any] = {}

    while status == "running":
        if step < total_steps:
            if permutation is None:
                permutation = torch.randperm(n_train, generator=order)
            batch = data.train.take(permutation[position : position + cfg.batch_size]).to(device)
            position += cfg.batch_size
            if position >= n_train:
                permutation, position = None, 0

            logits = model(*batch.inputs)
            loss = F.cross_entropy(logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # .item() is a sync point on a GPU; the policy needs the value every step.
            loss_value = loss.item()
            finite = math.isfinite(loss_value)
            if finite and cfg.clip_grad is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                finite = bool(torch.isfinite(norm))
            if finite:
                # A non-finite loss or gradient never reaches the weights: skip the update.
                optimizer.step()
                run.after_step()
                bad_run = 0
                window_loss += loss_value
                window_n += 1
            else:
                skipped += 1
                bad_run += 1
            # After the step: anchors set their step size inside it.
            lr_trace.append(run.step_size())
            t0 = time.perf_counter()
            policy.step(loss_value)
            policy_s += time.perf_counter() - t0
            step += 1
            window_samples += len(batch)
            sampler.check()

        at_end = step >= total_steps
        diverged = bad_run >= cfg.max_bad_steps
        if not (at_end or diverged or step % cfg.report_every == 0):
            continue

        val_loss, val_acc = evaluate_on(data.val)
        reason = ""
        if diverged:
            reason = (
                f"{bad_run} optimizer steps in a row had a non-finite loss or gradient "
                f"(max_bad_steps={cfg.max_bad_steps}); their updates were skipped"
            )
        elif not _finite_params(model):
            diverged, reason = True, "the weights became non-finite"
        elif not math.isfinite(val_loss):
            diverged, reason = True, "the validation loss is not finite"
        elif cfg.diverge_factor is not None and val_loss > cfg.diverge_factor * initial_val_loss:
            diverged, reason = (
                True,
                (
                    f"the validation loss {val_loss:.3g} exceeds {cfg.diverge_factor:g}x its "
                    f"initial {initial_val_loss:.3g}"
                ),
            )
        elapsed = time.perf_counter() - window_t0
        wall_s += elapsed
        best_val_acc = max(best_val_acc, val_acc)
        if cfg.target is not None and reached is None and val_acc >= cfg.target:
            reached = (step, wall_s)
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "train_loss": window_loss / window_n if window_n else math.nan,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": run.step_size(),
            "samples_per_s": window_samples / elapsed if elapsed > 0 else math.nan,
            "wall_s": wall_s,
            "window_s": elapsed,
            "loop_s": loop_s_before + (time.perf_counter() - loop_t0),
            "skipped_steps": skipped,
            "total_steps": total_steps,
            "lr_trace": lr_trace,
            "lr_trace_start": trace_start,
            "policy_ms_per_step": 1000.0 * policy_s / step if step else math.nan,
            **{f"policy/{k}": v for k, v in policy.diagnostics().items()},
            **sampler.snapshot(),
        }
        metrics["proc/cpu_s"] += cpu_s_before
        if reached is not None:
            metrics["steps_to_target"], metrics["wall_s_to_target"] = reached
        if diverged or at_end:
            status = "diverged" if diverged else "finished"
            if diverged:
                metrics["diverged_reason"] = f"{reason} at step {step} (lr {metrics['lr']:.3g})"
            metrics["best_val_acc"] = best_val_acc
            if data.test is not None:
                metrics["test_loss"], metrics["test_acc"] = evaluate_on(data.test)
        if trace_start == first_trace:
            # Once per process: where the data came from, and the caps it ran under.
            if data.notes:
                metrics["data_notes"] = "; ".join(data.notes)
            metrics.update(caps.metrics())
            if reapplied:
                metrics["reapplied"] = ",".join(reapplied)
                metrics["restored_lr"] = restored_lr  # the step size the checkpoint held
        metrics["status"] = status

        # No checkpoint ever holds non-finite weights: a diverged run reports without one.
        checkpoint_dir = None if diverged else tempfile.mkdtemp(prefix="tune-alr-ckpt-")
        try:
            if checkpoint_dir is not None:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "policy": policy.state_dict(),
                        "optimizer_run": run.state_dict(),
                        "order_rng": order.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                        "python_rng": random.getstate(),
                        "numpy_rng": np.random.get_state(),
                        "step": step,
                        "position": position,
                        "permutation": permutation,
                        "wall_s": wall_s,
                        "loop_s": metrics["loop_s"],
                        "skipped": skipped,
                        "best_val_acc": best_val_acc,
                        "reached": reached,
                        "policy_s": policy_s,
                        "initial_val_loss": initial_val_loss,
                        "cpu_s": metrics["proc/cpu_s"],
                        "config": cfg.to_dict(),
                    },
                    Path(checkpoint_dir) / CHECKPOINT_FILE,
                )
            report(metrics, checkpoint_dir)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        last = metrics
        lr_trace = []
        trace_start = step + 1
        window_loss, window_n, window_samples = 0.0, 0, 0
        window_t0 = time.perf_counter()
    return last
