"""What the policies need from predictors, declared by the brain; trained ones (router, length forest) and the priors
in chimera.predict implement these."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

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
