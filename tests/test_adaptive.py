"""hd and meta: the published rule by hand, the controller against torch, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tune_alr.policies import build
from tune_alr.policies.meta import (
    N_FEATURES,
    adam_update,
    controller_gradient,
    controller_output,
    make_controller,
)


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


def _torch_controller(net: dict[str, np.ndarray]) -> torch.nn.Sequential:
    hidden = len(net["b1"])
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
    """The NumPy controller (forward, gradient, clipped Adam) equals torch's, over 20 steps."""
    net = make_controller(12, seed=3)
    net["w2"] = np.random.default_rng(1).normal(size=12)  # non-zero, to test every path
    ref = _torch_controller(net)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-2)
    moments = {
        "m": {k: np.zeros_like(v) for k, v in net.items()},
        "v": {k: np.zeros_like(v) for k, v in net.items()},
    }
    rng = np.random.default_rng(0)
    for step in range(1, 21):
        x = rng.normal(size=N_FEATURES)
        signal = float(rng.normal()) * 3.0  # large enough that clipping at 1.0 acts
        out, _ = controller_output(net, x)
        ref_out = ref(torch.from_numpy(x))
        assert out == pytest.approx(float(ref_out.detach()), rel=1e-10)
        adam.zero_grad()
        (signal * ref_out).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        adam.step()
        grads = controller_gradient(net, x, signal)
        adam_update(net, grads, moments, step, lr=1e-2, clip=1.0)
    np.testing.assert_allclose(net["w1"], ref[0].weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(net["w2"], ref[2].weight.detach().numpy()[0], rtol=1e-6)


def test_meta_starts_as_a_constant_lr() -> None:
    net = make_controller(12, seed=0)
    assert controller_output(net, np.ones(N_FEATURES))[0] == 0.0
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    policy = build("meta", optimizer)
    (p**2).sum().backward()
    optimizer.step()
    policy.step(1.0)
    assert policy.get_last_lr() == [0.1]  # nothing graded yet: delta is exactly 0


def test_meta_guard_halves_the_lr_on_a_non_finite_loss() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    policy = build("meta", optimizer)
    optimizer.step()
    policy.step(float("nan"))
    assert policy.get_last_lr() == [pytest.approx(0.05)] and policy.guard_trips == 1


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
