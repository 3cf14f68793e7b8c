"""Plan 2's meta-learning policy: a tiny network that sets the LR, trained online.

Each step a controller (an MLP of 85 weights: 5 features -> 12 tanh -> 1) reads
normalised signals of the primary learner and outputs a change of the log LR,
``delta = max_step * tanh(output_scale * output)``. The controller is itself trained online, by Adam
at ``meta_lr`` with gradient clipping (plan 2: 1e-4 and 1.0), on the hypergradient of
the loss with respect to the log LR (DESIGN.md; Baydin et al., 2018):

    dL(theta_t) / d log a_{t-1} = <g_t, u_{t-1}>

so it needs no offline pre-training. That signal arrives two steps after the decision
it grades (the decision sets the next LR, whose update is graded by the gradient after
it), so the controller is trained on the features it saw then; the signal enters as the
cosine of ``g_t`` and ``u_{t-1}`` so that its scale does not depend on the model.

Features: the log LR relative to the start (in decades), the trend of the loss (fast
EMA against slow EMA), the gradient norm against its EMA (log), the smoothed and the
current cosine of the gradient with the last update.

Initialised to behave as a constant LR (the output layer starts at zero). Guards:

* short-horizon bias: greedy hypergradient methods shrink the LR too early, because
  one-step-ahead optimal LRs are smaller than the best LR over a run. ``optimism``
  shifts the target so that the controller settles where consecutive updates are
  slightly anti-aligned (cosine = ``optimism``) rather than exactly orthogonal, and
  ``min_factor`` floors the LR;
* divergence: a non-finite loss, one above ``divergence_ratio`` times its slow EMA, or
  a non-finite gradient alignment halves the LR at once (``guard_cut``). Without a loss
  only the last applies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch.optim import Optimizer

from .base import Evaluate, Policy, check_fraction, check_int, check_positive
from .hypergrad import observe_update, restore_buffers, snapshot

FEATURE_NAMES = ("log_lr_decades", "loss_trend", "grad_norm_ratio", "cos_ema", "cos")
N_FEATURES = len(FEATURE_NAMES)
#: The widest controller accepted: far beyond any use, far below an allocation failure.
MAX_HIDDEN = 4096
_DECADE = math.log(10.0)


# The controller is 85 numbers: torch's per-op dispatch would cost more than the math,
# so its forward, backward and Adam step are a few NumPy lines (float64).
Controller = dict[str, np.ndarray]


def make_controller(hidden: int, seed: int) -> Controller:
    """Weights of ``5 -> hidden (tanh) -> 1``; the output layer is zero, so delta = 0.

    The hidden layer is initialised as ``torch.nn.Linear`` does (uniform in
    +-1/sqrt(fan_in)), from its own generator, so the user's RNG streams do not move.
    """
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(N_FEATURES)
    return {
        "w1": rng.uniform(-bound, bound, size=(hidden, N_FEATURES)),
        "b1": rng.uniform(-bound, bound, size=hidden),
        "w2": np.zeros(hidden),
        "b2": np.zeros(1),
    }


def controller_output(net: Controller, x: np.ndarray) -> tuple[float, np.ndarray]:
    """The raw output and the hidden activations for features ``x``."""
    hidden = np.tanh(net["w1"] @ x + net["b1"])
    return float(net["w2"] @ hidden + net["b2"][0]), hidden


def controller_gradient(net: Controller, x: np.ndarray, d_output: float) -> Controller:
    """Gradient of ``d_output * output(x)`` with respect to every weight."""
    _, hidden = controller_output(net, x)
    d_pre = d_output * net["w2"] * (1.0 - hidden**2)
    return {
        "w1": np.outer(d_pre, x),
        "b1": d_pre,
        "w2": d_output * hidden,
        "b2": np.array([d_output]),
    }


def adam_update(
    net: Controller,
    grads: Controller,
    moments: dict[str, Controller],
    step: int,
    *,
    lr: float,
    clip: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """Clip ``grads`` to global norm ``clip``, then one Adam step on ``net`` (in place).

    ``step`` counts from 1. Same arithmetic as ``torch.optim.Adam`` with its defaults.
    """
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    scale = min(1.0, clip / (norm + 1e-6))
    b1, b2 = betas
    for key, grad in grads.items():
        grad = grad * scale
        m = moments["m"][key] = b1 * moments["m"][key] + (1 - b1) * grad
        v = moments["v"][key] = b2 * moments["v"][key] + (1 - b2) * grad * grad
        m_hat = m / (1 - b1**step)
        v_hat = v / (1 - b2**step)
        net[key] = net[key] - lr * m_hat / (np.sqrt(v_hat) + eps)


def _ema(old: float | None, new: float, beta: float) -> float:
    return new if old is None else beta * old + (1.0 - beta) * new


class Meta(Policy):
    """A learned LR controller, trained online on the hypergradient (plan 2).

    Keeps two copies of the parameters (the last update and the parameters before it)
    and the controller (85 weights and their Adam moments), all plain attributes, so the
    generic ``state_dict`` holds everything a resumed run needs. On ``load_state_dict``
    the copies move to the device and dtype of the optimizer's parameters.

    The loss is optional (``step()`` or ``step(None)``). Without one the policy still
    reads the gradient and its alignment with the last update, so the controller keeps
    deciding and learning from the hypergradient; the loss features (the loss EMAs and
    so the loss trend) hold their last values (a trend of 0 if no loss was ever given),
    and the loss-based divergence check is skipped. A non-finite gradient alignment
    still trips the guard, with or without a loss.

    Args:
        meta_lr: the controller's Adam LR. Default 1e-4 (plan 2).
        meta_clip: gradient-norm clipping of the controller's update. Default 1.0 (plan 2).
        max_step: the largest change of the log LR in one step. Default 0.05 (5%).
        hidden: the controller's hidden width. Default 12 (85 weights).
        optimism: the target cosine of gradient and last update, guarding against the
            short-horizon bias. Default 0 (the greedy hypergradient target).
        min_factor, max_factor: bounds on the LR as multiples of the initial LR.
            Defaults 1e-2 (the floor against short-horizon shrinkage) and 1e5 (room to
            recover a start far too low; the divergence guard handles too high).
        divergence_ratio: a loss above this multiple of its slow EMA counts as
            divergence. Default 4.
        guard_cut: LR multiplier when the guard trips, in (0, 1). Default 0.5.
        output_scale: gain on the controller's output before the tanh. With Adam at
            ``meta_lr`` moving each weight about ``meta_lr`` per step, this sets how fast
            the controller can learn to move the LR. Default 10.
        seed: the controller's initialisation seed. Default 0.
    """

    diagnostic_keys = (
        "delta",
        "cos",
        "cos_ema",
        "loss_fast",
        "loss_slow",
        "grad_norm_ema",
        "guard_trips",
        "meta_steps",
    )

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        meta_lr: float = 1e-4,
        meta_clip: float = 1.0,
        max_step: float = 0.05,
        hidden: int = 12,
        optimism: float = 0.0,
        min_factor: float = 1e-2,
        max_factor: float = 1e5,
        divergence_ratio: float = 4.0,
        guard_cut: float = 0.5,
        output_scale: float = 10.0,
        seed: int = 0,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        check_positive("meta_lr", meta_lr)
        check_positive("meta_clip", meta_clip)
        check_positive("max_step", max_step)
        check_int("hidden", hidden)
        if hidden > MAX_HIDDEN:
            raise ValueError(
                f"hidden must be at most {MAX_HIDDEN} (a controller of a few hundred weights "
                f"is the design; {hidden!r} would not fit in memory), got {hidden!r}."
            )
        if not (isinstance(optimism, (int, float)) and -1.0 < optimism < 1.0):
            raise ValueError(f"optimism must be in (-1, 1), got {optimism!r}.")
        check_fraction("min_factor", min_factor, high=1.0 + 1e-12)
        if not (isinstance(max_factor, (int, float)) and max_factor >= 1.0):
            raise ValueError(f"max_factor must be >= 1, got {max_factor!r}.")
        if not (isinstance(divergence_ratio, (int, float)) and divergence_ratio > 1.0):
            raise ValueError(f"divergence_ratio must be > 1, got {divergence_ratio!r}.")
        check_fraction("guard_cut", guard_cut)
        check_positive("output_scale", output_scale)
        check_int("seed", seed, minimum=0)
        self.output_scale = float(output_scale)
        self.meta_lr = float(meta_lr)
        self.meta_clip = float(meta_clip)
        self.max_step = float(max_step)
        self.optimism = float(optimism)
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.divergence_ratio = float(divergence_ratio)
        self.guard_cut = guard_cut
        self.controller = make_controller(hidden, seed)
        self.moments = {
            "m": {k: np.zeros_like(v) for k, v in self.controller.items()},
            "v": {k: np.zeros_like(v) for k, v in self.controller.items()},
        }
        self.meta_steps = 0
        self.previous, self.update = snapshot(optimizer)
        # Normalisers and the features of the last two decisions (the graded one is t-2).
        self.loss_fast: float | None = None
        self.loss_slow: float | None = None
        self.grad_norm_ema: float | None = None
        self.cos_ema = 0.0
        self.pending: list[list[float]] = []
        self.features: list[float] = [0.0] * N_FEATURES
        self.delta = 0.0
        self.cos = 0.0
        self.guard_trips = 0
        super().__init__(optimizer, total_steps=total_steps, evaluate=evaluate)

    # -- the step ------------------------------------------------------------------

    def diagnostics(self) -> dict[str, float]:
        """Adds the controller's current features and output (delta of the log LR)."""
        out = super().diagnostics()
        out.update({f"feature/{n}": v for n, v in zip(FEATURE_NAMES, self.features, strict=True)})
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; the parameter copies move to the parameters' device/dtype."""
        super().load_state_dict(state_dict)
        self.previous, self.update = restore_buffers(self.optimizer, self.previous, self.update)

    def _clamp(self, factor: float) -> float:
        return min(self.max_factor, max(self.min_factor, factor))

    def _features(self, loss: float | None, grad_norm: float) -> list[float]:
        if loss is not None:
            self.loss_fast = _ema(self.loss_fast, loss, 0.9)
            self.loss_slow = _ema(self.loss_slow, loss, 0.99)
        # Without a loss the EMAs hold, and so does the trend computed from them.
        trend = 0.0
        if self.loss_fast is not None and self.loss_slow is not None:
            trend = (self.loss_fast - self.loss_slow) / (abs(self.loss_slow) + 1e-12)
        self.grad_norm_ema = _ema(self.grad_norm_ema, grad_norm, 0.99)
        grad_ratio = math.log((grad_norm + 1e-12) / (self.grad_norm_ema + 1e-12))
        self.cos_ema = 0.9 * self.cos_ema + 0.1 * self.cos
        return [
            math.log(self.factor) / _DECADE,
            max(-1.0, min(1.0, trend)),
            max(-1.0, min(1.0, grad_ratio / 3.0)),
            self.cos_ema,
            self.cos,
        ]

    def _delta(self, output: float) -> float:
        return self.max_step * math.tanh(self.output_scale * output)

    def _meta_update(self, graded: list[float], signal: float) -> None:
        """One Adam step of the controller on ``signal * delta(graded features)``."""
        x = np.asarray(graded)
        output, _ = controller_output(self.controller, x)
        # d delta / d output, through the tanh and the output scale
        slope = (
            self.max_step * self.output_scale * (1.0 - math.tanh(self.output_scale * output) ** 2)
        )
        grads = controller_gradient(self.controller, x, signal * slope)
        self.meta_steps += 1
        adam_update(
            self.controller, grads, self.moments, self.meta_steps,
            lr=self.meta_lr, clip=self.meta_clip,
        )  # fmt: skip

    def _next_factor(self, loss: float | None) -> float:
        if self.last_epoch == 0:
            return self.factor
        alignment = observe_update(self.optimizer, self.previous, self.update)
        if not math.isfinite(alignment.dot):
            return self._trip()
        # The loss is optional: no loss is no evidence of divergence, only a bad one is.
        if loss is not None and (
            not math.isfinite(loss)
            or (self.loss_slow is not None and loss > self.divergence_ratio * self.loss_slow)
        ):
            return self._trip()
        self.cos = alignment.cos
        if len(self.pending) == 2:
            # The decision of two steps ago set the LR of u_{t-1}: grade it by <g_t, u_{t-1}>.
            self._meta_update(self.pending.pop(0), self.cos - self.optimism)
        self.features = self._features(loss, alignment.grad_norm)
        output, _ = controller_output(self.controller, np.asarray(self.features))
        self.delta = self._delta(output)
        self.pending.append(self.features)
        return self._clamp(self.factor * math.exp(self.delta))

    def _trip(self) -> float:
        self.guard_trips += 1
        self.pending = []  # the graded decisions belong to a run that blew up
        return self._clamp(self.factor * self.guard_cut)
