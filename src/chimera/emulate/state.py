"""What one emulator app owns: the engine clock, counters and histograms for /metrics, stored responses (an LRU)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from chimera.emulate.clock import EngineClock
from chimera.emulate.lengths import WorkloadLengths
from chimera.perfmodel.batching import Engine
from chimera.predict.cache import LRUCache

LAT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
MAX_STORED_RESPONSES = 10_000


class Hist:
    """Cumulative-bucket histogram kept incrementally (scrapes stay O(buckets))."""

    def __init__(self) -> None:
        self.counts = [0] * len(LAT_BUCKETS)
        self.n, self.total = 0, 0.0

    def observe(self, v: float) -> None:
        self.n, self.total = self.n + 1, self.total + v
        for i, b in enumerate(LAT_BUCKETS):
            if v <= b:
                self.counts[i] += 1


@dataclass(frozen=True)
class StoredResponse:
    """A finished /v1/responses answer kept for GET and `previous_response_id`: the Response object and where its
    conversation stands (task, stage, first user message, tokens of context a follow-up carries)."""

    body: dict[str, Any]
    task_id: str | None
    stage: int
    first_user: str
    context_tokens: int


@dataclass
class EmulatorState:
    """Everything one emulator app owns; `app.state.emulator`. `fail()` / `recover()` are the fault hooks."""

    model: str
    clock: EngineClock
    policy: str
    lengths: WorkloadLengths | None
    seed: int
    fail_after: int | None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    requests: int = 0
    failed: bool = False
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    success: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    ttft: Hist = field(default_factory=Hist)
    e2e: Hist = field(default_factory=Hist)
    responses: LRUCache = field(default_factory=lambda: LRUCache(MAX_STORED_RESPONSES))  # id -> StoredResponse

    @property
    def engine(self) -> Engine:
        return self.clock.engine

    def fail(self, reason: str = "emulated backend failure") -> None:
        """Kill the backend: in-flight requests die (streams drop), new ones get 500, /health says 503."""
        self.failed = True
        self.clock.fail_all(reason)

    def recover(self) -> None:
        """Undo `fail()` (requests count from zero again)."""
        self.failed, self.requests = False, 0
