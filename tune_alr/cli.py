"""The ``tune-alr`` command: demo, run, bench, report, resume, ui, check-cluster, list, meta-train.

Bad input exits with status 2 and one line that names the bad value and what is
accepted, before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO_POLICIES = ("constant", "step", "cyclic", "plateau", "feedback", "hd", "meta")


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> int | list[int]:
    """``3`` means seeds 0, 1, 2; ``0,4,7`` lists them."""
    try:
        if "," in text:
            return [int(s) for s in _names(text)]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be a count (e.g. 3) or a comma-separated list (e.g. 0,4,7), got {text!r}"
        ) from None


_BOOLEANS = {"true": True, "yes": True, "false": False, "no": False}


def _value(text: str) -> Any:
    """A ``key=value`` value: JSON when it parses (numbers, true, null, lists, objects),
    then ``True``/``False``/``yes``/``no`` in any case as booleans, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _BOOLEANS.get(text.strip().lower(), text)


def _raw_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """``key=value`` pairs, values kept as text."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like key=value, got {item!r}.")
        out[key] = value
    return out


def _assignments(items: Sequence[str], what: str) -> dict[str, Any]:
    """``key=value`` pairs, values read as :func:`_value` reads them."""
    return {key: _value(text) for key, text in _raw_assignments(items, what).items()}


def _nested(items: Sequence[str], flag: str, owner: str) -> dict[str, dict[str, Any]]:
    """``OWNER.NAME=VALUE`` assignments (``--policy-param``, ``--task-param``) by owner."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in _assignments(items, flag).items():
        name, dot, param = key.partition(".")
        if not dot or not name or not param:
            raise ValueError(f"{flag} must look like {owner}.name=value, got {key!r}.")
        out.setdefault(name, {})[param] = value
    return out


def _add_common(p: argparse.ArgumentParser, *, name: str) -> None:
    p.add_argument("--name", default=name, help=f"experiment name (default: {name})")
    p.add_argument("--output", help="folder for summary files (default: results/<name>)")
    p.add_argument(
        "--storage",
        help="Ray Tune storage: a folder or s3://, gs:// URI; shared by all nodes on a "
        "cluster (default: <output>/ray)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow store (default: sqlite:///./mlflow.db in the current folder)",
    )
    p.add_argument("--seeds", type=_seeds, default=3, help="a count or a list (default: 3)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the task's)")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps per trial")
    p.add_argument(
        "--profile",
        help="hardware profile: edge, laptop, gpu-slice, or a spec such as "
        "'cpus=1,threads=1,memory_mb=512' or 'edge,memory_mb=2048' (sets resources and caps)",
    )
    p.add_argument(
        "--node-type",
        help="run trials only on cluster nodes offering this custom resource (e.g. constrained)",
    )
    p.add_argument("--cpus-per-trial", type=float, help="Ray CPUs per trial (default: 1)")
    p.add_argument("--gpus-per-trial", type=float, help="Ray GPUs per trial (default: 0)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as fit)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray here)")
    _add_verbosity(p)


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("--quiet", action="store_true", help="no progress output")
    loud.add_argument(
        "--verbose", action="store_true", help="Ray Tune's full output instead of the table"
    )


def _verbosity(args: argparse.Namespace) -> int:
    return 0 if args.quiet else 2 if args.verbose else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="tune-alr",
        description="Adaptive learning-rate policies as Ray Tune trials, tracked in MLflow.",
    )
    from . import __version__

    root.add_argument("--version", action="version", version=f"tune-alr {__version__}")
    sub = root.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="the main job on the embedded digits task (about a minute on 2 cores)"
    )
    _add_common(demo, name="demo")

    run = sub.add_parser("run", help="run a grid of tasks x policies x seeds")
    _add_common(run, name="tune-alr")
    run.add_argument(
        "--preset", help="plan1 or plan2: the research plans' grids (flags below override)"
    )
    run.add_argument("--tasks", type=_names, help="comma-separated (default: digits)")
    run.add_argument("--policies", type=_names, help="comma-separated (default: constant,feedback)")
    run.add_argument(
        "--budget", type=float, help="fraction in (0, 1] scaling epochs and data (e.g. 0.05)"
    )
    run.add_argument("--target", type=float, help="validation accuracy to time (e.g. 0.97)")
    run.add_argument(
        "--baseline",
        help="the arm the others are compared with (default: constant, else the first; "
        "a preset's own)",
    )
    run.add_argument(
        "--data-dir", help="folder of local Parquet copies (default: $TUNE_ALR_DATA_DIR, else hub)"
    )
    run.add_argument("--limit-train", type=int, help="use at most N training rows")
    run.add_argument("--lr", type=float, help="initial LR (default: the task's)")
    run.add_argument(
        "--optimizer", help="sgd, adam, adamw, rmsprop or an anchor (default: the task's)"
    )
    run.add_argument("--batch-size", type=int, help="(default: the task's)")
    run.add_argument("--report-every", type=int, help="steps between reports (task default)")
    run.add_argument(
        "--policy-param",
        action="append",
        default=[],
        metavar="POLICY.NAME=VALUE",
        help="a policy parameter, e.g. feedback.interval=50 (repeatable)",
    )
    run.add_argument(
        "--scheduler",
        help="Ray Tune scheduler: fifo (default), asha, hyperband, median, pbt, pb2",
    )
    run.add_argument(
        "--scheduler-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a scheduler option, e.g. grace_period=3 (in reports; repeatable)",
    )
    run.add_argument("--search", help="grid (default: every task x policy x seed) or optuna (TPE)")
    run.add_argument("--num-samples", type=int, help="trials of a search (--search optuna)")
    run.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=KIND:ARGS",
        help="a searched setting: lr=log:1e-4:1e-1, optimizer=choice:sgd,adam, "
        "feedback.interval=int:10:200 (repeatable; default for searches: the LR)",
    )
    run.add_argument(
        "--stopper",
        action="store_true",
        help="stop trials that reached --target, sit at chance level, or whose policy's LR "
        "is pinned at a bound while the loss rises (tune_alr.PolicyStopper)",
    )
    run.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module to import first, in the driver and in every trial: one that "
        "registers your own task or policy (repeatable)",
    )
    run.add_argument(
        "--task-param",
        action="append",
        default=[],
        metavar="TASK.NAME=VALUE",
        help="a task option, e.g. imdb.layers=2 or mnist.model=plan2 (repeatable)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another trial setting, e.g. clip_grad=1.0, clip_grad=null (no clipping) or "
        "limit_train=500 (repeatable)",
    )

    ben = sub.add_parser(
        "bench", help="policies vs a fixed-LR grid and the LR-free anchors, time to target"
    )
    ben.add_argument(
        "--tasks", "--workloads", type=_names, default=["digits"],
        help="workloads or tasks: digits, mnist (= mnist-anchor), ag_news (= agnews-anchor)",
    )  # fmt: skip
    ben.add_argument(
        "--seeds",
        type=_seeds,
        help="paired seeds: a count or a list (default: enough for a consistent winner to "
        "reach p < 0.05 after Holm's correction, e.g. 10 for digits)",
    )
    ben.add_argument(
        "--baseline",
        help="the reference arm: defines the target, and every policy is compared with "
        "it (default: the best grid arm)",
    )
    ben.add_argument("--policies", type=_names, help="policies under test (default: feedback,"
                     "meta,hd,cyclic)")  # fmt: skip
    ben.add_argument("--anchors", type=_names, help="anchor optimizers (default: all)")
    ben.add_argument("--grid", type=_floats, help="Adam LRs of the grid (default: 1e-4..3e-2)")
    ben.add_argument("--budget", type=float, help="fraction in (0, 1] scaling epochs and data")
    ben.add_argument("--data-dir", help="local Parquet copies (default: $TUNE_ALR_DATA_DIR)")
    ben.add_argument(
        "--optuna",
        type=int,
        default=0,
        metavar="K",
        help="also tune Adam's LR with OptunaSearch over K trials per workload",
    )
    ben.add_argument("--asha", action="store_true", help="prune the Optuna trials with ASHA")
    ben.add_argument(
        "--leaderboard",
        action="store_true",
        help="also run Optuna, ASHA, PBT and PB2 searches of Adam's LR at 1x, 2x and 4x a "
        "policy's steps, per workload and seed: accuracy against compute",
    )
    ben.add_argument(
        "--pbt",
        type=int,
        default=0,
        metavar="N",
        help="also train a PBT population of N members per workload",
    )
    ben.add_argument("--name", default="bench", help="experiment name (default: bench)")
    ben.add_argument("--output", help="summary folder (default: results/<name>)")
    ben.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///./mlflow.db)")
    ben.add_argument("--address", help="Ray cluster address (default: start Ray here)")
    ben.add_argument("--max-concurrent", type=int, help="trials at once (default: as CPUs allow)")
    _add_verbosity(ben)

    rep = sub.add_parser("report", help="summarise a Ray Tune experiment folder again")
    rep.add_argument("directory", help="the experiment folder (e.g. results/demo/ray/demo)")
    rep.add_argument("--output", help="where to write the summary (default: results/<name>)")
    rep.add_argument(
        "--tracking-uri",
        help="also (re-)log the trials into this MLflow store, e.g. after an outage",
    )

    res = sub.add_parser("resume", help="finish an interrupted experiment (unfinished trials only)")
    res.add_argument("directory", help="its Ray Tune folder (e.g. results/demo/ray/demo)")
    res.add_argument(
        "--tracking-uri",
        help="the experiment's MLflow store again, with its credentials (the saved spec "
        "keeps none; MLFLOW_TRACKING_USERNAME/PASSWORD work too)",
    )

    ui = sub.add_parser("ui", help="open the MLflow UI on the project's store")
    ui.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///./mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)

    chk = sub.add_parser("check-cluster", help="check a ray up cluster file against Ray's schema")
    chk.add_argument("file", help="e.g. cluster/aws.yaml")

    sub.add_parser("list", help="list the tasks, policies and hardware profiles")

    from .metatrain import add_meta_train_parser

    add_meta_train_parser(sub)
    return root


def _experiment(args: argparse.Namespace, **overrides: Any) -> Any:
    from .experiment import Experiment

    fields: dict[str, Any] = {
        "name": args.name,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "output": args.output,
        "tracking_uri": args.tracking_uri,
        "storage": args.storage,
        "profile": args.profile,
        "node_type": args.node_type,
        "cpus_per_trial": args.cpus_per_trial,
        "gpus_per_trial": args.gpus_per_trial,
        "max_concurrent": args.max_concurrent,
        "address": args.address,
        "verbose": _verbosity(args),
    }
    fields.update(overrides)
    return Experiment(**fields)


def _run(exp: Any) -> int:
    from .runner import run

    return _print_results(exp, run(exp))


def _resume(args: argparse.Namespace) -> int:
    from .runner import resume

    results = resume(args.directory, tracking_uri=args.tracking_uri)
    return _print_results(results.experiment, results)


def _print_results(exp: Any, results: Any) -> int:
    from .report import format_table
    from .tracking import redact

    summary = results.summary()
    print()
    print(format_table(summary))
    print()
    print(f"Summary files:  {results.output_dir.resolve()}/ ({', '.join(sorted(results.files))})")
    print(f"Ray Tune trials: {results.experiment_dir}")
    print(f"MLflow store:   {redact(results.tracking_uri)}")
    from .tracking import training_view

    ui = "tune-alr ui"
    if exp.tracking_uri:
        ui += f" --tracking-uri {shlex.quote(redact(exp.tracking_uri))}"
    browse = "http://127.0.0.1:5000"
    if results.experiment_id is not None:
        browse = training_view(browse, results.experiment_id)
    print(f"Open the MLflow UI with:  {ui}")
    print(f"  then browse:  {browse}")
    failed = summary["failed"].sum()
    return 1 if failed else 0


def _run_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Experiment fields of ``tune-alr run``: the preset's, then the flags given.

    A flag replaces the preset's value of the same field; ``--set NAME=VALUE`` goes into
    ``Experiment.trial``, and one that disagrees with a flag is refused by the settings
    resolution (``tune_alr.settings``), naming both.
    """
    from .presets import preset

    fields: dict[str, Any] = preset(args.preset) if args.preset else {}
    fields.setdefault("tasks", ["digits"])
    fields.setdefault("policies", ["constant", "feedback"])
    flags = {
        "tasks": args.tasks,
        "policies": args.policies,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "report_every": args.report_every,
        "budget": args.budget,
        "target": args.target,
        "baseline": args.baseline,
    }
    preset_baseline = fields.get("baseline")
    fields.update({k: v for k, v in flags.items() if v is not None})
    labels = [getattr(p, "label", p) for p in fields["policies"]]
    if args.baseline is None and preset_baseline not in (None, *labels):
        del fields["baseline"]  # --policies dropped the preset's reference arm
    # a preset's task options apply to the tasks it still runs after --tasks
    task_params = {t: dict(p) for t, p in fields.get("task_params", {}).items()
                   if t in fields["tasks"]}  # fmt: skip
    for task, params in _nested(args.task_param, "--task-param", "task").items():
        task_params.setdefault(task, {}).update(params)
    fields["task_params"] = task_params
    trial = _assignments(args.set, "--set")
    for key, flag, value in (
        ("data_dir", "--data-dir", args.data_dir),
        ("limit_train", "--limit-train", args.limit_train),
    ):
        if value is None:
            continue
        if key in trial and trial[key] != value:
            raise ValueError(
                f"{key} is given twice with different values: {flag} {value!r} and "
                f"--set {key}={trial[key]!r}."
            )
        trial[key] = value
    if args.imports:
        trial["imports"] = [*trial.get("imports", []), *args.imports]
    for key, value in (("scheduler", args.scheduler), ("search", args.search),
                       ("num_samples", args.num_samples)):  # fmt: skip
        if value is not None:
            fields[key] = value
    if args.scheduler_param:
        fields["scheduler_params"] = _assignments(args.scheduler_param, "--scheduler-param")
    if args.space:
        fields["space"] = {k: str(v) for k, v in _raw_assignments(args.space, "--space").items()}
    if args.stopper:
        from .stopper import PolicyStopper

        fields["stopper"] = PolicyStopper(target=fields.get("target"))
    fields["trial"] = trial
    fields["policy_params"] = _nested(args.policy_param, "--policy-param", "policy")
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input exits 2 with one line, another failure 1.

    A tracking URI's secrets are known from the start: nothing this process prints
    shows them (``tune_alr.credentials``), tracebacks included, and Ray, which records
    the driver's command line, sees it with the secret masked.
    """
    from . import credentials

    args = parser().parse_args(argv)
    uri = getattr(args, "tracking_uri", None)
    if isinstance(uri, str):
        credentials.register_secrets(uri)
        sys.argv = [credentials.scrub(a) for a in sys.argv]
    import warnings

    def one_line(message: Any, category: Any, *rest: Any, **kwargs: Any) -> None:
        # A user of the command wants what went wrong, not where in our source it was said.
        print(f"tune-alr: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line
    with credentials.scrubbed_output():
        try:
            return _dispatch(args)
        except ValueError as err:
            print(f"tune-alr: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("tune-alr: interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            import traceback

            traceback.print_exc()
            print(f"tune-alr: error: {type(err).__name__}: {err}", file=sys.stderr)
            return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _run(_experiment(args, tasks=["digits"], policies=list(DEMO_POLICIES)))
    if args.command == "run":
        return _run(_experiment(args, **_run_fields(args)))
    if args.command == "bench":
        return _bench(args)
    if args.command == "report":
        return _report(args)
    if args.command == "resume":
        return _resume(args)
    if args.command == "ui":
        return _ui(args)
    if args.command == "list":
        return _list()
    if args.command == "meta-train":
        from .metatrain import meta_train_command

        return meta_train_command(args)
    if args.command == "check-cluster":
        from .clusterfile import check

        config = check(args.file)
        types = ", ".join(sorted(config.get("available_node_types", {})))
        print(f"{args.file}: valid ({config['provider']['type']} provider; node types: {types})")
        return 0
    return 2


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .bench_report import (
        COMPARISON_HEAD,
        TABLE_HEAD,
        comparison_rows,
        leaderboard_rows,
        table_rows,
    )

    fields: dict[str, Any] = {
        "tasks": args.tasks, "seeds": args.seeds, "budget": args.budget,
        "data_dir": args.data_dir, "name": args.name, "output": args.output,
        "tracking_uri": args.tracking_uri, "address": args.address,
        "max_concurrent": args.max_concurrent, "verbose": _verbosity(args),
        "optuna": args.optuna, "asha": args.asha, "pbt": args.pbt, "baseline": args.baseline,
        "leaderboard": args.leaderboard,
    }  # fmt: skip
    for key in ("policies", "anchors", "grid"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    spec = bench.Bench(**fields)
    outcome = bench.run(spec)
    for task, (target, best) in sorted(outcome.targets.items()):
        print(f"\n{task}: target {100 * target:.2f}% (reached by {best} on every seed)")
        print(_plain_table(TABLE_HEAD, table_rows(outcome.table, task)))
        rows = comparison_rows(outcome.comparisons, task)
        if rows:
            print(_plain_table(COMPARISON_HEAD, rows))
    if not outcome.leaderboard.empty:
        print("\nAccuracy against compute (medians over seeds; compute in policy runs):")
        print(_plain_table(*leaderboard_rows(outcome.leaderboard)))
    note = spec.power_note()
    if note:
        print(f"\nToo few seeds for significance: {note}")
    print(f"\nReport: {outcome.files['report.html'].resolve()}")
    return 0


def _plain_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]  # fmt: skip
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    from . import report
    from .storage import SPEC_FILE

    records = report.load_trials(args.directory)
    folder = Path(args.directory)
    saved = folder / SPEC_FILE
    name = folder.resolve().name
    spec = None
    if saved.is_file():
        from .runner import read_spec

        spec = read_spec(args.directory)
        name = spec[0].name
    # Beside the run's own summaries (results/<name>), never inside Ray's folder.
    output = Path(args.output) if args.output else Path("results") / name
    report.write_outputs(records, output, title=name)
    print(report.format_table(report.summarize(report.trials_frame(records))))
    print(f"\nSummary files: {output.resolve()}/")
    if args.tracking_uri:
        from . import tracking
        from .results import summary_files
        from .runner import close_parent

        tracking.check_tracking_uri(args.tracking_uri)
        parent = spec[1] if spec is not None else None
        handle = tracking.relog(records, args.tracking_uri, name, parent)
        close_parent(handle, "FINISHED", summary_files(output))
        print(
            f"MLflow: {len(records)} trial(s) logged into {tracking.redact(args.tracking_uri)} "
            f"(parent run {handle.parent_run_id})"
        )
    return 0


def _ui(args: argparse.Namespace) -> int:
    from .tracking import check_tracking_uri, default_tracking_uri
    from .ui import serve

    uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    return serve(uri, args.host, args.port)


def _list() -> int:
    from trainables import tasks

    from . import bench, hardware, optimizers
    from .policies import available

    print("tasks:   ", ", ".join(tasks.available()))
    print("policies:", ", ".join(available()))
    anchors = [a if optimizers.is_installed(a) else f"{a} (not installed)"
               for a in optimizers.ANCHORS]  # fmt: skip
    print("anchors: ", ", ".join(anchors), "(optimizers; extra 'anchors')")
    print("bench workloads:", ", ".join(bench.WORKLOADS))
    print("profiles:")
    for name in hardware.available():
        p = hardware.PROFILES[name]
        memory = f"{p.memory_mb:g} MiB" if p.memory_mb is not None else "no cap"
        print(f"  {name}: {p.cpus:g} CPU, {p.gpus:g} GPU, {p.torch_threads} thread(s), {memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
