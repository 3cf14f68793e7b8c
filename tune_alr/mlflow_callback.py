"""The Ray Tune callback that writes every trial into MLflow, from the driver.

Each trial gets a child run of the experiment's parent run (``tune_alr.tracking``):
opened when it starts (or reopened after a restart), one batch of metrics per report,
ended FINISHED or FAILED with its curves attached. The trainable knows nothing of it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ray import tune

from . import credentials
from .stopper import StopRecorder
from .tracking import Handle, TrialLogger


class MLflowTracking(tune.Callback):
    """Ray Tune callback that logs every trial into a child run of the experiment's run.

    Tracking never stops training: on the first error from the store it warns once and
    logs nothing more for this experiment (``tune-alr report`` can re-log it later).
    """

    def __init__(self, handle: Handle, recorder: StopRecorder | None = None) -> None:
        self.handle = handle
        self.recorder = recorder
        self._logger: TrialLogger | None = None
        self.failed: str | None = None

    def _safely(self, what: str, fn: Any, *args: Any) -> None:
        if self.failed is not None:
            return
        try:
            if self._logger is None:
                self._logger = TrialLogger(self.handle)
            fn(self._logger, *args)
        except Exception as err:  # any store failure: keep training, say so once
            self.failed = f"{what}: {type(err).__name__}: {credentials.scrub(str(err))}"
            warnings.warn(
                f"MLflow tracking at {self.handle.tracking_uri} failed "
                f"({self.failed}); "
                "training goes on and Ray keeps every result in its experiment folder "
                "(`tune-alr report <folder>` summarises it).",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely("start", TrialLogger.start, trial.trial_id, trial.config)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._safely("start", TrialLogger.start, trial.trial_id, trial.config)
        self._safely("result", TrialLogger.result, trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # A trial that met an error no retry would cure reports status "failed" and
        # ends without raising (trainables.ray_trainable): its run ends FAILED all the same.
        last = getattr(trial, "last_result", None) or {}
        stopped = self.recorder.reason(trial) if self.recorder is not None else None
        if last.get("status") == "failed":
            error = str(last.get("error", ""))
            self._safely("finish", TrialLogger.finish, trial.trial_id, "FAILED", error)
        elif stopped is not None:
            # Stopped early by a scheduler or the stopper: not failed, not finished.
            self._safely("finish", TrialLogger.stop, trial.trial_id, stopped)
        else:
            self._safely("finish", TrialLogger.finish, trial.trial_id, "FINISHED")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Trials ended by the stopper's stop_all() get no on_trial_complete (Ray Tune
        # 2.60): their runs end here as stopped. After an interruption they stay open for
        # a resume to continue.
        if self.recorder is None or not self.recorder.experiment_stopped():
            return
        open_runs = set(self._logger.open_trials()) if self._logger is not None else set()
        for trial in trials:
            if trial.trial_id in open_runs:
                self.on_trial_complete(0, trials, trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = getattr(trial, "error_file", None)
        message = Path(error).read_text()[-2000:] if error and Path(error).is_file() else None
        self._safely("finish", TrialLogger.finish, trial.trial_id, "FAILED", message)
