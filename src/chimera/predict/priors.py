"""Honest predictors without learning from text: per-kind accuracy and per-stage mean lengths from a training split."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from chimera.sched.types import Call
from chimera.workload.plan import WorkflowPlan
from chimera.workload.schema import Task


class KindAccuracyRouter:
    """Confidence = the model's mean score on training tasks of the same kind (Laplace-smoothed)."""

    def __init__(self, models: Sequence[str], smoothing: float = 1.0) -> None:
        self.models = list(models)
        self.smoothing = smoothing

    def fit(self, tasks: Sequence[Task]) -> "KindAccuracyRouter":
        sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for t in tasks:
            for m in self.models:
                o = t.outcomes.get(m)
                if o is None:
                    continue
                for key in ((t.kind, m), ("*", m)):
                    sums[key][0] += o.score
                    sums[key][1] += 1
        a = self.smoothing
        self.table_ = {k: (s + 0.5 * a) / (n + a) for k, (s, n) in sums.items()}
        self.models_ = list(self.models)
        self._rows: dict[str, np.ndarray] = {}
        return self

    def _row(self, kind: str) -> np.ndarray:
        row = self._rows.get(kind)
        if row is None:
            row = np.array([self.table_.get((kind, m), self.table_.get(("*", m), 0.5)) for m in self.models_])
            self._rows[kind] = row
        return row

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray:
        return np.vstack([self._row(c.kind) for c in calls])


class StageMeanLength:
    """Length = mean output tokens by (kind, stage, model) on training plans; remaining = mean of the rest."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models = list(models)

    def fit(self, plans: Sequence[WorkflowPlan]) -> "StageMeanLength":
        call_sum: dict[tuple[str, int], np.ndarray] = {}
        rem_sum: dict[tuple[str, int], np.ndarray] = {}
        count: dict[tuple[str, int], int] = defaultdict(int)
        for p in plans:
            for s in range(p.n_stages):
                for kind in (p.kind, "*"):
                    key = (kind, s)
                    c = np.array([p.output_tokens(s, m) for m in self.models], dtype=float)
                    r = np.array([p.remaining_tokens(s, m) for m in self.models], dtype=float)
                    if key in call_sum:
                        call_sum[key] += c
                        rem_sum[key] += r
                    else:
                        call_sum[key], rem_sum[key] = c, r
                    count[key] += 1
        if not count:
            raise ValueError("StageMeanLength.fit needs at least one plan")
        self.call_mean_ = {k: v / count[k] for k, v in call_sum.items()}
        self.remaining_mean_ = {k: v / count[k] for k, v in rem_sum.items()}
        self.max_stage_ = {k: max(s for (kk, s) in count if kk == k) for k in {k for k, _ in count}}
        self.models_ = list(self.models)
        return self

    def _lookup(self, kind: str, stage: int) -> tuple[np.ndarray, np.ndarray]:
        if kind not in self.max_stage_:
            kind = "*"
        s = min(stage, self.max_stage_[kind])
        call = self.call_mean_[(kind, s)]
        rem = self.remaining_mean_[(kind, s)]
        if stage > s:  # deeper than any training workflow: expect about one more call
            rem = call
        return call, rem

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._lookup(c.kind, c.stage) for c in calls]
        return np.vstack([p[0] for p in pairs]), np.vstack([p[1] for p in pairs])


class OracleConfidence:
    """True per-model task score, read from the simulator's ground truth (an upper bound, not deployable)."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models_ = list(models)

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray:
        return np.vstack([[c.truth.score((m,) * c.truth.n_stages) for m in self.models_] for c in calls])


class OracleLength:
    """True output tokens of this call and of the rest of the workflow, per model."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models_ = list(models)

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]:
        call = np.array([[c.truth.output_tokens(c.stage, m) for m in self.models_] for c in calls], dtype=float)
        rem = np.array([[c.truth.remaining_tokens(c.stage, m) for m in self.models_] for c in calls], dtype=float)
        return call, rem
