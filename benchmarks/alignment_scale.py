"""How large is the alignment signal at each LR, on plan 2's MNIST CNN and on meta-training
problems? The measurement behind the ``cos_snr`` feature.

    .venv/bin/python benchmarks/alignment_scale.py --data-dir ../shared/data   (about 1 min)

For each LR of a grid, Adam runs at that constant LR (the meta policy rides along with
``max_step`` ~ 0 and its online updates off, so it only measures) and the script prints
the mean, over the steps after the 20th, of the per-step cosine of the gradient with the
last update (``cos``: negative when consecutive steps agree, the LR too low), its
standard deviation, and the mean ``cos_snr`` (``cos_ema`` over the RMS of ``cos``). On
the MNIST CNN: 150 steps of batch 32 on 10,000 training images. On problems of the
meta-training distribution (``tune_alr.meta_problems``, Adam ones): each problem's whole
run, and its validation loss, so that its best constant LR shows. One thread.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

Batch = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def sampler(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> Batch:
    """Seeded random minibatches of ``size`` rows of ``(x, y)``."""
    order = torch.Generator().manual_seed(seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(y), (size,), generator=order)
        return x[index], y[index]

    return batch


def measure(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batch,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
) -> tuple[float, float, float]:
    """(mean cos, std cos, mean cos_snr) over steps 21.. of a constant-LR run."""
    from tune_alr.policies import build
    from tune_alr.policies.meta import FEATURE_NAMES

    policy = build("meta", optimizer, max_step=1e-9, meta_lr=1e-12, total_steps=steps)
    cos, snr = [], []
    for step in range(steps):
        x, y = batches()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        policy.step(loss.item())
        if step >= 20:
            cos.append(policy.features[FEATURE_NAMES.index("cos")])
            snr.append(policy.features[FEATURE_NAMES.index("cos_snr")])
    return float(np.mean(cos)), float(np.std(cos)), float(np.mean(snr))


def mnist(data_dir: Path, lrs: list[float]) -> None:
    # The plain loop's reader (benchmarks/ is on the path when this runs as a script).
    from _plain_mnist import load

    from trainables.data import SplitPlan, carve
    from trainables.models import Plan2CNN

    plan = SplitPlan(data_seed=0, val_size=2000, test_size=5000, limit_train=10000)
    raw = {"train": load(data_dir, "train"), "test": load(data_dir, "test")}
    arrays, _ = carve(raw, plan)
    x = torch.from_numpy(arrays["train"][0].reshape(-1, 1, 28, 28)).float() / 255.0
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(arrays["train"][1])
    print("plan 2's MNIST CNN, Adam, batch 32, 150 steps")
    print(f"{'lr':>8} {'cos mean':>9} {'cos std':>8} {'cos_snr':>8} {'last loss':>10}")
    for lr in lrs:
        torch.manual_seed(0)
        model = Plan2CNN(1, 28, 10)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        batches = sampler(x, y, 32, seed=0)
        mean, std, snr = measure(model, optimizer, batches, F.cross_entropy, 150)
        with torch.no_grad():
            last = float(F.cross_entropy(model(x[:2000]), y[:2000]))
        print(f"{lr:8.0e} {mean:+9.3f} {std:8.3f} {snr:+8.2f} {last:10.3f}")


def problems(count: int, seed: int) -> None:
    from tune_alr import meta_problems as mp

    specs = [s for s in mp.sample_problems(8 * count, seed) if s.optimizer == "adam"][:count]
    for spec in specs:
        data = mp.make_data(spec)
        n_weights = sum(p.numel() for p in mp.make_model(spec).parameters())
        print(f"\n{spec.name} ({n_weights} weights), {spec.steps} steps")
        print(f"{'lr':>8} {'cos mean':>9} {'cos std':>8} {'cos_snr':>8} {'val loss':>10}")
        loss_fn = F.mse_loss if data.regression else F.cross_entropy
        rows = []
        for lr in mp.LR_GRIDS["adam"]:
            model = mp.make_model(spec)
            optimizer = mp.make_optimizer("adam", model.parameters(), lr)
            batches = sampler(data.x, data.y, spec.batch, seed=spec.seed + 2)
            stats = measure(model, optimizer, batches, loss_fn, spec.steps)
            with torch.no_grad():
                val = float(loss_fn(model(data.x_val), data.y_val))
            rows.append((lr, *stats, val))
        best = min(rows, key=lambda r: r[4] if np.isfinite(r[4]) else np.inf)[0]
        for lr, mean, std, snr, val in rows:
            mark = "  <- best constant" if lr == best else ""
            print(f"{lr:8.1e} {mean:+9.3f} {std:8.3f} {snr:+8.2f} {val:10.3f}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TUNE_ALR_DATA_DIR"))
    parser.add_argument("--problems", type=int, default=4, help="meta-training problems")
    parser.add_argument("--seed", type=int, default=777, help="which problems")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.data_dir and (Path(args.data_dir) / "mnist").is_dir():
        mnist(Path(args.data_dir), [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    else:
        print("no MNIST under --data-dir (or TUNE_ALR_DATA_DIR): its part is skipped")
    problems(args.problems, args.seed)


if __name__ == "__main__":
    main()
