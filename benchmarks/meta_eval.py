"""Issue 17's evaluation: the shipped meta controller against the blank one, feedback and
the LR-free anchors, on a bench workload, from the default LR and from 10x off.

    .venv/bin/python benchmarks/meta_eval.py --task mnist --seeds 8 [--starts 1,0.1,10]
        [--arms meta-shipped,meta-scratch,feedback] [--anchors sf-adamw,prodigy,dadapt-adam]
        [--grid 1e-3,3e-3,1e-2]

One ``tune_alr.bench`` run (a Ray Tune experiment, MLflow tracked, its report written):

* the reference: Adam at ``--best-lr`` (the workload's best constant LR; it sets the
  target, the lowest best validation accuracy it reaches over the seeds), and Adam at
  each other LR of ``--grid`` beside it (they do not move the target);
* ``meta-shipped`` (``controller="meta-trained"``), ``meta-scratch`` (plan 2's blank
  start) and ``feedback``, each started at ``--best-lr`` times every factor of
  ``--starts`` (``1``: the best LR itself; the labels carry the factor, ``@0.1x``), or at an
  absolute LR given as ``lr=<LR>`` (labelled ``@lr<LR>``: the task's default start);
* the anchors (Schedule-Free AdamW, Prodigy, D-Adaptation Adam) at their published
  defaults: they take no LR to start from.

It prints the bench's table (final accuracy, hits, steps to target) and every policy's
paired comparison with each anchor and the reference (Wilcoxon signed-rank on log time to
target and on final accuracy, Holm-corrected over the whole family). The bench's tasks
are never in meta-training's problems (``tune_alr.meta_problems``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ANCHORS = ("sf-adamw", "prodigy", "dadapt-adam")
ARMS = ("meta-shipped", "meta-scratch", "feedback")


def parse_starts(text: str, best_lr: float) -> list[tuple[str, float]]:
    """``--starts``: factors of the best LR (``0.1``, labelled ``@0.1x``; ``1`` is the
    unlabelled start) or absolute LRs (``lr=1e-3``, labelled ``@lr1e-3``), as
    ``(label suffix, lr)`` pairs."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            if item.startswith("lr="):
                lr = float(item[3:])
                out.append((f"@lr{lr:g}", lr))
            else:
                factor = float(item)
                out.append(("" if factor == 1 else f"@{factor:g}x", best_lr * factor))
        except ValueError:
            raise SystemExit(f"--starts: {item!r} is neither a factor nor lr=<LR>") from None
    return out


def parse_names(option: str, text: str, accepted: tuple[str, ...]) -> tuple[str, ...]:
    """A comma list of names among ``accepted`` (empty is none); exits naming a bad one."""
    names = tuple(filter(None, (part.strip() for part in text.split(","))))
    bad = [name for name in names if name not in accepted]
    if bad:
        raise SystemExit(f"{option}: {bad} not among {list(accepted)}")
    return names


def arms(
    best_lr: float,
    starts: list[tuple[str, float]],
    controller: str | None = None,
    names: tuple[str, ...] = ARMS,
) -> list[Any]:
    """The policies' arms from every start (``parse_starts``), for the ``names`` among
    :data:`ARMS`; ``controller``: a candidate controller file, scored beside the shipped
    one as ``meta-file``."""
    from tune_alr.experiment import Arm

    out: list[Any] = []
    for tag, lr in starts:
        every = {
            "meta-shipped": Arm(
                f"meta-shipped{tag}", "meta", lr=lr, params={"controller": "meta-trained"}
            ),
            "meta-scratch": Arm(
                f"meta-scratch{tag}", "meta", lr=lr, params={"controller": "scratch"}
            ),
            "feedback": Arm(f"feedback{tag}", "feedback", lr=lr),
        }
        out += [every[name] for name in ARMS if name in names]
        if controller is not None:
            out.append(Arm(f"meta-file{tag}", "meta", lr=lr, params={"controller": controller}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist", help="a bench workload (digits, mnist, ag_news)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--best-lr", type=float, default=1e-3, help="the reference Adam LR")
    parser.add_argument(
        "--starts", default="1,0.1,10",
        help="start LRs: factors of --best-lr, or lr=<LR> (e.g. the task's default, lr=1e-3)",
    )  # fmt: skip
    parser.add_argument("--data-dir", default=os.environ.get("TUNE_ALR_DATA_DIR"))
    parser.add_argument("--output", default="results/meta-eval")
    parser.add_argument(
        "--controller",
        help="also score this controller file (tune-alr meta-train's output) as meta-file",
    )
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"which policies' arms (default: {','.join(ARMS)})"
    )
    parser.add_argument(
        "--anchors", default=",".join(ANCHORS), help="LR-free anchors ('' for none)"
    )
    parser.add_argument(
        "--grid", default="", help="more Adam LRs beside --best-lr (they do not set the target)"
    )
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    try:
        grid = tuple(float(part) for part in args.grid.split(",") if part.strip())
    except ValueError:
        raise SystemExit(f"--grid: {args.grid!r} is not a comma list of LRs") from None

    from tune_alr import bench

    spec = bench.Bench(
        tasks=[args.task],
        seeds=args.seeds,
        policies=arms(
            args.best_lr,
            parse_starts(args.starts, args.best_lr),
            None if args.controller is None else str(Path(args.controller).resolve()),
            parse_names("--arms", args.arms, ARMS),
        ),
        anchors=parse_names("--anchors", args.anchors, ANCHORS),
        grid=tuple(sorted({args.best_lr, *grid})),
        baseline=f"adam-{args.best_lr:g}",
        data_dir=args.data_dir,
        name=f"meta-eval-{args.task}",
        output=args.output,
        tracking_uri=args.tracking_uri,
    )
    outcome = bench.run(spec)
    print(outcome.files["bench.md"].read_text())
    print(f"Report: {outcome.files['report.html'].resolve()}")


if __name__ == "__main__":
    main()
