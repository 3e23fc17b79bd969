"""Workflow-length predictor (the paper's quantile regression forest): remaining output tokens of the whole
workflow, and of this call, per candidate model, at any quantile chosen at query time."""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import numpy as np
from quantile_forest import RandomForestQuantileRegressor
from sklearn.base import BaseEstimator

from chimera.predict.cache import LRUCache
from chimera.predict.length_features import LengthFeaturizer, LengthRow, rows_from_calls
from chimera.sched.types import Call

Quantiles = float | Sequence[float] | None
LengthStat = Literal["mean", "median"]


def stat_quantile(stat: LengthStat) -> str | None:
    """ForestLengths' `quantile` for a length statistic: "mean", or None (the forest's own quantile, the median).

    The simulator, `chimera tune` and the gateway default to "mean": expected latency is a sum of lengths, and where
    lengths are heavy-tailed the median under-counts a model's work (BENCHMARKS.md, "the forest's mean as the
    default reading")."""
    if stat not in ("mean", "median"):
        raise ValueError(f"length_stat must be 'mean' or 'median' (got {stat!r})")
    return "mean" if stat == "mean" else None


class _QuantileForest(RandomForestQuantileRegressor):
    """RandomForestQuantileRegressor whose `apply` walks the trees in a plain loop: sklearn's joblib dispatch costs
    ~80 us per tree, which dominated small-batch latency (8 ms vs 1 ms for 100 trees x 96 rows)."""

    def apply(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        return np.column_stack([est.tree_.apply(X) for est in self.estimators_])


class WorkflowLengthForest(BaseEstimator):
    """Two quantile forests over LengthFeaturizer features: remaining workflow tokens (the scheduler's job size)
    and this call's tokens.

    Defaults are measured (docs/predictors.md): log1p targets (splits fit relative errors across 10..10^4-token
    workflows; lower MAE and higher tau than raw targets on all three workloads); min_samples_leaf=10 and
    max_features=0.5 (held-out 0.9-quantile coverage 0.84-0.91 instead of 0.79-0.86 at 5 / 1.0, same MAE and tau);
    max_samples_leaf=1 (one stored training value per leaf, so a quantile is taken over n_estimators values: same
    accuracy as full leaves, 8x smaller artifact, ~2x faster predict; extreme quantiles get coarse).
    """

    def __init__(self, n_estimators: int = 100, min_samples_leaf: int = 10, max_features: float = 0.5,
                 text_dim: int = 16, quantile: float = 0.5, random_state: int | None = 0, n_jobs: int | None = None,
                 max_depth: int | None = None, max_samples_leaf: int | None = 1, log_target: bool = True) -> None:
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.text_dim = text_dim
        self.quantile = quantile
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.max_depth = max_depth
        self.max_samples_leaf = max_samples_leaf
        self.log_target = log_target

    def _forest(self) -> RandomForestQuantileRegressor:
        return _QuantileForest(
            n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf, max_features=self.max_features,
            max_depth=self.max_depth, max_samples_leaf=self.max_samples_leaf, random_state=self.random_state,
            n_jobs=self.n_jobs)

    def fit(self, rows: Sequence[LengthRow], call_targets: Sequence[float], remaining_targets: Sequence[float]
            ) -> "WorkflowLengthForest":
        call_y = np.asarray(call_targets, dtype=float)
        rem_y = np.asarray(remaining_targets, dtype=float)
        if not (len(rows) == len(call_y) == len(rem_y)):
            raise ValueError(f"rows ({len(rows)}), call_targets ({len(call_y)}) and remaining_targets "
                             f"({len(rem_y)}) differ in length")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        self.featurizer_ = LengthFeaturizer(text_dim=self.text_dim, random_state=self.random_state).fit(rows)
        X = self.featurizer_.transform(rows).astype(np.float32)
        self.remaining_forest_ = self._forest().fit(X, self._to_target(rem_y))
        self.call_forest_ = self._forest().fit(X, self._to_target(call_y))
        self.models_ = list(self.featurizer_.models_)
        self.kinds_ = list(self.featurizer_.kinds_)
        return self

    def spec(self) -> dict:
        """Feature spec and hyperparameters, for artifact manifests (a server must rebuild identical rows)."""
        return {"features": self.featurizer_.spec(), "params": self.get_params(),
                "targets": {"remaining": "output tokens from this stage to the end of the workflow (this call "
                            "included)", "call": "output tokens of this call",
                            "transform": "log1p" if self.log_target else "none"}}

    def _to_target(self, y: np.ndarray) -> np.ndarray:
        return np.log1p(np.maximum(y, 0.0)) if self.log_target else y

    def _from_target(self, y: np.ndarray) -> np.ndarray:
        return np.maximum(np.expm1(y) if self.log_target else y, 0.0)

    def _predict(self, forest: RandomForestQuantileRegressor, X: np.ndarray, quantiles: Quantiles) -> np.ndarray:
        q = self.quantile if quantiles is None else quantiles
        qs = [float(q)] if np.isscalar(q) else [float(v) for v in q]
        if not qs or any(not 0.0 < v < 1.0 for v in qs):
            raise ValueError(f"quantiles must lie in (0, 1), got {q}")
        y = forest.predict(X, quantiles=qs, oob_score=False)
        y = self._from_target(np.asarray(y, dtype=float).reshape(len(X), len(qs)))
        return y[:, 0] if np.isscalar(q) else y

    def transform_rows(self, rows: Sequence[LengthRow]) -> np.ndarray:
        """The feature matrix the forests see (float32, as quantile-forest casts it anyway)."""
        return self.featurizer_.transform(rows).astype(np.float32)

    def predict(self, rows: Sequence[LengthRow], quantiles: Quantiles = None) -> np.ndarray:
        """Remaining workflow tokens (this call included): (n,) at `quantile`, or (n, q) for a list of quantiles."""
        return self._predict(self.remaining_forest_, self.transform_rows(rows), quantiles)

    def predict_call(self, rows: Sequence[LengthRow], quantiles: Quantiles = None) -> np.ndarray:
        """This call's output tokens, shaped like `predict`."""
        return self._predict(self.call_forest_, self.transform_rows(rows), quantiles)

    def predict_both(self, rows: Sequence[LengthRow], quantiles: Quantiles = None) -> tuple[np.ndarray, np.ndarray]:
        """(call tokens, remaining tokens), featurizing once; remaining is never below the call itself."""
        X = self.transform_rows(rows)
        call = self._predict(self.call_forest_, X, quantiles)
        rem = self._predict(self.remaining_forest_, X, quantiles)
        return call, np.maximum(rem, call)


MEAN_QUANTILES = tuple((k + 0.5) / 20 for k in range(20))  # midpoints of 20 equal-mass bins: their average ≈ the mean


class ForestLengths:
    """LengthPredictor for a cluster: one column per cluster model, read from the forest under its workload name.

    `quantile`: the forest's own (the median) when None; "mean": the mean of the predicted distribution (the average
    of 20 equal-mass quantiles), what an expected latency needs where output lengths are heavy-tailed (a runaway
    generation costs far more than the median says)."""

    def __init__(self, forest: WorkflowLengthForest, mapping: Mapping[str, str] | None = None,
                 quantile: float | str | None = None, cache_size: int = 65536) -> None:
        if isinstance(quantile, str) and quantile != "mean":
            raise ValueError(f"quantile must be a number in (0, 1), 'mean' or None, got {quantile!r}")
        known = list(forest.models_)
        mapping = dict(mapping) if mapping is not None else {m: m for m in known}
        missing = sorted({src for src in mapping.values() if src not in known})
        if missing:
            raise ValueError(f"the length forest was not trained on {missing} (it knows {known}); set each cluster "
                             "entry's workload_model to one of those")
        self.forest = forest
        self.mapping = mapping
        self.quantile = quantile
        self.models_ = list(mapping)
        self._sources = [mapping[m] for m in self.models_]
        self._cache = LRUCache(cache_size)  # same request features -> same prediction (sweeps re-ask them)

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]:
        """(call tokens, remaining workflow tokens), each (len(calls), len(models_)), in one batched forest pass."""
        M = len(self._sources)
        if not calls:
            return np.zeros((0, M)), np.zeros((0, M))
        keys = [(c.kind, c.stage, c.prompt_tokens, c.generated_so_far, c.prompt) for c in calls]
        got = [self._cache.get(k) for k in keys]
        miss = [i for i, g in enumerate(got) if g is None]
        if miss:
            rows = rows_from_calls([calls[i] for i in miss], self._sources)
            if self.quantile == "mean":
                call, rem = self.forest.predict_both(rows, list(MEAN_QUANTILES))
                call, rem = call.mean(axis=1), rem.mean(axis=1)
            else:
                call, rem = self.forest.predict_both(rows, self.quantile)
            call, rem = call.reshape(len(miss), M), rem.reshape(len(miss), M)
            for j, i in enumerate(miss):
                got[i] = (call[j], rem[j])
                self._cache.put(keys[i], got[i])
        return np.vstack([g[0] for g in got]), np.vstack([g[1] for g in got])
