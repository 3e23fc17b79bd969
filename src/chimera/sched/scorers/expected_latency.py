"""Expected seconds until this call is done on each model: congestion + prefill + service."""

from __future__ import annotations

import numpy as np

from chimera.sched.plugin import register_scorer
from chimera.sched.scorers.base import Scorer


@register_scorer("expected_latency")
class ExpectedLatency(Scorer):
    """In-flight predicted tokens on m / m's throughput (congestion; off when `congestion` is False) + this call's
    prompt / m's prefill rate + its predicted tokens × m's TPOT (service). A cost: give it a negative weight."""

    congestion = True

    def bind(self, policy) -> None:
        self._names = list(policy.names)
        self._tps = np.array([m.tokens_per_s for m in policy.models])
        self._tpot = np.array([m.tpot_s for m in policy.models])
        self._prefill = np.array([m.prefill_tokens_per_s for m in policy.models])

    def seconds(self, call_tok: np.ndarray, prompt_tokens: int, monitor) -> np.ndarray:
        service = call_tok * self._tpot + prompt_tokens / self._prefill
        if not self.congestion:
            return service
        inflight = np.array([monitor.pred_tokens[n] for n in self._names])
        return inflight / self._tps + service

    def score(self, call, now, prediction, allowed, policy) -> np.ndarray:
        return self.seconds(prediction[1], call.prompt_tokens, policy.monitor)
