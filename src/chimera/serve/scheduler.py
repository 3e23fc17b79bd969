"""The gateway's body for a Policy: the simulator's protocol (submit → next_call while room → progress/complete).

Pure with respect to time: every method takes `now`, so the decisions can be replayed and compared with the
simulator without HTTP. The async side (serve/app.py) calls it from the event loop only.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from chimera.sched.policy import Policy
from chimera.sched.types import Call, ModelInfo
from chimera.serve.config import Backend

DOWN_S = 5.0  # a backend that just failed is avoided for this long (still used when nothing else has room)


class QueueFull(Exception):
    """No model the call may go to can take it now (no free slot, its queue or the gateway's at the cap)."""


@dataclass
class BackendState:
    """One replica and what the gateway has in flight on it."""

    cfg: Backend
    inflight: int = 0
    down_until: float = -1.0
    failures: int = 0
    # set by the health checker (serve/health.py); defaults mean "no probe data": the choice is unchanged
    healthy: bool = True
    down_reason: str | None = None  # why the last probe marked it down (connection, HTTP status, wrong model)
    scraped_running: float | None = None
    scraped_waiting: float | None = None
    kv_cache_usage: float | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def has_room(self) -> bool:
        return self.inflight < self.cfg.max_inflight

    def is_down(self, now: float) -> bool:
        """Failed its last health check, or a call failed on it within DOWN_S."""
        return not self.healthy or self.down_until > now

    def load_key(self) -> tuple[float, float]:
        """(gateway in-flight + backend-reported waiting, KV-cache usage); scraped values count 0 when absent."""
        return (self.inflight + (self.scraped_waiting or 0.0), self.kv_cache_usage or 0.0)


@dataclass
class WorkflowState:
    arrival_s: float
    generated: int = 0
    stages: int = 0


class Workflows:
    """Recently seen workflows (LRU), so later stages know the workflow's start and tokens generated so far."""

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

    def pop(self, wid: str) -> WorkflowState | None:
        return self._d.pop(wid, None)


@dataclass
class Ticket:
    """The gateway's handle on a call (Call.ctx): where it went and whether the client is still there."""

    backend: BackendState | None = None
    cancelled: bool = False
    tried: set[str] = field(default_factory=set)
    on_dispatch: Callable[["Ticket"], None] | None = None
    settled: bool = False  # the call's life ended (completed, failed or cancelled) and everything it held is freed
    extra: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    """Admission control per model (sum of its backends' max_inflight) in front of one Policy."""

    def __init__(self, policy: Policy, models: Sequence[ModelInfo], backends: Sequence[Backend],
                 max_queue: int = 1000, max_queue_per_model: int | None = None) -> None:
        self.policy = policy
        policy.bind(list(models))
        self.models = [m.name for m in models]
        self.backends: dict[str, list[BackendState]] = {m: [] for m in self.models}
        for b in backends:
            if b.model not in self.backends:
                raise ValueError(f"backend {b.name!r} serves {b.model!r}, which is not a bound model")
            self.backends[b.model].append(BackendState(b))
        self.cap = {m: sum(b.cfg.max_inflight for b in self.backends[m]) for m in self.models}
        self.inflight = {m: 0 for m in self.models}
        self.max_queue = max_queue
        self.max_queue_per_model = max_queue if max_queue_per_model is None else max_queue_per_model
        self.waiting_total = 0
        self.workflows = Workflows()
        self._ids = itertools.count()
        self._placed: dict[int, BackendState] = {}  # call_id -> backend it runs on

    def next_id(self) -> int:
        return next(self._ids)

    def waiting(self, model: str) -> int:
        return self.policy.waiting(model)

    # ---- backpressure -------------------------------------------------------------------------------------
    def accepts(self, model: str) -> bool:
        """A new call can go to `model`: it has a free slot (so it runs at once whatever else waits), or room in
        both its own queue and the gateway's. A saturated model never closes the others."""
        if self.inflight[model] + self.waiting(model) < self.cap[model]:
            return True
        return self.waiting(model) < self.max_queue_per_model and self.waiting_total < self.max_queue

    def open_models(self, pinned: str | None = None) -> list[str]:
        """The models a new call may be routed to now (only `pinned`, when the client named one)."""
        return [m for m in ([pinned] if pinned is not None else self.models) if self.accepts(m)]

    def backlog_reason(self, pinned: str | None = None) -> str:
        models = [pinned] if pinned is not None else self.models
        per = ", ".join(f"{m}: {self.waiting(m)} waiting, {self.inflight[m]}/{self.cap[m]} running" for m in models)
        return (f"{per}; {self.waiting_total} waiting in all (limits: {self.max_queue_per_model} per model, "
                f"{self.max_queue} in all)")

    # ---- the body-facing protocol (same order of calls as sim.Simulator) ------------------------------------
    def submit(self, call: Call, now: float, prediction=None) -> str:
        """Route among the open models and enqueue (the policy), then dispatch what fits; QueueFull if none is open."""
        allowed = self.open_models(call.pinned_model)
        if not allowed:
            raise QueueFull(self.backlog_reason(call.pinned_model))
        model = self.policy.submit(call, now, prediction=prediction, allowed=allowed)
        self.waiting_total += 1
        self.dispatch(model, now)
        return model

    def dispatch(self, model: str, now: float) -> None:
        """Move calls from the policy's queue to the model's backends while it has room."""
        while self.inflight[model] < self.cap[model]:
            call = self.policy.next_call(model, now)
            if call is None:
                return
            self.waiting_total -= 1
            ticket = call.ctx if isinstance(call.ctx, Ticket) else None
            if ticket is not None and ticket.cancelled:  # the client left while queued
                self.policy.on_fail(call, now)
                continue
            be = self._pick_backend(model, ticket, now)
            be.inflight += 1
            self.inflight[model] += 1
            self._placed[call.call_id] = be
            if ticket is not None:
                ticket.backend = be
                ticket.tried.add(be.name)
                if ticket.on_dispatch is not None:
                    ticket.on_dispatch(ticket)

    def _pick_backend(self, model: str, ticket: Ticket | None, now: float) -> BackendState:
        tried = ticket.tried if ticket is not None else set()
        room = [b for b in self.backends[model] if b.has_room]
        return min(room, key=lambda b: (b.name in tried, b.is_down(now), *b.load_key()))

    def progress(self, call: Call, new_tokens: int, now: float) -> None:
        self.policy.on_progress(call, new_tokens, now)

    def complete(self, call: Call, now: float, new_tokens: int = 0) -> None:
        """The call finished: report the last tokens and completion, free its slot, dispatch the next."""
        try:
            if new_tokens:
                self.policy.on_progress(call, new_tokens, now)
            self.policy.on_complete(call, now)
            st = self.workflows.get(call.workflow_id, now)
            st.generated += call.tokens_seen
            st.stages += 1
        except BaseException:
            self.policy.monitor.remove(call)  # a policy that failed half-way must not keep the call's load
            raise
        finally:  # whatever the policy does, the slot is freed
            self._release(call, now)

    def fail(self, call: Call, now: float, backend_down: bool = False) -> None:
        """The call failed on its backend (or was cancelled after dispatch): free the slot, dispatch the next."""
        be = self._placed.get(call.call_id)
        if backend_down and be is not None:
            be.down_until = now + DOWN_S
            be.failures += 1
        try:
            self.policy.on_fail(call, now)
        except BaseException:
            self.policy.monitor.remove(call)
            raise
        finally:
            self._release(call, now)

    def abandon(self, call: Call, now: float, backend_down: bool = False) -> None:
        """The call's life ended without completing, wherever it was: dispatched (free the slot), waiting (take it
        out of the queue) or half-submitted (forget its predicted load). Safe to call more than once."""
        if call.call_id in self._placed:
            self.fail(call, now, backend_down=backend_down)
        elif self.policy.withdraw(call, now):
            self.waiting_total -= 1

    def _release(self, call: Call, now: float) -> None:
        model = call.model
        assert model is not None
        be = self._placed.pop(call.call_id, None)
        if be is None:
            return  # never dispatched, or released already: nothing to free
        be.inflight -= 1
        self.inflight[model] -= 1
        self.dispatch(model, now)

    def end_workflow(self, workflow_id: str) -> None:
        self.workflows.pop(workflow_id)
        self.policy.on_workflow_end(workflow_id)

    # ---- retries -------------------------------------------------------------------------------------------
    def retry_target(self, call: Call, now: float, other_models: bool = True) -> str | None:
        """Where a failed call goes next: the same model if it has an untried healthy backend, else (when the
        client let the policy choose) the other model with the highest confidence the policy recorded
        (ties: least busy); None if nothing is left."""
        ticket = call.ctx if isinstance(call.ctx, Ticket) else None
        tried = ticket.tried if ticket is not None else set()

        def usable(m: str) -> bool:
            return any(b.name not in tried and not b.is_down(now) for b in self.backends[m])

        if call.model is not None and usable(call.model):
            return call.model
        if not other_models:
            has_untried = call.model is not None and any(b.name not in tried for b in self.backends[call.model])
            return call.model if has_untried else None
        others = [m for m in self.models if m != call.model and usable(m)]
        if not others:
            others = [m for m in self.models if any(b.name not in tried for b in self.backends[m])]
        if not others:
            return None
        return max(others, key=lambda m: (call.confidences.get(m, 0.0),
                                          -(self.inflight[m] + self.waiting(m)) / max(self.cap[m], 1)))
