"""Baseline policies the paper and practitioners compare against, all behind the same interface."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from chimera.sched.policy import Policy
from chimera.sched.types import Call


class RoundRobinMixin:
    """Spread calls over models in turn, as a plain load balancer in front of vLLM does."""

    _rr = 0

    def choose(self, call, now, conf, call_tok, rem_tok, allowed) -> int:  # type: ignore[override]
        n = len(allowed)
        for k in range(n):  # the next allowed model in turn
            i = (self._rr + k) % n
            if allowed[i]:
                self._rr += k + 1
                return i
        raise ValueError("no allowed model")


class VllmPolicy(RoundRobinMixin, Policy):
    """The paper's baseline: round-robin over models, FCFS everywhere (vLLM's default scheduling)."""

    name = "vllm"


class LeastLoadedPolicy(Policy):
    """Fewest in-flight calls per unit of capacity (LiteLLM's least-busy, normalised by max_inflight); FCFS."""

    name = "least-loaded"

    def choose(self, call, now, conf, call_tok, rem_tok, allowed) -> int:
        calls = self.monitor.calls
        loads = np.array([(calls[m.name] + 1) / m.max_inflight for m in self.models])
        return int(np.argmin(np.where(allowed, loads, np.inf)))


class RouteLLMPolicy(Policy):
    """RouteLLM-style threshold routing: the strongest model when its confidence clears a threshold.

    The threshold is calibrated on training calls so that `strong_share` of calls go to the strongest model;
    the others go to the most confident of the remaining models. FCFS order.
    """

    name = "routellm"
    needs_predictions = True

    def __init__(self, *args, strong_share: float = 0.5, threshold: float | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        if not 0.0 <= strong_share <= 1.0:
            raise ValueError(f"strong_share must be in [0, 1], got {strong_share}")
        self.strong_share = strong_share
        self.threshold = threshold

    def bind(self, models) -> None:
        super().bind(models)
        self.strong = max(range(len(self.models)), key=lambda i: self.models[i].size_rank)

    def prepare(self, train_calls: Sequence[Call]) -> None:
        if self.threshold is not None or not train_calls:
            return
        strong_conf = np.array([self.predict(c)[0][self.strong] for c in train_calls])
        # Ties (e.g. per-kind priors) make an exact share impossible; >= threshold sends the whole tie strong.
        self.threshold = float(np.quantile(strong_conf, 1.0 - self.strong_share)) if self.strong_share < 1 else -math.inf

    def choose(self, call, now, conf, call_tok, rem_tok, allowed) -> int:
        thr = self.threshold if self.threshold is not None else 0.5
        rest = [i for i in range(len(self.models)) if i != self.strong and allowed[i]]
        if allowed[self.strong] and (not rest or conf[self.strong] >= thr):
            return self.strong
        return max(rest, key=lambda i: conf[i])


class SjfPolicy(RoundRobinMixin, Policy):
    """Shortest predicted *request* first (per call, not per workflow), round-robin routing."""

    name = "sjf"
    needs_predictions = True

    def key(self, call: Call, now: float) -> float:
        return call.pred_call_tokens


class LtrPolicy(RoundRobinMixin, Policy):
    """LTR (Fu et al. 2024): rank by predicted length, preemptive re-ranking in the engine.

    Starvation rule from vllm-ltr: a sequence not scheduled for `starve_steps` steps gets top priority for
    `boost_steps` steps (tracked by the engine as waited steps).
    """

    name = "ltr"
    preemptive = True
    needs_predictions = True

    def __init__(self, *args, starve_steps: int = 200, boost_steps: int = 10, **kw) -> None:
        super().__init__(*args, **kw)
        self.starve_steps = starve_steps
        self.boost_steps = boost_steps

    def key(self, call: Call, now: float) -> float:
        return call.pred_call_tokens

    def engine_key(self, call: Call, generated: int, waited_steps: int, now: float) -> float:
        if waited_steps >= self.starve_steps:
            return -1e12 + call.arrival_s
        return call.pred_call_tokens


class MlfqPolicy(RoundRobinMixin, Policy):
    """FastServe-style MLFQ: skip-join by prompt length, demotion as service grows, promotion when starving.

    Queue quanta grow ×2 from `base_quantum_s`; service is measured as generated tokens × the model's TPOT.
    """

    name = "mlfq"
    preemptive = True

    def __init__(self, *args, base_quantum_s: float = 0.01, levels: int = 8, promote_s: float = 3.0, **kw) -> None:
        super().__init__(*args, **kw)
        self.base_quantum_s = base_quantum_s
        self.levels = levels
        self.promote_s = promote_s

    def bind(self, models) -> None:
        super().bind(models)
        self._tpot = {m.name: m.tpot_s for m in models}

    def _level_for_service(self, service_s: float) -> int:
        if service_s <= self.base_quantum_s:
            return 0
        return min(self.levels - 1, int(math.log2(service_s / self.base_quantum_s)) + 1)

    def key(self, call: Call, now: float) -> float:
        # Skip-join: the first queue whose quantum covers the prefill (prompt tokens at ~1/10 of a decode step each).
        tpot = self._tpot[call.model]  # type: ignore[index]
        return float(self._level_for_service(call.prompt_tokens * tpot / 10.0))

    def engine_key(self, call: Call, generated: int, waited_steps: int, now: float) -> float:
        tpot = self._tpot[call.model]  # type: ignore[index]
        if waited_steps * tpot >= self.promote_s:
            return -1.0
        level = max(int(call.priority), self._level_for_service(generated * tpot))
        return level + call.arrival_s * 1e-9
