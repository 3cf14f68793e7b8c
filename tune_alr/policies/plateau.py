"""Reduce-on-plateau, stepped per optimizer step with checks every ``interval`` steps.

The rule is PyTorch's ``ReduceLROnPlateau`` (relative threshold, mode "min"), applied to
the signal of :class:`~tune_alr.policies.interval.IntervalPolicy` instead of to
epoch-level metrics, so that it is compared with ``feedback`` on the same signal.
"""

from __future__ import annotations

from torch.optim import Optimizer

from .base import Evaluate, check_fraction, check_int, check_positive
from .interval import IntervalPolicy


class Plateau(IntervalPolicy):
    """Multiply the LR by ``decay`` when the signal has not improved for ``patience`` checks.

    Args:
        interval: steps between checks. Default 100.
        decay: multiplier applied on a plateau, in (0, 1). Default 0.5.
        patience: checks without improvement tolerated before a decay. Default 3.
        threshold: relative improvement that counts as one (signal < best * (1 -
            threshold)). Default 1e-4, as in PyTorch.
        cooldown: checks to wait after a decay before counting again. Default 0.
        min_factor: the LR never goes below ``min_factor`` times the initial LR.
            Default 1e-3.
    """

    diagnostic_keys = ("checks", "last_signal", "best", "bad_checks")

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        interval: int = 100,
        decay: float = 0.5,
        patience: int = 3,
        threshold: float = 1e-4,
        cooldown: int = 0,
        min_factor: float = 1e-3,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        check_fraction("decay", decay)
        check_int("patience", patience, minimum=0)
        check_positive("threshold", threshold, allow_zero=True)
        check_int("cooldown", cooldown, minimum=0)
        check_fraction("min_factor", min_factor, high=1.0 + 1e-12)
        self.decay = decay
        self.patience = patience
        self.threshold = threshold
        self.cooldown = cooldown
        self.min_factor = min_factor
        self.best = float("inf")
        self.bad_checks = 0
        self.cooldown_left = 0
        super().__init__(optimizer, interval=interval, total_steps=total_steps, evaluate=evaluate)

    def _on_check(self, signal: float) -> float:
        if signal < self.best * (1.0 - self.threshold):
            self.best = signal
            self.bad_checks = 0
        else:
            self.bad_checks += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_checks = 0
        if self.bad_checks > self.patience:
            self.bad_checks = 0
            self.cooldown_left = self.cooldown
            return max(self.min_factor, self.factor * self.decay)
        return self.factor
