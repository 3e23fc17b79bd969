"""The online confidence learner: P(model answers correctly | request) learnt from the gateway's own bandit feedback.

A deployment sees only the score of the workflow it ran, on the models it chose. So: a prior (model size for a cold
start, per-kind accuracy or a trained router for a warm one) plus, per model, a ridge regression of the residual
score on hashed request features (chimera.predict.text_features), updated in closed form as scores arrive; and
epsilon-greedy exploration with a decaying epsilon under a budget, so every model keeps being tried and every routing
decision has a known propensity (what off-policy evaluation reweights by).

Credit rule: a workflow's score teaches every call that formed it, each with weight 1 / (calls of the workflow) — a
model that ran more of the workflow takes more of the credit, and a long workflow counts no more than a short one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from chimera.predict.cache import LRUCache
from chimera.predict.text_features import HashedTextFeatures
from chimera.sched.decision import Decision
from chimera.sched.predictors import ConfidencePredictor, FeedbackOutcome
from chimera.sched.types import Call

MAX_CALLS_PER_WORKFLOW = 256  # decisions kept per pending workflow: a client's workflow cannot grow memory unbounded


class _Decided(NamedTuple):
    features: np.ndarray
    model: int
    prior: float  # the prior's confidence for that model then: the residual is learnt against it


class _Pending:
    __slots__ = ("first_s", "calls")

    def __init__(self, first_s: float) -> None:
        self.first_s = first_s
        self.calls: list[_Decided] = []


class LinearBandit:
    """ConfidencePredictor, Explorer and RewardLearner in one (the admission core drives all three roles).

    Parameters are read once (scikit-learn style); learnt state ends in `_`: `A_inv_` (per model, the inverse of
    ridge·I + Σ w·xxᵀ), `b_` (Σ w·residual·x), `coef_` (the ridge solution), counters in `stats()`."""

    def __init__(self, models: Sequence[str], prior: ConfidencePredictor, explore_start: float = 0.2,
                 explore_decay: float = 500.0, explore_min: float = 0.02, budget: float = 0.1, ridge: float = 1.0,
                 dim: int = 48, seed: int = 0, max_pending: int = 100_000, max_age_s: float = 86_400.0) -> None:
        self.models_ = list(models)
        self.explore_start, self.explore_decay = explore_start, explore_decay
        self.explore_min, self.budget = explore_min, budget
        self.ridge, self.dim, self.seed = ridge, dim, seed
        self.max_pending, self.max_age_s = max_pending, max_age_s
        self.use_prior(prior)
        self.features = HashedTextFeatures(dim)
        width, n = self.features.width, len(self.models_)
        self.A_inv_ = np.stack([np.eye(width) / ridge for _ in range(n)])
        self.b_ = np.zeros((n, width))
        self.coef_ = np.zeros((n, width))
        self.version_: str | None = None  # set by whoever loads the learner's prior (the gateway's reloads)
        self._rng = np.random.default_rng(seed)
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._done = LRUCache(max_pending)  # workflows learnt from (or refused as late): a second score is REPEATED
        self.counts_: dict[str, int] = {"decided": 0, "explored": 0, "evicted": 0, "learnt_calls": 0,
                                        **{o.value: 0 for o in FeedbackOutcome}}
        # Told the workflow id of every decision kept (a replica set shares which workflows each replica decided).
        self.on_decided: Callable[[str], None] | None = None

    # ---- the prior ------------------------------------------------------------------------------------------
    @property
    def prior(self) -> ConfidencePredictor:
        return self._prior[0]

    def use_prior(self, prior: ConfidencePredictor) -> None:
        """Correct `prior` from now on (a gateway reloading its trained router): what was learnt stays (the ridge
        statistics, the pending workflows, the counters); a pending decision keeps the prior value it was made
        with, its residual is learnt against that. The prior, its columns and its row cache change as one value,
        so a prediction on another thread meanwhile reads the old three or the new three."""
        missing = [m for m in self.models_ if m not in prior.models_]
        if missing:
            raise ValueError(f"the online learner's prior has no column for models {missing}")
        self._prior = (prior, [list(prior.models_).index(m) for m in self.models_], LRUCache(4096))

    # ---- ConfidencePredictor -------------------------------------------------------------------------------
    def _prior_row(self, call: Call) -> np.ndarray:
        prior, cols, rows = self._prior
        key = (call.prompt, call.kind)
        row = rows.get(key)
        if row is None:
            row = prior.predict_confidence([call])[0, cols]
            rows.put(key, row)
        return row

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray:
        """Prior + learnt correction, clipped to [0, 1]; one row per call, one column per model in `models_`."""
        out = np.empty((len(calls), len(self.models_)))
        for i, c in enumerate(calls):
            out[i] = self._prior_row(c) + self.coef_ @ self.features.transform(c.prompt, c.kind)
        return np.clip(out, 0.0, 1.0, out=out)

    # ---- Explorer --------------------------------------------------------------------------------------------
    def epsilon(self) -> float:
        """Exploration probability now: `explore_start` / sqrt(1 + decisions / explore_decay), not below `explore_min`;
        `explore_min` alone once the share of calls explored so far has reached the `budget`."""
        n = self.counts_["decided"]
        if n and self.counts_["explored"] >= self.budget * n:
            return self.explore_min
        return max(self.explore_min, self.explore_start / math.sqrt(1.0 + n / self.explore_decay))

    def explore(self, call: Call, greedy: int, allowed: np.ndarray) -> tuple[int, float, bool, float]:
        """With probability epsilon a model drawn uniformly among the allowed ones, else the policy's choice; the
        choice's propensity. One draw per decision (two when exploring): a run is the same for a seed."""
        eps = self.epsilon()
        self.counts_["decided"] += 1
        choices = np.flatnonzero(allowed)
        k = len(choices)
        if k <= 1:
            return greedy, 1.0, False, 0.0
        chosen, explored = greedy, False
        if self._rng.random() < eps:
            chosen, explored = int(choices[self._rng.integers(k)]), True
            self.counts_["explored"] += 1
        propensity = eps / k + (1.0 - eps) * (chosen == greedy)
        return chosen, propensity, explored, eps

    # ---- RewardLearner ---------------------------------------------------------------------------------------
    def decided(self, call: Call, decision: Decision, now: float) -> None:
        """Remember what this call contributes to its workflow, until the workflow's score arrives."""
        wid = call.workflow_id
        entry = self._pending.get(wid)
        if entry is None:
            entry = self._pending[wid] = _Pending(now)
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
                self.counts_["evicted"] += 1
        if len(entry.calls) >= MAX_CALLS_PER_WORKFLOW or decision.model not in self.models_:
            return
        j = self.models_.index(decision.model)
        entry.calls.append(_Decided(self.features.transform(call.prompt, call.kind), j,
                                    float(self._prior_row(call)[j])))
        if self.on_decided is not None:
            self.on_decided(wid)

    def reward(self, workflow_id: str, score: float, now: float) -> FeedbackOutcome:
        """Learn from a workflow's score once (the credit rule in the module docstring)."""
        outcome = self._reward(workflow_id, score, now)
        self.count(outcome)
        return outcome

    def count(self, outcome: FeedbackOutcome) -> None:
        """Count a score's outcome (`reward` does; a replica set counts the scores it answers for the set)."""
        self.counts_[outcome.value] += 1

    def _reward(self, workflow_id: str, score: float, now: float) -> FeedbackOutcome:
        if not (isinstance(score, (int, float)) and 0.0 <= score <= 1.0):
            return FeedbackOutcome.INVALID
        outcome, calls = self.claim(workflow_id, now)
        if calls:
            self.partial_fit(*self.credit(calls, score, len(calls)))
        return outcome

    def peek(self, workflow_id: str, now: float | None) -> FeedbackOutcome:
        """What a score for the workflow would do now, nothing taken: LEARNT (decisions pending), LATE (pending, first
        decided more than `max_age_s` before `now`; None: age not judged here), REPEATED (claimed) or UNKNOWN."""
        entry = self._pending.get(workflow_id)
        if entry is None:
            return FeedbackOutcome.REPEATED if self._done.get(workflow_id) else FeedbackOutcome.UNKNOWN
        late = now is not None and now - entry.first_s > self.max_age_s
        return FeedbackOutcome.LATE if late else FeedbackOutcome.LEARNT

    def claim(self, workflow_id: str, now: float | None) -> tuple[FeedbackOutcome, list[_Decided]]:
        """Take a workflow's pending decisions out, once: `peek`'s outcome, with the decisions to credit when LEARNT.
        A claimed workflow is remembered, so its next claim is REPEATED."""
        outcome = self.peek(workflow_id, now)
        entry = self._pending.pop(workflow_id, None)
        if entry is None:
            return outcome, []
        self._done.put(workflow_id, True)
        return outcome, entry.calls if outcome is FeedbackOutcome.LEARNT else []

    def pending_calls(self, workflow_id: str) -> int | None:
        """Decisions kept for a workflow awaiting its score; None when none is pending."""
        entry = self._pending.get(workflow_id)
        return None if entry is None else len(entry.calls)

    @staticmethod
    def credit(calls: Sequence[_Decided], score: float, n: int) -> tuple[np.ndarray, list[int], list[float],
                                                                           list[float]]:
        """`partial_fit`'s rows for a score: each call teaches its model score − its prior, with weight 1 / `n` (the
        calls of the whole workflow, which several replicas may have decided between them)."""
        w = 1.0 / n
        return (np.array([d.features for d in calls]), [d.model for d in calls], [score - d.prior for d in calls],
                [w] * len(calls))

    def partial_fit(self, X: np.ndarray, models: Sequence[int], residuals: Sequence[float],
                    weights: Sequence[float]) -> "LinearBandit":
        """Ridge update, one row at a time (Sherman–Morrison on the model's inverse): row i teaches model
        `models[i]` that its score exceeded the prior by `residuals[i]`, with weight `weights[i]`."""
        for x, j, r, w in zip(X, models, residuals, weights):
            a = self.A_inv_[j]
            ax = a @ x
            a -= np.outer(ax, ax) * (w / (1.0 + w * (x @ ax)))
            self.b_[j] += (w * r) * x
            self.coef_[j] = a @ self.b_[j]
            self.counts_["learnt_calls"] += 1
        return self

    # ---- reading ---------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters (decisions, explorations, every feedback outcome, workflows pending) and epsilon now."""
        n = self.counts_["decided"]
        return {**self.counts_, "pending": len(self._pending), "epsilon": self.epsilon(),
                "explored_share": self.counts_["explored"] / n if n else 0.0}
