"""RouteLLM-style baseline routers with SemanticRouter's fit/predict_proba signature, for the routing tables."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

from chimera.predict.encoders import is_fitted, make_encoder
from chimera.predict.priors import kind_accuracy
from chimera.predict.router import RouterBase


def _fit_encoder(spec: Any, texts: list[str]) -> Any:
    enc = make_encoder(spec) if isinstance(spec, str) else spec
    return enc if is_fitted(enc) else copy.deepcopy(enc).fit(texts)


@contextmanager
def _single_thread_torch() -> Iterator[None]:
    """Small matmuls run far faster on one thread (thread hand-off dominates, badly so on a busy 2-core box)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class KnnRouter(RouterBase):
    """Mean label of the k most cosine-similar training queries (per model, over those that have a label)."""

    def __init__(self, encoder: Any = "hashing", k: int = 20) -> None:
        self.encoder = encoder
        self.k = k

    def fit(
        self, texts: Sequence[str], scores: np.ndarray, models: Sequence[str], kinds: Sequence[str] | None = None
    ) -> "KnnRouter":
        texts = list(texts)
        self.scores_ = self._fit_priors(scores, models, kinds)
        self.encoder_ = _fit_encoder(self.encoder, texts)
        self.emb_ = self.encoder_.encode(texts)
        return self

    def predict_proba(
        self, texts: Sequence[str], kinds: Sequence[str] | None = None, models: Sequence[str] | None = None
    ) -> np.ndarray:
        texts = self._check_query(texts, kinds)
        models = list(self.models_ if models is None else models)
        k = min(self.k, len(self.emb_))
        sims = self.encoder_.encode(texts) @ self.emb_.T
        nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out = np.empty((len(texts), len(models)))
        index = {m: j for j, m in enumerate(self.models_)}
        for j, m in enumerate(models):
            if m not in index or not np.isfinite(self.scores_[:, index[m]]).any():
                out[:, j] = self._fallback_column(m, kinds, len(texts))
                continue
            lab = self.scores_[nn, index[m]]  # (n, k)
            have = np.isfinite(lab)
            mean = np.where(have, lab, 0.0).sum(1) / np.maximum(have.sum(1), 1)
            out[:, j] = np.where(have.any(1), mean, self.priors_["*"][m])
        return out


class MatrixFactorizationRouter(RouterBase):
    """RouteLLM "mf": P(m correct | q) = sigmoid(v_m . (W e_q) + b_m), full-batch masked BCE (torch).

    L2 penalty `weight_decay` on W and V; early-stopped on a random `val_frac` of the rows (0 disables).
    """

    def __init__(
        self,
        encoder: Any = "hashing",
        dim: int = 32,
        epochs: int = 300,
        lr: float = 1e-2,
        weight_decay: float = 1e-3,
        val_frac: float = 0.1,
        random_state: int = 0,
    ) -> None:
        self.encoder = encoder
        self.dim = dim
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_frac = val_frac
        self.random_state = random_state

    def fit(
        self, texts: Sequence[str], scores: np.ndarray, models: Sequence[str], kinds: Sequence[str] | None = None
    ) -> "MatrixFactorizationRouter":
        import torch

        texts = list(texts)
        scores = self._fit_priors(scores, models, kinds)
        self.encoder_ = _fit_encoder(self.encoder, texts)
        e = torch.from_numpy(self.encoder_.encode(texts))
        y = torch.from_numpy(np.nan_to_num(scores, nan=0.0)).float()
        mask = torch.from_numpy(np.isfinite(scores)).float()
        val = torch.from_numpy(np.random.default_rng(self.random_state).random(len(texts)) < self.val_frac)
        if val.all() or not val.any():
            val = torch.zeros(len(texts), dtype=torch.bool)
        g = torch.Generator().manual_seed(self.random_state)
        d, m = e.shape[1], len(self.models_)
        w = (torch.randn(d, self.dim, generator=g) / np.sqrt(d)).requires_grad_()
        v = (torch.randn(m, self.dim, generator=g) / np.sqrt(self.dim)).requires_grad_()
        p0 = np.array([self.priors_["*"].get(mm, 0.5) for mm in self.models_]).clip(0.02, 0.98)
        b = torch.tensor(np.log(p0 / (1 - p0)), dtype=torch.float32).requires_grad_()
        opt = torch.optim.Adam([w, v, b], lr=self.lr)

        def masked_bce(rows: torch.Tensor) -> torch.Tensor:
            logits = (e[rows] @ w) @ v.T + b
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[rows], reduction="none")
            return (bce * mask[rows]).sum() / mask[rows].sum().clamp(min=1.0)

        best = (float("inf"), 0, None)
        with _single_thread_torch():
            for epoch in range(self.epochs):
                loss = masked_bce(~val) + self.weight_decay * ((w**2).sum() + (v**2).sum())
                opt.zero_grad()
                loss.backward()
                opt.step()
                if val.any():
                    with torch.no_grad():
                        vl = float(masked_bce(val))
                    if vl < best[0]:
                        best = (vl, epoch + 1, [t.detach().clone() for t in (w, v, b)])
        params = best[2] if best[2] is not None else [t.detach() for t in (w, v, b)]
        self.W_, self.V_, self.b_ = (t.numpy().copy() for t in params)
        self.best_epoch_ = best[1] if best[2] is not None else self.epochs
        return self

    def predict_proba(
        self, texts: Sequence[str], kinds: Sequence[str] | None = None, models: Sequence[str] | None = None
    ) -> np.ndarray:
        texts = self._check_query(texts, kinds)
        models = list(self.models_ if models is None else models)
        p = 1.0 / (1.0 + np.exp(-((self.encoder_.encode(texts) @ self.W_) @ self.V_.T + self.b_)))
        index = {m: j for j, m in enumerate(self.models_)}
        out = np.empty((len(texts), len(models)))
        for j, m in enumerate(models):
            if m in index and m in self.priors_["*"]:
                out[:, j] = p[:, index[m]]
            else:
                out[:, j] = self._fallback_column(m, kinds, len(texts))
        return out


class RandomRouter(RouterBase):
    """Uniform random probabilities: its routing curve is random assignment (the diagonal)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(
        self, texts: Sequence[str], scores: np.ndarray, models: Sequence[str], kinds: Sequence[str] | None = None
    ) -> "RandomRouter":
        self._fit_priors(scores, models, kinds)
        self.rng_ = np.random.default_rng(self.seed)
        return self

    def predict_proba(
        self, texts: Sequence[str], kinds: Sequence[str] | None = None, models: Sequence[str] | None = None
    ) -> np.ndarray:
        texts = self._check_query(texts, kinds)
        models = list(self.models_ if models is None else models)
        return self.rng_.random((len(texts), len(models)))


class PriorRouter(RouterBase):
    """Per-kind mean accuracy of each model (Laplace-smoothed): the honest text-blind prior used today."""

    def __init__(self, smoothing: float = 1.0) -> None:
        self.smoothing = smoothing

    def fit(
        self, texts: Sequence[str], scores: np.ndarray, models: Sequence[str], kinds: Sequence[str] | None = None
    ) -> "PriorRouter":
        scores = self._fit_priors(scores, models, kinds)
        kinds = list(kinds) if kinds is not None else ["*"] * len(scores)
        self.table_: dict[tuple[str, str], float] = kind_accuracy(kinds, scores, self.models_, self.smoothing)
        return self

    def predict_proba(
        self, texts: Sequence[str], kinds: Sequence[str] | None = None, models: Sequence[str] | None = None
    ) -> np.ndarray:
        texts = self._check_query(texts, kinds)
        models = list(self.models_ if models is None else models)
        ks = list(kinds) if kinds is not None else ["*"] * len(texts)
        out = np.empty((len(texts), len(models)))
        for j, m in enumerate(models):
            if ("*", m) not in self.table_:
                out[:, j] = self._fallback_column(m, kinds, len(texts))
                continue
            out[:, j] = [self.table_.get((k, m), self.table_[("*", m)]) for k in ks]
        return out


__all__ = ["KnnRouter", "MatrixFactorizationRouter", "PriorRouter", "RandomRouter"]
