"""Workflow affinity: which replica a call goes to when one of them holds its context (prefix cache).

Pure: the body passes each replica's load and the prompt tokens it holds for the call as plain numbers (the simulator
asks its engines, the gateway estimates from where the workflow's last stage ran); the brain answers with an index.
"""

from __future__ import annotations

from typing import Sequence


def pick_replica(loads: Sequence[float], cached: Sequence[int] | None = None, margin: float = 0.0) -> int:
    """Index of the replica to run a call on. Without cached context: the least-loaded one (the first on ties).
    With it: the replica holding the most of the call's prompt (the fewest loaded among those), unless its load
    exceeds the least-loaded replica's by more than `margin` (same unit as `loads`): load still overrides."""
    if not loads:
        raise ValueError("pick_replica: no replicas")
    least = min(range(len(loads)), key=lambda i: loads[i])
    if not cached or max(cached) <= 0:
        return least
    holder = max(range(len(loads)), key=lambda i: (cached[i], -loads[i]))
    if cached[holder] <= cached[least] or loads[holder] - loads[least] > margin:
        return least
    return holder
