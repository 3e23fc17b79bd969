"""The gateway's one clock: seconds since it started on the event loop's monotonic clock (the policy's `now`), and the
wall time a trace row stores. Handed down to whoever needs time, so nothing calls back up for it."""

from __future__ import annotations

import asyncio
import time


class GatewayClock:
    def __init__(self) -> None:
        self._t0: float | None = None
        self._wall0 = time.time()

    def start(self) -> None:
        """Time zero is now (the lifespan's start)."""
        self._t0 = None
        self.now()
        self._wall0 = time.time()

    def now(self) -> float:
        """Seconds since the start, on the running loop's monotonic clock."""
        t = asyncio.get_running_loop().time()
        if self._t0 is None:
            self._t0 = t
        return t - self._t0

    def wall(self, now: float | None) -> float | None:
        """Epoch seconds of a `now` reading (None stays None)."""
        return None if now is None else self._wall0 + now
