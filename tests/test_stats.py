"""The comparison statistics on constructed inputs with known answers."""

from __future__ import annotations

import math

import pytest

from tune_alr.stats import holm, paired_test, performance_profile, speedup_ci

INF = math.inf


def test_a_clear_winner() -> None:
    baseline = [10.0, 12.0, 9.0, 11.0, 10.5, 13.0, 9.5, 12.5, 10.0, 11.5]
    policy = [t / 2 for t in baseline]  # twice as fast on every seed
    test = paired_test(policy, baseline)
    # Every difference has the same sign: the exact two-sided p is 2 / 2**10.
    assert test.pairs == 10 and test.p_value == pytest.approx(2 / 2**10)
    assert speedup_ci(policy, baseline) == (2.0, 2.0, 2.0)


def test_a_tie_is_not_significant() -> None:
    times = [5.0, 6.0, 7.0, 8.0]
    test = paired_test(times, times)
    assert test.p_value == 1.0
    assert speedup_ci(times, times) == (1.0, 1.0, 1.0)
    noisy = [5.1, 5.9, 7.2, 7.9]
    assert paired_test(noisy, times).p_value > 0.5


def test_misses_count_as_slower_than_any_hit() -> None:
    baseline = [10.0] * 8
    policy = [INF, INF, INF, 9.0, 9.0, 9.0, 9.0, 9.0]  # misses 3 seeds, wins 5 narrowly
    test = paired_test(policy, baseline)
    assert test.pairs == 8
    # The 3 misses outrank the 5 small wins: W+ = 6+7+8 = 21 against W- = 15.
    assert test.statistic == 15.0 and test.p_value > 0.5
    median, low, high = speedup_ci(policy, baseline)
    assert median == pytest.approx(10 / 9) and low == 0.0 and high == pytest.approx(10 / 9)
    both_missed = paired_test([INF, 5.0], [INF, 6.0])
    assert both_missed.pairs == 1  # the pair where both missed carries no information


def test_a_policy_hitting_where_the_baseline_misses_has_infinite_speedup() -> None:
    median, _, _ = speedup_ci([5.0, 5.0, 5.0], [INF, INF, 10.0])
    assert median == INF


def test_holm_adjusts_in_the_given_order() -> None:
    # Sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan, 0.9])[1] != holm([0.5, math.nan, 0.9])[1]  # NaN stays NaN
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1


def test_performance_profiles() -> None:
    profile = performance_profile(
        {"a": [1.0, 2.0, INF, 4.0], "b": [2.0, 1.0, 3.0, 4.0]}, taus=[1.0, 2.0, 10.0]
    )
    # Problem by problem, the best: 1, 1, 3, 4. a is best on 1 and 4, within 2x on 2.
    assert profile["a"].tolist() == [0.5, 0.75, 0.75]
    assert profile["b"].tolist() == [0.75, 1.0, 1.0]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="differ in length: 2 and 3"):
        paired_test([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="not NaN"):
        paired_test([math.nan], [1.0])


def test_compare_pairs_seeds_per_task_and_corrects_across_rows() -> None:
    import pandas as pd

    from tune_alr.stats import compare

    rows = []
    for seed in range(5):
        rows += [
            {"task": "digits", "policy": "constant", "seed": seed,
             "steps_to_target": 100 + seed, "wall_s_to_target": 1.0 + seed / 10},
            {"task": "digits", "policy": "feedback", "seed": seed,
             "steps_to_target": 50 + seed, "wall_s_to_target": 0.6 + seed / 10},
            {"task": "digits", "policy": "meta", "seed": seed,
             "steps_to_target": INF if seed < 2 else 90, "wall_s_to_target": 0.9},
        ]  # fmt: skip
    table = compare(pd.DataFrame(rows)).set_index("policy")
    assert list(table.index) == ["feedback", "meta"] and (table["pairs"] == 5).all()
    # feedback wins all 5 pairs: exact p = 2 / 2**5; Holm over 2 rows doubles it.
    assert table.loc["feedback", "steps_p"] == pytest.approx(0.0625)
    assert table.loc["feedback", "steps_p_holm"] == pytest.approx(0.125)
    assert table.loc["meta", "steps_ci_low"] == 0.0  # its misses
    with pytest.raises(ValueError, match="baseline 'sgd' is not among the policies"):
        compare(pd.DataFrame(rows), baseline="sgd")


@pytest.mark.parametrize(
    ("policy", "baseline", "informative", "interval"),
    [
        # one informative pair (the other both missed): a median, no interval
        ([5.0, INF], [10.0, INF], 1, False),
        # two: still no interval, a resample of two values would only give them back
        ([5.0, 6.0], [10.0, 9.0], 2, False),
        ([5.0, 6.0, 4.0], [10.0, 9.0, 8.0], 3, True),
    ],
)
def test_too_few_informative_pairs_give_no_interval(
    policy: list[float], baseline: list[float], informative: int, interval: bool
) -> None:
    from tune_alr.stats import MIN_CI_PAIRS

    assert MIN_CI_PAIRS == 3
    assert paired_test(policy, baseline).pairs == informative
    median, low, high = speedup_ci(policy, baseline)
    assert math.isfinite(median)
    assert (math.isfinite(low) and math.isfinite(high)) is interval


def test_no_informative_pair_means_no_test() -> None:
    from tune_alr.report import format_p, format_speedup
    from tune_alr.stats import accuracy_test

    test = paired_test([INF, INF], [INF, INF])
    assert test.pairs == 0 and math.isnan(test.p_value)
    assert math.isnan(accuracy_test([], []))
    assert format_p(test.p_value) == "n/a"
    row = {"steps_speedup": math.nan, "steps_ci_low": math.nan, "steps_ci_high": math.nan}
    assert format_speedup(row, "steps") == "n/a"
    row = {"steps_speedup": 0.68, "steps_ci_low": math.nan, "steps_ci_high": math.nan}
    assert format_speedup(row, "steps") == "0.68 [n/a]"


@pytest.mark.parametrize(("comparisons", "seeds"), [(1, 6), (3, 7), (24, 10), (48, 11)])
def test_seeds_needed_for_significance_after_holm(comparisons: int, seeds: int) -> None:
    from tune_alr.stats import min_p, power_note, seeds_needed

    assert seeds_needed(comparisons) == seeds
    assert min_p(seeds) * comparisons < 0.05 <= min_p(seeds - 1) * comparisons
    assert power_note(seeds, comparisons) is None
    note = power_note(seeds - 1, comparisons)
    assert note is not None and f"{seeds} seeds could" in note
