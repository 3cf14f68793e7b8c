"""Open-loop baselines: constant, step decay, cyclical (triangular) and cosine.

Each is a pure function of the step count, so the whole state is ``last_epoch`` and
resuming is exact by construction. The factor functions are module-level and pure so
they can be tested with tables.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from .base import Evaluate, Policy, check_fraction, check_int, check_positive


def step_factor(t: int, *, step_size: int, gamma: float) -> float:
    """``gamma ** floor(t / step_size)``: the multiplier of step decay at step ``t``."""
    return float(gamma ** (t // step_size))


def triangular_factor(t: int, *, half_cycle: int, low: float, high: float) -> float:
    """Smith's triangular cycle: ``low`` at the start of each cycle, ``high`` mid-cycle."""
    position = (t % (2 * half_cycle)) / half_cycle  # in [0, 2)
    return low + (high - low) * (1.0 - abs(position - 1.0))


def cosine_factor(t: int, *, t_max: int, warmup_steps: int, min_factor: float) -> float:
    """Linear warmup over ``warmup_steps``, then half a cosine from 1 to ``min_factor``."""
    if t < warmup_steps:
        return (t + 1) / warmup_steps
    progress = min(1.0, (t - warmup_steps) / max(1, t_max - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Constant(Policy):
    """The LR the optimizer was built with, unchanged."""

    def _next_factor(self, loss: float | None) -> float:
        return 1.0


class StepDecay(Policy):
    """Step decay: multiply the LR by ``gamma`` every ``step_size`` optimizer steps.

    Args:
        step_size: steps between decays. Default: a third of ``total_steps`` (two decays
            in the run) when the run length is known, else 1000.
        gamma: the multiplier applied at each decay, in (0, 1). Default 0.1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        step_size: int | None = None,
        gamma: float = 0.1,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        if step_size is None:
            step_size = max(1, math.ceil(total_steps / 3)) if total_steps else 1000
        check_int("step_size", step_size)
        check_fraction("gamma", gamma)
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, total_steps=total_steps, evaluate=evaluate)

    def _next_factor(self, loss: float | None) -> float:
        return step_factor(self.last_epoch, step_size=self.step_size, gamma=self.gamma)


class Cyclic(Policy):
    """Cyclical learning rate, triangular policy (Smith, 2017, arXiv:1506.01186).

    The LR moves linearly between ``low * lr`` and ``high * lr`` and back, starting at
    the low end. The optimizer's LR is taken as the peak by default.

    Args:
        half_cycle: steps from the low to the high end. Default: a quarter of
            ``total_steps`` (two full cycles in the run) when known, else 2000
            (PyTorch's ``CyclicLR`` default).
        low: multiplier at the bottom of the cycle, > 0. Default 0.1.
        high: multiplier at the top of the cycle, > ``low``. Default 1.0.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        half_cycle: int | None = None,
        low: float = 0.1,
        high: float = 1.0,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        if half_cycle is None:
            half_cycle = max(1, math.ceil(total_steps / 4)) if total_steps else 2000
        check_int("half_cycle", half_cycle)
        check_positive("low", low)
        check_positive("high", high)
        if high <= low:
            raise ValueError(f"high must be greater than low={low}, got {high!r}.")
        self.half_cycle = half_cycle
        self.low = low
        self.high = high
        super().__init__(optimizer, total_steps=total_steps, evaluate=evaluate)

    def _next_factor(self, loss: float | None) -> float:
        return triangular_factor(
            self.last_epoch, half_cycle=self.half_cycle, low=self.low, high=self.high
        )


class Cosine(Policy):
    """Cosine annealing over the run (Loshchilov & Hutter, 2017), optional linear warmup.

    Args:
        t_max: steps over which the LR anneals; default ``total_steps``. One of the two
            is required.
        min_factor: the final LR as a fraction of the initial one, in [0, 1). Default 0.
        warmup_steps: linear warmup steps before annealing. Default 0.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        t_max: int | None = None,
        min_factor: float = 0.0,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        t_max = t_max if t_max is not None else total_steps
        if t_max is None:
            raise ValueError(
                "cosine needs the run length: pass t_max=<steps> or total_steps=<steps>."
            )
        check_int("t_max", t_max)
        check_int("warmup_steps", warmup_steps, minimum=0)
        if not 0.0 <= min_factor < 1.0:
            raise ValueError(f"min_factor must be in [0, 1), got {min_factor!r}.")
        self.t_max = t_max
        self.min_factor = min_factor
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, total_steps=total_steps, evaluate=evaluate)

    def _next_factor(self, loss: float | None) -> float:
        return cosine_factor(
            self.last_epoch,
            t_max=self.t_max,
            warmup_steps=self.warmup_steps,
            min_factor=self.min_factor,
        )
