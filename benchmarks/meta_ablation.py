"""What each input of the meta controller buys: the controller with each feature removed.

    python benchmarks/meta_ablation.py [--controller PATH] [--problems 12] [--num-cpus 2]

Scores the shipped controller (or ``--controller``) on fresh problems of the training
distribution (``tune_alr.meta_problems``, a seed neither the meta-training nor its
selection saw), each started 3, 1.5 and 0 decades below and 1 decade above its best
constant LR, with the online adaptation on, as ``tune-alr meta-train`` scores it:
objective 0 = as good as the best constant LR of the grid over the run (mean log
validation loss, the final one weighted 0.25), lower is better. Then the same with each
feature removed from the controller (its input zeroed: the column of the first layer
dropped, so the online adaptation cannot use it either; the controller is not
retrained), and plan 2's blank start (``controller="scratch"``) for comparison.

Columns: the mean objective, its change against the full controller (positive: the
feature helps), the objective per start, and the share of runs whose final loss is
within 15% of the grid's lowest final loss. Inner runs are Ray tasks (``--num-cpus``),
or run in this process with ``--local``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from tune_alr.meta_problems import sample_problems
from tune_alr.metatrain import Task, evaluate, local_runner, ray_runner, references
from tune_alr.policies.meta import (
    controller_spec,
    load_controller,
    pack,
    unpack,
)

STARTS = (-3.0, -1.5, 0.0, 1.0)
FINAL_WEIGHT = 0.25


def without(spec: Any, feature: str) -> dict[str, Any]:
    """The controller file's contents with ``feature``'s input removed."""
    i = spec.features.index(feature)
    net = unpack(spec.weights, len(spec.features), spec.hidden)
    net = {**net, "w1": np.delete(net["w1"], i, axis=1)}
    features = tuple(f for f in spec.features if f != feature)
    return controller_spec(features, pack(net), hidden=spec.hidden).to_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--controller", default="meta-trained", help="meta-trained (shipped), or a file's path"
    )
    parser.add_argument("--problems", type=int, default=12, help="fresh problems (default 12)")
    parser.add_argument("--seed", type=int, default=20_000, help="their seed (default 20000)")
    parser.add_argument("--num-cpus", type=float, default=2, help="Ray CPUs (default 2)")
    parser.add_argument("--local", action="store_true", help="run in this process, no Ray")
    parser.add_argument(
        "--cache",
        default="results/meta-ablation/references.json",
        help="the problems' references, cached",
    )
    args = parser.parse_args()
    spec = load_controller(args.controller)
    problems = sample_problems(args.problems, args.seed)
    tasks = [Task(p, d) for p in problems for d in STARTS]
    variants: dict[str, dict[str, Any]] = {"full": spec.to_json()}
    variants.update({f"- {f}": without(spec, f) for f in spec.features})
    variants["scratch (plan 2)"] = load_controller("scratch").to_json()

    def measure(runner: Any) -> list[list[Any]]:
        refs = references(problems, runner, FINAL_WEIGHT, Path(args.cache))
        return evaluate(list(variants.values()), tasks, refs, runner, final_weight=FINAL_WEIGHT)

    t0 = time.perf_counter()
    if args.local:
        import torch

        torch.set_num_threads(1)
        table = measure(local_runner)
    else:
        from tune_alr.runner import ray_session

        with ray_session(num_cpus=args.num_cpus):
            table = measure(ray_runner())
    wall = time.perf_counter() - t0

    print(
        f"controller {spec.source}: {len(problems)} fresh problems (seed {args.seed}) x "
        f"starts {STARTS} decades from the best constant LR; {len(tasks)} runs per row, "
        f"{wall:.0f} s\n"
    )
    head = f"{'controller':22s} {'objective':>9s} {'change':>7s}"
    head += "".join(f" {f'@{d:+g}':>7s}" for d in STARTS) + f" {'within 15%':>10s}"
    print(head)
    full = statistics.mean(r.objective for r in table[0])
    for name, row in zip(variants, table, strict=True):
        mean = statistics.mean(r.objective for r in row)
        by_start = [
            statistics.mean(r.objective for r, t in zip(row, tasks, strict=True) if t.decades == d)
            for d in STARTS
        ]
        within = statistics.mean(r.final_ratio <= 1.15 for r in row)
        change = "" if name == "full" else f"{mean - full:+7.3f}"
        print(
            f"{name:22s} {mean:9.3f} {change:>7s}"
            + "".join(f" {v:7.3f}" for v in by_start)
            + f" {100 * within:9.0f}%"
        )


if __name__ == "__main__":
    main()
