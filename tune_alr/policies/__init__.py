"""Learning-rate policies for any PyTorch training loop (imports torch only).

from tune_alr.policies import build, available
policy = build("feedback", optimizer, evaluate=probe)
...
optimizer.step()
policy.step(loss.item())
"""

from .base import Policy
from .feedback import Feedback, feedback_decision
from .hd import HypergradientDescent
from .interval import IntervalPolicy
from .meta import Meta
from .plateau import Plateau
from .registry import available, build, check_name, check_params, register
from .schedules import Constant, Cosine, Cyclic, StepDecay

__all__ = [
    "Constant",
    "Cosine",
    "Cyclic",
    "Feedback",
    "HypergradientDescent",
    "IntervalPolicy",
    "Meta",
    "Plateau",
    "Policy",
    "StepDecay",
    "available",
    "build",
    "check_name",
    "check_params",
    "feedback_decision",
    "register",
]
