"""LTR (Fu et al. 2024): rank by predicted length, preemptive re-ranking in the engine."""

from __future__ import annotations

from pydantic import Field

from chimera.sched.plugin import register_policy
from chimera.sched.policy import Policy, PolicyParams, RoundRobinMixin
from chimera.sched.types import Call


@register_policy("ltr")
class LtrPolicy(RoundRobinMixin, Policy):
    """Shortest predicted call first, in the queue and inside the engine (needs in-engine preemption).

    Starvation rule from vllm-ltr: a sequence not scheduled for `starve_steps` steps gets top priority for
    `boost_steps` steps (tracked by the engine as waited steps).
    """

    preemptive = True
    needs_predictions = True

    class Params(PolicyParams):
        starve_steps: int = Field(default=200, ge=0)
        boost_steps: int = Field(default=10, ge=0)

    def key(self, call: Call, now: float) -> float:
        return call.pred_call_tokens

    def engine_key(self, call: Call, generated: int, waited_steps: int, now: float) -> float:
        if waited_steps >= self.starve_steps:
            return -1e12 + call.arrival_s
        return call.pred_call_tokens
