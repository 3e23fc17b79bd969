"""LiteLLM's least-busy routing, normalised by each model's capacity; FCFS order."""

from __future__ import annotations

import numpy as np

from chimera.sched.plugin import register_policy
from chimera.sched.policy import Policy


@register_policy("least-loaded")
class LeastLoadedPolicy(Policy):
    """Fewest in-flight calls per unit of capacity (LiteLLM's least-busy, normalised by max_inflight), other clients'
    calls on the engines (where the gateway scrapes them) and other gateway replicas' calls included; FCFS."""

    def choose(self, call, now, conf, call_tok, rem_tok, allowed) -> int:
        mon = self.monitor  # external: other clients' calls; remote: other gateway replicas' (both gateway only)
        loads = np.array([(mon.calls[m.name] + mon.external[m.name] + mon.remote_calls[m.name] + 1) / m.max_inflight
                          for m in self.models])
        return int(np.argmin(self.only_allowed(loads, allowed, np.inf)))
