"""Honest predictors without learning from text: per-kind accuracy and per-stage mean lengths from a training split;
for a gateway with no training data yet, confidence by model size and lengths learnt online from completions.
(The factories that build them by name: chimera/predict/plugins/.)"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np

from chimera.sched.types import Call, ModelInfo
from chimera.workload.plan import WorkflowPlan
from chimera.workload.schema import Task

DEFAULT_CALL_TOKENS = 256.0
TRACKED_STAGES = 64  # stages at or past the last share one running mean: a prediction costs O(stages × models), fixed
TRACKED_KINDS = 1024  # kinds past this many pool under OTHER_KIND: memory stays bounded whatever clients send
OTHER_KIND = "\x00other"


def kind_accuracy(kinds: Sequence[str], scores: Sequence[Sequence[float]] | np.ndarray, models: Sequence[str],
                  smoothing: float = 1.0) -> dict[tuple[str, str], float]:
    """Laplace-smoothed mean score by (kind, model) and by ("*", model) over all kinds, from one row of per-model
    scores per task (NaN: the model has no score for it); shared by the simulator's prior and the routing tables."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for kind, row in zip(kinds, scores):
        for m, v in zip(models, row):
            if v != v:  # NaN: no outcome for this model
                continue
            for key in {(kind, m), ("*", m)}:
                sums[key][0] += float(v)
                sums[key][1] += 1
    a = smoothing
    return {k: (total + 0.5 * a) / (n + a) for k, (total, n) in sums.items()}


def _stack(rows: Sequence[np.ndarray], n_models: int) -> np.ndarray:
    """Per-model rows as one (calls, models) array. np.array rather than np.vstack: the policy predicts one call at a
    time, and for one row vstack's generic path costs several times the copy."""
    return np.array(rows) if rows else np.empty((0, n_models))


class KindAccuracyRouter:
    """Confidence = the model's mean score on training tasks of the same kind (Laplace-smoothed)."""

    def __init__(self, models: Sequence[str], smoothing: float = 1.0) -> None:
        self.models = list(models)
        self.smoothing = smoothing

    def fit(self, tasks: Sequence[Task]) -> "KindAccuracyRouter":
        nan = float("nan")
        scores = [[o.score if (o := t.outcomes.get(m)) is not None else nan for m in self.models] for t in tasks]
        self.table_ = kind_accuracy([t.kind for t in tasks], scores, self.models, self.smoothing)
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
        return _stack([self._row(c.kind) for c in calls], len(self.models_))


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
        n = len(self.models_)
        return _stack([p[0] for p in pairs], n), _stack([p[1] for p in pairs], n)


class SizePriorConfidence:
    """Confidence rises with model size (0.5 smallest → 0.9 largest): bigger models are usually more accurate."""

    def __init__(self, models: Sequence[ModelInfo]) -> None:
        self.models_ = [m.name for m in models]
        n = max(len(models) - 1, 1)
        self._row = np.array([0.5 + 0.4 * m.size_rank / n for m in models])

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray:
        return np.tile(self._row, (len(calls), 1))


class RunningLength:
    """Per-(kind, stage, model) running mean of completion tokens; remaining = this stage's and later stages' means.
    StageMeanLength's online counterpart: it sees stages one at a time, not whole workflows, so the remaining work is
    the sum of per-stage means rather than a measured mean of remainders (the two differ where workflows vary in depth).
    Unseen (kind, stage, model) falls back to the stage's mean over all models, then to DEFAULT_CALL_TOKENS.
    Stages from TRACKED_STAGES − 1 on share one bucket, so a client's stage number never sets the work done.
    `warm` adds pseudo-observations from earlier runs (the gateway's trace store), pooled with what is learnt live."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models_ = list(models)
        self._sum: dict[tuple[str, int, str], float] = defaultdict(float)
        self._n: dict[tuple[str, int, str], int] = defaultdict(int)
        self._max_stage: dict[str, int] = {}
        self._prior: dict[tuple[str, int, str], tuple[float, float]] = {}  # key -> (tokens sum, weight)
        self._prior_max: dict[str, int] = {}
        self._installed: dict[tuple[str, int, str], tuple[float, int]] = {}  # the replica set's totals last installed

    def warm(self, prior: Mapping[tuple[str, int, str], tuple[float, float]]) -> None:
        """Replace the warm start: (kind, stage, model) -> (sum of tokens, weight), counted as `weight` more
        completions of that mean beside the live ones (an empty mapping takes it away)."""
        table: dict[tuple[str, int, str], tuple[float, float]] = {}
        top: dict[str, int] = {}
        for (kind, stage, model), (total, weight) in prior.items():
            if weight <= 0:
                continue
            kind, stage = self._key(kind, stage)
            s0, w0 = table.get((kind, stage, model), (0.0, 0.0))
            table[(kind, stage, model)] = (s0 + total, w0 + weight)
            top[kind] = max(top.get(kind, 0), stage)
        self._prior, self._prior_max = table, top

    def _key(self, kind: str, stage: int) -> tuple[str, int]:
        if kind not in self._max_stage and len(self._max_stage) >= TRACKED_KINDS:
            kind = OTHER_KIND
        return kind, min(max(stage, 0), TRACKED_STAGES - 1)

    def observe(self, kind: str, stage: int, model: str, tokens: int) -> None:
        kind, stage = self._key(kind, stage)
        self._sum[(kind, stage, model)] += tokens
        self._n[(kind, stage, model)] += 1
        self._max_stage[kind] = max(self._max_stage.get(kind, 0), stage)

    def take_deltas(self) -> dict[tuple[str, int, str], tuple[float, int]]:
        """What this instance observed since the last call (or the last `install_totals`): (kind, stage, model) ->
        (tokens sum, count), handed to a replica set to share; observing, predicting and the totals are unchanged."""
        out = {}
        for key, n in self._n.items():
            s0, n0 = self._installed.get(key, (0.0, 0))
            if n > n0:
                out[key] = (self._sum[key] - s0, n - n0)
                self._installed[key] = (self._sum[key], n)
        return out

    def totals(self) -> dict[tuple[str, int, str], tuple[float, int]]:
        """Everything this instance predicts from, the warm start aside: (kind, stage, model) -> (tokens sum, count)."""
        return {key: (self._sum[key], n) for key, n in self._n.items() if n > 0}

    def install_totals(self, totals: Mapping[tuple[str, int, str], tuple[float, int]]) -> None:
        """Predict from a replica set's totals (which hold every delta taken so far) plus what was observed here
        since the last `take_deltas`. Kinds past TRACKED_KINDS share OTHER_KIND's bucket, as observed ones do."""
        table: dict[tuple[str, int, str], tuple[float, int]] = {}
        for (kind, stage, model), (total, n) in totals.items():
            key = (*self._key(kind, stage), model)
            s0, n0 = table.get(key, (0.0, 0))
            table[key] = (s0 + total, n0 + int(n))
            self._max_stage[key[0]] = max(self._max_stage.get(key[0], 0), key[1])
        for key in set(table) | set(self._n):
            s0, n0 = self._installed.get(key, (0.0, 0))
            total, n = table.get(key, (0.0, 0))
            self._sum[key] = total + self._sum.get(key, 0.0) - s0
            self._n[key] = n + self._n.get(key, 0) - n0
        self._installed = table

    def learn(self, call: Call, tokens: int) -> None:
        """The OnlineLearner hook the admission core calls when a call completes."""
        self.observe(call.kind, call.stage, call.model, tokens)  # type: ignore[arg-type]

    def _mean(self, kind: str, stage: int, model: str) -> float:
        """This model's mean; for a model not yet served at this stage, the other models' pooled mean, so an
        unexplored model is not judged by the blind default (which would keep it unexplored)."""
        if self._prior:
            return self._warm_mean(kind, stage, model)
        n = self._n.get((kind, stage, model), 0)
        if n:
            return self._sum[(kind, stage, model)] / n
        pooled_n = sum(self._n.get((kind, stage, m), 0) for m in self.models_)
        if pooled_n:
            return sum(self._sum.get((kind, stage, m), 0.0) for m in self.models_) / pooled_n
        return DEFAULT_CALL_TOKENS

    def _warm_mean(self, kind: str, stage: int, model: str) -> float:
        """`_mean` with the warm start's pseudo-observations pooled in."""
        def both(m: str) -> tuple[float, float]:
            total, weight = self._prior.get((kind, stage, m), (0.0, 0.0))
            return self._sum.get((kind, stage, m), 0.0) + total, self._n.get((kind, stage, m), 0) + weight

        total, n = both(model)
        if n:
            return total / n
        pooled = [both(m) for m in self.models_]
        n = sum(w for _, w in pooled)
        return sum(t for t, _ in pooled) / n if n else DEFAULT_CALL_TOKENS

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]:
        call = np.zeros((len(calls), len(self.models_)))
        rem = np.zeros_like(call)
        for i, c in enumerate(calls):
            kind, stage = self._key(c.kind, c.stage)
            last = max(self._max_stage.get(kind, 0), stage)
            if self._prior_max:
                last = max(last, self._prior_max.get(kind, 0))
            for j, m in enumerate(self.models_):
                call[i, j] = self._mean(kind, stage, m)
                rem[i, j] = sum(self._mean(kind, s, m) for s in range(stage, last + 1))
        return call, rem
