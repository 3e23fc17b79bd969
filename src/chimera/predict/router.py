"""Semantic router: P(model answers correctly | request text), one calibrated logistic head per model on embeddings.

Fit once on (text, per-model score) rows of a training split; the scheduler reads it through `RouterConfidence`.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from chimera.predict.cache import LRUCache
from chimera.predict.encoders import is_fitted, make_encoder
from chimera.sched.types import Call
from chimera.workload.schema import Task


def tasks_to_arrays(tasks: Sequence[Task], models: Sequence[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, scores (n, M) with NaN where a task has no outcome for a model, kinds) for router.fit."""
    scores = np.full((len(tasks), len(models)), np.nan)
    for i, t in enumerate(tasks):
        for j, m in enumerate(models):
            o = t.outcomes.get(m)
            if o is not None:
                scores[i, j] = o.score
    return [t.prompt for t in tasks], scores, [t.kind for t in tasks]


def soft_label_rows(x: np.ndarray, s: np.ndarray,
                    w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional scores as weighted duplicates: (x, 1) weight s and (x, 0) weight 1-s, each times the row's
    weight `w` when given; zero weights dropped."""
    pos, neg = s > 0, s < 1
    xs = np.concatenate([x[pos], x[neg]])
    ys = np.concatenate([np.ones(pos.sum()), np.zeros(neg.sum())])
    ws = np.concatenate([s[pos], 1.0 - s[neg]])
    if w is not None:
        ws = ws * np.concatenate([w[pos], w[neg]])
    return xs, ys, ws


def head_weights(sample_weight: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    """The sample weights of the rows one head is fit on, scaled to mean 1 (so regularisation keeps its strength)."""
    if sample_weight is None:
        return None
    w = sample_weight[rows]
    return w / w.mean() if len(w) and w.mean() > 0 else w


class RouterBase(BaseEstimator):
    """Shared label bookkeeping: priors per (kind, model) and the warn-once fallback for unlabelled models."""

    def _fit_priors(self, scores: np.ndarray, models: Sequence[str], kinds: Sequence[str] | None,
                    sample_weight: np.ndarray | None = None) -> np.ndarray:
        """Validate scores; set models_ and priors_ = {kind or "*": {model: mean label}} (weighted by
        `sample_weight` when given)."""
        scores = np.asarray(scores, dtype=float)
        if scores.ndim != 2 or scores.shape[1] != len(models):
            raise ValueError(f"scores must be (n_texts, {len(models)}) for {len(models)} models; got {scores.shape}")
        if np.nanmin(scores, initial=0.0) < 0 or np.nanmax(scores, initial=1.0) > 1:
            raise ValueError("scores must lie in [0, 1] (NaN = no label)")
        self.models_ = list(models)
        kinds_arr = np.asarray(list(kinds) if kinds is not None else ["*"] * len(scores), dtype=object)
        priors: dict[str, dict[str, float]] = {}
        for kind in ["*", *sorted(set(kinds_arr) - {"*"})]:
            sel = slice(None) if kind == "*" else kinds_arr == kind
            rows = scores[sel]
            if sample_weight is None:
                priors[kind] = {m: float(np.nanmean(rows[:, j]))
                                for j, m in enumerate(self.models_) if np.isfinite(rows[:, j]).any()}
                continue
            w = sample_weight[sel]
            priors[kind] = {m: float(np.average(rows[has, j], weights=w[has]))
                            for j, m in enumerate(self.models_) if (has := np.isfinite(rows[:, j])).any()}
        self.priors_ = priors
        self._warned: set[str] = set()
        return scores

    def __getstate__(self) -> dict:
        """Saved without the set of models already warned about: a loaded router warns again when it falls back."""
        state = dict(super().__getstate__())
        state.pop("_warned", None)
        return state

    def _prior(self, model: str, kind: str | None) -> float | None:
        by_kind = self.priors_.get(kind or "*", {})
        return by_kind.get(model, self.priors_["*"].get(model))

    def _fallback_column(self, model: str, kinds: Sequence[str] | None, n: int) -> np.ndarray:
        """Prior of a model without a learned head (mean prior of all models if it has none); warns once."""
        known = self.priors_["*"]
        if model not in getattr(self, "_warned", set()):
            self._warned = getattr(self, "_warned", set()) | {model}
            what = "its training prior" if model in known else "the mean prior of all models"
            warnings.warn(f"router has no learned head for model {model!r}; using {what}", stacklevel=3)
        if model not in known:
            mean = float(np.mean(list(known.values()))) if known else 0.5
            return np.full(n, mean)
        ks = list(kinds) if kinds is not None else [None] * n
        return np.array([self._prior(model, k) for k in ks], dtype=float)

    def _check_query(self, texts: Sequence[str], kinds: Sequence[str] | None) -> list[str]:
        texts = list(texts)
        if kinds is not None and len(kinds) != len(texts):
            raise ValueError(f"{len(kinds)} kinds for {len(texts)} texts")
        return texts


class SemanticRouter(RouterBase):
    """Text embedding (+ one-hot kind) -> per-model LogisticRegression -> isotonic/Platt calibration.

    `encoder` is "hashing" | "minilm" or an encoder object; an already fitted/fine-tuned one is used as is
    (not refitted), otherwise a copy is fitted on the training texts. Calibration is cross-fitted: the rows are
    cut into round(1/calib_frac) held-out slices, each scored by a head fit without it, and the calibrator
    (isotonic | "sigmoid" = Platt | None) is fit on those scores; the served head uses all rows. Models left
    without a head or calibrator are listed with the reason in `skipped_`.
    """

    def __init__(
        self,
        encoder: Any = "hashing",
        C: float = 1.0,
        calibration: str | None = "sigmoid",  # Platt: at <1k rows isotonic steps tie and cost ranking (measured)
        calib_frac: float = 0.25,
        use_kind: bool = True,
        random_state: int = 0,
        min_labels: int = 30,
    ) -> None:
        self.encoder = encoder
        self.C = C
        self.calibration = calibration
        self.calib_frac = calib_frac
        self.use_kind = use_kind
        self.random_state = random_state
        self.min_labels = min_labels

    # -- features ---------------------------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings, each distinct text encoded once, in one encoder batch (serving caches live in
        RouterConfidence, so predict_proba has no hidden state)."""
        if not texts:
            return np.zeros((0, self.encoder_.dim), dtype=np.float32)
        distinct = list(dict.fromkeys(texts))
        if len(distinct) == len(texts):
            return self.encoder_.encode(texts)
        index = {t: i for i, t in enumerate(distinct)}
        return self.encoder_.encode(distinct)[[index[t] for t in texts]]

    def _features(self, emb: np.ndarray, kinds: Sequence[str] | None) -> np.ndarray:
        if not self.kinds_:
            return emb
        onehot = np.zeros((len(emb), len(self.kinds_)), dtype=np.float32)
        if kinds is not None:
            index = {k: i for i, k in enumerate(self.kinds_)}
            for r, k in enumerate(kinds):
                if k in index:
                    onehot[r, index[k]] = 1.0
        return np.hstack([emb, onehot])

    # -- fit --------------------------------------------------------------------------------------------------
    def _fit_calibrator(self, p: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> Any:
        if self.calibration == "isotonic":
            return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, s, sample_weight=w)
        if self.calibration == "sigmoid":
            z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1)).reshape(-1, 1)
            zs, ys, ws = soft_label_rows(z, s, w)
            return LogisticRegression(C=1e6).fit(zs, ys, sample_weight=ws)
        raise ValueError(f"calibration must be 'isotonic', 'sigmoid' or None; got {self.calibration!r}")

    def _apply_calibrator(self, cal: Any, p: np.ndarray) -> np.ndarray:
        if isinstance(cal, IsotonicRegression):
            return cal.predict(p)
        z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1)).reshape(-1, 1)
        return cal.predict_proba(z)[:, 1]

    def fit(
        self,
        texts: Sequence[str],
        scores: np.ndarray,
        models: Sequence[str],
        kinds: Sequence[str] | None = None,
        sample_weight: Sequence[float] | None = None,
    ) -> "SemanticRouter":
        """Encode the texts once, fit one head per model on all labelled rows, calibrate on held-out slices.
        `sample_weight` (one per text, > 0; e.g. inverse propensities of logged workflows) weights the priors, the
        heads and the calibration; each head's weights are scaled to mean 1."""
        if self.calibration not in ("isotonic", "sigmoid", None):
            raise ValueError(f"calibration must be 'isotonic', 'sigmoid' or None; got {self.calibration!r}")
        texts = list(texts)
        sw = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if sw is not None and (sw.shape != (len(texts),) or not np.all(np.isfinite(sw) & (sw > 0))):
            raise ValueError(f"sample_weight must be {len(texts)} finite weights > 0, one per text")
        scores = self._fit_priors(scores, models, kinds, sw)
        if len(texts) != len(scores):
            raise ValueError(f"{len(texts)} texts for {len(scores)} score rows")
        enc = make_encoder(self.encoder) if isinstance(self.encoder, str) else self.encoder
        refit_encoder = not is_fitted(enc)
        self.encoder_ = copy.deepcopy(enc).fit(texts) if refit_encoder else enc
        self.kinds_ = sorted(set(kinds)) if (self.use_kind and kinds is not None) else []
        x = self._features(self._embed(texts), kinds)

        self.heads_: dict[str, LogisticRegression | None] = {}
        self.calibrators_: dict[str, Any] = {}
        self.skipped_: dict[str, str] = {}  # model -> why it has no head / no calibrator
        with threadpool_limits(1):  # many small fits: BLAS threads only add hand-off cost
            for j, m in enumerate(self.models_):
                s, has = scores[:, j], np.isfinite(scores[:, j])
                if has.sum() < self.min_labels:
                    self.skipped_[m] = f"head: only {int(has.sum())} labelled rows (< {self.min_labels})"
                    self.heads_[m] = None
                elif np.all(s[has] >= 1.0) or np.all(s[has] <= 0.0):
                    self.skipped_[m] = "head: a single class in the labels"
                    self.heads_[m] = None
                else:
                    self.heads_[m] = self._fit_head(x[has], s[has], head_weights(sw, has))
            if self.calibration is not None:
                self._calibrate(texts, kinds, scores, x, enc if refit_encoder else None, sw)
        self._stack_heads()
        return self

    def _calibrate(
        self, texts: list[str], kinds: Sequence[str] | None, scores: np.ndarray, x: np.ndarray, enc: Any,
        sw: np.ndarray | None = None,
    ) -> None:
        """Cross-fit: each held-out slice (~calib_frac of rows) is scored by a head -- and, for encoders fitted on
        the training texts (hashing: IDF + SVD), an encoder -- that never saw it; the calibrator maps those
        out-of-sample scores to labels. Refitting the encoder matters: an SVD fit on a row flatters that row."""
        k = max(2, int(round(1.0 / self.calib_frac))) if self.calib_frac > 0 else 0
        if k == 0:
            self.skipped_.update({m: "calibration: calib_frac is 0" for m, h in self.heads_.items() if h is not None})
            return
        folds = np.random.default_rng(self.random_state).permutation(len(texts)) % k
        oof = np.full(scores.shape, np.nan)
        failed: dict[str, str] = {}
        for f in range(k):
            held = folds == f
            xf = x
            if enc is not None:
                fold_enc = copy.deepcopy(enc).fit([t for t, h in zip(texts, held) if not h])
                xf = self._features(fold_enc.encode(texts), kinds)
            for j, m in enumerate(self.models_):
                if self.heads_[m] is None or m in failed:
                    continue
                has = np.isfinite(scores[:, j])
                fit, out = has & ~held, has & held
                s_fit = scores[fit, j]
                if fit.sum() < self.min_labels or s_fit.min() == s_fit.max():
                    failed[m] = f"calibration: fold {f} has {int(fit.sum())} fit rows or a single class"
                    continue
                if out.any():
                    oof[out, j] = self._fit_head(xf[fit], s_fit, head_weights(sw, fit)).predict_proba(xf[out])[:, 1]
        for j, m in enumerate(self.models_):
            if self.heads_[m] is None:
                continue
            if m in failed:
                self.skipped_[m] = failed[m] + "; head uncalibrated"
                continue
            has = np.isfinite(scores[:, j])
            self.calibrators_[m] = self._fit_calibrator(oof[has, j], scores[has, j], head_weights(sw, has))

    def _fit_head(self, x: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> LogisticRegression:
        xs, ys, ws = soft_label_rows(x, s, w)
        return LogisticRegression(C=self.C, max_iter=2000).fit(xs, ys, sample_weight=ws)

    def _stack_heads(self) -> None:
        """All heads as one (d, H) matrix so that prediction is a single matmul."""
        self._head_models = [m for m in self.models_ if self.heads_.get(m) is not None]
        if self._head_models:
            self._W = np.column_stack([self.heads_[m].coef_[0] for m in self._head_models]).astype(np.float32)
            self._b = np.array([self.heads_[m].intercept_[0] for m in self._head_models], dtype=np.float32)

    # -- predict ----------------------------------------------------------------------------------------------
    def decision_heads(self, texts: Sequence[str], kinds: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Uncalibrated head probabilities per model with a head (for calibration diagnostics)."""
        texts = self._check_query(texts, kinds)
        if not self._head_models:
            return {}
        z = self._features(self._embed(texts), kinds) @ self._W + self._b
        p = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
        return {m: p[:, i] for i, m in enumerate(self._head_models)}

    def predict_proba(
        self, texts: Sequence[str], kinds: Sequence[str] | None = None, models: Sequence[str] | None = None
    ) -> np.ndarray:
        """(n, len(models)) P(correct); models default to `models_`; unlabelled models get their prior."""
        check_is_fitted(self, "heads_")
        texts = self._check_query(texts, kinds)
        models = list(self.models_ if models is None else models)
        raw = self.decision_heads(texts, kinds) if any(self.heads_.get(m) is not None for m in models) else {}
        out = np.empty((len(texts), len(models)))
        for j, m in enumerate(models):
            if m in raw:
                cal = self.calibrators_.get(m)
                out[:, j] = raw[m] if cal is None else self._apply_calibrator(cal, raw[m])
            else:
                out[:, j] = self._fallback_column(m, kinds, len(texts))
        return np.clip(out, 0.0, 1.0)


class RouterConfidence:
    """ConfidencePredictor over a fitted router for one cluster: columns = cluster model names.

    `mapping` maps cluster model name -> router model name (the cluster's `workload_model`); identity if None.
    Rows are cached per (prompt, kind) in an LRU of `cache_size` entries (0 = off): the simulator asks about
    the same workflow text at every stage.
    """

    def __init__(self, router: Any, mapping: Mapping[str, str] | None = None, cache_size: int = 4096) -> None:
        self.router = router
        self.mapping = dict(mapping) if mapping is not None else {m: m for m in router.models_}
        self.models_ = list(self.mapping)
        self._router_models = [self.mapping[m] for m in self.models_]
        self._cache = LRUCache(cache_size)

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray:
        """(len(calls), len(models_)); one router call for all cache misses."""
        keys = [(c.prompt, c.kind) for c in calls]
        rows = [self._cache.get(k) for k in keys]
        missing = list(dict.fromkeys(k for k, r in zip(keys, rows) if r is None))
        if missing:
            probs = self.router.predict_proba(
                [k[0] for k in missing], kinds=[k[1] for k in missing], models=self._router_models
            )
            new = dict(zip(missing, probs))
            for k, r in new.items():
                self._cache.put(k, r)
            rows = [new[k] if r is None else r for k, r in zip(keys, rows)]
        if not rows:
            return np.zeros((0, len(self.models_)))
        return np.vstack(rows)


__all__ = ["RouterBase", "RouterConfidence", "SemanticRouter", "soft_label_rows", "tasks_to_arrays"]
