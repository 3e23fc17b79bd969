"""A small least-recently-used map: the simulator and the gateway re-ask predictors about the same request."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable


class LRUCache:
    """Bounded map that forgets the least recently used entry first. Safe to share between two threads (the gateway's
    prediction thread and its event loop both read the online learner's caches): an entry evicted by the other
    thread between two steps here is simply absent, never an error."""

    def __init__(self, maxsize: int = 4096) -> None:
        self.maxsize = maxsize
        self._d: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        v = self._d.get(key)
        if v is not None:
            try:
                self._d.move_to_end(key)
            except KeyError:  # evicted by another thread meantime: the value read is still right
                pass
        return v

    def put(self, key: Hashable, value: Any) -> None:
        self._d[key] = value
        try:
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
        except KeyError:  # another thread evicted it (or emptied the map) meantime: nothing left to do
            pass

    def __len__(self) -> int:
        return len(self._d)
