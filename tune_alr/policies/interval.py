"""Closed-loop policies that look at a performance signal every ``interval`` steps.

The signal at a check is the ``evaluate`` probe's validation loss when a probe was
given, else the mean training loss over the steps since the previous check (windows
that do not overlap, so two consecutive checks compare independent averages). Per
step the cost is two float additions; the probe runs only at checks.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from .base import Evaluate, Policy, check_int


class IntervalPolicy(Policy):
    """Base for policies that decide at checks spaced ``interval`` steps apart.

    Subclasses implement :meth:`_on_check` (and may override :meth:`_on_step`, called
    on every step with that step's loss).

    Args:
        interval: optimizer steps between checks.
        early_interval: a shorter spacing used while ``last_epoch < early_steps``, so the
            policy can react during the first part of a run; ``None`` disables it.
        early_steps: how long the early cadence lasts, in optimizer steps.
    """

    diagnostic_keys: tuple[str, ...] = ("checks", "last_signal")

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        interval: int,
        early_interval: int | None = None,
        early_steps: int = 0,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        check_int("interval", interval)
        if early_interval is not None:
            check_int("early_interval", early_interval)
        check_int("early_steps", early_steps, minimum=0)
        self.interval = interval
        self.early_interval = early_interval
        self.early_steps = early_steps
        self.next_check = self._spacing(0)
        self.checks = 0
        self.window_sum = 0.0
        self.window_count = 0
        self.last_signal: float | None = None
        super().__init__(optimizer, total_steps=total_steps, evaluate=evaluate)

    def _spacing(self, t: int) -> int:
        if self.early_interval is not None and t < self.early_steps:
            return self.early_interval
        return self.interval

    # -- hooks ---------------------------------------------------------------------

    def _on_step(self, loss: float | None) -> float:
        """Called every step with its loss (may be non-finite); returns the factor."""
        return self.factor

    def _on_check(self, signal: float) -> float:
        """Called at each check with the signal; returns the new factor."""
        raise NotImplementedError

    # -- driver --------------------------------------------------------------------

    def _next_factor(self, loss: float | None) -> float:
        t = self.last_epoch
        if t == 0:
            return self.factor
        if loss is not None and math.isfinite(loss):
            self.window_sum += loss
            self.window_count += 1
        self.factor = self._on_step(loss)
        if t >= self.next_check:
            self.next_check = t + self._spacing(t)
            signal = self._signal()
            self.window_sum, self.window_count = 0.0, 0
            if signal is not None:
                self.checks += 1
                self.factor = self._on_check(signal)
                self.last_signal = signal
        return self.factor

    def _signal(self) -> float | None:
        probe = self._probe()
        if probe is not None:
            return probe
        self._warn_once(
            "no-probe",
            f"{type(self).__name__}: no evaluate probe given; using the mean training loss "
            "between checks as the feedback signal.",
        )
        if self.window_count == 0:
            self._warn_once(
                "no-signal",
                f"{type(self).__name__}: step() was called without a loss and there is no "
                "evaluate probe, so the LR stays unchanged. Pass policy.step(loss.item()).",
            )
            return None
        return self.window_sum / self.window_count
