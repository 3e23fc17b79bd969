"""A call's life in the gateway as one typed value: where it is (Phase), how it ended (Outcome), and everything the
gateway holds for it, from the edge to its trace row. After llm-d's request context and vLLM's request status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from chimera.sched.decision import Decision
from chimera.sched.types import Call
from chimera.serve.identity import Identity
from chimera.serve.pool import BackendState


class Phase(enum.Enum):
    """Where the current attempt is; an attempt moves forward only, and ENDED is final."""

    RECEIVED = "received"  # passed the edge and backpressure; predicting
    QUEUED = "queued"  # submitted to the admission core, waiting for a backend
    DISPATCHED = "dispatched"  # holds a backend slot; the upstream request is open
    STREAMING = "streaming"  # relaying the backend's stream to the client
    ENDED = "ended"  # settled: its slot, queue entry and predicted load are freed, its trace row written


class Outcome(enum.Enum):
    """How an attempt ended (the trace row's `status`)."""

    OK = "ok"
    ERROR = "error"  # the backend failed or answered an error, or the gateway hit a bug
    CANCELLED = "cancelled"  # the client left, or the server tore the request down
    TIMEOUT = "timeout"  # no backend in time, or the backend took too long
    REJECTED = "rejected"  # backpressure refused it after prediction (429)


@dataclass(eq=False)
class CallContext:
    """One request from the edge to its last trace row. A retry is a new attempt on the same context: a new brain
    `Call` (same arrival, so FCFS-like keys keep its place), its backends tried so far kept in `tried`."""

    path: str
    body: dict[str, Any]
    stream: bool
    show_usage: bool  # the client asked for the usage chunk itself
    client_pinned: bool  # the client named a model: retries stay on its replicas
    call: Call  # the current attempt as the brain sees it
    raw: bytes | None = None  # the body's bytes as the client sent them (forwarded as they are when nothing changes)
    identity: Identity | None = None  # the workflow the call belongs to and how it was found (serve/identity.py)
    decision: Decision | None = None  # what the policy decided for the current attempt (its trace row's routing)
    predictor_version: str | None = None  # the predictors the current attempt was decided with (serve/reload.py)
    phase: Phase = Phase.RECEIVED
    outcome: Outcome | None = None
    error: str | None = None
    backend: BackendState | None = None
    tried: set[str] = field(default_factory=set)
    attempts: int = 1
    # what the current attempt's answer said: content chunks relayed, the engine's own counts, the first token's time
    relayed: bool = False  # the answer was streamed to the client (its tokens count whatever the outcome)
    tokens: int = 0
    usage_tokens: int | None = None
    first_token_at: float | None = None
    response_id: str | None = None  # the backend's id of the answer (chat: `chatcmpl-…`; responses: `resp_…`)
    reply: list[dict[str, Any]] | None = None  # the answer as the client will send it back: chat [assistant message], responses: output items

    @property
    def settled(self) -> bool:
        return self.phase is Phase.ENDED

    @property
    def completion_tokens(self) -> int | None:
        """The attempt's output tokens: the engine's own count when it gave one, else the chunks relayed; None when
        no answer reached the client."""
        if self.usage_tokens is not None:
            return self.usage_tokens
        return self.tokens if self.relayed else None

    @property
    def unreported_tokens(self) -> int:
        """Tokens the engine counted beyond the chunks already reported as progress (settled with the completion)."""
        return max(0, (self.usage_tokens or 0) - self.tokens)

    def retry(self, call: Call) -> None:
        """Start the next attempt with `call`; what the last one held was settled."""
        assert self.settled, "an attempt is retried only once it has ended"
        self.call, self.phase, self.outcome, self.error, self.backend = call, Phase.RECEIVED, None, None, None
        self.decision = None
        self.relayed, self.tokens, self.usage_tokens, self.first_token_at = False, 0, None, None
        self.response_id, self.reply = None, None
        self.attempts += 1
