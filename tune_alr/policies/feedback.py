"""Plan 1's performance-feedback policy, and what it needs to fix a mis-set LR.

The plan's rule: every ``interval`` (100) steps, measure the validation loss; if it
improved by at least ``threshold`` (1%) relative to the previous check, raise the LR by
``factor`` (10%), otherwise lower it by 10%. Those are this policy's defaults.

As written, that rule moves the LR by at most x0.53..x1.77 in 600 steps (measured in
the project's DESIGN.md), so it cannot correct a start that is 10x off, and it has no
answer to a diverging run. On top of it, and each switchable:

* ``accelerate``: consecutive decisions in the same direction compound (the k-th in a
  row multiplies by ``(1 +/- factor) ** k``, k capped at ``max_streak``), as Rprop does
  with step sizes; a cut right after a raise also takes that raise back (the "bold
  driver" retreat), so a run of raises cannot overshoot by more than one step.
* ``early_interval``: a faster cadence during the first ``early_steps`` steps.
* ``guard``: a non-finite training loss, or a signal more than ``divergence_ratio``
  times the previous one, cuts the LR by ``guard_cut`` at once and forbids raising it
  for ``cooldown`` checks. A raise the cooldown holds back moves nothing, so it does not
  count in the streak (a later cut takes back only raises actually applied).
* ``rate_threshold``: the threshold is a rate, ``threshold`` per ``interval`` steps, so
  a check ``k`` steps after the last one asks for ``threshold * k / interval``. The
  plan's 1% is per 100 steps; asking 1% of every early check, 25 steps apart, is a rule
  four times stricter, which on AG News's BiLSTM from Adam at 1e-3 read the loss's
  initial plateau (0.4% per 25 steps) as failure, cut at every check, the cuts
  compounded, and the LR reached its floor (0.35-0.39 accuracy where a constant 1e-3
  reaches 0.76). During the protective ramp (below) checks still ask the full
  threshold, so that a ramp not plainly paying off ends early: a start too high is
  then never reached. At the plan's fixed cadence it changes nothing.
* ``min_factor`` / ``max_factor``: the LR stays within those multiples of its start.
* ``warmup_steps`` / ``warmup_start`` (the protective start): the LR starts at
  ``warmup_start`` (0.1) times the given LR and rises geometrically to it over the first
  ``warmup_steps`` (100, and at most a quarter of the run when its length is known)
  steps, while the checks run as usual (their raises and cuts
  multiply the ramp). The first cut during the ramp (a check without progress, or the
  guard) ends it where it stands: the LR reached so far becomes the policy's own and
  the rule carries on from there, so a start LR that is too high is never reached.
  Without it, a run started well above its best LR takes its first steps at full LR,
  before any check: Adam at 0.01 on MNIST (the plan's setting) let the CNN die in
  those steps (10.8% accuracy in the bench), and no later cut brings dead units back.

``build("plan1-literal", ...)`` is this policy with all of them off, so both the plan's
rule and the extended one are measured.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from .base import Evaluate, check_bool, check_fraction, check_int, check_positive
from .interval import IntervalPolicy


def feedback_decision(
    previous: float | None,
    current: float,
    *,
    threshold: float,
    factor: float,
    streak: int,
    accelerate: bool,
    max_streak: int,
) -> tuple[float, int]:
    """Plan 1's rule as a pure function: ``(multiplier, new_streak)`` for one check.

    ``streak`` counts consecutive decisions: positive for raises, negative for cuts.
    The first check (no ``previous``) only records the signal: multiplier 1.
    """
    if previous is None:
        return 1.0, 0
    improvement = (previous - current) / abs(previous) if previous != 0 else 0.0
    up = improvement >= threshold
    if not accelerate:
        return (1.0 + factor if up else 1.0 - factor), (1 if up else -1)
    if up:
        streak = streak + 1 if streak > 0 else 1
        return (1.0 + factor) ** min(streak, max_streak), streak
    multiplier = 1.0 - factor
    if streak > 0:
        # The last raise did not pay off: take it back as well (the "bold driver" retreat).
        multiplier /= (1.0 + factor) ** min(streak, max_streak)
    streak = streak - 1 if streak < 0 else -1
    return multiplier * (1.0 - factor) ** (min(-streak, max_streak) - 1), streak


class Feedback(IntervalPolicy):
    """Adjust the LR from real-time performance feedback (plan 1).

    Call ``step(loss)`` after every optimizer step. Give ``evaluate`` (a cheap
    validation-loss probe on a fixed small held-out subset) to follow the plan; without
    it the policy uses the mean training loss between checks, and says so once.

    Args:
        interval: steps between checks. Default 100 (plan 1).
        factor: relative LR change per decision, in (0, 1). Default 0.1 (plan 1: 10%).
        threshold: relative improvement of the signal that counts as progress, per
            ``interval`` steps (see ``rate_threshold``). Default 0.01 (plan 1: 1%).
        accelerate: compound consecutive same-direction decisions. Default True.
            Booleans are parsed strictly (see :func:`~tune_alr.policies.base.check_bool`):
            the string ``"False"`` is false, ``"nope"`` an error.
        max_streak: cap on the compounding power. Default 5 (at most x1.61 / x0.59
            per check).
        early_interval: check spacing during the first ``early_steps`` steps, or
            ``None`` for the plan's fixed cadence. Default 25.
        early_steps: length of the early phase. Default 400.
        guard: enable the divergence guard. Default True.
        divergence_ratio: a signal above this multiple of the previous one counts as
            divergence. Default 2.0.
        guard_cut: LR multiplier when the guard trips, in (0, 1). Default 0.5.
        cooldown: checks after a trip during which the LR is not raised. Default 2.
            A withheld raise counts as no decision: it ends the current streak, and
            the next raise or cut starts a new one.
        min_factor, max_factor: bounds on the LR as multiples of the initial LR.
            Defaults 1e-3 and 100. Use 0 and ``math.inf`` to disable.
        warmup_steps: length of the protective start in steps, at most a quarter
            of ``total_steps`` when that is given; 0 disables it. Default 100.
        warmup_start: the LR's multiplier at the first step of the protective start, in
            (0, 1]. Default 0.1.
        rate_threshold: ``threshold`` is per ``interval`` steps, scaled to each check's
            distance from the previous sane one, once the protective ramp has ended.
            Default True.
    """

    diagnostic_keys = (
        "checks", "last_signal", "streak", "cooldown_left", "guard_trips", "warmup",
    )  # fmt: skip

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        interval: int = 100,
        factor: float = 0.1,
        threshold: float = 0.01,
        accelerate: bool = True,
        max_streak: int = 5,
        early_interval: int | None = 25,
        early_steps: int = 400,
        guard: bool = True,
        divergence_ratio: float = 2.0,
        guard_cut: float = 0.5,
        cooldown: int = 2,
        min_factor: float = 1e-3,
        max_factor: float = 100.0,
        warmup_steps: int = 100,
        warmup_start: float = 0.1,
        rate_threshold: bool = True,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        check_fraction("factor", factor)
        check_int("warmup_steps", warmup_steps, minimum=0)
        check_fraction("warmup_start", warmup_start, high=1.0 + 1e-12)
        check_positive("threshold", threshold, allow_zero=True)
        check_int("max_streak", max_streak)
        if not (isinstance(divergence_ratio, (int, float)) and divergence_ratio > 1.0):
            raise ValueError(f"divergence_ratio must be > 1, got {divergence_ratio!r}.")
        check_fraction("guard_cut", guard_cut)
        check_int("cooldown", cooldown, minimum=0)
        check_positive("min_factor", min_factor, allow_zero=True)
        if not (isinstance(max_factor, (int, float)) and max_factor >= 1.0):
            raise ValueError(f"max_factor must be >= 1 (or math.inf), got {max_factor!r}.")
        if min_factor > 1.0:
            raise ValueError(f"min_factor must be <= 1, got {min_factor!r}.")
        self.adjust = factor
        self.threshold = threshold
        self.accelerate = check_bool("accelerate", accelerate)
        self.max_streak = max_streak
        self.guard = check_bool("guard", guard)
        self.divergence_ratio = float(divergence_ratio)
        self.guard_cut = guard_cut
        self.cooldown = cooldown
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.streak = 0
        self.cooldown_left = 0
        self.guard_trips = 0
        self.reference: float | None = None  # the signal of the last sane check
        self.reference_step = 0  # and its step
        self.rate_threshold = check_bool("rate_threshold", rate_threshold)
        if total_steps is not None and warmup_steps > 0:
            # A quarter of the run at most: a short run (digits' 100 steps) would otherwise
            # spend all of it below the LR it was given.
            warmup_steps = min(warmup_steps, max(1, total_steps // 4))
        self.warmup_steps = warmup_steps
        self.warmup_start = float(warmup_start)
        # The protective start: the ramp's multiplier on the LR (1 once it has ended).
        self.warming = warmup_steps > 0
        self.warmup = self.warmup_start if self.warming else 1.0
        super().__init__(
            optimizer,
            interval=interval,
            early_interval=early_interval,
            early_steps=early_steps if early_interval is not None else 0,
            total_steps=total_steps,
            evaluate=evaluate,
        )

    def _clamp(self, value: float) -> float:
        return min(self.max_factor, max(self.min_factor, value))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Each group's base LR times the factor, times the ramp of the protective start."""
        return [float(base) * self.factor * self.warmup for base in self.base_lrs]

    def _next_factor(self, loss: float | None) -> float:
        before = self.factor
        factor = super()._next_factor(loss)
        if not self.warming:
            return factor
        if factor < before:
            # A cut during the ramp ends it: the LR reached becomes the policy's own.
            factor = self._clamp(factor * self.warmup)
            self.warming, self.warmup = False, 1.0
        elif self.last_epoch >= self.warmup_steps:
            self.warming, self.warmup = False, 1.0
        else:
            self.warmup = self.warmup_start ** (1.0 - self.last_epoch / self.warmup_steps)
        return factor

    def _trip(self) -> float:
        self.guard_trips += 1
        self.streak = 0
        self.cooldown_left = self.cooldown
        return self._clamp(self.factor * self.guard_cut)

    def _on_step(self, loss: float | None) -> float:
        if self.guard and loss is not None and not math.isfinite(loss):
            return self._trip()
        return self.factor

    def _on_check(self, signal: float) -> float:
        previous = self.reference
        if self.guard and (
            not math.isfinite(signal)
            or (previous is not None and signal > self.divergence_ratio * previous)
        ):
            # The reference stays the last sane signal, not the exploded one.
            return self._trip()
        if not math.isfinite(signal):
            return self.factor
        threshold = self.threshold
        if self.rate_threshold and not self.warming:
            # During the protective ramp every check asks the full threshold: a ramp
            # that is not plainly paying off ends early (a start too high is never
            # reached); after it, the threshold is the plan's rate.
            threshold *= (self.last_epoch - self.reference_step) / self.interval
        self.reference, self.reference_step = signal, self.last_epoch
        multiplier, self.streak = feedback_decision(
            previous,
            signal,
            threshold=threshold,
            factor=self.adjust,
            streak=self.streak,
            accelerate=self.accelerate,
            max_streak=self.max_streak,
        )
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            if multiplier > 1.0:
                # The raise is withheld, so it must not count as one: the streak is what
                # the bold-driver retreat takes back, and it may only take back raises
                # that were applied. A withheld check moved nothing, so no streak runs on.
                multiplier, self.streak = 1.0, 0
        return self._clamp(self.factor * multiplier)


def plan1_literal(optimizer: Optimizer, **params: object) -> Feedback:
    """Plan 1's rule exactly as written: fixed cadence, +-10%, no guard, no bounds, no
    protective start."""
    literal: dict[str, object] = {
        "accelerate": False,
        "early_interval": None,
        "guard": False,
        "min_factor": 0.0,
        "max_factor": math.inf,
        "warmup_steps": 0,
        "rate_threshold": False,
    }
    literal.update(params)
    return Feedback(optimizer, **literal)  # type: ignore[arg-type]
