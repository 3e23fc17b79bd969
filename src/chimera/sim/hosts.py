"""Servers that share one machine's CPU: while one is busy, the others step slower.

On a CPU server (and, less, for GPU servers whose API processes share cores) the engine's own scheduler, the API
server, the gateway and the client float over the same cores as the model workers, so a busy server takes time
from its neighbours. Each server carries a measured factor (`ModelSpec.peer_busy_slowdown`) for its step time
while any other server of the same `host` has work; engines switch speed at a step boundary.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

from chimera.engine.batching import Engine


class SharedHosts:
    """Which engines share a host, and each one's slowdown while a peer is busy; `update` applies them."""

    def __init__(self, members: Sequence[tuple[Engine, str | None, float]]) -> None:
        groups: dict[str, list[tuple[Engine, float]]] = defaultdict(list)
        for eng, host, factor in members:
            if host is not None:
                groups[host].append((eng, factor))
        self._links = [(eng, factor, [p for p, _ in group if p is not eng])
                       for group in groups.values() if len(group) > 1
                       for eng, factor in group if factor != 1.0]

    def __bool__(self) -> bool:
        return bool(self._links)

    def update(self, now: float, changed: Callable[[Engine], None]) -> None:
        """Set every linked engine's speed from its peers' state now; `changed(engine)` for each that changed."""
        for eng, factor, peers in self._links:
            want = factor if any(p.busy for p in peers) else 1.0
            if eng.slowdown != want:
                eng.set_slowdown(want, now)
                changed(eng)
