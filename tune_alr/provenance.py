"""Where a result came from: the command, the versions, the commit and the date.

Written at the top of the bench's report (and attached to MLflow with it), so that a
table read months later says what produced it.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from . import __version__, credentials

#: The packages whose versions decide the figures.
PACKAGES = ("torch", "ray", "mlflow", "numpy", "scipy", "optuna")


def git_commit(folder: Path | None = None) -> str:
    """The commit of the project's checkout (``+dirty`` with local changes), or
    ``unknown`` outside one (an installed wheel)."""
    folder = folder or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=folder, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def provenance() -> dict[str, str]:
    """Command line (secrets scrubbed), versions, commit and date, by name."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "command": credentials.scrub(" ".join(sys.argv)),
        "tune-alr": __version__,
        **versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown() -> str:
    """The provenance as a Markdown list."""
    return "\n".join(f"- {key}: `{value}`" for key, value in provenance().items())


__all__ = ["PACKAGES", "git_commit", "markdown", "provenance"]
