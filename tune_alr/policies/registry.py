"""The policy registry: ``build(name, optimizer, **params)`` and ``available()``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from .base import Evaluate, Policy
from .feedback import Feedback, plan1_literal
from .hd import HypergradientDescent
from .meta import Meta
from .plateau import Plateau
from .schedules import Constant, Cosine, Cyclic, StepDecay

Factory = Callable[..., Policy]

_REGISTRY: dict[str, Factory] = {
    "constant": Constant,
    "step": StepDecay,
    "cyclic": Cyclic,
    "cosine": Cosine,
    "plateau": Plateau,
    "feedback": Feedback,
    "plan1-literal": plan1_literal,
    "hd": HypergradientDescent,
    "meta": Meta,
}


def available() -> list[str]:
    """The names ``build`` accepts, sorted."""
    return sorted(_REGISTRY)


def register(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Add a policy factory ``factory(optimizer, **params) -> Policy`` under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a policy name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"policy {name!r} is already registered; pass overwrite=True.")
    _REGISTRY[name] = factory


def check_name(name: str) -> None:
    """Raise ``ValueError`` naming the accepted policies unless ``name`` is one."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available())}.")


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise ``ValueError`` if ``params`` has a keyword the policy does not take."""
    check_name(name)
    target = _REGISTRY[name]
    if target is plan1_literal:
        target = Feedback
    accepted = [
        p
        for p, spec in inspect.signature(target).parameters.items()
        if p != "optimizer" and spec.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"policy {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted)}."
        )


def build(
    name: str,
    optimizer: Optimizer,
    *,
    evaluate: Evaluate | None = None,
    total_steps: int | None = None,
    **params: Any,
) -> Policy:
    """Build the policy ``name`` on ``optimizer``; ``params`` override its defaults.

    Args:
        name: one of :func:`available`.
        optimizer: the optimizer whose LR the policy drives (its current LR is the base).
        evaluate: optional zero-argument callable returning a validation-loss probe.
        total_steps: the run's length in optimizer steps, when known.
        **params: the policy's own keyword arguments.

    Raises:
        ValueError: an unknown name, an unknown parameter or a value out of range.
    """
    check_params(name, params)
    return _REGISTRY[name](optimizer, evaluate=evaluate, total_steps=total_steps, **params)
