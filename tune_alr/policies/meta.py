"""Plan 2's meta-learning policy: a tiny network that sets the LR, meta-trained, then
trained online.

Each step a controller (an MLP: features -> ``hidden`` tanh -> 1) reads normalised
signals of the primary learner and outputs a change of the log LR,
``delta = max_step * tanh(output_scale * output)``. The controller is trained online, by
Adam at ``meta_lr`` with gradient clipping (plan 2: 1e-4 and 1.0), on the hypergradient
of the loss with respect to the log LR (DESIGN.md; Baydin et al., 2018):

    dL(theta_t) / d log a_{t-1} = <g_t, u_{t-1}>

That signal arrives two steps after the decision it grades (the decision sets the next
LR, whose update is graded by the gradient after it), so the controller is trained on the
features it saw then; the signal enters as the cosine of ``g_t`` and ``u_{t-1}`` so that
its scale does not depend on the model.

Where the controller starts (``controller``):

* ``"meta-trained"`` (the default): the controller shipped in
  ``tune_alr/policies/controllers/meta-trained.json`` (six features: ``log_lr_decades``,
  ``loss_trend``, ``grad_norm_ratio``, ``loss_level``, ``curvature``, ``progress``; 8 tanh
  units, 65 weights; a learned start 0.28 decades below the LR given), whose starting
  weights were meta-trained (``tune-alr meta-train``, :mod:`tune_alr.metatrain`) over a
  distribution of synthetic training problems, with this online adaptation on during each
  of them; its provenance (distribution, seed, generations, command, commit, date, wall
  time) is in the file. It reads no alignment feature: the online rule below aims at the
  greedy alignment (cosine 0), and controllers that learned a fixed point on the
  alignment from small problems held MNIST's LR 6x or more below its best (README,
  "Meta-training the controller", which also gives where it beats the blank start on the
  bench's workloads and where it does not);
* ``"scratch"``: plan 2's blank start: the five features of :data:`PLAN2_FEATURES`,
  ``hidden`` (12) tanh units initialised as ``torch.nn.Linear`` is, and an output layer of
  zeros, so that it starts as a constant LR and learns only online (the same LR sequence
  as the first release, step for step);
* a path to a controller file that ``tune-alr meta-train`` wrote, or such a file's
  contents as a dict.

A controller file (version 2) may also carry a learned start, ``initial_decades``: the
first step's LR is ``10**initial_decades`` times the LR given (``tune-alr meta-train
--learn-initial`` learns it with the weights: a start below the given LR is a learned
warm-up, which the controller then climbs from). Version 1 files, and ``"scratch"``,
start at the LR given.

The features (:data:`FEATURE_NAMES`; each clipped to the range given, a controller file
names those it reads). ``g_t`` is the gradient after step ``t``, ``u_{t-1}`` the update
that led to it, EMAs per step:

* ``log_lr_decades``: ``log10(lr / initial lr)``, the LR relative to the one given
  (``initial_decades`` at the first step);
* ``loss_trend``: the fast (0.9) against the slow (0.99) EMA of the loss,
  ``(fast - slow) / |slow|``, in [-1, 1]: negative while the loss falls;
* ``grad_norm_ratio``: ``log(|g_t| / EMA|g|) / 3``, in [-1, 1]: a burst of gradient norm;
* ``cos_ema`` and ``cos``: the cosine of ``g_t`` and ``u_{t-1}`` (the normalised
  hypergradient), smoothed (0.9) and as measured: positive when the last step overshot
  (the LR is too high), negative when consecutive steps agree (too low);
* ``loss_level``: ``log(fast loss EMA / first loss) / 4``, in [-1, 1]: how far the run
  has come (0 at the start, -1 for a loss 55x lower), positive if it got worse;
* ``curvature``: a second-order signal, the secant curvature along the last update
  times the step's length, ``r = <g_t - g_{t-1}, u_{t-1}> / (|u_{t-1}| |g_{t-1}|)``
  (``lr * <dg, u> / |u|^2`` for plain SGD), smoothed (0.9), as ``(r - 1) / 2`` in
  [-1, 1]: on a quadratic, 0 means the step was the best along its line (r = 1), 0.5
  the edge of stability (r = 2: the loss came back to its level), -0.5 a step much too
  short. For SGD it is ``1 + cos * |g_t| / |g_{t-1}|``; for Adam and RMSprop it also
  reads the preconditioning (``<g_{t-1}, u_{t-1}>`` is no longer ``-|g| |u|``). It costs
  one more dot product per parameter, no memory;
* ``progress``: ``step / total_steps`` in [0, 1], or 0 when the run length is unknown
  (a fifth of the meta-training runs do not give it);
* ``cos_snr``: ``cos_ema / sqrt(EMA_0.99(cos^2))``, in [-1, 1]: the smoothed alignment
  in units of its own recent size. ``cos`` itself shrinks with the gradient noise: with
  Adam 10x below its best LR, consecutive steps agree at ``cos`` -0.6 on a 100-weight
  problem but only -0.16 on plan 2's MNIST CNN (100k weights), so a controller that
  learned a threshold on ``cos_ema`` from small problems misreads a large one; this
  ratio reads -1.0 and -0.76 there (``benchmarks/alignment_scale.py``).

``benchmarks/meta_ablation.py`` measures what each feature buys the shipped controller.

Guards:

* short-horizon bias: greedy hypergradient methods shrink the LR too early, because
  one-step-ahead optimal LRs are smaller than the best LR over a run. ``optimism``
  shifts the target so that the controller settles where consecutive updates are
  slightly anti-aligned (cosine = ``optimism``) rather than exactly orthogonal, and
  ``min_factor`` floors the LR. The meta-trained controller learned its answer to the
  bias over whole runs (the meta-training objective is the loss over a run);
* divergence: a non-finite loss, one above ``divergence_ratio`` times its slow EMA, or
  a non-finite gradient alignment halves the LR at once (``guard_cut``). Without a loss
  only the last applies.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from .base import Evaluate, Policy, check_fraction, check_int, check_positive
from .hypergrad import Alignment, restore_buffers, snapshot

FEATURE_NAMES = (
    "log_lr_decades",
    "loss_trend",
    "grad_norm_ratio",
    "cos_ema",
    "cos",
    "loss_level",
    "curvature",
    "progress",
    "cos_snr",
)
N_FEATURES = len(FEATURE_NAMES)
#: The inputs of plan 2's controller as first released: what ``controller="scratch"`` reads.
PLAN2_FEATURES = FEATURE_NAMES[:5]
#: The widest controller accepted: far beyond any use, far below an allocation failure.
MAX_HIDDEN = 4096
#: The scratch controller's default width (plan 2's: 5 x 12 + 12 + 12 + 1 = 85 weights).
SCRATCH_HIDDEN = 12
#: What a controller file says it is, and the layout version this module writes.
FILE_FORMAT = "tune-alr meta controller"
FILE_VERSION = 2
#: The layout versions this module reads: 1 (no ``initial_decades``: the LR starts where
#: it is given) and 2 (with it).
READ_VERSIONS = (1, 2)
#: The largest learned start offset accepted, in decades either way.
MAX_INITIAL_DECADES = 6.0
#: The shipped meta-trained controller, in ``tune_alr/policies/controllers/``.
META_TRAINED_FILE = "meta-trained.json"
_DECADE = math.log(10.0)
_ACCEPTED = (
    "'meta-trained' (the shipped meta-trained controller, the default), 'scratch' "
    "(plan 2's blank start), "
    "a path to a controller file written by tune-alr meta-train, or such a file's "
    "contents as a dict"
)


# -- the controller: a flat vector of float64 weights --------------------------------
#
# The controller is under a hundred numbers: torch's per-op dispatch would cost more
# than the math, so its forward, backward and Adam step are a few NumPy lines on one
# flat vector, laid out as w1 (hidden x features, row-major), b1, w2, b2.


def controller_size(n_features: int, hidden: int) -> int:
    """The number of weights of a ``n_features -> hidden -> 1`` controller."""
    return hidden * (n_features + 2) + 1


def _blocks(n_features: int, hidden: int) -> tuple[slice, slice, slice, slice]:
    a = hidden * n_features
    return (
        slice(0, a),
        slice(a, a + hidden),
        slice(a + hidden, a + 2 * hidden),
        slice(a + 2 * hidden, a + 2 * hidden + 1),
    )


def unpack(weights: np.ndarray, n_features: int, hidden: int) -> dict[str, np.ndarray]:
    """Views ``w1`` (hidden x features), ``b1``, ``w2`` (hidden) and ``b2`` (1) of ``weights``."""
    w1, b1, w2, b2 = _blocks(n_features, hidden)
    return {
        "w1": weights[w1].reshape(hidden, n_features),
        "b1": weights[b1],
        "w2": weights[w2],
        "b2": weights[b2],
    }


def pack(net: Mapping[str, Any]) -> np.ndarray:
    """The flat vector of ``{"w1", "b1", "w2", "b2"}`` (float64)."""
    parts = [np.asarray(net[k], dtype=np.float64).reshape(-1) for k in ("w1", "b1", "w2", "b2")]
    return np.concatenate(parts)


def scratch_weights(hidden: int = SCRATCH_HIDDEN, seed: int = 0) -> np.ndarray:
    """Plan 2's blank start over :data:`PLAN2_FEATURES`: the output layer is zero.

    The hidden layer is initialised as ``torch.nn.Linear`` does (uniform in
    +-1/sqrt(fan_in)), from its own generator, so the user's RNG streams do not move.
    """
    n = len(PLAN2_FEATURES)
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(n)
    w1 = rng.uniform(-bound, bound, size=(hidden, n))
    b1 = rng.uniform(-bound, bound, size=hidden)
    return pack({"w1": w1, "b1": b1, "w2": np.zeros(hidden), "b2": np.zeros(1)})


def controller_output(weights: np.ndarray, x: np.ndarray, hidden: int) -> tuple[float, np.ndarray]:
    """The raw output and the hidden activations for features ``x``."""
    net = unpack(weights, len(x), hidden)
    act = np.tanh(net["w1"] @ x + net["b1"])
    return float(net["w2"] @ act + net["b2"][0]), act


def controller_gradient(
    weights: np.ndarray, x: np.ndarray, hidden: int, d_output: float, act: np.ndarray
) -> np.ndarray:
    """Gradient of ``d_output * output(x)`` with respect to every weight (flat).

    ``act`` are the hidden activations of ``x`` (from :func:`controller_output`).
    """
    net = unpack(weights, len(x), hidden)
    d_pre = d_output * net["w2"] * (1.0 - act**2)
    return np.concatenate((np.outer(d_pre, x).reshape(-1), d_pre, d_output * act, [d_output]))


def adam_update(
    weights: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    step: int,
    *,
    lr: float,
    clip: float,
    n_features: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip ``grad`` to global norm ``clip``, then one Adam step: ``(weights, m, v)``, new.

    ``step`` counts from 1. Same arithmetic as ``torch.optim.Adam`` with its defaults
    (the norm summed block by block, as over the layers' tensors). Nothing is changed in
    place, so a ``state_dict`` taken earlier keeps its values.
    """
    scale = 1.0
    if math.sqrt(float(grad @ grad)) > clip * (1 - 1e-9) - 1e-6:
        # Near or over the clip: the norm as summed over the layers' tensors (what the
        # clipping of plan 2's first release computed), to the last bit.
        hidden = (len(weights) - 1) // (n_features + 2)
        blocks = _blocks(n_features, hidden)
        norm = math.sqrt(sum(float(np.sum(grad[s] * grad[s])) for s in blocks))
        scale = min(1.0, clip / (norm + 1e-6))
    b1, b2 = betas
    grad = grad * scale
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    m_hat = m / (1 - b1**step)
    v_hat = v / (1 - b2**step)
    return weights - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


# -- controller files --------------------------------------------------------------


@dataclass(frozen=True)
class ControllerSpec:
    """A controller's inputs, width and starting weights, and where they came from."""

    features: tuple[str, ...]
    hidden: int
    weights: np.ndarray
    source: str
    provenance: Mapping[str, Any]
    #: Where the LR starts, in decades from the LR the user gave (0: there). A learned
    #: start: ``tune-alr meta-train --learn-initial`` meta-trains it with the weights.
    initial_decades: float = 0.0

    def to_json(self, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The controller file's contents (``json.dump`` writes it; floats round-trip)."""
        net = unpack(self.weights, len(self.features), self.hidden)
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "features": list(self.features),
            "hidden": self.hidden,
            "initial_decades": float(self.initial_decades),
            "weights": {k: v.tolist() for k, v in net.items()},
            "provenance": dict(self.provenance if provenance is None else provenance),
        }


def controller_spec(
    features: tuple[str, ...] | list[str],
    weights: Any,
    *,
    hidden: int,
    source: str = "given",
    provenance: Mapping[str, Any] | None = None,
    initial_decades: Any = 0.0,
) -> ControllerSpec:
    """A checked :class:`ControllerSpec` from flat ``weights`` (``ValueError`` if bad)."""
    feats = _check_features(tuple(features), source)
    if (
        isinstance(initial_decades, bool)
        or not isinstance(initial_decades, (int, float))
        or not abs(initial_decades) <= MAX_INITIAL_DECADES
    ):
        raise ValueError(
            f"controller {source}: 'initial_decades' must be a number from "
            f"-{MAX_INITIAL_DECADES:g} to {MAX_INITIAL_DECADES:g} (decades from the given "
            f"LR), got {initial_decades!r}."
        )
    flat = np.array(weights, dtype=np.float64).reshape(-1)
    if flat.size != controller_size(len(feats), hidden):
        raise ValueError(
            f"controller {source}: {flat.size} weights, but {len(feats)} features and "
            f"{hidden} hidden units need {controller_size(len(feats), hidden)}."
        )
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"controller {source}: its weights must all be finite numbers.")
    return ControllerSpec(
        feats, hidden, flat, source, dict(provenance or {}), float(initial_decades)
    )


def _check_features(features: tuple[str, ...], source: str) -> tuple[str, ...]:
    unknown = [f for f in features if f not in FEATURE_NAMES]
    if unknown or not features or len(set(features)) != len(features):
        problem = (
            f"unknown feature(s) {unknown}" if unknown else "no features" if not features
            else "a feature named twice"
        )  # fmt: skip
        raise ValueError(
            f"controller {source} reads {list(features)}: {problem}; this version of the "
            f"meta policy computes {list(FEATURE_NAMES)} (a file from another version of "
            "tune-alr? run tune-alr meta-train again)."
        )
    return features


def parse_controller(data: Any, source: str = "given") -> ControllerSpec:
    """A controller file's contents (``json.load``'s dict) as a checked spec."""
    if not isinstance(data, Mapping):
        raise ValueError(f"controller {source}: expected a JSON object, got {type(data).__name__}.")
    version = data.get("version")
    if data.get("format") != FILE_FORMAT or version not in READ_VERSIONS:
        raise ValueError(
            f"controller {source} is not a tune-alr meta controller file this version reads "
            f"(format {data.get('format')!r}, version {version!r}; expected "
            f"{FILE_FORMAT!r}, version {' or '.join(map(str, READ_VERSIONS))})."
        )
    if version == 1 and "initial_decades" in data:
        raise ValueError(
            f"controller {source}: 'initial_decades' came with version 2 of the file; a "
            "version 1 file has none (its LR starts where it is given)."
        )
    if version >= 2 and "initial_decades" not in data:
        raise ValueError(f"controller {source}: a version {version} file needs 'initial_decades'.")
    features = data.get("features")
    hidden = data.get("hidden")
    weights = data.get("weights")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise ValueError(f"controller {source}: 'features' must be a list of names.")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(
            f"controller {source}: 'hidden' must be an integer from 1 to {MAX_HIDDEN}, "
            f"got {hidden!r}."
        )
    if not isinstance(weights, Mapping) or set(weights) != {"w1", "b1", "w2", "b2"}:
        raise ValueError(f"controller {source}: 'weights' must hold exactly w1, b1, w2, b2.")
    shapes = {"w1": (hidden, len(features)), "b1": (hidden,), "w2": (hidden,), "b2": (1,)}
    for key, shape in shapes.items():
        try:
            array = np.asarray(weights[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"controller {source}: weights {key} are not numbers.") from None
        if array.shape != shape:
            raise ValueError(
                f"controller {source}: weights {key} have shape {array.shape}, "
                f"expected {shape} ({len(features)} features, {hidden} hidden)."
            )
    provenance = data.get("provenance") or {}
    return controller_spec(
        tuple(features), pack(weights), hidden=hidden, source=source, provenance=provenance,
        initial_decades=data.get("initial_decades", 0.0),
    )  # fmt: skip


def read_controller(path: str | os.PathLike[str]) -> ControllerSpec:
    """A controller file (``ValueError`` naming it if missing or malformed)."""
    shown = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"controller must be {_ACCEPTED}; got {shown!r} (no such file).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"controller file {shown!r} cannot be read: {err}.") from None
    return parse_controller(data, repr(shown))


@functools.cache
def _meta_trained_file() -> str:
    return (resources.files("tune_alr.policies") / "controllers" / META_TRAINED_FILE).read_text(
        encoding="utf-8"
    )


def meta_trained_controller() -> ControllerSpec:
    """The shipped meta-trained controller (``controllers/meta-trained.json``)."""
    return parse_controller(json.loads(_meta_trained_file()), "'meta-trained'")


def load_controller(
    controller: Any, *, hidden: int | None = None, seed: int | None = None
) -> ControllerSpec:
    """Resolve the ``controller`` argument of :class:`Meta` (see its docstring)."""
    if isinstance(controller, str) and controller == "scratch":
        width = SCRATCH_HIDDEN if hidden is None else hidden
        return controller_spec(
            PLAN2_FEATURES, scratch_weights(width, 0 if seed is None else seed),
            hidden=width, source="'scratch'",
        )  # fmt: skip
    given = [f"{k}={v!r}" for k, v in (("hidden", hidden), ("seed", seed)) if v is not None]
    if isinstance(controller, str) and controller == "meta-trained":
        spec = meta_trained_controller()
    elif isinstance(controller, Mapping):
        spec = parse_controller(controller)
    elif isinstance(controller, (str, os.PathLike)) and os.fspath(controller):
        spec = read_controller(controller)
    else:
        raise ValueError(f"controller must be {_ACCEPTED}; got {controller!r}.")
    if given:
        raise ValueError(
            f"{' and '.join(given)} set(s) the initialisation of controller='scratch'; the "
            f"controller {spec.source} brings its own weights ({spec.hidden} hidden units)."
        )
    return spec


# -- the policy ----------------------------------------------------------------------


def _ema(old: float | None, new: float, beta: float) -> float:
    return new if old is None else beta * old + (1.0 - beta) * new


def _clip(value: float, low: float = -1.0, high: float = 1.0) -> float:
    return max(low, min(high, value))


@dataclass(frozen=True)
class Observation(Alignment):
    """One step's :class:`~tune_alr.policies.hypergrad.Alignment` (``dot = <g_t, u_{t-1}>``,
    the norms of ``g_t`` and ``u_{t-1}``, ``cos``) and ``next_dot = <g_t, u_t>`` (of the
    update just made)."""

    next_dot: float


@torch.no_grad()
def observe_step(
    optimizer: Optimizer, previous: list[torch.Tensor], update: list[torch.Tensor]
) -> Observation:
    """``tune_alr.policies.hypergrad.observe_update`` plus ``<g_t, u_t>``: call once
    after ``optimizer.step()``; rolls the buffers forward in place (``update`` becomes
    ``u_t``, ``previous`` the current parameters), moving a buffer whose device or dtype
    no longer matches its parameter's."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not len(params) == len(previous) == len(update):
        raise ValueError(
            f"the policy keeps copies of {len(previous)} parameters, but the optimizer "
            f"now has {len(params)}: build the policy after the optimizer's last "
            "add_param_group."
        )
    dot = grad_sq = update_sq = next_dot = 0.0
    for i, p in enumerate(params):
        prev, upd = previous[i], update[i]
        if not (prev.device == upd.device == p.device and prev.dtype == upd.dtype == p.dtype):
            prev = previous[i] = prev.to(device=p.device, dtype=p.dtype)
            upd = update[i] = upd.to(device=p.device, dtype=p.dtype)
        flat_update = upd.reshape(-1)  # reshape: a channels-last copy is not viewable
        update_sq += float(torch.dot(flat_update, flat_update))
        if p.grad is None:
            torch.sub(p.detach(), prev, out=upd)
        else:
            flat_grad = p.grad.detach().reshape(-1)
            dot += float(torch.dot(flat_grad, flat_update))
            grad_sq += float(torch.dot(flat_grad, flat_grad))
            torch.sub(p.detach(), prev, out=upd)
            next_dot += float(torch.dot(flat_grad, upd.reshape(-1)))
        prev.copy_(p.detach())
    return Observation(dot, math.sqrt(grad_sq), math.sqrt(update_sq), next_dot)


class Meta(Policy):
    """A learned LR controller, meta-trained and then trained online (plan 2).

    Keeps two copies of the parameters (the last update and the parameters before it)
    and the controller (its weights and their Adam moments), all plain attributes, so the
    generic ``state_dict`` holds everything a resumed run needs. On ``load_state_dict``
    the copies move to the device and dtype of the optimizer's parameters; a state saved
    by an older release, whose controller read other features, is refused with a
    ``ValueError`` that says so.

    The loss is optional (``step()`` or ``step(None)``). Without one the policy still
    reads the gradient and its alignment with the last update, so the controller keeps
    deciding and learning from the hypergradient; the loss features (the loss EMAs and
    so the loss trend and level) hold their last values (0 if no loss was ever given),
    and the loss-based divergence check is skipped. A non-finite gradient alignment
    still trips the guard, with or without a loss.

    Args:
        controller: where the controller starts: ``"meta-trained"`` (the shipped
            meta-trained controller), ``"scratch"`` (plan 2's blank start: a constant LR
            that learns online only), a path to a file written by ``tune-alr
            meta-train``, or such a file's contents as a dict. Default
            ``"meta-trained"``.
        meta_lr: the controller's online Adam LR. Default 1e-4 (plan 2).
        meta_clip: gradient-norm clipping of the controller's update. Default 1.0 (plan 2).
        max_step: the largest change of the log LR in one step. Default 0.05 (5%).
        hidden: the scratch controller's hidden width. Default 12 (85 weights); only
            with ``controller="scratch"`` (a loaded controller has its own).
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
        seed: the scratch controller's initialisation seed. Default 0; only with
            ``controller="scratch"``.
        total_steps: the run's length; feeds the ``progress`` feature (0 without it).
    """

    diagnostic_keys = (
        "delta",
        "cos",
        "cos_ema",
        "loss_fast",
        "loss_slow",
        "grad_norm_ema",
        "curvature_ema",
        "guard_trips",
        "meta_steps",
    )

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        controller: Any = "meta-trained",
        meta_lr: float = 1e-4,
        meta_clip: float = 1.0,
        max_step: float = 0.05,
        hidden: int | None = None,
        optimism: float = 0.0,
        min_factor: float = 1e-2,
        max_factor: float = 1e5,
        divergence_ratio: float = 4.0,
        guard_cut: float = 0.5,
        output_scale: float = 10.0,
        seed: int | None = None,
        total_steps: int | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        check_positive("meta_lr", meta_lr)
        check_positive("meta_clip", meta_clip)
        check_positive("max_step", max_step)
        if hidden is not None:
            check_int("hidden", hidden)
            if hidden > MAX_HIDDEN:
                raise ValueError(
                    f"hidden must be at most {MAX_HIDDEN} (a controller of a few hundred "
                    f"weights is the design; {hidden!r} would not fit in memory), "
                    f"got {hidden!r}."
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
        if seed is not None:
            check_int("seed", seed, minimum=0)
        spec = load_controller(controller, hidden=hidden, seed=seed)
        self.output_scale = float(output_scale)
        self.meta_lr = float(meta_lr)
        self.meta_clip = float(meta_clip)
        self.max_step = float(max_step)
        self.optimism = float(optimism)
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.divergence_ratio = float(divergence_ratio)
        self.guard_cut = guard_cut
        # The controller: which features it reads (by index into FEATURE_NAMES), its
        # width, its weights and their Adam moments.
        self.controller_source = spec.source
        self.controller_features = spec.features
        self.controller_index = [FEATURE_NAMES.index(f) for f in spec.features]
        self.hidden = spec.hidden
        # The controller's learned start (a version-2 file's initial_decades; 1 otherwise).
        self.initial_factor = 10.0**spec.initial_decades
        self.weights = spec.weights.copy()
        self.adam_m = np.zeros_like(self.weights)
        self.adam_v = np.zeros_like(self.weights)
        self.meta_steps = 0
        self.previous, self.update = snapshot(optimizer)
        # Normalisers and the inputs of the last two decisions (the graded one is t-2).
        self.loss_fast: float | None = None
        self.loss_slow: float | None = None
        self.loss_first: float | None = None
        self.grad_norm_ema: float | None = None
        self.cos_ema = 0.0
        self.cos_sq_ema: float | None = None  # EMA (0.99) of cos^2: the alignment's scale
        self.curvature_ema = 1.0  # r = 1: "the step was right", until measured
        self.last_next_dot: float | None = None  # <g_{t-1}, u_{t-1}>
        self.last_grad_norm = 0.0  # |g_{t-1}|
        self.pending: list[np.ndarray] = []
        self.features: list[float] = [0.0] * N_FEATURES
        self.delta = 0.0
        self.cos = 0.0
        self.guard_trips = 0
        super().__init__(optimizer, total_steps=total_steps, evaluate=evaluate)

    # -- the step ------------------------------------------------------------------

    def diagnostics(self) -> dict[str, float]:
        """Adds every feature (``feature/<name>``) and the output (delta of the log LR)."""
        out = super().diagnostics()
        out.update({f"feature/{n}": v for n, v in zip(FEATURE_NAMES, self.features, strict=True)})
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; the parameter copies move to the parameters' device/dtype.

        Raises:
            ValueError: a state of another model, or one an older release saved (its
                controller read other features: its weights do not fit this one).
        """
        saved = state_dict.get("controller_features")
        if saved is None or "weights" not in state_dict:
            old = state_dict.get("controller")
            width = ""
            if isinstance(old, Mapping) and hasattr(old.get("w1"), "shape"):
                width = f" ({old['w1'].shape[1]} features, {old['w1'].shape[0]} hidden)"
            raise ValueError(
                "this meta policy state was saved by an earlier tune-alr, whose controller"
                f"{width} read the features {list(PLAN2_FEATURES)} only; this version's "
                f"controller can read {list(FEATURE_NAMES)} and keeps its weights in "
                "another layout, so the state cannot be resumed. Resume with the tune-alr "
                "version that saved it, or start the run again."
            )
        _check_features(tuple(saved), "in the saved state")
        super().load_state_dict(state_dict)
        # Own copies: the loaded arrays and lists are never shared with the caller's dict.
        self.weights = np.array(self.weights, dtype=np.float64)
        self.adam_m = np.array(self.adam_m, dtype=np.float64)
        self.adam_v = np.array(self.adam_v, dtype=np.float64)
        self.pending = [np.array(x, dtype=np.float64) for x in self.pending]
        # A state saved before a feature was added holds fewer: the new ones start at 0.
        self.features = list(self.features) + [0.0] * (N_FEATURES - len(self.features))
        self.controller_index = list(self.controller_index)
        self.previous, self.update = restore_buffers(self.optimizer, self.previous, self.update)

    def _clamp(self, factor: float) -> float:
        return min(self.max_factor, max(self.min_factor, factor))

    def _features(self, loss: float | None, seen: Observation) -> list[float]:
        if loss is not None:
            self.loss_fast = _ema(self.loss_fast, loss, 0.9)
            self.loss_slow = _ema(self.loss_slow, loss, 0.99)
            if self.loss_first is None:
                self.loss_first = loss
        # Without a loss the EMAs hold, and so do the trend and level computed from them.
        trend = level = 0.0
        if self.loss_fast is not None and self.loss_slow is not None:
            trend = (self.loss_fast - self.loss_slow) / (abs(self.loss_slow) + 1e-12)
            if self.loss_first is not None and self.loss_first > 0 and self.loss_fast > 0:
                level = math.log(self.loss_fast / self.loss_first) / 4.0
        self.grad_norm_ema = _ema(self.grad_norm_ema, seen.grad_norm, 0.99)
        grad_ratio = math.log((seen.grad_norm + 1e-12) / (self.grad_norm_ema + 1e-12))
        self.cos_ema = 0.9 * self.cos_ema + 0.1 * self.cos
        # The alignment in units of its own size: a 100k-weight network's minibatch
        # gradients are nearly orthogonal to its last update (|cos| < 0.2 at any LR),
        # a 100-weight problem's are not (up to 0.7); their ratios are comparable.
        self.cos_sq_ema = _ema(self.cos_sq_ema, self.cos * self.cos, 0.99)
        snr = self.cos_ema / (math.sqrt(self.cos_sq_ema) + 1e-12)
        # The secant: <g_t - g_{t-1}, u_{t-1}> / (|u_{t-1}| |g_{t-1}|).
        if self.last_next_dot is not None and seen.update_norm > 0 and self.last_grad_norm > 0:
            r = (seen.dot - self.last_next_dot) / (seen.update_norm * self.last_grad_norm)
            self.curvature_ema = 0.9 * self.curvature_ema + 0.1 * _clip(r, -3.0, 5.0)
        self.last_next_dot = seen.next_dot
        self.last_grad_norm = seen.grad_norm
        progress = 0.0
        if self.total_steps is not None:
            progress = min(1.0, self.last_epoch / self.total_steps)
        return [
            math.log(self.factor) / _DECADE,
            _clip(trend),
            _clip(grad_ratio / 3.0),
            self.cos_ema,
            self.cos,
            _clip(level),
            _clip((self.curvature_ema - 1.0) / 2.0),
            progress,
            _clip(snr),
        ]

    def _delta(self, output: float) -> float:
        return self.max_step * math.tanh(self.output_scale * output)

    def _meta_update(self, graded: np.ndarray, signal: float) -> None:
        """One Adam step of the controller on ``signal * delta(graded features)``."""
        output, act = controller_output(self.weights, graded, self.hidden)
        # d delta / d output, through the tanh and the output scale
        slope = (
            self.max_step * self.output_scale * (1.0 - math.tanh(self.output_scale * output) ** 2)
        )
        grad = controller_gradient(self.weights, graded, self.hidden, signal * slope, act)
        self.meta_steps += 1
        self.weights, self.adam_m, self.adam_v = adam_update(
            self.weights, grad, self.adam_m, self.adam_v, self.meta_steps,
            lr=self.meta_lr, clip=self.meta_clip, n_features=len(graded),
        )  # fmt: skip

    def _next_factor(self, loss: float | None) -> float:
        if self.last_epoch == 0:
            return self._clamp(self.initial_factor)
        seen = observe_step(self.optimizer, self.previous, self.update)
        if not math.isfinite(seen.dot):
            return self._trip()
        # The loss is optional: no loss is no evidence of divergence, only a bad one is.
        if loss is not None and (
            not math.isfinite(loss)
            or (self.loss_slow is not None and loss > self.divergence_ratio * self.loss_slow)
        ):
            return self._trip()
        self.cos = seen.cos
        if len(self.pending) == 2:
            # The decision of two steps ago set the LR of u_{t-1}: grade it by <g_t, u_{t-1}>.
            self._meta_update(self.pending.pop(0), self.cos - self.optimism)
        self.features = self._features(loss, seen)
        x = np.array([self.features[i] for i in self.controller_index])
        output, _ = controller_output(self.weights, x, self.hidden)
        self.delta = self._delta(output)
        self.pending.append(x)
        return self._clamp(self.factor * math.exp(self.delta))

    def _trip(self) -> float:
        self.guard_trips += 1
        self.pending = []  # the graded decisions belong to a run that blew up
        self.last_next_dot = None  # no secant across a blown-up step
        return self._clamp(self.factor * self.guard_cut)
