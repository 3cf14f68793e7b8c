"""A Ray Tune stopper that reads the policies, and the record of why trials stopped.

    from tune_alr import PolicyStopper
    Experiment(..., stopper=PolicyStopper(target=0.97))         # or tune.RunConfig(stop=...)

:class:`PolicyStopper` stops a trial for one of three reasons, each a parameter with a
documented default (``None`` turns a rule off):

* **target reached**: ``val_acc >= target``; the rest of its budget is saved, and its
  time to target is kept (the loop reports it);
* **no progress**: ``val_acc`` within ``chance_margin`` of chance (one over the number of
  classes) for ``chance_patience`` reports in a row (default 5): a network a policy (or
  an LR) has killed does not come back, and spending its budget teaches nothing;
* **LR pinned while the loss got worse**: the policy's LR at one of its bounds
  (``policy/at_bound``) for ``pinned_patience`` reports in a row (default 5) and the
  validation loss now worse than its best of those reports: the policy has run out of
  room to act on what it sees.

Usable in any Ray Tune experiment (it reads only reported metrics). Each decision is
logged, and kept in :attr:`PolicyStopper.reasons`; :class:`StopRecorder` (a callback the
runner adds) writes the reason of every trial that ended before its last step, a
scheduler's or the stopper's, into the trial's folder (``tune_alr_stopped.json``) for
the tables, and the MLflow callback tags the trial's run with it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import tune

from .policies.base import check_fraction, check_int
from .report import STOP_FILE

log = logging.getLogger(__name__)


class PolicyStopper(tune.Stopper):
    """Stops trials that reached their target, made no progress, or whose policy is stuck.

    Args:
        target: validation accuracy that ends a trial as done early; ``None``: never.
        chance_patience: reports in a row at chance level before a trial is stopped as
            making no progress. Default 5; ``None``: never.
        chance_margin: how close to chance counts as chance (absolute accuracy).
            Default 0.02.
        pinned_patience: reports in a row with the policy's LR at a bound, the validation
            loss worse than its best of those reports, before a trial is stopped.
            Default 5; ``None``: never.
        worse_by: how much above its best of the pinned reports the validation loss must
            be to count as worse (relative). Default 0.01.
    """

    def __init__(
        self,
        target: float | None = None,
        *,
        chance_patience: int | None = 5,
        chance_margin: float = 0.02,
        pinned_patience: int | None = 5,
        worse_by: float = 0.01,
    ) -> None:
        if target is not None:
            check_fraction("target", target, high=1.0 + 1e-12)
        for name, value in (("chance_patience", chance_patience),
                            ("pinned_patience", pinned_patience)):  # fmt: skip
            if value is not None:
                check_int(name, value)
        check_fraction("chance_margin", chance_margin, high=0.5)
        check_fraction("worse_by", worse_by)
        self.target = target
        self.chance_patience = chance_patience
        self.chance_margin = chance_margin
        self.pinned_patience = pinned_patience
        self.worse_by = worse_by
        self.reasons: dict[str, str] = {}
        self._at_chance: dict[str, int] = {}
        self._pinned: dict[str, tuple[int, float]] = {}  # run length, best val_loss in it

    def __call__(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        reason = self.decide(trial_id, result)
        if reason is None:
            return False
        self.reasons[trial_id] = reason
        log.info("stopping trial %s: %s", trial_id, reason)
        return True

    def decide(self, trial_id: str, result: Mapping[str, Any]) -> str | None:
        """Why the trial should stop now, or ``None`` (updates the rules' counters)."""
        acc, loss = result.get("val_acc"), result.get("val_loss")
        if not isinstance(acc, (int, float)) or result.get("status", "running") != "running":
            return None  # no validation in this report, or the trial ends anyway
        step = result.get("step", "?")
        if self.target is not None and acc >= self.target:
            return f"target {self.target:g} reached (val_acc {acc:.4f} at step {step})"
        classes = result.get("num_classes")
        if self.chance_patience is not None and isinstance(classes, int) and classes > 0:
            chance = 1.0 / classes
            run = self._at_chance.get(trial_id, 0) + 1 if acc <= chance + self.chance_margin else 0
            self._at_chance[trial_id] = run
            if run >= self.chance_patience:
                return (
                    f"no progress: val_acc {acc:.4f} at chance ({chance:.2f}) for {run} "
                    f"reports, at step {step}"
                )
        if self.pinned_patience is not None and isinstance(loss, (int, float)):
            if result.get("policy/at_bound") == 1.0:
                run, best = self._pinned.get(trial_id, (0, math.inf))
                best = min(best, float(loss)) if math.isfinite(loss) else best
                self._pinned[trial_id] = (run + 1, best)
                worse = not math.isfinite(loss) or loss > best * (1 + self.worse_by)
                if run + 1 >= self.pinned_patience and worse:
                    return (
                        f"the policy's LR stayed at its bound for {run + 1} reports while "
                        f"the validation loss got worse ({loss:.4g}, its best there "
                        f"{best:.4g}), at step {step}"
                    )
            else:
                self._pinned.pop(trial_id, None)
        return None

    def stop_all(self) -> bool:
        return False


class ComputeBudget(tune.Stopper):
    """Ends a whole experiment once its trials have taken ``steps`` optimizer steps in all.

    For comparisons at equal compute: a search given one, two or four times a policy's
    steps stops there, whatever its scheduler made of them. Steps are counted from the
    reports' ``lr_trace`` (one entry per step a trial took itself), at report granularity.
    """

    def __init__(self, steps: int) -> None:
        check_int("steps", steps)
        self.steps = steps
        self.spent = 0

    def __call__(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        self.spent += len(result.get("lr_trace") or ())
        return False

    def stop_all(self) -> bool:
        return self.spent >= self.steps


class StopRecorder(tune.Callback):
    """Writes why a trial ended before its last step into its folder (the tables read it).

    A trial that completes with a last report still ``running`` was stopped: by
    ``stopper`` (its reason), by the stopper ending the whole experiment (``stop_all``,
    as :class:`ComputeBudget` does), or else by the scheduler ``scheduler`` names.
    """

    def __init__(self, scheduler: str, stopper: Any) -> None:
        self.scheduler = scheduler
        self.stopper = stopper
        self.recorded: set[str] = set()

    def experiment_stopped(self) -> bool:
        """Whether the stopper has ended the whole experiment (its ``stop_all``)."""
        stop_all = getattr(self.stopper, "stop_all", None)
        return bool(callable(stop_all) and stop_all())

    def reason(self, trial: Any) -> str | None:
        """Why ``trial`` stopped early, or ``None`` when it ran to its end."""
        last = getattr(trial, "last_result", None) or {}
        if last.get("status", "running") != "running" or not last:
            return None
        reasons = getattr(self.stopper, "reasons", {})
        if trial.trial_id in reasons:
            return str(reasons[trial.trial_id])
        if self.experiment_stopped():
            if isinstance(self.stopper, ComputeBudget):
                return f"the experiment's compute budget of {self.stopper.steps} steps was spent"
            return f"the stopper {type(self.stopper).__name__} ended the experiment"
        return (
            f"stopped early by the {self.scheduler} scheduler after "
            f"{last.get('training_iteration', '?')} reports (step {last.get('step', '?')})"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = self.reason(trial)
        if reason is None:
            return
        folder = Path(str(getattr(trial, "path", "") or ""))
        if folder.is_dir():  # a local experiment folder (a URI storage: MLflow has it)
            (folder / STOP_FILE).write_text(json.dumps({"reason": reason}))
            self.recorded.add(trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Ray Tune 2.60 ends every trial when the stopper's stop_all() says so without
        # calling on_trial_complete: the trials running or paused then are recorded here.
        # An experiment that ended otherwise (interrupted) leaves them to a resume.
        if not self.experiment_stopped():
            return
        for trial in trials:
            if trial.trial_id not in self.recorded:
                self.on_trial_complete(0, trials, trial)


__all__ = ["STOP_FILE", "ComputeBudget", "PolicyStopper", "StopRecorder"]
