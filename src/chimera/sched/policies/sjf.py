"""Shortest predicted request first (per call, not per workflow), round-robin routing."""

from __future__ import annotations

from chimera.sched.plugin import register_policy
from chimera.sched.policy import Policy, RoundRobinMixin
from chimera.sched.types import Call


@register_policy("sjf")
class SjfPolicy(RoundRobinMixin, Policy):
    """Queue order by this call's predicted output tokens."""

    needs_predictions = True

    def key(self, call: Call, now: float) -> float:
        return call.pred_call_tokens
