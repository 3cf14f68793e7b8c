"""What a run produced: its trials read back from Ray Tune's folder, and the tables.

:func:`collect` reads the trial folders of one run (a second run under the same name
shares Ray Tune's experiment folder, so a run names its own trials) and writes
``summary.csv``, ``trials.csv``, ``summary.md`` and the plots into the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pandas as pd

from . import credentials, report

if TYPE_CHECKING:
    from .experiment import Experiment


@dataclass
class Results:
    """The outcome of ``tune_alr.run``: where everything went, and the tables."""

    experiment: Experiment
    experiment_dir: Path
    output_dir: Path
    tracking_uri: str
    parent_run_id: str | None
    experiment_id: str | None
    files: dict[str, Path]
    records: list[report.TrialRecord]

    def trials(self) -> pd.DataFrame:
        """One row per trial."""
        return report.trials_frame(self.records)

    def summary(self) -> pd.DataFrame:
        """One row per (task, policy): mean and std over seeds of the final metrics."""
        return report.summarize(self.trials())

    @property
    def all_failed(self) -> bool:
        """Whether some trial ran and none finished or diverged."""
        return bool(self.records) and all(
            r.status not in ("finished", "diverged") for r in self.records
        )


def trial_folders(grid: Any) -> set[str]:
    """The trial folder names of a Ray Tune ``ResultGrid`` (this run's trials only)."""
    return {PurePosixPath(str(result.path)).name for result in grid}


def summary_files(output: Path) -> list[Path]:
    """The summary files of an output folder, to attach to the MLflow parent run."""
    return sorted(p for p in output.glob("*") if p.suffix in (".csv", ".md", ".png"))


def collect(
    exp: Experiment,
    experiment_dir: Path,
    parent_run_id: str | None,
    only: set[str] | None = None,
    experiment_id: str | None = None,
) -> Results:
    """Read the experiment folder (``only`` these trial folders) and write the summaries."""
    records = report.load_trials(experiment_dir, only)
    files = report.write_outputs(records, exp.output_dir, title=exp.name, baseline=exp.baseline)
    return Results(
        experiment=exp,
        experiment_dir=experiment_dir,
        output_dir=exp.output_dir,
        tracking_uri=credentials.public_uri(exp.uri),
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
        files=files,
        records=records,
    )


__all__ = ["Results", "collect", "summary_files", "trial_folders"]
