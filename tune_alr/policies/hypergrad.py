"""What the hypergradient policies share: the last update and the alignment signal.

For an update ``u_{t-1} = theta_t - theta_{t-1}`` made with LR ``a_{t-1}``, the
derivative of the next loss with respect to that LR is (Baydin et al., 2018)

    dL(theta_t) / d a_{t-1} = <g_t, u_{t-1}> / a_{t-1}

for any optimizer whose update is linear in the LR (SGD, SGD with momentum, Adam,
RMSprop). A policy keeps ``theta`` and ``u`` of the previous step in two lists of
tensors (two copies of the parameters: the memory cost), and :func:`observe_update`
returns ``<g_t, u_{t-1}>`` and the norms, reading ``p.grad`` as ``opt.step()`` left it.
The buffers are plain attributes, so they travel in the policy's ``state_dict`` and a
resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer


@dataclass(frozen=True)
class Alignment:
    """``dot = <g_t, u_{t-1}>``, the norms of both, and ``cos`` (0 when either is 0)."""

    dot: float
    grad_norm: float
    update_norm: float

    @property
    def cos(self) -> float:
        denominator = self.grad_norm * self.update_norm
        return self.dot / denominator if denominator > 0 else 0.0


def _params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def snapshot(optimizer: Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(previous parameters, previous update)`` buffers: a copy of theta and zeros."""
    previous = [p.detach().clone() for p in _params(optimizer)]
    return previous, [torch.zeros_like(p) for p in previous]


@torch.no_grad()
def observe_update(
    optimizer: Optimizer, previous: list[torch.Tensor], update: list[torch.Tensor]
) -> Alignment:
    """Call once after ``optimizer.step()``: the alignment of ``g_t`` with ``u_{t-1}``.

    Then rolls the buffers forward in place: ``update`` becomes ``u_t`` and ``previous``
    the current parameters.
    """
    dot = grad_sq = update_sq = 0.0
    for p, prev, upd in zip(_params(optimizer), previous, update, strict=True):
        flat_update = upd.view(-1)
        if p.grad is not None:
            # torch.dot on flat views: one fused pass each, no temporaries.
            flat_grad = p.grad.detach().reshape(-1)
            dot += float(torch.dot(flat_grad, flat_update))
            grad_sq += float(torch.dot(flat_grad, flat_grad))
        update_sq += float(torch.dot(flat_update, flat_update))
        torch.sub(p.detach(), prev, out=upd)
        prev.copy_(p.detach())
    return Alignment(dot, math.sqrt(grad_sq), math.sqrt(update_sq))
