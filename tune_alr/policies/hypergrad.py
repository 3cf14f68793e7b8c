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

Each buffer lives on the device and in the dtype of its parameter. A checkpoint is
often loaded on the CPU (``map_location="cpu"``) and the model may change dtype
(``model.double()``, ``.half()``) or device (``model.to("cuda")``) after the policy was
built, so :func:`restore_buffers` (on ``load_state_dict``) and :func:`observe_update`
(on every step, where it costs a comparison per parameter) move a buffer that does not
match its parameter.
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


def _matches(buffer: torch.Tensor, param: torch.Tensor) -> bool:
    return buffer.device == param.device and buffer.dtype == param.dtype


def restore_buffers(
    optimizer: Optimizer, previous: list[torch.Tensor], update: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Loaded ``(previous, update)`` buffers as the policy's own, on its parameters.

    Returns new lists of new tensors, each on the device and in the dtype of the
    optimizer parameter it shadows: copies even where nothing moves, so that the
    policy's in-place updates never write into the caller's (checkpoint's) tensors.

    Raises:
        ValueError: the buffers do not match the optimizer's parameters in number or
            shape (a state saved for another model).
    """
    params = _params(optimizer)
    for name, buffers in (("previous", previous), ("update", update)):
        if len(buffers) != len(params):
            raise ValueError(
                f"the policy state holds copies of {len(buffers)} parameters ({name}) but "
                f"the optimizer has {len(params)}: it was saved for another model."
            )
        for i, (buffer, p) in enumerate(zip(buffers, params, strict=True)):
            if buffer.shape != p.shape:
                raise ValueError(
                    f"the policy state's copy of parameter {i} ({name}) has shape "
                    f"{tuple(buffer.shape)}, the optimizer's parameter {tuple(p.shape)}: "
                    "it was saved for another model."
                )

    def own(buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            b.detach().to(device=p.device, dtype=p.dtype, copy=True)
            for b, p in zip(buffers, params, strict=True)
        ]

    return own(previous), own(update)


@torch.no_grad()
def observe_update(
    optimizer: Optimizer, previous: list[torch.Tensor], update: list[torch.Tensor]
) -> Alignment:
    """Call once after ``optimizer.step()``: the alignment of ``g_t`` with ``u_{t-1}``.

    Then rolls the buffers forward in place: ``update`` becomes ``u_t`` and ``previous``
    the current parameters. A buffer whose device or dtype no longer matches its
    parameter's (the model was moved or cast since) is first replaced, in its list, by
    a converted copy: the values carry over, as they would in the optimizer's state.
    """
    params = _params(optimizer)
    if not len(params) == len(previous) == len(update):
        raise ValueError(
            f"the policy keeps copies of {len(previous)} parameters, but the optimizer "
            f"now has {len(params)}: build the policy after the optimizer's last "
            "add_param_group."
        )
    dot = grad_sq = update_sq = 0.0
    for i, p in enumerate(params):
        prev, upd = previous[i], update[i]
        if not (_matches(prev, p) and _matches(upd, p)):
            prev = previous[i] = prev.to(device=p.device, dtype=p.dtype)
            upd = update[i] = upd.to(device=p.device, dtype=p.dtype)
        flat_update = upd.reshape(-1)  # reshape: a channels-last copy is not viewable
        if p.grad is not None:
            # torch.dot on flat views: one fused pass each, no temporaries.
            flat_grad = p.grad.detach().reshape(-1)
            dot += float(torch.dot(flat_grad, flat_update))
            grad_sq += float(torch.dot(flat_grad, flat_grad))
        update_sq += float(torch.dot(flat_update, flat_update))
        torch.sub(p.detach(), prev, out=upd)
        prev.copy_(p.detach())
    return Alignment(dot, math.sqrt(grad_sq), math.sqrt(update_sq))
