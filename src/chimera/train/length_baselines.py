"""Baselines for the workflow-length forest, with its fit/predict signature so one evaluation covers all."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from chimera.predict.length_features import LengthFeaturizer, LengthRow

Quantiles = float | Sequence[float] | None


class StageMeanBaseline(BaseEstimator):
    """Mean remaining tokens by (kind, stage, model): the honest prior the simulator uses today (StageMeanLength).

    Falls back to the deepest trained stage of the (kind, model), then to all kinds; quantiles are the group's
    empirical ones, so its coverage is comparable with the forest's.
    """

    def fit(self, rows: Sequence[LengthRow], call_targets: Sequence[float], remaining_targets: Sequence[float]
            ) -> "StageMeanBaseline":
        if len(rows) == 0:
            raise ValueError("StageMeanBaseline.fit needs at least one row")
        rem = np.asarray(remaining_targets, float)
        call = np.asarray(call_targets, float)
        idx: dict[tuple[str, int, str], list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            idx[(r.kind, r.stage, r.model)].append(i)
            idx[("*", r.stage, r.model)].append(i)
            idx[("*", r.stage, "*")].append(i)
        self.remaining_ = {k: np.sort(rem[v]) for k, v in idx.items()}
        self.call_mean_ = {k: float(call[v].mean()) for k, v in idx.items()}
        self.max_stage_: dict[tuple[str, str], int] = {}
        for kind, s, m in idx:
            self.max_stage_[(kind, m)] = max(s, self.max_stage_.get((kind, m), -1))
        return self

    def _key(self, r: LengthRow) -> tuple[str, int, str]:
        for kind, m in ((r.kind, r.model), ("*", r.model), ("*", "*")):
            top = self.max_stage_.get((kind, m))
            if top is not None:
                return kind, min(r.stage, top), m
        raise AssertionError("unreachable: ('*', '*') is always fitted")

    def predict(self, rows: Sequence[LengthRow], quantiles: Quantiles = None) -> np.ndarray:
        """Group mean (quantiles=None), or the group's empirical quantile(s)."""
        keys = [self._key(r) for r in rows]
        if quantiles is None:
            return np.array([self.remaining_[k].mean() for k in keys])
        qs = [quantiles] if np.isscalar(quantiles) else list(quantiles)
        out = np.array([np.quantile(self.remaining_[k], qs) for k in keys]).reshape(len(rows), len(qs))
        return out[:, 0] if np.isscalar(quantiles) else out

    def predict_call(self, rows: Sequence[LengthRow]) -> np.ndarray:
        return np.array([self.call_mean_[self._key(r)] for r in rows])


class PairwiseRanker(BaseEstimator):
    """Learning-to-rank baseline (after Fu et al. 2024): a linear score over the forest's features, trained with a
    logistic loss on pairs of rows from the same (kind, stage) to order their remaining lengths. The score has no
    unit: use it to rank only."""

    rank_only = True

    def __init__(self, text_dim: int = 16, C: float = 1.0, max_pairs: int = 50_000, random_state: int | None = 0
                 ) -> None:
        self.text_dim = text_dim
        self.C = C
        self.max_pairs = max_pairs
        self.random_state = random_state

    def fit(self, rows: Sequence[LengthRow], call_targets: Sequence[float] | None, remaining_targets: Sequence[float]
            ) -> "PairwiseRanker":
        y = np.asarray(remaining_targets, float)
        self.featurizer_ = LengthFeaturizer(text_dim=self.text_dim, random_state=self.random_state).fit(rows)
        self.scaler_ = StandardScaler().fit(self.featurizer_.transform(rows))
        X = self.scaler_.transform(self.featurizer_.transform(rows))
        i, j = self._pairs(rows, y)
        if len(i) == 0:
            raise ValueError("PairwiseRanker needs two rows of the same (kind, stage) with different targets")
        d = X[i] - X[j]
        s = np.sign(y[i] - y[j])
        # both orientations: the loss is symmetric, so no intercept and balanced classes
        clf = LogisticRegression(C=self.C, fit_intercept=False, max_iter=1000)
        clf.fit(np.vstack([d, -d]), np.concatenate([s, -s]) > 0)
        self.coef_ = clf.coef_.ravel()
        self.n_pairs_ = len(i)
        return self

    def _pairs(self, rows: Sequence[LengthRow], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Up to max_pairs random pairs within (kind, stage) groups, in proportion to each group's pair count."""
        rng = np.random.default_rng(self.random_state)
        idx: dict[tuple[str, int], list[int]] = defaultdict(list)
        for n, r in enumerate(rows):
            idx[(r.kind, r.stage)].append(n)
        groups = [np.asarray(v) for v in idx.values() if len(v) >= 2]
        sizes = np.array([len(g) * (len(g) - 1) / 2 for g in groups], float)
        if not groups:
            return np.zeros(0, int), np.zeros(0, int)
        budget = np.maximum(1, np.round(self.max_pairs * sizes / sizes.sum())).astype(int)
        ii, jj = [], []
        for g, b in zip(groups, budget):
            a = g[rng.integers(len(g), size=b)]
            c = g[rng.integers(len(g), size=b)]
            keep = y[a] != y[c]
            ii.append(a[keep])
            jj.append(c[keep])
        return np.concatenate(ii), np.concatenate(jj)

    def predict(self, rows: Sequence[LengthRow], quantiles: Quantiles = None) -> np.ndarray:
        """Ranking score: higher = longer remaining workflow. `quantiles` is accepted but meaningless here."""
        if quantiles is not None:
            raise TypeError("PairwiseRanker predicts a ranking score, not token quantiles")
        return self.scaler_.transform(self.featurizer_.transform(rows)) @ self.coef_
