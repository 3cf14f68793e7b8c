"""Statistics for comparing policies over paired seeds (``scipy.stats``).

The unit of comparison is a *pair*: the same task and seed (same initial weights and
data order) under two policies. Time to target is the primary measure, and a run that
never reaches the target took infinitely long:

* :func:`paired_test`: the Wilcoxon signed-rank test on log time to target. A miss is
  ranked above every hit by standing in as ``MISS_FACTOR`` x the slowest hit of the
  comparison (ranks, not the value, matter); pairs where both missed are ties.
* :func:`accuracy_test`: the Wilcoxon signed-rank test on paired final accuracies.
* :func:`holm`: Holm's step-down correction across a family of comparisons.
* :func:`speedup_ci`: the median speed-up (baseline time / policy time per pair; a
  policy hit against a baseline miss is ``inf``, the reverse ``0``) and its 95%
  bootstrap confidence interval (percentile method, seeded).
* :func:`performance_profile`: Dolan-More profiles, the fraction of problems (task,
  seed) each policy solves within a factor tau of the best policy on that problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

#: A miss stands in as this many times the slowest hit when ranking differences.
MISS_FACTOR = 10.0
#: Informative pairs below which no bootstrap interval is given (it would be one value).
MIN_CI_PAIRS = 3
#: The significance level the reports and warnings speak of.
ALPHA = 0.05


def min_p(pairs: int) -> float:
    """The smallest two-sided p-value an exact Wilcoxon test on ``pairs`` pairs can give:
    every difference in one direction, ``2 / 2**pairs`` (1 for no pairs)."""
    return 1.0 if pairs <= 0 else min(1.0, 2.0 / 2.0**pairs)


def seeds_needed(comparisons: int = 1, alpha: float = ALPHA) -> int:
    """The fewest paired seeds with which a winner on every seed reaches ``p < alpha``
    after Holm's correction over ``comparisons`` (the smallest p is multiplied by it)."""
    pairs = 1
    while min_p(pairs) * max(1, comparisons) >= alpha:
        pairs += 1
    return pairs


def power_note(pairs: int, comparisons: int, alpha: float = ALPHA) -> str | None:
    """A warning when ``pairs`` seeds cannot show significance; ``None`` when they can."""
    if min_p(pairs) * max(1, comparisons) < alpha:
        return None
    return (
        f"with {pairs} paired seed(s) the smallest two-sided Wilcoxon p is "
        f"{min_p(pairs):.3g}: no comparison can reach p < {alpha:g}"
        + (f" after Holm's correction over {comparisons} comparisons" if comparisons > 1 else "")
        + f". {seeds_needed(comparisons, alpha)} seeds could."
    )


@dataclass(frozen=True)
class PairedTest:
    """The outcome of :func:`paired_test`."""

    pairs: int  # informative pairs: at least one side reached the target
    statistic: float
    p_value: float  # NaN when no pair is informative: no test can be formed


def _as_array(values: Sequence[float]) -> np.ndarray:
    return np.asarray([math.inf if v is None else float(v) for v in values], dtype=float)


def paired_test(policy: Sequence[float], baseline: Sequence[float]) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test on log times to target (``inf`` = miss)."""
    a, b = _as_array(policy), _as_array(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}.")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("times to target must be numbers or inf (a miss), not NaN.")
    keep = np.isfinite(a) | np.isfinite(b)  # both missed: a tie, no information
    a, b = a[keep], b[keep]
    hits = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    if len(a) == 0:
        return PairedTest(0, math.nan, math.nan)
    if not (hits > 0).all():
        raise ValueError("times to target must be > 0 (or inf, a miss).")
    stand_in = MISS_FACTOR * hits.max()
    diff = np.log(np.where(np.isfinite(a), a, stand_in)) - np.log(
        np.where(np.isfinite(b), b, stand_in)
    )
    if np.all(diff == 0):
        return PairedTest(len(a), 0.0, 1.0)
    result = stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return PairedTest(len(a), float(result.statistic), float(result.pvalue))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given (NaN stays NaN)."""
    p = np.asarray(p_values, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), math.nan)
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def speedup_ci(
    policy: Sequence[float], baseline: Sequence[float], *, seed: int = 0, resamples: int = 9999
) -> tuple[float, float, float]:
    """Median speed-up of ``policy`` over ``baseline`` and its 95% bootstrap interval.

    Pairs where both missed carry no speed-up and are left out. With fewer than
    :data:`MIN_CI_PAIRS` informative pairs the interval is NaN (reports print "n/a"):
    resampling one or two values would only give them back.
    """
    a, b = _as_array(policy), _as_array(baseline)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(
            np.isfinite(a) & np.isfinite(b),
            b / a,
            np.where(np.isfinite(a), math.inf, np.where(np.isfinite(b), 0.0, math.nan)),
        )
    ratio = ratio[~np.isnan(ratio)]  # both missed: no speed-up to speak of
    if len(ratio) == 0:
        return math.nan, math.nan, math.nan
    median = float(np.median(ratio))
    if len(ratio) < MIN_CI_PAIRS:
        return median, math.nan, math.nan
    if np.all(ratio == ratio[0]):
        return median, median, median
    with np.errstate(invalid="ignore"):  # inf ratios: the percentile method copes
        ci = stats.bootstrap(
            (ratio,),
            np.median,
            confidence_level=0.95,
            n_resamples=resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
    return median, float(ci.low), float(ci.high)


def compare(trials: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """Every policy against ``baseline`` per task, on paired seeds; Holm across all rows.

    ``trials`` is ``report.trials_frame`` (columns task, policy, seed,
    steps_to_target, wall_s_to_target; a miss is ``inf``). ``baseline`` defaults to
    ``constant`` when present, else the first policy. See :func:`compare_pairs` for
    the columns.
    """
    policies = sorted(trials["policy"].unique())
    if baseline is None:
        baseline = "constant" if "constant" in policies else policies[0]
    if baseline not in policies:
        raise ValueError(f"baseline {baseline!r} is not among the policies {policies}.")
    pairs = []
    for task, group in trials.groupby("task", sort=True):
        present = set(group["policy"])
        if baseline in present:
            pairs += [(str(task), p, baseline) for p in sorted(present) if p != baseline]
    return compare_pairs(trials, pairs)


def accuracy_test(policy: Sequence[float], baseline: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired final accuracies (1.0: no
    difference; NaN: no pair to test)."""
    a, b = np.asarray(policy, dtype=float), np.asarray(baseline, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    if not len(diff):
        return math.nan
    if not np.any(diff != 0):
        return 1.0
    return float(stats.wilcoxon(diff, zero_method="wilcox").pvalue)


def compare_pairs(trials: pd.DataFrame, pairs: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """The comparisons ``(task, policy, baseline)`` on paired seeds; Holm across all rows.

    Returns one row per pair with the number of paired seeds (``pairs``) and of those
    where at least one side reached the target (``informative``), the median speed-up in
    steps and in wall seconds to target with 95% bootstrap intervals, the Wilcoxon
    p-values on log time to target (``steps_p``, ``wall_p``) and on final validation
    accuracy (``acc_p``, with ``acc_diff``, the median paired difference), and each
    p-value Holm-corrected across all rows (``*_p_holm``).
    """
    rows = []
    values = ["steps_to_target", "wall_s_to_target"]
    if "val_acc" in trials.columns:
        values.append("val_acc")
    for task, policy, baseline in pairs:
        group = trials[trials["task"] == task]
        wide = group.pivot_table(index="seed", columns="policy", values=values, aggfunc="first")
        row: dict[str, object] = {"task": task, "policy": policy, "baseline": baseline}
        for measure, label in (("steps_to_target", "steps"), ("wall_s_to_target", "wall")):
            pair = wide[measure][[policy, baseline]].dropna()
            a, b = pair[policy].tolist(), pair[baseline].tolist()
            test = paired_test(a, b)
            median, low, high = speedup_ci(a, b)
            row.update(
                {
                    "pairs": len(pair),
                    "informative": test.pairs,
                    f"{label}_speedup": median,
                    f"{label}_ci_low": low,
                    f"{label}_ci_high": high,
                    f"{label}_p": test.p_value,
                }
            )
        if "val_acc" in values:
            acc = wide["val_acc"][[policy, baseline]].dropna()
            row["acc_diff"] = (
                float(np.median(acc[policy] - acc[baseline])) if len(acc) else math.nan
            )
            row["acc_p"] = accuracy_test(acc[policy].tolist(), acc[baseline].tolist())
        rows.append(row)
    out = pd.DataFrame(rows)
    if not out.empty:
        for label in ("steps", "wall", "acc"):
            if f"{label}_p" in out.columns:
                out[f"{label}_p_holm"] = holm(out[f"{label}_p"].tolist())
    return out


def performance_profile(
    times: Mapping[str, Sequence[float]], taus: Sequence[float] | None = None
) -> pd.DataFrame:
    """Fraction of problems each policy solves within ``tau`` x the best time.

    ``times[policy][i]`` is the time on problem ``i`` (``inf`` = miss); every policy
    has the same problems in the same order. Returns one column per policy, indexed
    by ``tau`` (from 1).
    """
    names = list(times)
    table = np.vstack([_as_array(times[n]) for n in names])  # policies x problems
    best = table.min(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(np.isfinite(table), table / best, math.inf)
    if taus is None:
        finite = ratios[np.isfinite(ratios)]
        top = float(finite.max()) if finite.size else 1.0
        grid = np.unique(np.concatenate([[1.0], np.geomspace(1.0, max(top, 1.0) * 1.05, 50)]))
    else:
        grid = np.asarray(taus, dtype=float)
    data = {n: [(ratios[i] <= t).mean() for t in grid] for i, n in enumerate(names)}
    return pd.DataFrame(data, index=pd.Index(grid, name="tau"))


__all__ = [
    "ALPHA",
    "MIN_CI_PAIRS",
    "MISS_FACTOR",
    "PairedTest",
    "accuracy_test",
    "compare",
    "compare_pairs",
    "holm",
    "min_p",
    "paired_test",
    "performance_profile",
    "power_note",
    "seeds_needed",
    "speedup_ci",
]
