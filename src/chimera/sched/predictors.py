"""What the policies need from predictors, declared by the brain; trained ones (router, length forest) and the priors
in chimera.predict implement these."""

from __future__ import annotations

from enum import Enum
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from chimera.sched.decision import Decision
from chimera.sched.types import Call


@runtime_checkable
class ConfidencePredictor(Protocol):
    """P(model answers correctly | call), one column per model in `models_`."""

    models_: list[str]

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray: ...


@runtime_checkable
class LengthPredictor(Protocol):
    """Predicted output tokens per model: of this call, and of the rest of the workflow including this call."""

    models_: list[str]

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class OnlineLearner(Protocol):
    """A predictor that learns from calls as they complete (the gateway's running per-stage means); the admission
    core calls `learn` with each completed call and its output tokens, in both bodies."""

    def learn(self, call: Call, tokens: int) -> None: ...


class FeedbackOutcome(str, Enum):
    """What a workflow's score did: taught a learner, or why it did not (the gateway answers and counts each)."""

    LEARNT = "learnt"
    UNKNOWN = "unknown"  # no decision of that workflow is pending: never seen here, or forgotten
    REPEATED = "repeated"  # learnt from already: a score teaches once
    LATE = "late"  # older than the learner keeps a workflow's decisions (`max_age_s`)
    INVALID = "invalid"  # not a finite score in [0, 1]
    IGNORED = "ignored"  # no predictor learns from scores


@runtime_checkable
class RewardLearner(Protocol):
    """A predictor that learns from workflow scores (bandit feedback): the admission core tells it what each call
    decided, and later the score of the workflow those calls formed."""

    def decided(self, call: Call, decision: Decision, now: float) -> None: ...

    def reward(self, workflow_id: str, score: float, now: float) -> FeedbackOutcome: ...


@runtime_checkable
class Explorer(Protocol):
    """A confidence predictor that sometimes routes away from the policy's choice to learn, with a known probability:
    `explore` returns (model index, its propensity, explored?, the exploration probability in force)."""

    def explore(self, call: Call, greedy: int, allowed: np.ndarray) -> tuple[int, float, bool, float]: ...
