"""The ``mnist-anchor`` workload as a plain single-process PyTorch loop: no Ray, no MLflow.

    .venv/bin/python benchmarks/_plain_mnist.py --data-dir ../shared/data [--lr 1e-3]

The yardstick of ``benchmarks/harness_vs_plain.py``, written the way one would write it
by hand: read the Parquet files with pandas, stack the images into a tensor, standardise
them, build plan 2's CNN, and train with Adam at a constant LR, batch 32, 2 epochs of
10,000 images (626 steps), evaluating on the 2,000 validation images every 25 steps and
on the 5,000 test images at the end. One thread, as the workload's trials run: two of
these side by side use the machine's two cores without oversubscribing them.

The work is the harness's: the same rows (``trainables.data.carve`` picks them, as the
task's loader does), the same model class and the same shuffling seed; only the
harness's machinery is absent. Prints one JSON line: wall seconds from interpreter start,
and the final validation and test accuracy.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports: the harness's figure includes its own

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.read_parquet(folder / "mnist" / f"{split}.parquet")
    return np.stack(frame["image"].to_numpy()), frame["label"].to_numpy(np.int64)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int
) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train()
    return loss / len(y), correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batch", type=int, default=256)
    args = parser.parse_args()

    from trainables.data import SplitPlan, carve
    from trainables.models import Plan2CNN

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    folder = Path(args.data_dir)
    raw = {"train": load(folder, "train"), "test": load(folder, "test")}
    plan = SplitPlan(data_seed=args.seed, val_size=2000, test_size=5000, limit_train=10000)
    arrays, _ = carve(raw, plan)
    mean = float(arrays["train"][0].mean() / 255.0)
    std = float(arrays["train"][0].std() / 255.0)
    tensors = {
        name: (
            (torch.from_numpy(x.reshape(-1, 1, 28, 28)).float() / 255.0 - mean) / std,
            torch.from_numpy(y),
        )
        for name, (x, y) in arrays.items()
    }
    train_x, train_y = tensors["train"]
    model = Plan2CNN(1, 28, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    step, batch, evaluations = 0, 32, []
    for _ in range(2):
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(0, len(order), batch):  # the last batch is partial (313 per epoch)
            index = order[i : i + batch]
            loss = F.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 25 == 0:
                evaluations.append(evaluate(model, *tensors["val"], args.eval_batch))
    if step % 25:
        evaluations.append(evaluate(model, *tensors["val"], args.eval_batch))
    test = evaluate(model, *tensors["test"], args.eval_batch)
    print(json.dumps({"wall_s": time.time() - STARTED, "steps": step,
                      "evaluations": len(evaluations), "val_acc": evaluations[-1][1],
                      "test_acc": test[1]}))  # fmt: skip


if __name__ == "__main__":
    main()
