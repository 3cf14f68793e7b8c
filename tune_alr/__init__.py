"""tune-alr: adaptive learning-rate policies, benchmarked as Ray Tune trials.

``tune_alr.policies`` needs only torch. ``Experiment``, ``run`` and the rest (Ray Tune
and MLflow) are imported on first use, so that importing the policies never imports Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public names and the module that defines each (imported on first use).
_LAZY = {
    "Arm": "experiment",
    "Experiment": "experiment",
    "PolicyStopper": "stopper",
    "Results": "results",
    "meta_train": "metatrain",
    "resume": "runner",
    "run": "runner",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'tune_alr' has no attribute {name!r}")
