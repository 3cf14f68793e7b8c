"""The base class every learning-rate policy derives from.

A policy is a PyTorch learning-rate scheduler (``torch.optim.lr_scheduler.LRScheduler``)
that is stepped once per optimizer step and may be fed that step's training loss:

    opt.step()
    policy.step(loss.item())

Every policy expresses the learning rate of each parameter group as the group's base
LR (its ``initial_lr``) times one scalar ``factor`` that the policy maintains. That keeps
parameter groups in proportion, makes the state a handful of floats, and lets bounds be
stated relative to the LR the user chose.

State lives in plain attributes, so ``state_dict()`` is every attribute except the
optimizer and the callables given at construction (the ``evaluate`` probe), as in
PyTorch's own schedulers; ``load_state_dict`` restores them and writes the restored LR
back into the optimizer, so that a policy rebuilt on a fresh optimizer continues the
identical LR sequence.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

Evaluate = Callable[[], float]

# Attributes that are wiring, not state: never saved, never overwritten by a load.
_TRANSIENT = frozenset({"optimizer", "_evaluate"})


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0 (or >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        accepted = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name} must be {accepted}, got {value!r}.")


def check_int(name: str, value: Any, *, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


# The spellings of a boolean that a config file, a command line or an environment variable
# may carry; compared after stripping whitespace and lower-casing.
_TRUE_STRINGS = frozenset({"true", "yes", "1"})
_FALSE_STRINGS = frozenset({"false", "no", "0"})


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a ``bool``, parsed strictly; ``ValueError`` for anything ambiguous.

    Accepts ``True``/``False`` (NumPy's booleans too), the integers 0 and 1, and the
    strings ``true``/``false``/``yes``/``no``/``1``/``0`` in any case with surrounding
    whitespace ignored. ``bool(value)`` is not used because it reads the string
    ``"False"`` (or ``"no"``, or ``"0"``) as true, which silently turns a feature on.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_STRINGS:
            return True
        if word in _FALSE_STRINGS:
            return False
    raise ValueError(
        f"{name} must be a boolean: True/False, 0/1 or one of the strings "
        f"'true', 'false', 'yes', 'no', '1', '0' (any case), got {value!r}."
    )


def check_fraction(name: str, value: float, *, low: float = 0.0, high: float = 1.0) -> None:
    """Raise ``ValueError`` unless ``low < value < high``."""
    if not isinstance(value, (int, float)) or not (low < value < high):
        raise ValueError(f"{name} must be in the open interval ({low}, {high}), got {value!r}.")


class Policy(LRScheduler):
    """A learning-rate policy: an ``LRScheduler`` stepped once per optimizer step.

    Subclasses implement :meth:`_next_factor`, which reads ``self.last_epoch`` (the
    number of optimizer steps taken so far) and the optional training loss of the step
    just taken, updates the subclass's own state, and returns the new LR multiplier.

    Args:
        optimizer: the wrapped optimizer; each group's current ``lr`` becomes its base.
        total_steps: the run's length in optimizer steps, when known. Schedules defined
            over a run (step, cyclic, cosine) size themselves from it; others ignore it.
        evaluate: optional zero-argument callable returning a validation-loss probe.
            Only policies that use feedback call it; the others ignore it.
    """

    #: State attributes worth logging besides ``factor`` (see :meth:`diagnostics`).
    diagnostic_keys: tuple[str, ...] = ()

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        if total_steps is not None:
            check_int("total_steps", total_steps)
        if evaluate is not None and not callable(evaluate):
            raise ValueError(f"evaluate must be a zero-argument callable, got {evaluate!r}.")
        self.total_steps = total_steps
        self._evaluate = evaluate
        self.factor = 1.0
        # LRScheduler.__init__ records base_lrs and calls step() once (last_epoch -> 0).
        super().__init__(optimizer)

    # -- the hook subclasses implement -------------------------------------------------

    def _next_factor(self, loss: float | None) -> float:
        """Advance to step ``self.last_epoch`` given the last step's loss; return the factor.

        Also called once from the constructor with ``last_epoch == 0`` and no loss, where it
        returns the factor of the first optimizer step.
        """
        raise NotImplementedError

    # -- LRScheduler interface ---------------------------------------------------------

    def step(self, loss: float | None = None) -> None:
        """Advance one optimizer step; ``loss`` is that step's training loss, if known."""
        if isinstance(loss, torch.Tensor):
            loss = float(loss.detach())
        elif loss is not None:
            loss = float(loss)
        self._step_count += 1
        self.last_epoch += 1
        self.factor = float(self._next_factor(loss))
        self._apply()

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The LR of each parameter group: its base LR times the current factor."""
        return [float(base) * self.factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """Every attribute except the optimizer and the ``evaluate`` callable."""
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state and write the restored LR into the optimizer."""
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in _TRANSIENT})
        self._apply()

    def rebase(self, base_lrs: list[float]) -> None:
        """Give the groups new base LRs, keeping the policy's state (its factor included).

        Used when a hyperparameter search changes the LR of a run in flight (Population
        Based Training's exploit-and-perturb): the LR becomes the new base x the factor.
        """
        if len(base_lrs) != len(self.base_lrs):
            raise ValueError(
                f"rebase needs one LR per parameter group ({len(self.base_lrs)}), "
                f"got {len(base_lrs)}."
            )
        for lr in base_lrs:
            check_positive("base lr", lr)
        self.base_lrs = [float(lr) for lr in base_lrs]
        for group, lr in zip(self.optimizer.param_groups, base_lrs, strict=True):
            group["initial_lr"] = float(lr)
        self._apply()

    def diagnostics(self) -> dict[str, float]:
        """The policy's state for logging (why the LR is where it is): ``factor``, the
        attributes a subclass names in ``diagnostic_keys`` where they are finite numbers,
        and for a policy with LR bounds (``min_factor``, ``max_factor``) ``at_bound``.
        """
        out: dict[str, float] = {}
        for key in ("factor", *self.diagnostic_keys):
            value = getattr(self, key, None)
            if isinstance(value, (bool, int, float)) and math.isfinite(value):
                out[key] = float(value)
        low, high = getattr(self, "min_factor", None), getattr(self, "max_factor", None)
        if isinstance(low, float) and isinstance(high, float):
            # 1 while the LR sits at one of the policy's bounds (it can act no further
            # that way), else 0: what tune_alr.PolicyStopper reads.
            pinned = self.factor <= low * (1 + 1e-9) or self.factor >= high * (1 - 1e-9)
            out["at_bound"] = 1.0 if pinned else 0.0
        return out

    # -- helpers -----------------------------------------------------------------------

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]

    def _probe(self) -> float | None:
        """The ``evaluate`` probe's value, or ``None`` when no probe was given."""
        if self._evaluate is None:
            return None
        return float(self._evaluate())

    def _warn_once(self, key: str, message: str) -> None:
        warned: set[str] = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
