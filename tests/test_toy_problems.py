"""Mis-set LRs on small deterministic problems (``tune_alr.toy_problems``).

The claim checked for ``meta``, with the shipped meta-trained controller (the default) and
with plan 2's blank start (``controller="scratch"``): from every start (1e-5, 10x too
low, 10x too high, 30x too high) it ends within 3.5x of the final loss of the best
constant LR of an 8-value grid, in the same 600 SGD steps, with every loss and LR finite,
but for the one start recorded in ``META_MISSES``. Measured: the shipped controller ends
at 1.07x, 1.33x, 2.15x, 5.91x (logreg) and 2.64x, 3.14x, 1.43x, 1.33x (mlp); scratch at
1.09x, 1.02x, 1.14x, 1.47x and 2.77x, 3.13x, 1.25x, 2.71x. The goal of 1.15x from every
start is not met by either (see README). For ``hd``, ``feedback`` and ``plan1-literal``
the table records where each recovers (within 1.6x); elsewhere they stay finite but do
not recover, as ``python benchmarks/toy_problems.py`` shows. The toy problems are not in
the meta-training distribution."""

from __future__ import annotations

import functools

import pytest

from tune_alr.toy_problems import best_constant, run

META_FACTOR = 3.5
RECOVERED = 1.6
STARTS = ("1e-5", "10x low", "10x high", "30x high")
#: (controller, problem, start) where meta ends beyond META_FACTOR, measured: the shipped
#: controller from 30x too high on logistic regression ends at 5.91x, its LR at 2.9 (the
#: best constant is 1): it backs off from 30 but not far enough.
META_MISSES = {("meta-trained", "logreg", "30x high")}


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


@pytest.mark.parametrize("controller", ["meta-trained", "scratch"])
@pytest.mark.parametrize("problem", ["logreg", "mlp"])
@pytest.mark.parametrize("which", STARTS)
def test_meta_ends_near_the_best_constant_lr(problem: str, which: str, controller: str) -> None:
    result = run(problem, "meta", _start(problem, which), controller=controller)
    assert result.finite
    ratio = result.final_loss / _best(problem)[1]
    if (controller, problem, which) in META_MISSES:
        assert ratio > META_FACTOR  # the limitation, recorded: update the table if fixed
    else:
        assert ratio <= META_FACTOR


# (policy, problem, start) where the policy recovers, measured; all others: finite only.
RECOVERS = {
    ("hd", "logreg", "10x low"),
    ("feedback", "logreg", "10x low"),
    ("feedback", "logreg", "10x high"),
    # With the protective start (a ramp from 0.1x over 100 steps that the first cut
    # ends): 1.30x and 1.31x / 1.35x; without it 3.32x, and 1.77x / 11.02x on the MLP.
    ("feedback", "logreg", "30x high"),
    ("feedback", "mlp", "10x high"),
    ("feedback", "mlp", "30x high"),
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


@pytest.mark.parametrize("problem", ["logreg", "mlp"])
@pytest.mark.parametrize("which", ["10x high", "30x high"])
def test_feedback_protective_start_rescues_a_start_too_high(problem: str, which: str) -> None:
    """The protective start (feedback's default) against the same rule without it."""
    start = _start(problem, which)
    best = _best(problem)[1]
    protected = run(problem, "feedback", start)
    bare = run(problem, "feedback", start, warmup_steps=0)
    assert protected.finite and protected.final_loss <= 1.4 * best
    assert bare.final_loss > 1.4 * best  # without it: 1.47x, 3.32x, 1.77x, 11.02x
