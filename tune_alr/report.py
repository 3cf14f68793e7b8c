"""Tables and plots from a Ray Tune experiment folder.

Everything here reads what Ray Tune wrote (each trial folder's ``params.json`` and
``result.json``), so a finished, interrupted or copied experiment can be summarised
without Ray running: ``tune-alr report DIR``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

SUMMARY_COLUMNS = [
    "task",
    "policy",
    "seeds",
    "finished",
    "diverged",
    "stopped",
    "failed",
    "val_acc_mean",
    "val_acc_std",
    "val_loss_mean",
    "val_loss_std",
    "best_val_acc_mean",
    "test_acc_mean",
    "test_acc_std",
    "steps_mean",
    "wall_s_mean",
    "samples_per_s_mean",
    "final_lr_mean",
    "epochs_to_stable_mean",
    "target_hits",
    "steps_to_target_median",
    "wall_s_to_target_median",
    "cpu_s_mean",
    "peak_rss_mb_mean",
    "policy_ms_per_step_mean",
    "cpu_s_total",
    "steps_total",
]

#: The file a trial stopped early gets (``tune_alr.stopper``; read here without Ray).
STOP_FILE = "tune_alr_stopped.json"
#: Every result of a trial as the driver received it (``tune_alr.resultlog``), preferred
#: to Ray Tune's ``result.json``, which a restore from a checkpoint can cut short.
RESULTS_FILE = "tune_alr_results.jsonl"

#: Relative improvement of the best validation loss below which it counts as stable.
STABLE_TOLERANCE = 0.01


def epochs_to_stable(epochs: Sequence[float], losses: Sequence[float]) -> float:
    """Convergence speed as plan 1 defines it: epochs to a stable validation loss.

    The epoch of the earliest report after which the best validation loss never again
    improves by more than ``STABLE_TOLERANCE`` (1%) relative: later reports may wander
    or rise (over-fitting), but none beats it by more than 1%. NaN without reports.
    """
    finite = [(e, v) for e, v in zip(epochs, losses, strict=True) if math.isfinite(v)]
    if not finite:
        return math.nan
    suffix_min = [math.inf] * (len(finite) + 1)
    for i in range(len(finite) - 1, -1, -1):
        suffix_min[i] = min(finite[i][1], suffix_min[i + 1])
    best = math.inf
    for i, (epoch, loss) in enumerate(finite):
        best = min(best, loss)
        if suffix_min[i + 1] >= best * (1.0 - STABLE_TOLERANCE):
            return float(epoch)
    return float(finite[-1][0])


@dataclass
class TrialRecord:
    """One trial as Ray Tune recorded it."""

    path: Path
    config: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    stop_reason: str | None = None  # why a scheduler or the stopper ended it early

    @property
    def trial_id(self) -> str:
        if self.results and "trial_id" in self.results[-1]:
            return str(self.results[-1]["trial_id"])
        return self.path.name

    @property
    def status(self) -> str:
        """``finished``, ``diverged``, ``failed`` (an error, retried or not), ``stopped``
        (ended early by a scheduler or the stopper, :attr:`stop_reason`) or
        ``incomplete`` (an interrupted run)."""
        last = self.results[-1] if self.results else {}
        if last.get("status") in ("finished", "diverged"):
            return str(last["status"])
        if self.error or last.get("status") == "failed":
            return "failed"
        return "stopped" if self.stop_reason else "incomplete"

    def lr_path(self) -> tuple[list[int], list[float]]:
        """Steps and LR at every optimizer step, from the reports' ``lr_trace``."""
        steps: list[int] = []
        lrs: list[float] = []
        for result in self.results:
            start = int(result.get("lr_trace_start", 1))
            for offset, lr in enumerate(result.get("lr_trace") or ()):
                if not steps or start + offset > steps[-1]:
                    steps.append(start + offset)
                    lrs.append(float(lr))
        return steps, lrs


def _label(record: TrialRecord) -> str:
    return str(record.config.get("label") or record.config.get("policy"))


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut off by a killed process
    return rows


def load_trials(
    experiment_dir: str | Path, only: Collection[str] | None = None
) -> list[TrialRecord]:
    """Every trial folder (one holding ``params.json``) under ``experiment_dir``.

    ``only``: the trial folder names to read. Ray Tune puts a second run under the same
    experiment name into the same folder, beside the first run's trials; a run reads
    just its own (``Result.path`` of its ``ResultGrid``).

    A record's ``config`` is the one the trial started with (its first result's): a PBT
    or PB2 exploit copies the donor's config into the member and Ray rewrites
    ``params.json`` with it, so a member would be counted under its last donor's arm.
    The config after each exploit stays in that result's ``config``.
    """
    root = Path(experiment_dir)
    if not root.is_dir():
        raise ValueError(f"experiment folder {str(root)!r} does not exist.")
    records = []
    for params in sorted(root.glob("*/params.json")):
        folder = params.parent
        if only is not None and folder.name not in only:
            continue
        error_file = folder / "error.txt"
        stop_file = folder / STOP_FILE
        results = _read_json_lines(
            folder / RESULTS_FILE if (folder / RESULTS_FILE).is_file() else folder / "result.json"
        )
        start = results[0].get("config") if results else None
        records.append(
            TrialRecord(
                path=folder,
                config=start if isinstance(start, dict) else json.loads(params.read_text()),
                results=results,
                error=error_file.read_text() if error_file.is_file() else None,
                stop_reason=(
                    json.loads(stop_file.read_text()).get("reason") if stop_file.is_file() else None
                ),
            )
        )
    if not records:
        raise ValueError(f"no Ray Tune trials (*/params.json) under {str(root)!r}.")
    return records


def _own_cpu(results: Sequence[Mapping[str, Any]], last: Mapping[str, Any]) -> float:
    """CPU seconds a trial ran itself: its reports' ``proc/cpu_window_s`` summed.

    Reports written before that metric existed give the cumulative ``proc/cpu_s`` of the
    last report, which a PBT exploit inflates with the donor's CPU.
    """
    windows = [r["proc/cpu_window_s"] for r in results if "proc/cpu_window_s" in r]
    if windows:
        return float(sum(windows))
    return float(last.get("proc/cpu_s", math.nan))


def trials_frame(records: Iterable[TrialRecord]) -> pd.DataFrame:
    """One row per trial: its config keys and its last reported metrics."""
    rows = []
    for record in records:
        last = record.results[-1] if record.results else {}
        rows.append(
            {
                "task": record.config.get("task"),
                "policy": record.config.get("label") or record.config.get("policy"),
                "seed": record.config.get("seed"),
                "status": record.status,
                "trial_id": record.trial_id,
                "val_acc": last.get("val_acc", math.nan),
                "val_loss": last.get("val_loss", math.nan),
                "best_val_acc": last.get("best_val_acc", math.nan),
                "test_acc": last.get("test_acc", math.nan),
                "test_loss": last.get("test_loss", math.nan),
                "steps": last.get("step", math.nan),
                "wall_s": last.get("wall_s", math.nan),
                "samples_per_s": _mean(r.get("samples_per_s") for r in record.results),
                "final_lr": last.get("lr", math.nan),
                "epochs_to_stable": epochs_to_stable(
                    [r["epoch"] for r in record.results if "val_loss" in r],
                    [r["val_loss"] for r in record.results if "val_loss" in r],
                ),
                # a trial that never reached its target counts as infinitely slow
                "steps_to_target": last.get("steps_to_target", _miss(record)),
                "wall_s_to_target": last.get("wall_s_to_target", _miss(record)),
                "profile": next((r["profile"] for r in record.results if "profile" in r), ""),
                "cpu_s": last.get("proc/cpu_s", math.nan),
                # the CPU this trial ran itself (a PBT member's donor's is not its own)
                "cpu_s_run": _own_cpu(record.results, last),
                "cpu_percent": _mean(r.get("proc/cpu_percent") for r in record.results),
                "peak_rss_mb": max(
                    (r["proc/peak_rss_mb"] for r in record.results if "proc/peak_rss_mb" in r),
                    default=math.nan,
                ),
                "policy_ms_per_step": last.get("policy_ms_per_step", math.nan),
                # compute spent: every optimizer step this trial ran itself (a restart's
                # replayed steps and a PBT member's donor's steps are not its own)
                "steps_run": sum(len(r.get("lr_trace") or ()) for r in record.results),
                "stop_reason": record.stop_reason or "",
                "diverged_reason": last.get("diverged_reason", ""),
                "error": (record.error or str(last.get("error", ""))).strip().splitlines()[-1:]
                or "",
            }
        )
    frame = pd.DataFrame(rows)
    frame["error"] = frame["error"].map(lambda e: e[0] if isinstance(e, list) and e else "")
    return frame.sort_values(["task", "policy", "seed"], kind="stable").reset_index(drop=True)


def _miss(record: TrialRecord) -> float:
    return math.inf if record.config.get("target") is not None else math.nan


def _mean(values: Iterable[Any]) -> float:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, policy): counts and mean/std over seeds of the final metrics."""
    rows = []
    for (task, policy), group in trials.groupby(["task", "policy"], sort=True):
        ok = group[group["status"].isin(["finished", "diverged"])]
        row: dict[str, Any] = {
            "task": task,
            "policy": policy,
            "seeds": len(group),
            "finished": int((group["status"] == "finished").sum()),
            "diverged": int((group["status"] == "diverged").sum()),
            "stopped": int((group["status"] == "stopped").sum()),
            "failed": int((~group["status"].isin(["finished", "diverged", "stopped"])).sum()),
            # equal-compute comparisons: what the arm spent over all its trials, stopped
            # and failed ones included
            # unknown (no trial measured it) rather than a made-up 0
            "cpu_s_total": float(group["cpu_s_run"].sum())
            if group["cpu_s_run"].notna().any()
            else math.nan,
            "steps_total": int(group["steps_run"].sum()),
        }
        for metric in ("val_acc", "val_loss", "test_acc"):
            row[f"{metric}_mean"] = ok[metric].mean()
            row[f"{metric}_std"] = ok[metric].std(ddof=1) if len(ok) > 1 else 0.0
        for metric in (
            "best_val_acc",
            "steps",
            "wall_s",
            "samples_per_s",
            "final_lr",
            "epochs_to_stable",
            "cpu_s",
            "peak_rss_mb",
            "policy_ms_per_step",
        ):
            row[f"{metric}_mean"] = ok[metric].mean()
        row["target_hits"] = int(group["steps_to_target"].map(math.isfinite).sum())
        for metric in ("steps_to_target", "wall_s_to_target"):
            row[f"{metric}_median"] = (
                group[metric].median() if group[metric].notna().any() else math.nan
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def to_markdown(summary: pd.DataFrame, title: str = "Summary") -> str:
    """The summary as a Markdown table (accuracies in %, mean +- std over seeds)."""
    head = (
        "| task | policy | seeds | val acc % | val loss | test acc % | steps | wall s "
        "| final lr | epochs to stable | steps to target (hits) | CPU s | peak RSS MiB "
        "| policy ms/step | compute: CPU s, steps (all trials) |"
    )
    lines = [f"# {title}", "", head, "|" + " --- |" * 15]
    for _, r in summary.iterrows():
        notes = []
        for state in ("diverged", "stopped", "failed"):
            if r[state]:
                notes.append(f"{r[state]} {state}")
        seeds = f"{r['seeds']}" + (f" ({', '.join(notes)})" if notes else "")
        lines.append(
            f"| {r['task']} | {r['policy']} | {seeds} "
            f"| {_pct(r['val_acc_mean'], r['val_acc_std'])} "
            f"| {r['val_loss_mean']:.4f} "
            f"| {_pct(r['test_acc_mean'], r['test_acc_std'])} "
            f"| {r['steps_mean']:.0f} | {r['wall_s_mean']:.1f} | {r['final_lr_mean']:.3g} "
            f"| {r['epochs_to_stable_mean']:.2f} "
            f"| {_target_cell(r['steps_to_target_median'], r['target_hits'], r['seeds'])} "
            f"| {format_num(r['cpu_s_mean'], '.1f')} | {format_num(r['peak_rss_mb_mean'], '.0f')} "
            f"| {format_num(r['policy_ms_per_step_mean'], '.3f')} "
            f"| {format_num(r['cpu_s_total'], '.1f')}, {r['steps_total']} |"
        )
    return "\n".join(lines) + "\n"


def format_num(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _pct(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{100 * mean:.2f} +- {100 * std:.2f}"


def _target_cell(median: float, hits: int, seeds: int) -> str:
    if not isinstance(median, float) or math.isnan(median):
        return "-"
    return f"{median:.0f} ({hits}/{seeds})" if math.isfinite(median) else f"never ({hits}/{seeds})"


def format_table(summary: pd.DataFrame) -> str:
    """A compact plain-text table for the terminal."""
    columns = [
        "task", "policy", "seeds", "val_acc_mean", "val_acc_std", "val_loss_mean",
        "test_acc_mean", "steps_mean", "wall_s_mean", "final_lr_mean", "epochs_to_stable_mean",
        "cpu_s_mean", "peak_rss_mb_mean", "policy_ms_per_step_mean", "cpu_s_total",
        "steps_total",
    ]  # fmt: skip
    if summary["stopped"].any():
        columns.insert(3, "stopped")
    if summary["steps_to_target_median"].notna().any():
        columns += ["target_hits", "steps_to_target_median"]
    return summary[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_trial_curves(
    lr_steps: Sequence[int],
    lr_values: Sequence[float],
    curve: Sequence[tuple[int, float, float]],
    folder: Path,
) -> list[Path]:
    """``lr_curve.png`` and ``val_curve.png`` of one trial into ``folder``."""
    plt = pyplot()
    paths = []
    if lr_steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(lr_steps, lr_values, lw=1)
        ax.set(xlabel="optimizer step", ylabel="learning rate", yscale="log", title="LR path")
        fig.tight_layout()
        paths.append(folder / "lr_curve.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if curve:
        steps, losses, accs = zip(*curve, strict=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, losses, color="tab:red", label="val loss")
        ax.set(xlabel="optimizer step", ylabel="validation loss", title="Validation")
        twin = ax.twinx()
        twin.plot(steps, accs, color="tab:blue", label="val acc")
        twin.set_ylabel("validation accuracy")
        fig.tight_layout()
        paths.append(folder / "val_curve.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def accuracy_range(records: Sequence[TrialRecord]) -> tuple[float, float] | None:
    """The validation-accuracy axis, zoomed where the arms differ: from a little under
    the lowest best accuracy of a trial that learned (reached half the best trial's) to
    just over the highest. A collapsed trial then runs off the bottom, as it should."""
    bests = [
        max(r["val_acc"] for r in record.results if "val_acc" in r)
        for record in records
        if any("val_acc" in r for r in record.results)
    ]
    if not bests:
        return None
    learned = [b for b in bests if b >= 0.5 * max(bests)]
    low, high = min(learned), max(learned)
    margin = max(0.01, 0.25 * (high - low))
    return max(0.0, low - margin), min(1.0, high + margin)


def plot_experiment(records: Sequence[TrialRecord], folder: Path) -> list[Path]:
    """Per task: ``lr_<task>.png`` (LR paths) and ``val_<task>.png`` (val accuracy)."""
    plt = pyplot()
    paths = []
    for task in sorted({str(r.config.get("task")) for r in records}):
        mine = [r for r in records if str(r.config.get("task")) == task and r.results]
        policies = sorted({_label(r) for r in mine})
        colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(policies)}
        for kind in ("lr", "val"):
            fig, ax = plt.subplots(figsize=(7, 4))
            labelled: set[str] = set()
            for record in mine:
                policy = _label(record)
                label = None if policy in labelled else policy
                labelled.add(policy)
                if kind == "lr":
                    xs, ys = record.lr_path()
                else:
                    xs = [r["step"] for r in record.results if "val_acc" in r]
                    ys = [r["val_acc"] for r in record.results if "val_acc" in r]
                ax.plot(xs, ys, color=colours[policy], lw=1, alpha=0.8, label=label)
            if kind == "lr":
                ax.set(yscale="log", ylabel="learning rate", title=f"{task}: LR path per trial")
            else:
                ax.set(ylabel="validation accuracy", title=f"{task}: validation accuracy")
                zoom = accuracy_range(mine)
                if zoom is not None:
                    ax.set_ylim(*zoom)
            ax.set_xlabel("optimizer step")
            ax.legend(fontsize=8)
            fig.tight_layout()
            paths.append(folder / f"{kind}_{task}.png")
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)
    return paths


def _comparisons(trials: pd.DataFrame, baseline: str | None) -> pd.DataFrame | None:
    """Paired comparisons against the baseline, when a target was set and seeds pair."""
    from .stats import compare

    timed = trials["steps_to_target"].notna().any()
    if not timed or trials["seed"].nunique() < 2 or trials["policy"].nunique() < 2:
        return None
    return compare(trials, baseline)


def _comparison_markdown(comparisons: pd.DataFrame | None, seeds: int) -> str:
    from .stats import MIN_CI_PAIRS, power_note

    if comparisons is None or comparisons.empty:
        return ""
    lines = [
        "",
        f"## Time to target against {comparisons['baseline'].iloc[0]} (paired seeds)",
        "",
        "Median speed-up (baseline time / policy time; a miss is infinitely slow) with its "
        "95% bootstrap interval (n/a with fewer than "
        f"{MIN_CI_PAIRS} informative pairs: pairs where a side reached the target); p: "
        "Wilcoxon signed-rank on log time, Holm-corrected across all rows (n/a: no "
        "informative pair).",
        "",
        "| task | policy | pairs | speed-up in steps | p (Holm) | speed-up in wall s | p (Holm) |",
        "|" + " --- |" * 7,
    ]
    for _, r in comparisons.iterrows():
        lines.append(
            f"| {r['task']} | {r['policy']} | {format_pairs(r)} "
            f"| {format_speedup(r, 'steps')} | {format_p(r['steps_p_holm'])} "
            f"| {format_speedup(r, 'wall')} | {format_p(r['wall_p_holm'])} |"
        )
    note = power_note(seeds, len(comparisons))
    if note:
        lines += ["", f"**Too few seeds for significance**: {note}"]
    return "\n".join(lines) + "\n"


def format_speedup(row: Any, label: str) -> str:
    """``median [low, high]``; ``n/a`` where no pair was informative or too few were for
    an interval (``stats.MIN_CI_PAIRS``)."""
    median, low, high = row[f"{label}_speedup"], row[f"{label}_ci_low"], row[f"{label}_ci_high"]
    if math.isnan(median):
        return "n/a"
    if math.isnan(low) or math.isnan(high):
        return f"{median:.2f} [n/a]"
    return f"{median:.2f} [{low:.2f}, {high:.2f}]"


def format_pairs(row: Any) -> str:
    """``pairs (informative)``: seeds paired, and those where a side reached the target."""
    informative = row.get("informative", row["pairs"])
    return f"{row['pairs']} ({informative} informative)"


def format_p(value: float) -> str:
    """The p-value, ``*`` below ``stats.ALPHA``; ``n/a`` where no test could be formed."""
    if math.isnan(value):
        return "n/a"
    mark = " *" if value < 0.05 else ""
    return f"{value:.3g}{mark}"


def _trouble(trials: pd.DataFrame) -> str:
    """The trials stopped early, and those that diverged or failed, each with its reason
    (Markdown)."""
    lines, stopped = [], []
    for _, t in trials.iterrows():
        name = f"{t['task']}/{t['policy']}/seed{t['seed']}"
        if t["status"] == "diverged":
            lines.append(f"- {name}: diverged: {t['diverged_reason'] or 'no reason recorded'}")
        elif t["status"] == "stopped":
            stopped.append(f"- {name}: {t['stop_reason']}")
        elif t["status"] != "finished":
            lines.append(f"- {name}: {t['status']}: {t['error'] or 'no error recorded'}")
    out = ""
    if stopped:
        out += "\n## Trials stopped early\n\n" + "\n".join(stopped) + "\n"
    if lines:
        out += "\n## Trials that did not finish cleanly\n\n" + "\n".join(lines) + "\n"
    return out


def write_outputs(
    records: Sequence[TrialRecord], output: Path, title: str, baseline: str | None = None
) -> dict[str, Path]:
    """Write ``summary.csv``, ``trials.csv``, ``summary.md`` and the plots into ``output``.

    With a target and paired seeds, every arm is compared with ``baseline`` (an arm's
    label; default ``constant`` where present, else the first arm) in ``comparisons.csv``
    and ``summary.md``.
    """
    output.mkdir(parents=True, exist_ok=True)
    trials = trials_frame(records)
    summary = summarize(trials)
    files = {
        "summary.csv": output / "summary.csv",
        "trials.csv": output / "trials.csv",
        "summary.md": output / "summary.md",
    }
    summary.to_csv(files["summary.csv"], index=False)
    trials.to_csv(files["trials.csv"], index=False)
    comparisons = _comparisons(trials, baseline)
    if comparisons is not None:
        files["comparisons.csv"] = output / "comparisons.csv"
        comparisons.to_csv(files["comparisons.csv"], index=False)
    files["summary.md"].write_text(
        to_markdown(summary, title)
        + _comparison_markdown(comparisons, int(trials["seed"].nunique()))
        + _trouble(trials)
    )
    for path in plot_experiment(records, output):
        files[path.name] = path
    return files
