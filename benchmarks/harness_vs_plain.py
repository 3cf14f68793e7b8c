"""The whole harness against plain loops: two MNIST arms through ``tune-alr bench`` vs two
plain PyTorch loops started side by side.

    .venv/bin/python benchmarks/harness_vs_plain.py --data-dir ../shared/data [--repeats 5]

Each repeat runs, one after the other (alternating which goes first):

* **harness**: ``tune-alr bench --tasks mnist --seeds 1 --policies feedback --anchors ''
  --grid 1e-3``: two arms of the ``mnist-anchor`` workload (Adam at 1e-3 and the feedback
  policy), with Ray's start-up, the data, MLflow tracking into a fresh sqlite store,
  the statistics and the report, from the command's start to its exit;
* **plain**: two ``benchmarks/_plain_mnist.py`` processes (the same data, model, batch,
  steps and evaluations every 25 steps, one thread each) started together, until both
  have exited.

It prints each repeat and the medians, and the ratio harness / plain (the issue's goal:
at most 1.0). The decoded-data cache (``trainables.cache``) is warmed once before the
repeats, as it is on a machine that has run a trial before: its first decode is
``benchmarks/trial_cost.py``'s to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def environment(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "TUNE_ALR_CACHE_DIR": str(cache)})  # fmt: skip
    return env


def harness(data_dir: str, folder: Path, env: dict[str, str]) -> float:
    command = [
        str(BIN / "tune-alr"), "bench", "--tasks", "mnist", "--seeds", "1",
        "--policies", "feedback", "--anchors", "", "--grid", "1e-3", "--data-dir", data_dir,
        "--name", "harness", "--output", str(folder / "out"),
        "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--quiet",
    ]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"tune-alr bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def plain(data_dir: str, env: dict[str, str]) -> tuple[float, list[dict[str, float]]]:
    command = [sys.executable, str(ROOT / "benchmarks" / "_plain_mnist.py"), "--data-dir", data_dir]
    began = time.perf_counter()
    procs = [
        subprocess.Popen([*command, "--lr", "1e-3"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - began
    if any(p.returncode for p in procs):
        raise SystemExit("a plain loop failed")
    return wall, [json.loads(o.strip().splitlines()[-1]) for o in outs]


def warm_cache(data_dir: str, env: dict[str, str]) -> None:
    """Load the workload's data once through the task's loader: the decode fills the cache."""
    code = (
        "import sys\n"
        "from tune_alr.workloads import workload\n"
        "from trainables import TrialConfig, tasks\n"
        "w = workload('mnist')\n"
        "cfg = TrialConfig.from_dict({'task': w.task, 'policy': 'constant', **w.trial, "
        "'task_params': dict(w.task_params), 'data_dir': sys.argv[1]})\n"
        "tasks.get(cfg.task).load(cfg.data_request())\n"
    )
    subprocess.run([sys.executable, "-c", code, data_dir], env=env, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TUNE_ALR_DATA_DIR"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.data_dir or not (Path(args.data_dir) / "mnist" / "train.parquet").exists():
        raise SystemExit("needs MNIST: --data-dir (or TUNE_ALR_DATA_DIR) with mnist/*.parquet")
    data_dir = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="harness-vs-plain-") as tmp:
        env = environment(Path(tmp) / "cache")
        warm_cache(data_dir, env)
        rows = []
        for repeat in range(args.repeats):
            folder = Path(tmp) / f"r{repeat}"
            folder.mkdir()
            if repeat % 2:
                p, loops = plain(data_dir, env)
                h = harness(data_dir, folder, env)
            else:
                h = harness(data_dir, folder, env)
                p, loops = plain(data_dir, env)
            rows.append((h, p))
            inner = ", ".join(f"{x['wall_s']:.1f} s (val {x['val_acc']:.4f})" for x in loops)
            print(f"repeat {repeat}: harness {h:.1f} s, plain {p:.1f} s [{inner}], "
                  f"ratio {h / p:.2f}", flush=True)  # fmt: skip
    h_med = statistics.median(h for h, _ in rows)
    p_med = statistics.median(p for _, p in rows)
    ratio = statistics.median(h / p for h, p in rows)
    verdict = "met" if ratio <= 1.0 else "NOT met"
    print(f"\nmedians over {len(rows)} repeats: harness {h_med:.1f} s, two plain loops "
          f"{p_med:.1f} s; ratio harness/plain {ratio:.2f} (goal <= 1.00: {verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
