"""Hypergradient descent (Baydin et al., 2018), the published method nearest to ``meta``.

A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood. "Online Learning Rate
Adaptation with Hypergradient Descent." ICLR 2018, arXiv:1703.04782.

SGD-HD and Adam-HD update the LR itself by gradient descent on the loss:

    a_t = a_{t-1} - beta * dL(theta_t) / d a_{t-1} = a_{t-1} - beta * <g_t, u_{t-1}> / a_{t-1}

where ``u_{t-1}`` is the last parameter update (for SGD ``-a g``, so this is the paper's
``a_{t-1} + beta * g_t . g_{t-1}``). The paper's ``beta``: 1e-3 for SGD-HD, 1e-7 for
Adam-HD (the default here for Adam, AdamW and RMSprop).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from .base import Evaluate, Policy, check_positive
from .hypergrad import observe_update, snapshot

_ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)


class HypergradientDescent(Policy):
    """SGD-HD / Adam-HD: the LR follows its own hypergradient, every step.

    Keeps two copies of the parameters (the last update and the parameters before it).

    Args:
        beta: the hypergradient step size. Default: 1e-3 for SGD, 1e-7 for adaptive
            optimizers (Adam, AdamW, RMSprop, Adagrad), as published.
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
            beta = 1e-7 if isinstance(optimizer, _ADAPTIVE) else 1e-3
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
