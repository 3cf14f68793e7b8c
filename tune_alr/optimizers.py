"""Optimizers by name: PyTorch's own and the learning-rate-free anchors (imports torch only).

    from tune_alr import optimizers
    run = optimizers.build("prodigy", model, lr=None)   # lr None: the authors' default
    run.train_mode()
    ...
    loss.backward(); run.optimizer.step(); run.after_step()
    with run.eval_model() as m:                         # the weights to evaluate
        evaluate(m)

The anchors are the published methods a learning-rate policy has to beat. They need
the optional extra ``anchors`` (``pip install 'tune-alr[anchors]'``, pinned in
``constraints.txt``); each runs with the defaults its authors publish:

* ``sf-adamw``: Schedule-Free AdamW (Defazio et al. 2024, ``schedulefree``): lr 0.0025,
  betas (0.9, 0.999), no warm-up (``warmup_steps`` can be given). It keeps two sequences:
  the optimizer must be in ``train()`` mode to step and in ``eval()`` mode to evaluate
  (the weights are swapped to the averaged sequence x). Models with BatchNorm get their
  running statistics recomputed on training batches in eval mode, as its README asks.
* ``sf-sgd``: Schedule-Free SGD, lr 1.0, momentum 0.9, the same modes.
* ``prodigy``: Prodigy (Mishchenko & Defazio 2024, ``prodigyopt``): lr 1.0, d0 1e-6,
  betas (0.9, 0.999), decoupled weight decay 0. Its step size is ``lr x d``.
* ``dadapt-adam``: D-Adaptation Adam (Defazio & Mishchenko 2023, ``dadaptation``):
  lr 1.0, d0 1e-6. Its step size is ``lr x d``.
* ``dog``: DoG (Ivgi et al. 2023, ``dog-optimizer``): lr 1.0, reps_rel 1e-6 (1e-4 for a
  model with BatchNorm, as its authors advise), evaluated on the polynomial-decay
  average of the weights (gamma 8) that its authors call crucial. Its step size is eta.

A learning-rate policy wraps any of them: it scales the group's ``lr`` (the multiplier
these methods apply to their own estimate), so ``feedback`` on ``prodigy`` is valid.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: The extra that installs the anchors.
EXTRA_HINT = "pip install 'tune-alr[anchors]' (or -c constraints.txt -e '.[anchors]')"

#: Batches of training data used to recompute BatchNorm statistics for Schedule-Free.
BN_BATCHES = 20


@dataclass(frozen=True)
class Spec:
    """How to build one optimizer.

    Attributes:
        module, cls: where the class lives (imported on first use).
        default_lr: the LR used when none is given (the authors' default for anchors).
        package: the pip package, for the error when it is missing (``None``: torch).
        modes: the optimizer has ``train()``/``eval()`` modes (Schedule-Free).
        averaging: evaluate on a polynomial-decay average of the weights (DoG).
        step_size: the effective step size from the first param group, when it is not
            the group's ``lr``.
    """

    module: str
    cls: str
    default_lr: float | None
    package: str | None = None
    modes: bool = False
    averaging: bool = False
    step_size: Callable[[Mapping[str, Any]], float] | None = None


def _times_d(group: Mapping[str, Any]) -> float:
    return float(group["lr"]) * float(group.get("d", 1.0))


def _scheduled(group: Mapping[str, Any]) -> float:
    # Before the first step Schedule-Free has no scheduled LR yet: its warm-up starts at 0.
    return float(group.get("scheduled_lr", 0.0))


def _eta(group: Mapping[str, Any]) -> float:
    eta = group.get("eta")
    if not eta:  # DoG sets eta at its first step
        return float("nan")
    return float(eta[0])


_SPECS: dict[str, Spec] = {
    "sgd": Spec("torch.optim", "SGD", None),
    "adam": Spec("torch.optim", "Adam", None),
    "adamw": Spec("torch.optim", "AdamW", None),
    "rmsprop": Spec("torch.optim", "RMSprop", None),
    "sf-adamw": Spec(
        "schedulefree", "AdamWScheduleFree", 0.0025, "schedulefree", modes=True,
        step_size=_scheduled,
    ),
    "sf-sgd": Spec(
        "schedulefree", "SGDScheduleFree", 1.0, "schedulefree", modes=True, step_size=_scheduled
    ),
    "prodigy": Spec("prodigyopt", "Prodigy", 1.0, "prodigyopt", step_size=_times_d),
    "dadapt-adam": Spec("dadaptation", "DAdaptAdam", 1.0, "dadaptation", step_size=_times_d),
    "dog": Spec("dog", "DoG", 1.0, "dog-optimizer", averaging=True, step_size=_eta),
}  # fmt: skip

BUILTIN = ("sgd", "adam", "adamw", "rmsprop")
ANCHORS = ("sf-adamw", "sf-sgd", "prodigy", "dadapt-adam", "dog")


def available() -> list[str]:
    """Every optimizer name :func:`build` accepts (PyTorch's, then the anchors)."""
    return [*BUILTIN, *ANCHORS]


def spec(name: object) -> Spec:
    """The :class:`Spec` of ``name``; ``ValueError`` naming the accepted ones otherwise."""
    try:
        return _SPECS[name] if isinstance(name, str) else _SPECS[""]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; accepted: {', '.join(available())}."
        ) from None


def default_lr(name: str) -> float | None:
    """The LR an optimizer runs at when none is given (anchors: the published default)."""
    return spec(name).default_lr


def is_installed(name: str) -> bool:
    """Whether the package behind ``name`` can be imported."""
    try:
        _class(name)
    except ValueError:
        return False
    return True


def _class(name: object) -> type[torch.optim.Optimizer]:
    s = spec(name)
    try:
        module = importlib.import_module(s.module)
    except ImportError as err:
        raise ValueError(
            f"optimizer {name!r} needs the package {s.package!r}, which is not installed: "
            f"{EXTRA_HINT}."
        ) from err
    cls: type[torch.optim.Optimizer] = getattr(module, s.cls)
    return cls


def check(name: object) -> None:
    """Raise ``ValueError`` if ``name`` is unknown or its package is missing."""
    _class(name)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Run:
    """One optimizer driving one model, with the hooks the training loop calls.

    Attributes:
        optimizer: the ``torch.optim.Optimizer``.
        name: its registry name.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        bn_batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self._spec = spec(name)
        self._bn_batches = bn_batches
        self._averager: Any = None
        if self._spec.averaging:
            # DoG's own averager (Shamir & Zhang polynomial decay, gamma 8).
            from dog import PolynomialDecayAverager

            self._averager = PolynomialDecayAverager(model, gamma=8.0)

    # -- the loop's hooks --------------------------------------------------------

    def train_mode(self) -> None:
        """Before training steps (Schedule-Free swaps the weights back to its y)."""
        if self._spec.modes:
            self.optimizer.train()  # type: ignore[attr-defined]

    def after_step(self) -> None:
        """After each ``optimizer.step()`` that updated the weights."""
        if self._averager is not None:
            self._averager.step()

    @contextlib.contextmanager
    def eval_model(self) -> Iterator[nn.Module]:
        """The model whose weights are the ones to evaluate, for the ``with`` block.

        Schedule-Free: the optimizer is put in eval mode (weights x) and back in train
        mode afterwards; DoG: the averaged copy; everything else: the model itself.
        """
        if self._averager is not None:
            yield self._averager.averaged_model
            return
        if not self._spec.modes:
            yield self.model
            return
        # Schedule-Free's eval() and train() move the weights between y and x by
        # arithmetic (lerp), which is not exact both ways: the weights after a round trip
        # differ in their last bits, so a run would depend on how often it evaluated (a
        # trial's last report, with its test split, would checkpoint other weights than
        # the same step of a longer run). The training weights are put back as they were.
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.model.parameters()]
        self.optimizer.eval()  # type: ignore[attr-defined]
        try:
            if _has_batchnorm(self.model) and self._bn_batches is not None:
                self._recompute_batchnorm()
            yield self.model
        finally:
            self.optimizer.train()  # type: ignore[attr-defined]
            with torch.no_grad():
                for param, value in zip(self.model.parameters(), kept, strict=True):
                    param.copy_(value)

    @torch.no_grad()
    def _recompute_batchnorm(self) -> None:
        """Running statistics measured at the evaluated weights (Schedule-Free's README)."""
        assert self._bn_batches is not None
        was_training = self.model.training
        saved: dict[nn.modules.batchnorm._BatchNorm, float | None] = {}
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                saved[m] = m.momentum
                m.momentum = None  # a cumulative average over the batches below
        self.model.train()
        for inputs in self._bn_batches():
            self.model(*inputs)
        for m, momentum in saved.items():
            m.momentum = momentum
        self.model.train(was_training)

    def step_size(self) -> float:
        """The effective step size of the first parameter group (its LR for PyTorch's)."""
        group = self.optimizer.param_groups[0]
        if self._spec.step_size is None:
            return float(group["lr"])
        return self._spec.step_size(group)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the model and optimizer (DoG's average)."""
        return {} if self._averager is None else {"averager": self._averager.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._averager is not None and "averager" in state:
            self._averager.load_state_dict(copy.deepcopy(dict(state["averager"])))


def build(
    name: str,
    model: nn.Module,
    lr: float | None = None,
    params: Mapping[str, Any] | None = None,
    *,
    bn_batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]] | None = None,
) -> Run:
    """The optimizer ``name`` on ``model``'s parameters, wrapped in a :class:`Run`.

    Args:
        name: one of :func:`available`.
        lr: the learning rate (for the anchors, the multiplier on their own estimate);
            ``None`` takes :func:`default_lr`.
        params: other keyword arguments of the optimizer class.
        bn_batches: callable yielding input tuples of training data; Schedule-Free uses
            them to recompute BatchNorm statistics before each evaluation.

    Raises:
        ValueError: an unknown name, a missing package, or parameters the class rejects.
    """
    cls: Any = _class(name)
    extra = dict(params or {})
    if lr is None:
        lr = default_lr(name)
    if lr is None:
        raise ValueError(f"optimizer {name!r} has no default learning rate; give lr.")
    if name == "dog" and "reps_rel" not in extra and _has_batchnorm(model):
        extra["reps_rel"] = 1e-4  # the DoG authors' value for models with BatchNorm
    try:
        optimizer = cls(model.parameters(), lr=lr, **extra)
    except TypeError as err:
        raise ValueError(f"optimizer {name!r} rejected its parameters {extra}: {err}") from err
    return Run(name, model, optimizer, bn_batches=bn_batches)


__all__ = [
    "ANCHORS",
    "BUILTIN",
    "Run",
    "Spec",
    "available",
    "build",
    "check",
    "default_lr",
    "is_installed",
    "spec",
]
