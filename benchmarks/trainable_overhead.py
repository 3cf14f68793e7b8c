"""Throughput of the training loop bare against inside a Ray Tune trial.

    python benchmarks/trainable_overhead.py [--repeats 3] [--task digits] [--steps 340]

The same trial settings (1 thread, the given policy, reports with checkpoints every
``--report-every`` steps) run alternately: bare, through ``trainables.loop.train``
in this process with a report that drops everything; and as a real Ray Tune trial
through ``tune_alr.run`` (a worker process, ``tune.report`` with checkpoints copied into
Ray's storage, the resource sampler, and MLflow logging from the driver into a sqlite
store). Throughput is steps x batch size over ``loop_s``, the loop's own wall time
(evaluations and earlier reports included; process start-up and data loading not).
The ratio of a repeat is the trial's throughput over the bare loop's; the table gives
each repeat and the median. Target (issue 6): the trial keeps at least 95%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bare(settings: dict[str, Any]) -> float:
    from trainables import loop

    last = loop.train(settings, lambda metrics, checkpoint: None)
    return float(last["step"] * settings["batch_size"] / last["loop_s"])


def in_trial(settings: dict[str, Any], folder: Path, repeat: int) -> float:
    import tune_alr

    exp = tune_alr.Experiment(
        name=f"overhead{repeat}",
        tasks=[settings["task"]],
        policies=[settings["policy"]],
        seeds=1,
        max_steps=settings["max_steps"],
        report_every=settings["report_every"],
        batch_size=settings["batch_size"],
        trial={k: v for k, v in settings.items() if k in ("threads", "data_dir")},
        output=folder / f"out{repeat}",
        tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        verbose=0,
    )
    (record,) = tune_alr.run(exp).records
    last = record.results[-1]
    return float(last["step"] * settings["batch_size"] / last["loop_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--policy", default="feedback")
    parser.add_argument("--steps", type=int, default=340)
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", default=os.environ.get("TUNE_ALR_DATA_DIR"))
    args = parser.parse_args()

    import ray

    settings: dict[str, Any] = {
        "task": args.task,
        "policy": args.policy,
        "max_steps": args.steps,
        "report_every": args.report_every,
        "batch_size": args.batch_size,
        "threads": 1,
    }
    if args.task != "digits" and args.data_dir:
        settings["data_dir"] = args.data_dir
    with tempfile.TemporaryDirectory(prefix="tar-ovh-", dir="/tmp") as tmp:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"{tmp}/ray")
        try:
            ratios = []
            print(f"{args.task}, {args.policy}, {args.steps} steps, batch {args.batch_size}, "
                  f"report every {args.report_every}, 1 thread")  # fmt: skip
            print("repeat  bare samples/s  trial samples/s  ratio")
            for repeat in range(args.repeats):
                # Alternate which goes first, so drift on a noisy machine cancels.
                if repeat % 2 == 0:
                    b = bare(settings)
                    t = in_trial(settings, Path(tmp), repeat)
                else:
                    t = in_trial(settings, Path(tmp), repeat)
                    b = bare(settings)
                ratios.append(t / b)
                print(f"{repeat:6d}  {b:14.0f}  {t:15.0f}  {t / b:5.3f}")
            print(f"median ratio: {statistics.median(ratios):.3f} (target >= 0.95)")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
