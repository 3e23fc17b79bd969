"""Oracle predictors: the true scores and lengths of each call's workflow, read from the ground truth a simulator
has (workflow id -> its plan). An upper bound on what better predictions can buy; not deployable."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from chimera.sched.types import Call
from chimera.workload.plan import WorkflowPlan


class OracleConfidence:
    """True per-model task score: the workflow's score were every stage run on that model."""

    def __init__(self, models: Sequence[str], truth: Mapping[str, WorkflowPlan]) -> None:
        self.models_ = list(models)
        self.truth = truth

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray:
        plans = [self.truth[c.workflow_id] for c in calls]
        return np.vstack([[p.score((m,) * p.n_stages) for m in self.models_] for p in plans])


class OracleLength:
    """True output tokens of this call and of the rest of the workflow, per model."""

    def __init__(self, models: Sequence[str], truth: Mapping[str, WorkflowPlan]) -> None:
        self.models_ = list(models)
        self.truth = truth

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]:
        plans = [self.truth[c.workflow_id] for c in calls]
        call = np.array([[p.output_tokens(c.stage, m) for m in self.models_] for c, p in zip(calls, plans)], dtype=float)
        rem = np.array([[p.remaining_tokens(c.stage, m) for m in self.models_] for c, p in zip(calls, plans)],
                       dtype=float)
        return call, rem
