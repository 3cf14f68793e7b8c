"""Per-step cost of each policy against no policy, and the memory each one holds.

    python benchmarks/policy_overhead.py [--repeats 5] [--steps 200] [--policies meta,hd]

Plan 2's MNIST CNN (conv32-pool-conv64-pool-fc128-fc10, 421k weights), batch 32 of
random 28x28 images, Adam, 1 thread. Each repeat times every configuration once, in a
shuffled order, over the same number of steps; the ratio of a configuration is its
steps/s over the no-policy steps/s of the same repeat, and the table gives the median
over repeats. ``feedback+probe`` adds a 256-image validation probe (at each check: every
25 steps for the first 400, then every 100), the cost of following plan 1 to the letter.
``meta`` is the default, the shipped meta-trained controller (six features, one more dot
product per parameter than plan 2's first release for its curvature feature),
``meta-scratch`` plan 2's blank start (five features). Targets: feedback within 1% of
no policy, meta and hd within 5%. On a noisy 2-core machine the end-to-end ratio spreads
by +-15% between repeats, so the table also gives the time spent inside ``policy.step``
itself, measured in the same runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from trainables.models import Plan2CNN
from tune_alr.policies import build

POLICIES = ("constant", "step", "cyclic", "plateau", "feedback", "feedback+probe", "hd", "meta",
            "meta-scratch")  # fmt: skip


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def measure(name: str, steps: int, seed: int) -> tuple[float, float, int]:
    """(steps/s, share of the time spent inside policy.step, bytes the policy holds)."""
    torch.manual_seed(seed)
    model = Plan2CNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(steps, 32, 1, 28, 28)
    y = torch.randint(0, 10, (steps, 32))
    probe_x, probe_y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))

    @torch.no_grad()
    def probe() -> float:
        model.eval()
        value = float(F.cross_entropy(model(probe_x), probe_y))
        model.train()
        return value

    policy = None
    if name != "none":
        base = name.removesuffix("+probe").removesuffix("-scratch")
        evaluate: Callable[[], float] | None = probe if name.endswith("+probe") else None
        params = {"controller": "scratch"} if name == "meta-scratch" else {}
        policy = build(base, optimizer, evaluate=evaluate, total_steps=steps, **params)
    for i in range(10):  # warm-up, untimed
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    in_policy = 0.0
    start = time.perf_counter()
    for i in range(steps):
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = loss.item()  # the same sync point with or without a policy
        if policy is not None:
            t0 = time.perf_counter()
            policy.step(value)
            in_policy += time.perf_counter() - t0
    elapsed = time.perf_counter() - start
    held = tensor_bytes(policy.state_dict()) if policy is not None else 0
    return steps / elapsed, in_policy / elapsed, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated subset (default: all)")  # fmt: skip
    args = parser.parse_args()
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(POLICIES))
    if unknown:
        parser.error(f"unknown {unknown}; accepted: {', '.join(POLICIES)}")
    torch.set_num_threads(1)
    ratios: dict[str, list[float]] = {p: [] for p in chosen}
    shares: dict[str, list[float]] = {p: [] for p in chosen}
    held: dict[str, int] = {}
    baseline: list[float] = []
    order = random.Random(0)
    for _ in range(args.repeats):
        names = ["none", *chosen]
        order.shuffle(names)
        rates = {}
        for name in names:
            rates[name], share, held[name] = measure(name, args.steps, seed=0)
            if name != "none":
                shares[name].append(share)
        baseline.append(rates["none"])
        for name in chosen:
            ratios[name].append(rates[name] / rates["none"])
    print(
        f"Plan 2 MNIST CNN, batch 32, Adam, 1 thread, {args.steps} steps x {args.repeats} repeats"
    )
    print(f"no policy: median {statistics.median(baseline):.1f} steps/s\n")
    print("ratio: steps/s against no policy in the same repeat (its spread is the noise);")
    print("in step(): share of the wall time spent inside policy.step (the direct cost)\n")
    print(f"{'policy':16s} {'median ratio':>12s} {'min':>7s} {'max':>7s}", end="")
    print(f" {'in step()':>10s} {'holds':>10s}")
    for name in chosen:
        r = ratios[name]
        median = statistics.median(r)
        print(
            f"{name:16s} {median:12.3f} {min(r):7.3f} {max(r):7.3f} "
            f"{100 * statistics.median(shares[name]):9.2f}% {held[name] / 2**20:8.2f} MiB"
        )


if __name__ == "__main__":
    main()
