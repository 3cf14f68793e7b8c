"""tune-alr: adaptive learning-rate policies, benchmarked as Ray Tune trials.

``tune_alr.policies`` needs only torch. ``Experiment`` and ``run`` (Ray Tune + MLflow)
are imported on first use, so that importing the policies never imports Ray.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Arm", "Experiment", "Results", "resume", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module 'tune_alr' has no attribute {name!r}")
