"""LiteLLM's least-busy routing, normalised by each model's capacity; FCFS order."""

from __future__ import annotations

import numpy as np

from chimera.sched.plugin import register_policy
from chimera.sched.policy import Policy


@register_policy("least-loaded")
class LeastLoadedPolicy(Policy):
    """Fewest in-flight calls per unit of capacity (LiteLLM's least-busy, normalised by max_inflight), other clients'
    calls on the engines included where the gateway scrapes them; FCFS."""

    def choose(self, call, now, conf, call_tok, rem_tok, allowed) -> int:
        calls, external = self.monitor.calls, self.monitor.external  # external: other clients' calls (gateway)
        loads = np.array([(calls[m.name] + external[m.name] + 1) / m.max_inflight for m in self.models])
        return int(np.argmin(self.only_allowed(loads, allowed, np.inf)))
