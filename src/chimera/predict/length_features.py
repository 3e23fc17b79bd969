"""Request-time features of the workflow-length predictor, shared by training and serving so they cannot drift.

A row is what the scheduler knows when a call arrives: the task kind, the candidate model, the stage, the call's
prompt tokens (task text plus carried context), the tokens earlier stages generated, and the task text.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

from chimera.sched.types import Call
from chimera.workload.plan import WorkflowPlan

SPEC_VERSION = 1
NUMERIC = ("stage", "log1p_prompt_tokens", "log1p_generated_so_far")
HASH_FEATURES = 2**18
NGRAMS = (1, 2)


class LengthRow(NamedTuple):
    """One (call, candidate model) pair as seen at request time."""

    kind: str
    model: str
    stage: int
    prompt_tokens: int
    generated_so_far: int
    text: str


class LengthFeaturizer(TransformerMixin, BaseEstimator, auto_wrap_output_keys=None):
    """Rows -> dense float matrix: numeric, one-hot kind, one-hot model, and `text_dim` SVD-of-TF-IDF text features.

    Unknown kinds or models encode as all-zero one-hots (the forest then falls back on the other features).
    """

    def __init__(self, text_dim: int = 16, kinds: Sequence[str] | None = None, models: Sequence[str] | None = None,
                 random_state: int | None = 0) -> None:
        self.text_dim = text_dim
        self.kinds = kinds
        self.models = models
        self.random_state = random_state

    def fit(self, rows: Sequence[LengthRow], y: Any = None) -> "LengthFeaturizer":
        if len(rows) == 0:
            raise ValueError("LengthFeaturizer.fit needs at least one row")
        if self.text_dim < 0:
            raise ValueError(f"text_dim must be >= 0, got {self.text_dim}")
        self.kinds_ = list(self.kinds) if self.kinds is not None else sorted({r.kind for r in rows})
        self.models_ = list(self.models) if self.models is not None else sorted({r.model for r in rows})
        self._kind_col = {k: i for i, k in enumerate(self.kinds_)}
        self._model_col = {m: i for i, m in enumerate(self.models_)}
        self.hasher_ = self.tfidf_ = self.text_projection_ = self.text_explained_variance_ = None
        self.text_components_ = 0
        if self.text_dim > 0:
            texts = sorted({r.text for r in rows})  # each task once, however many stages and models it has
            self.hasher_ = _hasher()
            counts = self.hasher_.transform(texts)
            self.tfidf_ = TfidfTransformer(sublinear_tf=True).fit(counts)
            tf = self.tfidf_.transform(counts)
            k = min(self.text_dim, len(texts) - 1)  # fewer distinct texts than text_dim: pad with zeros
            if k >= 1:
                svd = TruncatedSVD(n_components=k, random_state=self.random_state).fit(tf)
                # svd.transform(x) == x @ components_.T; kept sparse (only hashed columns seen in training are
                # non-zero): a small artifact, and 0.02 ms instead of TruncatedSVD.transform's ~7 ms validation
                self.text_projection_ = sparse.csr_matrix(svd.components_.T)
                self.text_explained_variance_ = float(svd.explained_variance_ratio_.sum())
                self.text_components_ = k
        self.feature_names_ = [*NUMERIC, *(f"kind={k}" for k in self.kinds_), *(f"model={m}" for m in self.models_),
                               *(f"text_{i}" for i in range(self.text_dim))]
        self.n_features_out_ = len(self.feature_names_)
        return self

    def transform(self, rows: Sequence[LengthRow]) -> np.ndarray:
        n, nk, nm = len(rows), len(self.kinds_), len(self.models_)
        out = np.zeros((n, self.n_features_out_), dtype=np.float64)
        if n == 0:
            return out
        out[:, 0] = [r.stage for r in rows]
        out[:, 1] = [r.prompt_tokens for r in rows]
        out[:, 2] = [r.generated_so_far for r in rows]
        np.log1p(np.maximum(out[:, 1:3], 0.0), out=out[:, 1:3])
        idx = np.arange(n)
        kc = np.array([self._kind_col.get(r.kind, -1) for r in rows])
        mc = np.array([self._model_col.get(r.model, -1) for r in rows])
        ok = kc >= 0
        out[idx[ok], 3 + kc[ok]] = 1.0
        ok = mc >= 0
        out[idx[ok], 3 + nk + mc[ok]] = 1.0
        if self.text_projection_ is not None:
            out[:, 3 + nk + nm: 3 + nk + nm + self.text_components_] = self.text_features([r.text for r in rows])
        return out

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """SVD text coordinates, each distinct text computed once (a call's text repeats for every model)."""
        if self.text_projection_ is None:
            return np.zeros((len(texts), 0))
        uniq: dict[str, int] = {}
        inv = np.array([uniq.setdefault(t, len(uniq)) for t in texts])
        z = self.tfidf_.transform(self.hasher_.transform(list(uniq))) @ self.text_projection_
        return z.toarray()[inv]

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(self.feature_names_, dtype=object)

    def spec(self) -> dict[str, Any]:
        """What a serving process must reproduce exactly; goes into the artifact manifest."""
        return {
            "version": SPEC_VERSION,
            "row": list(LengthRow._fields),
            "numeric": list(NUMERIC),
            "kinds": list(self.kinds_),
            "models": list(self.models_),
            "text": {"dim": self.text_dim, "svd_components": self.text_components_, "hashing_features": HASH_FEATURES,
                     "ngram_range": list(NGRAMS), "tfidf": "sublinear_tf", "random_state": self.random_state,
                     "explained_variance": self.text_explained_variance_},
            "feature_names": list(self.feature_names_),
        }


def _hasher() -> HashingVectorizer:
    return HashingVectorizer(n_features=HASH_FEATURES, ngram_range=NGRAMS, alternate_sign=False, norm=None)


def examples_from_plans(plans: Sequence[WorkflowPlan], texts: Sequence[str], models: Sequence[str]
                        ) -> tuple[list[LengthRow], np.ndarray, np.ndarray, np.ndarray]:
    """Training rows per (plan, stage, model), as if the whole workflow ran on that model.

    Returns rows, this call's output tokens, remaining workflow tokens (this call included), and the task id of
    each row (for grouped splits and ranking metrics). Models a plan has no outcome for are skipped.
    """
    if len(plans) != len(texts):
        raise ValueError(f"got {len(plans)} plans but {len(texts)} texts")
    rows: list[LengthRow] = []
    call_t: list[int] = []
    rem_t: list[int] = []
    groups: list[str] = []
    for plan, text in zip(plans, texts):
        have = set(plan.models)
        for m in models:
            if m not in have:
                continue
            outs: list[int] = []
            for s in range(plan.n_stages):
                rows.append(LengthRow(plan.kind, m, s, plan.prompt_tokens(s, outs), sum(outs), text))
                out = plan.output_tokens(s, m)
                call_t.append(out)
                rem_t.append(plan.remaining_tokens(s, m))
                groups.append(plan.task_id)
                outs.append(out)
    return (rows, np.asarray(call_t, dtype=float), np.asarray(rem_t, dtype=float),
            np.asarray(groups, dtype=object))


def rows_from_calls(calls: Sequence[Call], models: Sequence[str]) -> list[LengthRow]:
    """Serving rows, call-major: row i * len(models) + j is calls[i] on models[j]."""
    return [LengthRow(c.kind, m, c.stage, c.prompt_tokens, c.generated_so_far, c.prompt) for c in calls
            for m in models]
