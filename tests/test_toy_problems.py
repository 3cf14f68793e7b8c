"""Mis-set LRs on small deterministic problems (``tune_alr.toy_problems``).

The claim checked for ``meta``: from every start (1e-5, 10x too low, 10x too high, 30x
too high) it ends within 3.5x of the final loss of the best constant LR of an 8-value
grid, in the same 600 SGD steps, with every loss and LR finite. For ``hd``, ``feedback``
and ``plan1-literal`` the table records where each recovers (within 1.6x); elsewhere
they stay finite but do not recover, as ``python benchmarks/toy_problems.py`` shows.
"""

from __future__ import annotations

import functools

import pytest

from tune_alr.toy_problems import best_constant, run

META_FACTOR = 3.5
RECOVERED = 1.6
STARTS = ("1e-5", "10x low", "10x high", "30x high")


@functools.cache
def _best(problem: str) -> tuple[float, float]:
    return best_constant(problem)


def _start(problem: str, which: str) -> float:
    best_lr = _best(problem)[0]
    return {"1e-5": 1e-5, "10x low": best_lr / 10, "10x high": best_lr * 10,
            "30x high": best_lr * 30}[which]  # fmt: skip


def test_the_grid_has_an_interior_best() -> None:
    # Otherwise "10x off" would fall outside what the grid can judge.
    assert _best("logreg")[0] == 1.0 and _best("mlp")[0] == 0.3


@pytest.mark.parametrize("problem", ["logreg", "mlp"])
@pytest.mark.parametrize("which", STARTS)
def test_meta_ends_near_the_best_constant_lr(problem: str, which: str) -> None:
    result = run(problem, "meta", _start(problem, which))
    assert result.finite
    assert result.final_loss <= META_FACTOR * _best(problem)[1]


# (policy, problem, start) where the policy recovers, measured; all others: finite only.
RECOVERS = {
    ("hd", "logreg", "10x low"),
    ("feedback", "logreg", "10x low"),
    ("feedback", "logreg", "10x high"),
    # ("feedback", "mlp", "10x high") recovered to 1.6x while a raise withheld by the
    # guard's cooldown still counted in the streak; counted right, it ends at 1.77x.
    ("plan1-literal", "logreg", "10x low"),
}


@pytest.mark.parametrize("problem", ["logreg", "mlp"])
@pytest.mark.parametrize("which", STARTS)
@pytest.mark.parametrize("policy", ["hd", "feedback", "plan1-literal"])
def test_other_policies_as_recorded(policy: str, problem: str, which: str) -> None:
    result = run(problem, policy, _start(problem, which))
    ratio = result.final_loss / _best(problem)[1]
    if (policy, problem, which) in RECOVERS:
        assert ratio <= RECOVERED
    else:
        assert ratio > RECOVERED  # the limitation, recorded: update the table if fixed
    if policy != "plan1-literal":  # the literal rule has no guard: it may blow up
        assert result.finite
