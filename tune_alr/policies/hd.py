"""Hypergradient descent (Baydin et al., 2018), the published method nearest to ``meta``.

A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood. "Online Learning Rate
Adaptation with Hypergradient Descent." ICLR 2018, arXiv:1703.04782.

SGD-HD and Adam-HD update the LR itself by gradient descent on the loss:

    a_t = a_{t-1} - beta * dL(theta_t) / d a_{t-1} = a_{t-1} - beta * <g_t, u_{t-1}> / a_{t-1}

where ``u_{t-1}`` is the last parameter update (for SGD ``-a g``, so this is the paper's
``a_{t-1} + beta * g_t . g_{t-1}``). The paper's ``beta``: 1e-3 for SGD-HD, 1e-7 for
Adam-HD; :func:`default_beta` picks one by the kind of update the optimizer makes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from .base import Evaluate, Policy, check_positive
from .hypergrad import observe_update, restore_buffers, snapshot

#: The published ``beta`` of Adam-HD and of SGD-HD (Baydin et al., 2018).
BETA_ADAPTIVE = 1e-7
BETA_SGD = 1e-3

# PyTorch's per-coordinate adaptive optimizers (each coordinate's step is divided by a
# running scale of its own gradients). Adafactor exists from torch 2.5 on.
_ADAPTIVE: tuple[type[Optimizer], ...] = tuple(
    cls
    for cls in (
        getattr(torch.optim, name, None)
        for name in (
            "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adafactor",
            "RMSprop", "Adagrad", "Adadelta",
        )
    )
    if isinstance(cls, type)
)  # fmt: skip


def default_beta(optimizer: Optimizer) -> float:
    """The published hypergradient step size for the kind of update ``optimizer`` makes.

    The hypergradient ``<g_t, u_{t-1}> / a_{t-1}`` is about ``|g|^2`` for an SGD-like
    update and about ``|g|_1`` (the gradient against its own scale) for a per-coordinate
    adaptive one, so the two need betas four decades apart (Baydin et al., 2018):

    * ``1e-7`` (Adam-HD) for per-coordinate adaptive optimizers: PyTorch's Adam, AdamW,
      Adamax, NAdam, RAdam, SparseAdam, Adafactor, RMSprop, Adagrad and Adadelta (and
      their subclasses), and any optimizer whose param groups carry Adam's ``betas``,
      which covers the anchors Prodigy, D-Adaptation Adam (and Adan, Lion) and
      Schedule-Free AdamW (and RAdam) without importing their packages;
    * ``1e-3`` (SGD-HD) for every other optimizer, the SGD-like ones: SGD,
      Schedule-Free SGD, D-Adaptation SGD, DoG.

    The rule reads the class and the param-group keys only, so an adaptive optimizer
    without ``betas`` from outside PyTorch (D-Adaptation AdaGrad, for one) gets the SGD
    value: pass ``beta`` explicitly for it.
    """
    if isinstance(optimizer, _ADAPTIVE):
        return BETA_ADAPTIVE
    if any("betas" in group for group in optimizer.param_groups):
        return BETA_ADAPTIVE
    return BETA_SGD


class HypergradientDescent(Policy):
    """SGD-HD / Adam-HD: the LR follows its own hypergradient, every step.

    Keeps two copies of the parameters (the last update and the parameters before it).

    Args:
        beta: the hypergradient step size. Default: :func:`default_beta`, 1e-7 for
            per-coordinate adaptive optimizers (the Adam and RMSprop families, Prodigy,
            D-Adaptation Adam, Schedule-Free AdamW) and 1e-3 for SGD-like ones, as
            published.
        min_factor, max_factor: bounds on the LR as multiples of the initial LR (the
            additive rule could otherwise make it negative). Defaults 1e-3 and 1e3.
    """

    diagnostic_keys = ("hypergradient",)

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        beta: float | None = None,
        min_factor: float = 1e-3,
        max_factor: float = 1e3,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        if beta is None:
            beta = default_beta(optimizer)
        check_positive("beta", beta)
        check_positive("min_factor", min_factor)
        if not (isinstance(max_factor, (int, float)) and max_factor >= max(1.0, min_factor)):
            raise ValueError(f"max_factor must be >= 1 and >= min_factor, got {max_factor!r}.")
        self.beta = float(beta)
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.previous, self.update = snapshot(optimizer)
        self.update_lr = 0.0  # the LR that made ``self.update`` (0: no update yet)
        self.hypergradient = 0.0
        super().__init__(optimizer, total_steps=total_steps, evaluate=evaluate)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; the parameter copies move to the parameters' device/dtype."""
        super().load_state_dict(state_dict)
        self.previous, self.update = restore_buffers(self.optimizer, self.previous, self.update)

    def _next_factor(self, loss: float | None) -> float:
        if self.last_epoch == 0:
            return self.factor
        alignment = observe_update(self.optimizer, self.previous, self.update)
        lr = float(self.base_lrs[0]) * self.factor  # the LR of the update just made
        factor = self.factor
        if self.update_lr > 0 and math.isfinite(alignment.dot):
            self.hypergradient = alignment.dot / self.update_lr
            new_lr = lr - self.beta * self.hypergradient
            factor = min(self.max_factor, max(self.min_factor, new_lr / float(self.base_lrs[0])))
        self.update_lr = lr
        return factor
