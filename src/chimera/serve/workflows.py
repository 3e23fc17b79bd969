"""What the gateway remembers of recent workflows: when each started, the tokens it has generated, how many stages
it has run and where its context is cached (the model and backend of its last stage), in an LRU of bounded size."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class WorkflowState:
    arrival_s: float
    generated: int = 0
    stages: int = 0
    # Where the workflow's context is (workflow affinity): the model and backend that served its last stage, and the
    # tokens it left there (that call's prompt + output), which the backend's prefix cache is assumed to hold.
    last_model: str | None = None
    last_backend: str | None = None
    context_tokens: int = 0


class Workflows:
    """Recently seen workflows (LRU, at most `cap`), so later stages know the workflow's start, tokens generated so far
    and where its context is cached; the least recently used is forgotten first."""

    def __init__(self, cap: int = 100_000) -> None:
        self.cap = cap
        self._d: OrderedDict[str, WorkflowState] = OrderedDict()

    def get(self, wid: str, now: float) -> WorkflowState:
        st = self._d.get(wid)
        if st is None:
            st = self._d[wid] = WorkflowState(arrival_s=now)
            if len(self._d) > self.cap:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(wid)
        return st

    def peek(self, wid: str) -> WorkflowState | None:
        """The workflow's state if it is known, without creating it or refreshing its place."""
        return self._d.get(wid)

    def pop(self, wid: str) -> WorkflowState | None:
        return self._d.pop(wid, None)

    def __len__(self) -> int:
        return len(self._d)
