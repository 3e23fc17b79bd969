"""The per-model wait queue both bodies run (through the admission core): lowest key first, with aging so nothing
starves."""

from __future__ import annotations

import heapq
import itertools
from collections import deque

from chimera.sched.types import Call


class WaitQueue:
    """Priority queue with starvation promotion: a call waiting longer than `starve_s` jumps the queue.

    Promotion is checked on the oldest waiting call at each pop, so it costs O(1) amortised.
    """

    def __init__(self, starve_s: float | None = None) -> None:
        self.starve_s = starve_s
        self._heap: list[tuple[float, int, Call]] = []
        self._fifo: deque[tuple[int, Call]] = deque()
        self._live: dict[int, Call] = {}
        self._entry: dict[int, int] = {}  # call_id -> entry number, for withdrawal
        self._counter = itertools.count()
        self.promotions = 0

    def __len__(self) -> int:
        return len(self._live)

    def push(self, call: Call, key: float) -> None:
        n = next(self._counter)
        heapq.heappush(self._heap, (key, n, call))
        self._fifo.append((n, call))
        self._live[n] = call
        self._entry[call.call_id] = n

    def remove(self, call: Call) -> bool:
        """Withdraw a waiting call (its client left, or its request failed before dispatch); True if it was here.
        Its heap and FIFO entries are dropped lazily, as popped ones are."""
        n = self._entry.pop(call.call_id, None)
        if n is None or self._live.pop(n, None) is None:
            return False
        if len(self._heap) > 2 * len(self._live) + 64:  # mostly withdrawn entries: rebuild (amortised O(1))
            self._heap = [e for e in self._heap if e[1] in self._live]
            heapq.heapify(self._heap)
            self._fifo = deque(e for e in self._fifo if e[0] in self._live)
        return True

    def _drop_dead_fifo(self) -> None:
        while self._fifo and self._fifo[0][0] not in self._live:
            self._fifo.popleft()

    def pop(self, now: float) -> tuple[Call, bool] | None:
        """Remove and return (call, promoted): the starving oldest call if any, else the lowest key."""
        if not self._live:
            return None
        self._drop_dead_fifo()
        if self.starve_s is not None and self._fifo:
            n, call = self._fifo[0]
            if now - call.enqueued_s >= self.starve_s:
                self._fifo.popleft()
                del self._live[n]
                self._entry.pop(call.call_id, None)
                self.promotions += 1
                return call, True
        while self._heap:
            _, n, call = heapq.heappop(self._heap)
            if n in self._live:
                del self._live[n]
                self._entry.pop(call.call_id, None)
                return call, False
        return None  # pragma: no cover - _live and _heap agree

    def peek_keys(self) -> list[float]:
        """Keys of live entries in pop order ignoring aging (for tests and metrics)."""
        return [k for k, n, _ in sorted(self._heap) if n in self._live]
