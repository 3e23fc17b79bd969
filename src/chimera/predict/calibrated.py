"""A fixed length predictor corrected by how far off it has been: its predictions × a ratio actual / predicted per
(kind, stage, model), learnt from a body's real lengths (the gateway's trace store). A trained forest never learns
online; this lets its systematic error on live traffic (another mix of prompts, another engine) shrink without a
retrain, while keeping its per-call ranking."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from chimera.predict.priors import TRACKED_STAGES
from chimera.sched.predictors import LengthPredictor
from chimera.sched.types import Call

CellKey = tuple[str, int, str]  # (kind, stage, model)


def cell_stage(stage: int) -> int:
    """The stage a ratio is kept under: deep stages share one cell, as the running means keep them."""
    return min(max(int(stage), 0), TRACKED_STAGES - 1)


class LengthRatios:
    """Immutable ratios actual / predicted: per (kind, stage, model) cell, else per model, else 1."""

    def __init__(self, models: Sequence[str], cells: Mapping[CellKey, float] | None = None,
                 per_model: Mapping[str, float] | None = None) -> None:
        self.models = list(models)
        self.cells = dict(cells or {})
        self.per_model = dict(per_model or {})
        self._default = np.array([self.per_model.get(m, 1.0) for m in self.models])
        self._rows: dict[tuple[str, int], np.ndarray] = {}
        for kind, stage, _ in self.cells:  # one row per (kind, stage) the table knows: bounded by the table
            key = (kind, stage)
            if key not in self._rows:
                self._rows[key] = np.array([self.cells.get((kind, stage, m), self.per_model.get(m, 1.0))
                                            for m in self.models])

    def __bool__(self) -> bool:
        return bool(self.cells or self.per_model)

    def row(self, kind: str, stage: int) -> np.ndarray:
        """One factor per model (in `models` order) for a call of `kind` at `stage`."""
        return self._rows.get((kind, cell_stage(stage)), self._default)

    def ratio(self, kind: str, stage: int, model: str) -> float:
        return self.cells.get((kind, cell_stage(stage), model), self.per_model.get(model, 1.0))


class CalibratedLengths:
    """LengthPredictor: `base`'s call and remaining tokens × the ratio of the call's (kind, stage) for each model.
    `ratios` is replaced whole (one reference), so a prediction on another thread reads one table or the next.
    Scaling the remaining tokens by the current stage's ratio assumes the predictor is off the same way on the
    workflow's later stages, which it has not seen yet. Only for a predictor that does not learn online: one that
    does moves under the ratio, and the ratio learnt from its old predictions would be wrong for its new ones."""

    def __init__(self, base: LengthPredictor, ratios: LengthRatios | None = None) -> None:
        self.base = base
        self.models_ = list(base.models_)
        self.ratios = ratios if ratios is not None else LengthRatios(self.models_)

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]:
        call, rem = self.base.predict_lengths(calls)
        ratios = self.ratios
        if not ratios or not len(calls):
            return call, rem
        f = np.array([ratios.row(c.kind, c.stage) for c in calls])
        return call * f, rem * f
