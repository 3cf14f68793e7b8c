"""hd and meta: the published rule by hand, the controller against torch, bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tune_alr.policies import build
from tune_alr.policies.meta import (
    PLAN2_FEATURES,
    adam_update,
    controller_gradient,
    controller_output,
    scratch_weights,
    unpack,
)

N_FEATURES = len(PLAN2_FEATURES)  # the scratch controller's inputs


def test_hd_follows_the_paper_on_a_quadratic() -> None:
    """SGD-HD: a_t = a_{t-1} + beta * g_t . g_{t-1} on f = theta^2 / 2 from theta = 1."""
    theta = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = torch.optim.SGD([theta], lr=0.1)
    policy = build("hd", optimizer, beta=0.01)
    lrs, grads = [], []
    for _ in range(4):
        optimizer.zero_grad()
        (0.5 * theta**2).sum().backward()
        grads.append(float(theta.grad))
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        policy.step()
    # the first step has no previous update; then each LR adds beta * g_t * g_{t-1}
    assert lrs[1] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.1 + 0.01 * grads[1] * grads[0])
    assert lrs[3] == pytest.approx(lrs[2] + 0.01 * grads[2] * grads[1])


def test_hd_default_beta_is_the_published_one() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert build("hd", torch.optim.SGD(p, lr=0.1)).beta == 1e-3  # SGD-HD
    assert build("hd", torch.optim.Adam(p, lr=0.1)).beta == 1e-7  # Adam-HD


def _torch_controller(weights: np.ndarray, hidden: int) -> torch.nn.Sequential:
    net = unpack(weights, N_FEATURES, hidden)
    ref = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    ).double()
    with torch.no_grad():
        ref[0].weight.copy_(torch.from_numpy(net["w1"]))
        ref[0].bias.copy_(torch.from_numpy(net["b1"]))
        ref[2].weight.copy_(torch.from_numpy(net["w2"][None, :]))
        ref[2].bias.copy_(torch.from_numpy(net["b2"]))
    return ref


def test_controller_matches_torch_autograd_and_adam() -> None:
    """The NumPy controller (forward, gradient, clipped Adam) equals torch's, over 20 steps.

    (Updated when the controller became one flat vector, for the per-step cost: the same
    checks on the new functions.)
    """
    weights = scratch_weights(12, seed=3)
    unpack(weights, N_FEATURES, 12)["w2"][:] = np.random.default_rng(1).normal(size=12)
    ref = _torch_controller(weights, 12)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-2)
    m, v = np.zeros_like(weights), np.zeros_like(weights)
    rng = np.random.default_rng(0)
    for step in range(1, 21):
        x = rng.normal(size=N_FEATURES)
        signal = float(rng.normal()) * (3.0 if step % 2 else 0.1)  # clipped, or not
        out, act = controller_output(weights, x, 12)
        ref_out = ref(torch.from_numpy(x))
        assert out == pytest.approx(float(ref_out.detach()), rel=1e-10)
        adam.zero_grad()
        (signal * ref_out).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        adam.step()
        grad = controller_gradient(weights, x, 12, signal, act)
        weights, m, v = adam_update(weights, grad, m, v, step, lr=1e-2, clip=1.0,
                                    n_features=N_FEATURES)  # fmt: skip
    net = unpack(weights, N_FEATURES, 12)
    np.testing.assert_allclose(net["w1"], ref[0].weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(net["w2"], ref[2].weight.detach().numpy()[0], rtol=1e-6)


def test_meta_scratch_starts_as_a_constant_lr() -> None:
    """Plan 2's blank start (``controller="scratch"``, the default)."""
    weights = scratch_weights(12, seed=0)
    assert controller_output(weights, np.ones(N_FEATURES), 12)[0] == 0.0
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    policy = build("meta", optimizer, controller="scratch")
    (p**2).sum().backward()
    optimizer.step()
    policy.step(1.0)
    assert policy.get_last_lr() == [0.1]  # nothing graded yet: delta is exactly 0


@pytest.mark.parametrize("controller", ["scratch", "meta-trained"])
def test_meta_guard_halves_the_lr_on_a_non_finite_loss(controller: str) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    policy = build("meta", optimizer, controller=controller)
    start = policy.get_last_lr()[0]  # the shipped controller's learned start is below 0.1
    assert start == pytest.approx(0.1 * policy.initial_factor)
    optimizer.step()
    policy.step(float("nan"))
    assert policy.get_last_lr() == [pytest.approx(start / 2)] and policy.guard_trips == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_meta_and_hd_work_with_each_optimizer(optimizer: str) -> None:
    from trainables.loop import train

    for policy in ("meta", "hd"):
        reports: list[dict] = []
        lr = {"sgd": 0.05, "adam": 1e-3, "rmsprop": 1e-3}[optimizer]
        config = {"task": "digits", "policy": policy, "optimizer": optimizer, "lr": lr,
                  "max_steps": 60, "report_every": 30}  # fmt: skip
        last = train(config, lambda metrics, _, out=reports: out.append(metrics))
        assert last["status"] == "finished"
        assert reports[-1]["val_loss"] < reports[0]["val_loss"] * 1.5
        assert all(np.isfinite(r["lr"]) and r["lr"] > 0 for r in reports)


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("meta", {"meta_lr": 0}, "meta_lr must be a finite number > 0, got 0"),
        ("meta", {"meta_clip": -1.0}, "meta_clip must be a finite number > 0, got -1.0"),
        ("meta", {"max_step": float("nan")}, "max_step must be a finite number > 0"),
        ("meta", {"hidden": 0}, "hidden must be an integer >= 1, got 0"),
        ("meta", {"optimism": 1.5}, "optimism must be in (-1, 1), got 1.5"),
        ("meta", {"min_factor": 0.0}, "min_factor must be in the open interval"),
        ("meta", {"max_factor": 0.5}, "max_factor must be >= 1, got 0.5"),
        ("meta", {"divergence_ratio": 0.5}, "divergence_ratio must be > 1, got 0.5"),
        ("meta", {"guard_cut": 0.0}, "guard_cut must be in the open interval"),
        ("meta", {"output_scale": -2.0}, "output_scale must be a finite number > 0"),
        ("meta", {"seed": -1}, "seed must be an integer >= 0, got -1"),
        ("hd", {"beta": -1e-3}, "beta must be a finite number > 0, got -0.001"),
        ("hd", {"min_factor": 0.0}, "min_factor must be a finite number > 0, got 0.0"),
        ("hd", {"max_factor": 0.5}, "max_factor must be >= 1 and >= min_factor, got 0.5"),
    ],
)
def test_bad_arguments(name: str, params: dict, fragment: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError) as err:
        build(name, optimizer, **params)
    assert fragment in str(err.value)


# -- hd's default beta: by the kind of optimizer --------------------------------------

ADAPTIVE, SGD_LIKE = 1e-7, 1e-3  # Adam-HD and SGD-HD's published beta


@pytest.mark.parametrize(
    ("module", "cls", "expected"),
    [
        ("torch.optim", "SGD", SGD_LIKE),
        ("torch.optim", "Adam", ADAPTIVE),
        ("torch.optim", "AdamW", ADAPTIVE),
        ("torch.optim", "RMSprop", ADAPTIVE),
        ("torch.optim", "Adagrad", ADAPTIVE),
        ("torch.optim", "Adadelta", ADAPTIVE),
        ("torch.optim", "Adamax", ADAPTIVE),
        ("torch.optim", "NAdam", ADAPTIVE),
        ("torch.optim", "RAdam", ADAPTIVE),
        ("torch.optim", "SparseAdam", ADAPTIVE),
        # the anchors: classified by their param groups, never imported by the policies
        ("prodigyopt", "Prodigy", ADAPTIVE),
        ("dadaptation", "DAdaptAdam", ADAPTIVE),
        ("dadaptation", "DAdaptSGD", SGD_LIKE),
        ("schedulefree", "AdamWScheduleFree", ADAPTIVE),
        ("schedulefree", "SGDScheduleFree", SGD_LIKE),
        ("dog", "DoG", SGD_LIKE),
    ],
)
def test_hd_default_beta_by_the_kind_of_optimizer(module: str, cls: str, expected: float) -> None:
    optimizer_cls = getattr(pytest.importorskip(module), cls)
    optimizer = optimizer_cls([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert build("hd", optimizer).beta == expected
    from tune_alr.policies.hd import default_beta

    assert default_beta(optimizer) == expected


def test_hd_explicit_beta_wins_over_the_default() -> None:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert build("hd", optimizer, beta=1e-4).beta == 1e-4


# -- meta without a loss ----------------------------------------------------------------


def _meta_trace(losses: list[float | None], **params: object) -> tuple[list[float], object]:
    """Meta on SGD on an ill-conditioned quadratic; ``losses`` are what step() is given."""
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    curvature = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    optimizer = torch.optim.SGD([theta], lr=0.3)
    policy = build("meta", optimizer, **params)
    trace = []
    for loss in losses:
        optimizer.zero_grad()
        (0.5 * curvature * theta**2).sum().backward()
        optimizer.step()
        policy.step(loss)
        trace.append(policy.get_last_lr()[0])
    return trace, policy


def test_meta_without_a_loss_is_not_divergence() -> None:
    """``step()`` with no loss used to trip the guard: five calls left the LR at 1/32.

    On plan 2's blank start (``controller="scratch"``), whose output is exactly 0 until
    graded, so that any move of the LR would be the guard's.
    """
    trace, policy = _meta_trace([None] * 5, controller="scratch")
    assert policy.guard_trips == 0
    assert trace[:2] == [0.3, 0.3]  # nothing graded yet: the controller's output is 0
    # then the controller's first Adam steps (at meta_lr 1e-4) move it a hair, not x1/32
    assert trace == pytest.approx([0.3] * 5, rel=1e-3)


def test_meta_without_a_loss_keeps_learning_from_the_alignment() -> None:
    """No loss: the same decisions as a loss that sits exactly at its averages.

    A constant loss of 1.0 leaves both loss EMAs at 1.0 (a fixed point, exactly), so the
    loss trend is 0 throughout, as it is when no loss is ever given; every other feature
    comes from the gradient and the update. The two LR traces are then the same, bit
    for bit, and move: the controller kept learning from the alignment.
    """
    steps = 30
    without, policy = _meta_trace([None] * steps, meta_lr=1e-2)
    with_loss, reference = _meta_trace([1.0] * steps, meta_lr=1e-2)
    assert without == with_loss
    assert len(set(without)) > 10
    assert policy.guard_trips == 0
    assert policy.meta_steps == reference.meta_steps == steps - 2
    assert policy.loss_fast is None and policy.loss_slow is None  # never saw a loss


def test_meta_without_a_loss_holds_the_loss_features() -> None:
    _, policy = _meta_trace([3.0, 2.0, 1.5])
    held = (policy.loss_fast, policy.loss_slow, policy.features[1])
    meta_steps = policy.meta_steps
    for k in range(4):
        policy.optimizer.step()  # the gradient of the last step, again
        policy.step()
        assert (policy.loss_fast, policy.loss_slow, policy.features[1]) == held
        assert policy.meta_steps == meta_steps + k + 1  # still learning
    assert held[2] < 0  # the trend the loss had (falling) is the one held
    assert policy.guard_trips == 0


@pytest.mark.parametrize("controller", ["scratch", "meta-trained"])
def test_meta_without_a_loss_still_trips_on_a_non_finite_gradient(controller: str) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    policy = build("meta", optimizer, controller=controller)
    start = policy.get_last_lr()[0]
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    optimizer.step()
    policy.step()
    assert policy.get_last_lr() == [pytest.approx(start / 2)] and policy.guard_trips == 1


# -- the parameter copies follow the parameters' device and dtype ---------------------


def _data(device: str | torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, 1, generator=g, dtype=torch.float64) + 0.1
    return x.to(device, dtype), y.to(device, dtype)


def _train(model, optimizer, policy, start: int, steps: int) -> list[float]:
    p = next(model.parameters())
    x, y = _data(p.device, p.dtype)
    trace = []
    for k in range(start, start + steps):
        idx = torch.arange(k * 8, k * 8 + 8) % 64
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        policy.step(loss.item())
        trace.append(policy.get_last_lr()[0])
    return trace


def _through_a_checkpoint(state: dict) -> dict:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=False)  # as a restart does


POLICIES_WITH_COPIES = [("hd", {}), ("meta", {"meta_lr": 1e-2})]


def _moved_mid_run(name: str, params: dict, convert, steps: int = 12):
    """The parameters change device/dtype after ``steps`` steps: an unbroken run (the
    model converted in place, same optimizer and policy) and a restart (checkpoint,
    fresh model converted, fresh optimizer and policy, state loaded). Both traces after
    the change, and both policies."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    # Plain SGD: no optimizer state of its own to convert, the policy's is under test.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = build(name, optimizer, **params)
    _train(model, optimizer, policy, 0, steps)
    checkpoint = _through_a_checkpoint({"model": model.state_dict(), "policy": policy.state_dict()})
    convert(model)
    unbroken = _train(model, optimizer, policy, steps, steps)

    fresh = torch.nn.Linear(4, 1)
    fresh.load_state_dict(checkpoint["model"])
    convert(fresh)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05)
    restored = build(name, fresh_optimizer, **params)
    restored.load_state_dict(checkpoint["policy"])
    for buffer in (*restored.previous, *restored.update):
        p = next(fresh.parameters())
        assert (buffer.device, buffer.dtype) == (p.device, p.dtype)
    resumed = _train(fresh, fresh_optimizer, restored, steps, steps)
    # The loaded buffers are the policy's own, not views of the checkpoint's tensors.
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(restored.previous, checkpoint["policy"]["previous"], strict=True)
    )
    return unbroken, resumed, policy, restored


def _assert_buffers_follow(policy, device: torch.device, dtype: torch.dtype) -> None:
    buffers = [*policy.previous, *policy.update]
    assert buffers and all((b.device, b.dtype) == (device, dtype) for b in buffers)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (torch.float32, torch.float64),  # model.double()
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),  # model.half()
        (torch.float32, torch.bfloat16),
    ],
)
@pytest.mark.parametrize(("name", "params"), POLICIES_WITH_COPIES)
def test_policy_copies_follow_a_dtype_change(
    name: str, params: dict, before: torch.dtype, after: torch.dtype
) -> None:
    """A run restarted in another dtype: loads, steps, continues the unbroken LR sequence."""
    torch.set_default_dtype(before)
    try:
        unbroken, resumed, policy, restored = _moved_mid_run(
            name, params, lambda model: model.to(after)
        )
    finally:
        torch.set_default_dtype(torch.float32)
    assert resumed == unbroken  # bit for bit
    assert len(set(resumed)) > 1  # and the LR moves
    _assert_buffers_follow(policy, torch.device("cpu"), after)
    _assert_buffers_follow(restored, torch.device("cpu"), after)


@pytest.mark.parametrize(("name", "params"), POLICIES_WITH_COPIES)
def test_policy_copies_follow_a_dtype_change_after_construction(name: str, params: dict) -> None:
    """``model.double()`` between building the policy and the first step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = build(name, optimizer, **params)
    model.double()
    trace = _train(model, optimizer, policy, 0, 5)
    assert all(math.isfinite(lr) for lr in trace)
    _assert_buffers_follow(policy, torch.device("cpu"), torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "params"), POLICIES_WITH_COPIES)
def test_policy_copies_follow_a_move_to_cuda(name: str, params: dict) -> None:
    """A CPU checkpoint (map_location="cpu") resumed on a GPU: the copies move with it."""
    unbroken, resumed, policy, restored = _moved_mid_run(
        name, params, lambda model: model.to("cuda")
    )
    assert resumed == unbroken
    cuda = torch.device("cuda", torch.cuda.current_device())
    _assert_buffers_follow(policy, cuda, torch.float32)
    _assert_buffers_follow(restored, cuda, torch.float32)


@pytest.mark.parametrize("name", ["hd", "meta"])
def test_policy_state_for_other_parameters_is_refused(name: str) -> None:
    two = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))])
    state = build(name, two).state_dict()
    one = build(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    with pytest.raises(ValueError, match="2 parameter"):
        one.load_state_dict(state)


def _alignment_features(dim: int, noise: float, lr: float, steps: int = 120) -> tuple[float, float]:
    """Mean ``cos_ema`` and ``cos_snr`` of Adam on a noisy least-squares problem of ``dim``
    weights (steps 40 on), under a meta policy that holds the LR (``max_step`` ~ 0)."""
    from tune_alr.policies.meta import FEATURE_NAMES

    g = torch.Generator().manual_seed(0)
    target = torch.randn(dim, generator=g)
    w = torch.nn.Parameter(torch.zeros(dim))
    opt = torch.optim.Adam([w], lr=lr)
    policy = build("meta", opt, controller="scratch", max_step=1e-9, meta_lr=1e-12)
    cos_ema, snr = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((w - target) ** 2).sum() / dim
        loss.backward()
        assert w.grad is not None
        w.grad += noise * torch.randn(dim, generator=g) / math.sqrt(dim)
        opt.step()
        policy.step(loss.item())
        if step >= 40:
            cos_ema.append(policy.features[FEATURE_NAMES.index("cos_ema")])
            snr.append(policy.features[FEATURE_NAMES.index("cos_snr")])
    return float(np.mean(cos_ema)), float(np.mean(snr))


def test_cos_snr_reads_too_low_on_a_small_and_on_a_noisy_large_problem() -> None:
    """Far below a good LR consecutive Adam steps agree. On 20 clean weights the raw
    alignment says so loudly (about -0.85); on 20,000 noisy ones it is lost in the noise
    (|cos_ema| < 0.01, as on a large network's minibatch gradients), where ``cos_snr``,
    the alignment over its own recent size, still reads it, and less so as the LR rises."""
    small = _alignment_features(dim=20, noise=0.0, lr=1e-4)
    large = _alignment_features(dim=20_000, noise=1.0, lr=1e-4)
    large_high = _alignment_features(dim=20_000, noise=1.0, lr=1e-1)
    assert small[0] < -0.5 and abs(large[0]) < 0.01  # the raw scale differs 100-fold
    assert small[1] < -0.9 and large[1] < -0.3  # the ratio says "too low" on both
    assert large_high[1] > large[1] + 0.2  # and moves with the LR
    assert all(-1.0 <= v <= 1.0 for v in (*small, *large, *large_high))


def test_a_meta_state_saved_before_cos_snr_resumes() -> None:
    """A state from a release with eight features resumes; the new one starts at 0."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    policy = build("meta", opt, controller="scratch")
    state = policy.state_dict()
    state["features"] = state["features"][:8]
    del state["cos_sq_ema"]
    resumed = build("meta", torch.optim.SGD([p], lr=0.1), controller="scratch")
    resumed.load_state_dict(state)
    assert len(resumed.features) == 9 and resumed.features[8] == 0.0
    assert "feature/cos_snr" in resumed.diagnostics()
