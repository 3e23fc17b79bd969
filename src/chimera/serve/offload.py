"""Run trained predictors off the event loop: rows are computed on one worker thread before `Policy.submit`.

The policy holds these wrappers instead of the predictors; `submit` then finds its rows ready (keyed by call_id)
and the loop never waits on an encoder. Only the worker thread touches the wrapped predictors (and their caches).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from chimera.sched.types import Call


class OffloadedConfidence:
    """ConfidencePredictor whose rows were computed ahead by `Offloader.prepare`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.models_ = list(inner.models_)
        self.ready: dict[int, np.ndarray] = {}

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray:
        rows = [self.ready.pop(c.call_id, None) for c in calls]
        if any(r is None for r in rows):  # not prepared (direct use): compute inline
            return self.inner.predict_confidence(calls)
        return np.vstack(rows)


class OffloadedLength:
    """LengthPredictor whose rows were computed ahead by `Offloader.prepare`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.models_ = list(inner.models_)
        self.ready: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.ready.pop(c.call_id, None) for c in calls]
        if any(r is None for r in rows):
            return self.inner.predict_lengths(calls)
        return np.vstack([r[0] for r in rows]), np.vstack([r[1] for r in rows])


class Offloader:
    """One prediction thread shared by both wrappers (predictors are not thread-safe; one thread keeps them so)."""

    def __init__(self, confidence: OffloadedConfidence | None, length: OffloadedLength | None) -> None:
        self.confidence = confidence
        self.length = length
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chimera-predict")

    def _compute(self, call: Call) -> None:
        if self.confidence is not None:
            self.confidence.ready[call.call_id] = self.confidence.inner.predict_confidence([call])[0]
        if self.length is not None:
            c, r = self.length.inner.predict_lengths([call])
            self.length.ready[call.call_id] = (c[0], r[0])

    def discard(self, call: Call) -> None:
        """Forget rows of a call that never reached `submit`."""
        for w in (self.confidence, self.length):
            if w is not None:
                w.ready.pop(call.call_id, None)

    async def prepare(self, call: Call) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(self.pool, self._compute, call)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
