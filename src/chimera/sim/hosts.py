"""Servers that share one machine's CPU: while one is busy, the others step slower.

On a CPU server (and, less, for GPU servers whose API processes share cores) the engine's own scheduler, the API
server, the gateway and the client float over the same cores as the model workers, so a busy server takes time
from its neighbours, the more the more requests it streams. Each server carries a measured factor
(`ModelSpec.peer_busy_slowdown`) for its step time while the other servers of the same `host` run
`peer_busy_batch` requests each; with r requests running on its peers (r ≥ 1) the factor is
1 + (slowdown − 1) · min(1, r / (peer_busy_batch · peers)), so one request on an otherwise idle peer steals less
than a full batch. Engines switch speed at a step boundary.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

from chimera.perfmodel.batching import Engine


class SharedHosts:
    """Which engines share a host, and each one's slowdown while a peer is busy; `update` applies them."""

    def __init__(self, members: Sequence[tuple[Engine, str | None, float, int]]) -> None:
        groups: dict[str, list[tuple[Engine, float, int]]] = defaultdict(list)
        for eng, host, factor, batch in members:
            if host is not None:
                groups[host].append((eng, factor, batch))
        self._links = [(eng, factor, batch * (len(group) - 1), [p for p, _, _ in group if p is not eng])
                       for group in groups.values() if len(group) > 1
                       for eng, factor, batch in group if factor != 1.0]

    def __bool__(self) -> bool:
        return bool(self._links)

    def update(self, now: float, changed: Callable[[Engine], None]) -> None:
        """Set every linked engine's speed from its peers' state now; `changed(engine)` for each that changed."""
        for eng, factor, full, peers in self._links:
            running = sum(p.n_running for p in peers)
            want = 1.0 + (factor - 1.0) * min(1.0, running / full) if running else 1.0
            if eng.slowdown != want:
                eng.set_slowdown(want, now)
                changed(eng)
