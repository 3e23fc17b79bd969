"""The paper's baseline: round-robin over models, FCFS everywhere (vLLM's default scheduling)."""

from __future__ import annotations

from chimera.sched.plugin import register_policy
from chimera.sched.policy import Policy, RoundRobinMixin


@register_policy("vllm")
class VllmPolicy(RoundRobinMixin, Policy):
    """Round-robin routing, FCFS order; takes only the common aging parameters."""
