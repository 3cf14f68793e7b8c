"""The bench's report: ``bench.md``, ``report.html``, CSV tables and plots.

``report.html`` is one self-contained file (the plots are embedded), so it can be
opened from an MLflow artifact view or mailed as it is.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from . import provenance
from .report import format_num, format_p, format_pairs, format_speedup, pyplot
from .workloads import Workload


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.2f}" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _median(value: float, hits: int, seeds: int, spec: str) -> str:
    if math.isinf(value):
        return f"never ({hits}/{seeds})"
    return f"{value:{spec}} ({hits}/{seeds})"


def _pp(row: Any, label: str) -> str:
    """The raw p-value and the Holm-corrected one (the mark goes by the corrected)."""
    raw = row[f"{label}_p"]
    if raw is None or math.isnan(raw):
        return "n/a"
    return f"{raw:.3g} / {format_p(row[f'{label}_p_holm'])}"


def table_rows(table: pd.DataFrame, task: str) -> list[list[str]]:
    rows = []
    for _, r in table[table["task"] == task].iterrows():
        rows.append(
            [
                str(r["arm"]),
                str(r["kind"]),
                _pct(r["final_val_acc_mean"], r["final_val_acc_std"]),
                _median(r["steps_to_target_median"], r["hits"], r["seeds"], ".0f"),
                _median(r["wall_s_to_target_median"], r["hits"], r["seeds"], ".1f"),
                format_num(r["wall_s_mean"], ".1f"),
                format_num(r["policy_ms_per_step_mean"], ".3f"),
                format_num(r["peak_rss_mb_mean"], ".0f"),
            ]
        )
    return rows


TABLE_HEAD = ["arm", "kind", "final val acc % (mean ± std)", "steps to target, median (hits)",
              "wall s to target, median (hits)", "train wall s", "policy ms/step",
              "peak RSS MiB"]  # fmt: skip
COMPARISON_HEAD = ["policy", "vs", "pairs", "speed-up in steps [95% CI]", "p raw / Holm",
                   "speed-up in wall s [95% CI]", "p raw / Holm", "Δ final acc (median, pts)",
                   "p raw / Holm"]  # fmt: skip


def comparison_rows(comp: pd.DataFrame, task: str) -> list[list[str]]:
    rows: list[list[str]] = []
    if comp.empty:
        return rows
    for _, r in comp[comp["task"] == task].iterrows():
        rows.append(
            [
                str(r["policy"]),
                str(r["baseline"]),
                format_pairs(r),
                format_speedup(r, "steps"),
                _pp(r, "steps"),
                format_speedup(r, "wall"),
                _pp(r, "wall"),
                format_num(100 * r["acc_diff"], "+.2f"),
                _pp(r, "acc"),
            ]
        )
    return rows


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


PROTOCOL = (
    "Target: the lowest best validation accuracy, over its seeds, of the reference arm "
    "(the best fixed-LR grid arm by median, or --baseline): the accuracy it reaches on "
    "every seed. Time to target: the first validation report at or above it (a miss is "
    "infinitely slow). Speed-up: reference time / policy time per paired seed, median "
    "with a 95% bootstrap interval (n/a with fewer than 3 informative pairs, those where "
    "a side reached the target). p: two-sided Wilcoxon signed-rank on log time to target "
    "and on final accuracy, raw and Holm-corrected across all comparisons of a measure "
    "(n/a: no informative pair); * Holm p < 0.05. With n informative pairs the smallest "
    "two-sided p is 2/2^n (0.0625 for 5)."
)


def plot_profile(profile: pd.DataFrame, path: Path) -> Path:
    """The performance-profile plot (fraction of problems within tau x the best time)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, column in enumerate(profile.columns):
        style = "-" if i < 10 else "--"
        ax.step(profile.index, profile[column], where="post", label=str(column), ls=style)
    ax.set(xscale="log", xlabel="tau (time to target / best time on the problem)",
           ylabel="fraction of problems", title="Performance profile (wall s to target)",
           ylim=(0, 1.02))  # fmt: skip
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(
    name: str,
    workloads: Sequence[Workload],
    out: Path,
    trials: pd.DataFrame,
    table: pd.DataFrame,
    comp: pd.DataFrame,
    goal: Mapping[str, tuple[float, str]],
    profile: pd.DataFrame,
    tuned: pd.DataFrame | None = None,
    warning: str | None = None,
    leaderboard: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write the bench's files into the output folder ``out``; returns them by name."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "bench_trials.csv": out / "bench_trials.csv",
        "bench_table.csv": out / "bench_table.csv",
        "bench_comparisons.csv": out / "bench_comparisons.csv",
        "bench.md": out / "bench.md",
        "report.html": out / "report.html",
    }
    trials.to_csv(files["bench_trials.csv"], index=False)
    table.to_csv(files["bench_table.csv"], index=False)
    comp.to_csv(files["bench_comparisons.csv"], index=False)
    if not profile.empty:
        files["perf_profile.png"] = plot_profile(profile, out / "perf_profile.png")

    md = [f"# {name}: policies against the grid and the anchors", "", PROTOCOL, ""]
    parts = [f"<h1>{html.escape(name)}: policies against the grid and the anchors</h1>",
             f"<p>{html.escape(PROTOCOL)}</p>"]  # fmt: skip
    if warning:
        md += [f"**Too few seeds for significance**: {warning}", ""]
        parts.append(f"<p><b>Too few seeds for significance</b>: {html.escape(warning)}</p>")
    origin = provenance.provenance()
    md += ["Produced by:", "", provenance.markdown(), ""]
    parts.append("<p>Produced by:</p><ul>" + "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in origin.items()
    ) + "</ul>")  # fmt: skip
    by_task = {w.task: w for w in workloads}
    for task in sorted(goal):
        target, best = goal[task]
        w = by_task.get(task)
        heading = f"{task} ({w.name}: {w.note})" if w else task
        line = f"Target {100 * target:.2f}% validation accuracy (reference arm: {best})."
        rows, crow = table_rows(table, task), comparison_rows(comp, task)
        md += [f"## {heading}", "", line, "", _markdown_table(TABLE_HEAD, rows), ""]
        parts += [f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(line)}</p>",
                  _html_table(TABLE_HEAD, rows)]  # fmt: skip
        if crow:
            md += ["Each policy against each anchor and the best grid arm:", "",
                   _markdown_table(COMPARISON_HEAD, crow), ""]  # fmt: skip
            parts += ["<h3>Paired comparisons</h3>", _html_table(COMPARISON_HEAD, crow)]
        for kind, caption in (("lr", "LR path (step size) per trial"),
                              ("val", "validation accuracy")):  # fmt: skip
            image = out / f"{kind}_{task}.png"
            if image.is_file():
                md.append(f"![{task} {caption}]({image.name})")
                parts.append(_img(image, f"{task}: {caption}"))
        md.append("")
    if tuned is not None and not tuned.empty:
        files["bench_tuned.csv"] = out / "bench_tuned.csv"
        tuned.to_csv(files["bench_tuned.csv"], index=False)
        head = ["task", "method", "trials", "best LR", "best val acc %",
                "trials reaching target", "cost: train s", "cost: steps"]  # fmt: skip
        rows = [[str(r.task), str(r.method), str(r.trials), f"{r.best_lr:.3g}",
                 f"{100 * r.best_val_acc:.2f}", str(r.trials_reaching_target),
                 f"{r.cost_s:.1f}", str(r.cost_steps)] for r in tuned.itertuples()]  # fmt: skip
        note = ("Adam's constant LR tuned by Ray Tune (seed 0); the cost is every trial of "
                "the search, to set against one run of a policy.")  # fmt: skip
        md += ["## Tuned baselines", "", note, "", _markdown_table(head, rows), ""]
        parts += ["<h2>Tuned baselines</h2>", f"<p>{html.escape(note)}</p>",
                  _html_table(head, rows)]  # fmt: skip
    if leaderboard is not None and not leaderboard.empty:
        files["bench_leaderboard.csv"] = out / "bench_leaderboard.csv"
        leaderboard.to_csv(files["bench_leaderboard.csv"], index=False)
        files["leaderboard.png"] = plot_leaderboard(leaderboard, out / "leaderboard.png")
        head, rows = leaderboard_rows(leaderboard)
        note = (
            "One untuned policy run against Ray Tune's searches of Adam's constant LR "
            "stopped at 1, 2 and 4 times the policy's optimizer steps (all their trials "
            "counted); medians over seeds of the best validation accuracy reached."
        )
        md += ["## Accuracy against compute", "", note, "", _markdown_table(head, rows), "",
               "![accuracy against compute](leaderboard.png)", ""]  # fmt: skip
        picture = _img(files["leaderboard.png"], "leaderboard")
        parts += ["<h2>Accuracy against compute</h2>", f"<p>{html.escape(note)}</p>",
                  _html_table(head, rows), picture]  # fmt: skip
    if "perf_profile.png" in files:
        md += ["## Performance profile", "", "![performance profile](perf_profile.png)", ""]
        parts += ["<h2>Performance profile</h2>", _img(files["perf_profile.png"], "profile")]
    trouble = trials[trials["status"] != "finished"]
    if not trouble.empty:
        lines = [f"- {t.task}/{t.policy}/seed{t.seed}: {t.status} {t.diverged_reason or t.error}"
                 for t in trouble.itertuples()]  # fmt: skip
        md += ["## Trials that did not finish cleanly", "", *lines, ""]
        parts += ["<h2>Trials that did not finish cleanly</h2><ul>"
                  + "".join(f"<li>{html.escape(x[2:])}</li>" for x in lines) + "</ul>"]  # fmt: skip
    files["bench.md"].write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
             "padding:3px 6px;font-size:13px}img{max-width:100%}")  # fmt: skip
    files["report.html"].write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    return files


def leaderboard_rows(board: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The leaderboard as text rows, best first within each task."""
    head = ["task", "method", "compute (x policy)", "seeds", "best val acc % (median)",
            "lowest seed %", "steps (median)", "CPU s (median)"]  # fmt: skip
    rows = []
    for task, g in board.groupby("task", sort=True):
        for r in g.sort_values("best_val_acc_median", ascending=False).itertuples():
            rows.append([str(task), str(r.method), f"{r.budget:g}x", str(r.seeds),
                         f"{100 * r.best_val_acc_median:.2f}", f"{100 * r.best_val_acc_min:.2f}",
                         f"{r.steps_median:.0f}", f"{r.cpu_s_median:.1f}"])  # fmt: skip
    return head, rows


def plot_leaderboard(board: pd.DataFrame, path: Path) -> Path:
    """Best validation accuracy against optimizer steps spent, per task and method."""
    plt = pyplot()
    tasks = sorted(board["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = board[board["task"] == task]
        for method, g in mine.groupby("method", sort=True):
            g = g.sort_values("steps_median")
            style = "o" if str(method).startswith("policy") else "o-"
            ax.plot(g["steps_median"], g["best_val_acc_median"], style, label=str(method))
        ax.set(xscale="log", xlabel="optimizer steps spent (median)",
               ylabel="best validation accuracy (median)", title=task)  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>"
