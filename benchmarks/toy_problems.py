"""Do the adaptive policies fix a mis-set LR? Final loss against the best constant LR.

    python benchmarks/toy_problems.py

For each toy problem: the best constant LR of an 8-value grid, then meta, hd, feedback
and plan1-literal started far too low (1e-5), 10x too low, 10x too high and 30x too
high (near divergence), each with the same SGD step budget. Prints final loss / best final loss.
"""

from __future__ import annotations

import torch

from tune_alr.toy_problems import PROBLEMS, STEPS, best_constant, run

POLICIES = ("meta", "hd", "feedback", "plan1-literal")


def main() -> None:
    torch.set_num_threads(1)
    print(f"SGD, {STEPS} steps, batch 32; ratio = final loss / best constant's final loss\n")
    for name in PROBLEMS:
        best_lr, best_loss = best_constant(name)
        starts = (1e-5, best_lr / 10, best_lr * 10, best_lr * 30)
        print(f"\n{name}: best constant LR {best_lr:g}, final loss {best_loss:.4f}")
        print("policy         " + "".join(f"{f'start {s:g}':>22}" for s in starts))
        for policy in POLICIES:
            cells = []
            for start in starts:
                r = run(name, policy, start)
                flag = "" if r.finite else " NONFINITE"
                cells.append(f"{r.final_loss / best_loss:6.2f}x (lr {r.final_lr:.2g}){flag}")
            print(f"{policy:15s}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
