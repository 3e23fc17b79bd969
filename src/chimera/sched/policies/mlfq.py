"""FastServe-style MLFQ: skip-join by prompt length, demotion as service grows, promotion when starving."""

from __future__ import annotations

import math

from pydantic import Field

from chimera.sched.plugin import register_policy
from chimera.sched.policy import Policy, PolicyParams, RoundRobinMixin
from chimera.sched.types import Call


@register_policy("mlfq")
class MlfqPolicy(RoundRobinMixin, Policy):
    """Queue quanta grow ×2 from `base_quantum_s`; service is measured as generated tokens × the model's TPOT
    (needs in-engine preemption)."""

    preemptive = True

    class Params(PolicyParams):
        base_quantum_s: float = Field(default=0.01, gt=0)
        levels: int = Field(default=8, ge=1)
        promote_s: float = 3.0

    def bind(self, models) -> None:
        super().bind(models)
        self.speeds_changed()

    def speeds_changed(self) -> None:
        self._tpot = {m.name: m.tpot_s for m in self.models}

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
