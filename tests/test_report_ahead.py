"""Reports handed to Ray Tune one report ahead (trainables.ray_trainable.ReportAhead), and
Population Based Training's checkpoint cadence. No Ray cluster: ``send`` is a stand-in."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from trainables import loop
from trainables.ray_trainable import ReportAhead


class SlowSend:
    """A ``tune.report`` stand-in that takes ``delay`` seconds, as the driver's round trip."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.sent: list[tuple[int, bool]] = []  # (step, had a checkpoint that loaded)
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        loaded = False
        if checkpoint_dir is not None:
            loaded = loop.load_checkpoint(checkpoint_dir).step == metrics["step"]
        time.sleep(self.delay)
        self.sent.append((metrics["step"], loaded))
        with self.lock:
            self.in_flight -= 1


CONFIG = {"task": "digits", "policy": "constant", "max_steps": 40, "report_every": 5,
          "checkpoint_every": 2}  # fmt: skip


def test_reports_arrive_in_order_one_in_flight_with_their_checkpoints() -> None:
    send = SlowSend()
    reporter = ReportAhead(send)
    loop.train(CONFIG, reporter)
    reporter.wait()
    assert [s for s, _ in send.sent] == list(range(5, 41, 5))
    assert [c for _, c in send.sent] == [False, True] * 4  # every 2nd, and each loads
    assert send.most_in_flight == 1


def test_the_loop_does_not_wait_for_the_round_trip() -> None:
    """With a 50 ms round trip per report, the loop's report call returns at once (it
    waits only when the previous report is still in flight)."""
    rows: list[dict[str, Any]] = []
    send = SlowSend(delay=0.05)

    def keep(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        rows.append(metrics)
        reporter(metrics, checkpoint_dir)

    reporter = ReportAhead(send)
    loop.train({**CONFIG, "max_steps": 60, "report_every": 10}, keep)
    reporter.wait()
    waited = sum(r["time/report_s"] for r in rows)
    assert waited < 0.05 * len(rows) / 2, waited  # a synchronous report would wait it all


def test_a_send_error_is_raised_at_the_next_report() -> None:
    calls: list[int] = []

    def send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        calls.append(metrics["step"])
        if metrics["step"] == 10:
            raise OSError("storage gone")

    with pytest.raises(OSError, match="storage gone"):
        loop.train(CONFIG, ReportAhead(send))
    assert calls == [5, 10]  # the report after the failure was never sent


def test_a_stop_from_ray_ends_the_loop_after_its_current_step() -> None:
    calls: list[int] = []
    steps: list[int] = []

    def send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        calls.append(metrics["step"])
        if metrics["step"] == 15:
            raise SystemExit(0)  # what tune.report raises when Ray Tune stops the trial

    reporter = ReportAhead(send)

    def should_stop() -> bool:
        steps.append(0)
        return reporter.is_stopped()

    with pytest.raises(loop.Stopped):
        loop.train({**CONFIG, "max_steps": 400}, reporter, should_stop=should_stop)
    assert calls == [5, 10, 15] and reporter.stopped
    assert len(steps) < 20  # it did not train on to its next report
    # without should_stop, the next report raises SystemExit(0), as tune.report would
    calls.clear()
    reporter = ReportAhead(send)
    with pytest.raises(SystemExit) as stop:
        loop.train(CONFIG, reporter)
    assert stop.value.code == 0 and calls == [5, 10, 15] and reporter.stopped


def test_checkpoint_folders_are_moved_aside_and_removed_after_sending(tmp_path: Path) -> None:
    seen: list[str] = []

    def send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            assert Path(checkpoint_dir, loop.CHECKPOINT_FILE).is_file()
            seen.append(checkpoint_dir)

    reporter = ReportAhead(send)
    loop.train(CONFIG, reporter)
    reporter.wait()
    assert len(seen) == 4 and not any(Path(s).exists() for s in seen)


def test_population_based_training_checkpoints_at_every_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tune_alr import tuning

    captured: dict[str, Any] = {}

    def fake_run(search: Any, method: str, space: dict[str, Any], config: Any) -> None:
        captured.update(space)

    monkeypatch.setattr(tuning, "_run", fake_run)
    search = tuning.Search(task="digits", num_samples=2, output=tmp_path,
                           trial={"checkpoint_every": 5},
                           tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")  # fmt: skip
    tuning.population(search)
    assert captured["checkpoint_every"] == 1  # whatever the trial settings say
