"""Chimera's policy: route by confidence − λ·expected latency, order workflows shortest-total-job-first with aging."""

from __future__ import annotations

import numpy as np

from chimera.sched.policy import Policy
from chimera.sched.types import Call


class ChimeraPolicy(Policy):
    """The paper's scheduler (arXiv 2603.22206), with switches for the ablations.

    Value of model m = w·confidence(m) − λ·expected latency(m), where w is this call's predicted share of the
    workflow's output (the weight the stage carries in the task score: a tiny final-answer call must not claim the
    large model at the cost of the long reasoning call). Expected latency on m = in-flight predicted tokens on m /
    m's throughput (congestion) + this call's prompt / m's prefill rate + its predicted tokens × m's TPOT (service).
    Priority = predicted remaining output tokens of the whole workflow on the chosen model (STJF);
    a call waiting longer than `starve_s` is promoted, and its workflow stays ahead for `quantum_s`.
    """

    name = "chimera"
    needs_predictions = True

    def __init__(
        self,
        *args,
        lam: float = 0.02,
        route: bool = True,
        stjf: bool = True,
        load: bool = True,
        starve_s: float | None = 30.0,
        quantum_s: float = 10.0,
        **kw,
    ) -> None:
        super().__init__(*args, starve_s=starve_s, quantum_s=quantum_s, **kw)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam
        self.route = route
        self.stjf = stjf
        self.load = load

    def bind(self, models) -> None:
        super().bind(models)
        self._tps = np.array([m.tokens_per_s for m in self.models])
        self._tpot = np.array([m.tpot_s for m in self.models])
        self._prefill = np.array([m.prefill_tokens_per_s for m in self.models])

    def expected_latency(self, call_tok: np.ndarray, prompt_tokens: int = 0) -> np.ndarray:
        service = call_tok * self._tpot + prompt_tokens / self._prefill
        if not self.load:
            return service
        inflight = np.array([self.monitor.pred_tokens[n] for n in self.names])
        return inflight / self._tps + service

    def choose(self, call: Call, now: float, conf, call_tok, rem_tok, allowed) -> int:
        lat = self.expected_latency(call_tok, call.prompt_tokens)
        if not self.route:
            return int(np.argmin(np.where(allowed, lat, np.inf)))
        share = call_tok / np.maximum(call.generated_so_far + rem_tok, 1.0)
        return int(np.argmax(np.where(allowed, share * conf - self.lam * lat, -np.inf)))

    def key(self, call: Call, now: float) -> float:
        if not self.stjf:
            return call.arrival_s
        return call.pred_remaining_tokens
