"""The policies: exact LR traces, bad arguments, exact resume."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from tune_alr.policies import Feedback, available, build, feedback_decision


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _probe(values: list[float]) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def _trace(policy: torch.optim.lr_scheduler.LRScheduler, steps: int, losses=None) -> list[float]:
    out = []
    for k in range(steps):
        policy.optimizer.step()
        policy.step(None if losses is None else losses[k])
        out.append(policy.get_last_lr()[0])
    return out


def test_available_lists_the_contract_names() -> None:
    assert {"constant", "step", "cyclic", "cosine", "plateau", "feedback", "plan1-literal"} <= set(
        available()
    )


C = math.cos(math.pi / 4)


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("constant", {}, [1, 1, 1, 1, 1]),
        ("step", {"step_size": 3, "gamma": 0.5}, [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]),
        ("cyclic", {"half_cycle": 2, "low": 0.1, "high": 1.0}, [0.55, 1.0, 0.55, 0.1, 0.55]),
        ("cosine", {"t_max": 4}, [(1 + C) / 2, 0.5, (1 - C) / 2, 0.0, 0.0]),
        ("cosine", {"t_max": 4, "warmup_steps": 2}, [1.0, 1.0, 0.5, 0.0]),
    ],
)
def test_schedule_traces(name: str, params: dict, expected: list[float]) -> None:
    policy = build(name, _optimizer(1.0), **params)
    assert _trace(policy, len(expected)) == pytest.approx(expected, abs=1e-12)


def test_initial_lr_is_the_schedule_at_step_zero() -> None:
    assert build("cyclic", _optimizer(2.0), half_cycle=2, low=0.1).get_last_lr() == [
        pytest.approx(0.2)
    ]
    assert build("cosine", _optimizer(1.0), t_max=10, warmup_steps=4).get_last_lr() == [0.25]


def test_step_and_cyclic_size_themselves_from_total_steps() -> None:
    step = build("step", _optimizer(1.0), total_steps=9)  # decays at 3 and 6: two in the run
    assert _trace(step, 9) == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001])
    cyclic = build("cyclic", _optimizer(1.0), total_steps=8)  # half cycle of 2 steps
    assert cyclic.half_cycle == 2


def test_plateau_trace() -> None:
    probe = _probe([1.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8])
    policy = build(
        "plateau", _optimizer(), evaluate=probe, interval=1, patience=1, decay=0.5, threshold=0.0
    )
    assert _trace(policy, 7) == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])


@pytest.mark.parametrize(
    ("previous", "current", "streak", "accelerate", "expected"),
    [
        (None, 1.0, 0, True, (1.0, 0)),  # first check only records
        (1.0, 0.98, 0, False, (1.1, 1)),  # 2% better: raise 10%
        (1.0, 0.995, 0, False, (0.9, -1)),  # 0.5% better: below 1%, lower 10%
        (1.0, 1.2, 0, False, (0.9, -1)),  # worse: lower
        (1.0, 0.99, 0, False, (1.1, 1)),  # exactly the threshold counts as progress
        (1.0, 0.9, 2, True, (1.1**3, 3)),  # third raise in a row compounds
        (1.0, 0.9, 7, True, (1.1**5, 8)),  # capped at max_streak=5
        (1.0, 1.0, 3, True, (0.9 / 1.1**3, -1)),  # a cut after raises takes the last raise back
        (1.0, 1.0, -2, True, (0.9**3, -3)),  # third cut in a row compounds
        (1.0, 0.9, -3, True, (1.1, 1)),  # a raise after cuts restarts at one step
        (0.0, 0.0, 0, False, (0.9, -1)),  # a zero signal cannot improve relatively
    ],
)
def test_feedback_decision_table(previous, current, streak, accelerate, expected) -> None:
    multiplier, new_streak = feedback_decision(
        previous, current, threshold=0.01, factor=0.1, streak=streak,
        accelerate=accelerate, max_streak=5,
    )  # fmt: skip
    assert (multiplier, new_streak) == (pytest.approx(expected[0]), expected[1])


def test_plan1_literal_trace_every_interval() -> None:
    probe = _probe([1.0, 0.9, 0.895, 0.8, 0.81])
    policy = build("plan1-literal", _optimizer(), evaluate=probe, interval=2)
    expected = [1, 1, 1, 1.1, 1.1, 0.99, 0.99, 1.089, 1.089, 0.9801]
    assert _trace(policy, 10) == pytest.approx(expected)


def test_feedback_defaults_are_plan1_settings() -> None:
    policy = build("feedback", _optimizer(), evaluate=lambda: 1.0)
    assert (policy.interval, policy.adjust, policy.threshold) == (100, 0.1, 0.01)
    literal = build("plan1-literal", _optimizer(), evaluate=lambda: 1.0)
    assert (literal.interval, literal.adjust, literal.threshold) == (100, 0.1, 0.01)
    assert not literal.guard and not literal.accelerate and literal.early_interval is None
    assert literal.warmup_steps == 0 and policy.warmup_steps == 100  # the protective start
    # ... at most a quarter of a run of known length (digits' 102 steps: 25)
    assert build("feedback", _optimizer(), evaluate=lambda: 1.0, total_steps=102).warmup_steps == 25
    assert (
        build("feedback", _optimizer(), evaluate=lambda: 1.0, total_steps=5000).warmup_steps == 100
    )


def test_feedback_threshold_is_a_rate_per_interval() -> None:
    """Checks 25 steps apart ask for a quarter of the 1% per 100 steps: a loss falling 0.4%
    a check (a plateau's slow start) raises the LR; with ``rate_threshold=False`` every
    such check is a cut, and the cuts compound. At the plan's cadence nothing changes."""
    falling = [1.0 * 0.996**k for k in range(6)]
    settings = {"interval": 100, "early_interval": 25, "warmup_steps": 0, "guard": False}
    rate = build("feedback", _optimizer(), evaluate=_probe(falling), **settings)
    strict = build(
        "feedback", _optimizer(), evaluate=_probe(falling), rate_threshold=False, **settings
    )
    rate_lrs, strict_lrs = _trace(rate, 126), _trace(strict, 126)
    assert rate.streak == 4 and rate_lrs[-1] > 1.0  # four raises after the first check
    assert strict.streak == -4 and strict_lrs[-1] < 0.7  # four compounding cuts
    # At a fixed cadence the scaled threshold is the threshold: 0.4% per 100 steps cuts.
    plain = build("feedback", _optimizer(), evaluate=_probe(falling), early_interval=None,
                  warmup_steps=0, guard=False)  # fmt: skip
    _trace(plain, 301)
    assert plain.streak == -2


def test_feedback_ramp_asks_the_full_threshold_then_the_rate() -> None:
    """A 0.4% fall per 25-step check during the ramp is a cut that ends it (a start too
    high is never reached); after it, the same fall is progress (0.25% is asked)."""
    falling = [1.0 * 0.996**k for k in range(8)]
    policy = build("feedback", _optimizer(), evaluate=_probe(falling), interval=100,
                   early_interval=25, warmup_steps=100, guard=False)  # fmt: skip
    _trace(policy, 51)  # checks at 25 (the first) and 50 (during the ramp)
    assert not policy.warming and policy.streak == -1  # cut: the ramp ended where it stood
    ended = policy.get_last_lr()[0]
    assert ended < 0.5
    _trace(policy, 75)  # checks at 75, 100, 125: progress at the rate now
    assert policy.streak == 3 and policy.get_last_lr()[0] > ended


def test_feedback_protective_start_ramps_up_geometrically() -> None:
    """From warmup_start x the LR to the LR over warmup_steps steps; checks act on top."""
    probe = _probe([1.0, 0.5, 0.25, 0.2, 0.19])  # steadily better: raises
    policy = build("feedback", _optimizer(), evaluate=probe, interval=2, early_interval=None,
                   warmup_steps=4, warmup_start=0.01, accelerate=False)  # fmt: skip
    assert policy.get_last_lr() == [pytest.approx(0.01)]  # the first step's LR
    ramp = [0.01 ** (1 - t / 4) for t in (1, 2, 3)] + [1.0, 1.0, 1.0]
    factor = [1.0, 1.0, 1.0, 1.1, 1.1, 1.21]  # the check at 2 records, 4 and 6 raise
    assert _trace(policy, 6) == pytest.approx([r * f for r, f in zip(ramp, factor, strict=True)])
    assert not policy.warming and policy.warmup == 1.0


@pytest.mark.parametrize("cause", ["check", "guard"])
def test_feedback_protective_start_ends_at_the_first_cut(cause: str) -> None:
    """A cut during the ramp ends it where it stands: the LR of the step just taken
    becomes the policy's own, then the cut applies; the LR never jumps back up."""
    if cause == "check":  # the check at step 4 shows no progress: a 10% cut
        policy = build("feedback", _optimizer(), evaluate=_probe([1.0, 1.0]), interval=2,
                       early_interval=None, warmup_steps=10, warmup_start=0.1)  # fmt: skip
        trace = _trace(policy, 5)
        stop, cut = 3, 0.9
    else:  # a non-finite loss at step 3: the guard halves
        policy = build("feedback", _optimizer(), interval=100, warmup_steps=10, warmup_start=0.1)
        trace = _trace(policy, 5, losses=[1.0, 1.0, float("nan"), 1.0, 1.0])
        stop, cut = 2, 0.5
    ramp = [0.1 ** (1 - t / 10) for t in range(1, stop + 1)]
    assert trace[:stop] == pytest.approx(ramp)
    reached = ramp[-1]
    assert trace[stop:] == pytest.approx([reached * cut] * (5 - stop))
    assert not policy.warming and policy.factor == pytest.approx(reached * cut)


def test_feedback_accelerates_retreats_and_guards() -> None:
    probe = _probe([1.0, 0.9, 0.8, 0.7, 0.75, 2.0, 0.7, 0.6, 0.5])
    # The rule alone (the protective start is tested below).
    policy = build("feedback", _optimizer(), evaluate=probe, interval=1, early_interval=None,
                   warmup_steps=0)  # fmt: skip
    f = [1.0, 1.1, 1.1 * 1.21, 1.1 * 1.21 * 1.331]
    f.append(f[-1] * 0.9 / 1.331)  # the cut after three raises takes the third back
    f.append(f[-1] * 0.5)  # 2.0 > 2 x 0.75: the guard halves the LR
    f.append(f[-1])  # cooldown: a raise is withheld (1 of 2)
    f.append(f[-1])  # cooldown: withheld (2 of 2)
    f.append(f[-1] * 1.1)  # withheld raises do not count: the first raise actually applied
    assert _trace(policy, 9) == pytest.approx(f)
    assert policy.guard_trips == 1


@pytest.mark.parametrize(
    ("cooldown", "probes", "expected"),
    [
        # The bug report: raise, trip, two raises withheld, then a cut. The cut takes back
        # no raise, because none was applied since the trip: x0.9, not x0.9 / 1.1**2.
        (2, [1.0, 0.9, 2.0, 0.8, 0.7, 0.75], [1.0, 1.1, 0.55, 0.55, 0.55, 0.55 * 0.9]),
        # A raise withheld, then the first raise after the cooldown is a first raise.
        (1, [1.0, 2.5, 0.9, 0.8], [1.0, 0.5, 0.5, 0.55]),
        # A raise withheld, then a cut: a plain first cut.
        (1, [1.0, 2.5, 0.9, 1.0], [1.0, 0.5, 0.5, 0.45]),
        # Cuts during the cooldown apply and compound as usual...
        (2, [1.0, 3.0, 1.1, 1.2, 0.9], [1.0, 0.5, 0.45, 0.45 * 0.81, 0.45 * 0.81 * 1.1]),
        # ...and a withheld raise between two cuts ends the run of cuts (it moved nothing).
        (3, [1.0, 2.5, 1.1, 1.0, 1.05], [1.0, 0.5, 0.45, 0.45, 0.45 * 0.9]),
    ],
)
def test_feedback_raises_withheld_by_the_cooldown_do_not_count_in_the_streak(
    cooldown: int, probes: list[float], expected: list[float]
) -> None:
    policy = build("feedback", _optimizer(), evaluate=_probe(probes), interval=1,
                   early_interval=None, cooldown=cooldown, warmup_steps=0)  # fmt: skip
    assert _trace(policy, len(probes)) == pytest.approx(expected, rel=1e-12)
    assert policy.guard_trips == 1


def test_feedback_guard_cuts_on_non_finite_loss_and_bounds_hold() -> None:
    policy = build("feedback", _optimizer(), interval=1000, min_factor=0.2)
    _trace(policy, 3, losses=[float("nan"), float("inf"), float("nan")])
    assert policy.get_last_lr() == [pytest.approx(0.2)]  # 0.125 clamped at the floor
    assert policy.guard_trips == 3


def test_feedback_early_cadence() -> None:
    calls = []

    def probe() -> float:
        calls.append(policy.last_epoch)
        return 1.0

    policy = build("feedback", _optimizer(), evaluate=probe, interval=10, early_interval=2,
                   early_steps=6)  # fmt: skip
    _trace(policy, 30)
    assert calls == [2, 4, 6, 16, 26]


def test_feedback_without_probe_uses_training_loss_and_says_so_once() -> None:
    policy = build("plan1-literal", _optimizer(), interval=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # window means: (2+2)/2=2, (1+1)/2=1 (50% better: raise), (1+1)/2=1 (no progress: lower)
        trace = _trace(policy, 6, losses=[2, 2, 1, 1, 1, 1])
    assert trace == pytest.approx([1, 1, 1, 1.1, 1.1, 0.99])
    messages = [str(w.message) for w in caught if "no evaluate probe" in str(w.message)]
    assert len(messages) == 1


def test_feedback_without_any_signal_keeps_the_lr_and_warns() -> None:
    policy = build("feedback", _optimizer(), interval=1, early_interval=None, warmup_steps=0)
    with pytest.warns(RuntimeWarning, match="without a loss"):
        assert _trace(policy, 3) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("nope", {}, "unknown policy 'nope'; available:"),
        ("feedback", {"intervall": 5}, "has no parameter 'intervall'"),
        ("feedback", {"interval": 0}, "interval must be an integer >= 1, got 0"),
        ("feedback", {"interval": 2.5}, "interval must be an integer >= 1, got 2.5"),
        ("feedback", {"factor": 1.5}, "factor must be in the open interval (0.0, 1.0), got 1.5"),
        ("feedback", {"factor": 0}, "factor must be in the open interval"),
        ("feedback", {"threshold": -0.1}, "threshold must be a finite number >= 0, got -0.1"),
        ("feedback", {"divergence_ratio": 1.0}, "divergence_ratio must be > 1, got 1.0"),
        ("feedback", {"max_factor": 0.5}, "max_factor must be >= 1"),
        ("feedback", {"min_factor": 2.0}, "min_factor must be <= 1, got 2.0"),
        ("feedback", {"guard_cut": 1.0}, "guard_cut must be in the open interval"),
        ("feedback", {"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
        ("feedback", {"warmup_start": 0.0}, "warmup_start must be in the open interval"),
        ("feedback", {"warmup_start": 1.5}, "warmup_start must be in the open interval"),
        ("step", {"gamma": 1.0}, "gamma must be in the open interval (0.0, 1.0), got 1.0"),
        ("step", {"step_size": 0}, "step_size must be an integer >= 1, got 0"),
        ("cyclic", {"low": 0.5, "high": 0.4}, "high must be greater than low=0.5, got 0.4"),
        ("cyclic", {"low": -1.0}, "low must be a finite number > 0, got -1.0"),
        ("cosine", {}, "cosine needs the run length"),
        ("cosine", {"t_max": 10, "min_factor": 1.0}, "min_factor must be in [0, 1), got 1.0"),
        ("plateau", {"patience": -1}, "patience must be an integer >= 0, got -1"),
        ("plateau", {"decay": 2.0}, "decay must be in the open interval (0.0, 1.0), got 2.0"),
        ("constant", {"total_steps": 0}, "total_steps must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_value_error(name: str, params: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        build(name, _optimizer(), **params)
    assert fragment in str(err.value)


# -- boolean parameters: parsed strictly -------------------------------------------


# Every boolean parameter of every policy, by the registry name that takes it.
BOOLEAN_PARAMETERS = [
    ("feedback", "accelerate"),
    ("feedback", "guard"),
    ("feedback", "rate_threshold"),
    ("plan1-literal", "accelerate"),
    ("plan1-literal", "guard"),
    ("plan1-literal", "rate_threshold"),
]

ACCEPTED_BOOLEANS = [
    (True, True),
    (False, False),
    (1, True),
    (0, False),
    (np.bool_(True), True),
    (np.bool_(False), False),
    ("true", True),
    ("True", True),
    ("TRUE", True),
    ("false", False),
    ("False", False),
    ("False ", False),
    (" no\n", False),
    ("yes", True),
    ("Yes", True),
    ("no", False),
    ("1", True),
    ("0", False),
]
REJECTED_BOOLEANS = ["nope", "", "on", "off", "t", "2", 2, -1, 0.5, 1.0, None, [True]]


@pytest.mark.parametrize(("value", "expected"), ACCEPTED_BOOLEANS)
@pytest.mark.parametrize(("name", "parameter"), BOOLEAN_PARAMETERS)
def test_boolean_parameters_parse_strictly(
    name: str, parameter: str, value: object, expected: bool
) -> None:
    policy = build(name, _optimizer(), evaluate=lambda: 1.0, **{parameter: value})
    assert getattr(policy, parameter) is expected


@pytest.mark.parametrize("value", REJECTED_BOOLEANS)
@pytest.mark.parametrize(("name", "parameter"), BOOLEAN_PARAMETERS)
def test_boolean_parameters_reject_anything_else(name: str, parameter: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        build(name, _optimizer(), evaluate=lambda: 1.0, **{parameter: value})
    message = str(err.value)
    assert message.startswith(f"{parameter} must be a boolean")
    assert f"got {value!r}" in message
    assert "'true', 'false', 'yes', 'no', '1', '0'" in message


@pytest.mark.parametrize(("value", "expected"), ACCEPTED_BOOLEANS)
def test_check_bool_accepts(value: object, expected: bool) -> None:
    from tune_alr.policies.base import check_bool

    assert check_bool("flag", value) is expected


@pytest.mark.parametrize("value", REJECTED_BOOLEANS)
def test_check_bool_rejects(value: object) -> None:
    from tune_alr.policies.base import check_bool

    with pytest.raises(ValueError, match=r"^flag must be a boolean: .*, got "):
        check_bool("flag", value)


def test_boolean_parameters_table_is_complete() -> None:
    """Every parameter annotated ``bool`` on a policy is in ``BOOLEAN_PARAMETERS``."""
    import inspect

    from tune_alr import policies

    found = set()
    for export in policies.__all__:
        cls = getattr(policies, export)
        if isinstance(cls, type) and issubclass(cls, policies.Policy):
            for parameter, spec in inspect.signature(cls).parameters.items():
                if "bool" in str(spec.annotation):
                    found.add((cls.__name__, parameter))
    assert found == {
        ("Feedback", "accelerate"),
        ("Feedback", "guard"),
        ("Feedback", "rate_threshold"),
    }
    assert {p for n, p in BOOLEAN_PARAMETERS if n == "feedback"} == {p for _, p in found}


def test_bad_evaluate_and_optimizer() -> None:
    with pytest.raises(ValueError, match="evaluate must be a zero-argument callable"):
        build("feedback", _optimizer(), evaluate=3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        build("constant", "sgd")  # type: ignore[arg-type]


# -- exact resume -------------------------------------------------------------------


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    return x, y


def _run(name: str, steps: int, params: dict, state=None, start: int = 0):
    """``steps`` steps of minibatch SGD on a linear model under ``name``: LR trace, state."""
    x, y = _problem()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def probe() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x[:64]), y[:64]))

    policy = build(name, optimizer, evaluate=probe, total_steps=60, **params)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        policy.load_state_dict(state["policy"])
    trace = []
    for k in range(start, start + steps):
        idx = torch.arange(k * 16, k * 16 + 16) % 256
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        policy.step(loss.item())
        trace.append(policy.get_last_lr()[0])
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "policy": policy.state_dict()}  # fmt: skip
    return trace, saved


@pytest.mark.parametrize("name", available())
def test_exact_resume(name: str) -> None:
    """N steps, save, load into fresh objects, M more: the trace of one unbroken run."""
    interval = name in ("feedback", "plan1-literal", "plateau")
    params = {"interval": 3} if interval else {}
    whole, _ = _run(name, 60, params)
    first, state = _run(name, 25, params)
    # The resumed policy is built with other arguments: the loaded state must win.
    other = {"interval": 50} if interval else {}
    rest, _ = _run(name, 35, other, state=_copy(state), start=25)
    assert first + rest == whole  # bit for bit
    assert len(set(whole)) > 1 or name == "constant"  # the trace actually moves


def _copy(state):
    import copy
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)  # through serialisation, as a checkpoint would
    buffer.seek(0)
    return copy.deepcopy(torch.load(buffer, weights_only=False))


def test_state_dict_excludes_the_probe_and_restores_the_lr() -> None:
    # (Without the protective start, whose ramp would multiply the restored factor.)
    policy = build("feedback", _optimizer(), evaluate=lambda: 1.0, warmup_steps=0)
    state = policy.state_dict()
    assert "_evaluate" not in state and "optimizer" not in state
    state["factor"] = 0.25
    fresh = Feedback(_optimizer(), evaluate=lambda: 1.0, warmup_steps=0)
    fresh.load_state_dict(state)
    assert fresh.optimizer.param_groups[0]["lr"] == 0.25
    assert fresh.get_last_lr() == [0.25]


def test_param_groups_keep_their_proportion() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    policy = build("step", optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    policy.step()
    assert policy.get_last_lr() == [0.5, 0.05]
