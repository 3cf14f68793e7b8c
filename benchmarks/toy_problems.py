"""Do the adaptive policies fix a mis-set LR? Final loss against the best constant LR.

    python benchmarks/toy_problems.py [--policies meta,meta-scratch] [--controller FILE]

For each toy problem: the best constant LR of an 8-value grid, then each policy started
far too low (1e-5), 10x too low, 10x too high and 30x too high (near divergence), each
with the same SGD step budget. Prints final loss / best final loss (the goal for meta:
at most 1.15 from every start) and the last LR. ``meta`` is the default, the shipped
meta-trained controller, ``meta-scratch`` plan 2's blank start (``controller="scratch"``:
the meta policy as first released, step for step), ``feedback`` has its
protective start and ``feedback-nowarmup`` is it without (``warmup_steps=0``);
``--controller FILE`` adds ``meta-file``, a controller that ``tune-alr meta-train`` wrote. The toy
problems are not in the meta-training distribution (``tune_alr.meta_problems``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from tune_alr.toy_problems import PROBLEMS, STEPS, best_constant, run

#: label -> (policy, params)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "meta": ("meta", {}),
    "meta-scratch": ("meta", {"controller": "scratch"}),
    "hd": ("hd", {}),
    "feedback": ("feedback", {}),
    "feedback-nowarmup": ("feedback", {"warmup_steps": 0}),
    "plan1-literal": ("plan1-literal", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--policies",
        default=",".join(VARIANTS),
        help=f"comma-separated, among {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--controller", help="also run this controller file (tune-alr meta-train's output)"
    )
    args = parser.parse_args()
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.controller is not None:
        VARIANTS["meta-file"] = ("meta", {"controller": args.controller})
        chosen.append("meta-file")
    unknown = [p for p in chosen if p not in VARIANTS]
    if unknown:
        parser.error(f"unknown {unknown}; accepted: {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    print(f"SGD, {STEPS} steps, batch 32; ratio = final loss / best constant's final loss\n")
    for name in PROBLEMS:
        best_lr, best_loss = best_constant(name)
        starts = (1e-5, best_lr / 10, best_lr * 10, best_lr * 30)
        print(f"\n{name}: best constant LR {best_lr:g}, final loss {best_loss:.4f}")
        print("policy             " + "".join(f"{f'start {s:g}':>22}" for s in starts))
        for label in chosen:
            policy, params = VARIANTS[label]
            cells = []
            for start in starts:
                r = run(name, policy, start, **params)
                flag = "" if r.finite else " NONFINITE"
                cells.append(f"{r.final_loss / best_loss:6.2f}x (lr {r.final_lr:.2g}){flag}")
            print(f"{label:19s}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
