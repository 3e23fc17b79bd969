"""The gateway's side of the admission core (chimera.sched.admission.Admission, which the simulator runs too):
backends, backpressure, workflow state and retries around it.

Pure with respect to time: every method takes `now`, so a recorded simulator event sequence can be replayed through
it without HTTP (tests/test_replay.py). The async side (serve/app.py) calls it from the event loop only.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from chimera.sched.admission import Admission, Event, live_refusal
from chimera.sched.policy import Policy
from chimera.sched.types import Call, ModelInfo, Prediction
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
    external_calls: float = 0.0  # running + waiting on the engine beyond the gateway's own in-flight, at the last scrape

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


@dataclass
class Ticket:
    """The gateway's handle on a call (Call.ctx): where it went and whether the client is still there."""

    backend: BackendState | None = None
    cancelled: bool = False
    tried: set[str] = field(default_factory=set)
    on_dispatch: Callable[["Ticket"], None] | None = None
    settled: bool = False  # the call's life ended (completed, failed or cancelled) and everything it held is freed
    extra: dict[str, Any] = field(default_factory=dict)


class PolicyNotLive(ValueError):
    """A policy the gateway cannot run (see chimera.sched.admission.live_refusal); the message names it and why."""


class Scheduler:
    """The gateway's side of the admission core: backends (replica choice, health, in-flight per backend),
    backpressure limits, workflow state and retries. Admission itself — per-model capacity (the sum of its
    backends' max_inflight), queues, dispatch, progress, completion — is chimera.sched.admission.Admission, the
    same core the simulator runs."""

    def __init__(self, policy: Policy, models: Sequence[ModelInfo], backends: Sequence[Backend],
                 max_queue: int = 1000, max_queue_per_model: int | None = None,
                 record: Callable[[Event], None] | None = None) -> None:
        refusal = live_refusal(policy)
        if refusal:
            raise PolicyNotLive(refusal)
        self.policy = policy
        self.models = [m.name for m in models]
        self.backends: dict[str, list[BackendState]] = {m: [] for m in self.models}
        for b in backends:
            if b.model not in self.backends:
                raise ValueError(f"backend {b.name!r} serves {b.model!r}, which is not a bound model")
            self.backends[b.model].append(BackendState(b))
        cap = {m: sum(b.cfg.max_inflight for b in self.backends[m]) for m in self.models}
        # The hooks are looked up per call, so a test can replace one on the instance.
        self.core: Admission[BackendState] = Admission(
            policy, models, place=lambda m, c, now: self._pick_backend(m, c, now),
            start=lambda c, be, now: self._start(c, be, now), release=lambda c, be, now: self._release(c, be, now),
            capacity=cap, record=record)
        self.cap = self.core.capacity
        self.inflight = self.core.inflight  # per model (the backends' own counts are on BackendState)
        self.max_queue = max_queue
        self.max_queue_per_model = max_queue if max_queue_per_model is None else max_queue_per_model
        self.workflows = Workflows()
        self._ids = itertools.count()

    @property
    def waiting_total(self) -> int:
        return self.core.waiting_total

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

    # ---- the body-facing protocol: the admission core's, with backpressure in front -------------------------
    def submit(self, call: Call, now: float, prediction: Prediction | None = None) -> str:
        """Route among the open models and enqueue (the policy), then dispatch what fits; QueueFull if none is open."""
        allowed = self.open_models(call.pinned_model)
        if not allowed:
            raise QueueFull(self.backlog_reason(call.pinned_model))
        every = call.pinned_model is None and len(allowed) == len(self.models)
        self._note_external(now)
        if self.policy.affinity:
            st = self.workflows.peek(call.workflow_id)
            if st is not None and st.last_model is not None and st.context_tokens > 0:
                call.cached_tokens = {st.last_model: min(st.context_tokens, call.prompt_tokens)}
        return self.core.submit(call, now, prediction, None if every else allowed).model

    def _note_external(self, now: float) -> None:
        """Other clients' calls on each model's live engines (scraped) into the policy's load monitor."""
        ext = self.policy.monitor.external
        for m, bes in self.backends.items():
            ext[m] = float(sum(b.external_calls for b in bes if not b.is_down(now)))

    def dispatch(self, model: str, now: float) -> None:
        """Move calls from the policy's queue to the model's backends while it has room."""
        self.core.dispatch(model, now)

    def _pick_backend(self, model: str, call: Call | None, now: float) -> BackendState:
        """The core's replica-choice hook: an untried, healthy, least-loaded backend with room."""
        ticket = getattr(call, "ctx", None)
        ticket = ticket if isinstance(ticket, Ticket) else None
        tried = ticket.tried if ticket is not None else set()
        room = [b for b in self.backends[model] if b.has_room]
        best = min(room, key=lambda b: (b.name in tried, b.is_down(now), *b.load_key()))
        if not self.policy.affinity or len(room) < 2 or call is None:
            return best
        st = self.workflows.peek(call.workflow_id)
        if st is None or st.last_backend is None or st.last_model != model:
            return best
        # Workflow affinity: among the backends as good as the best one (untried, healthy), the one holding the
        # workflow's context, unless its load exceeds the least-loaded one's by more than the policy's margin.
        ok = [b for b in room if (b.name in tried, b.is_down(now)) == (best.name in tried, best.is_down(now))]
        ok.sort(key=lambda b: b.load_key())
        cached = [st.context_tokens if b.name == st.last_backend else 0 for b in ok]
        return ok[self.policy.pick_replica([b.load_key()[0] for b in ok], cached)]

    def _start(self, call: Call, be: BackendState, now: float) -> None:
        be.inflight += 1
        ticket = call.ctx if isinstance(call.ctx, Ticket) else None
        if ticket is not None:
            ticket.backend = be
            ticket.tried.add(be.name)
            if ticket.on_dispatch is not None:
                ticket.on_dispatch(ticket)

    def _release(self, call: Call, be: BackendState, now: float) -> None:
        be.inflight -= 1

    def progress(self, call: Call, new_tokens: int, now: float) -> None:
        self.core.progress(call, new_tokens, now)

    def complete(self, call: Call, now: float, new_tokens: int = 0) -> None:
        """The call finished: its tokens and completion reach the policy (and the online learners), its slot is
        freed and the next call dispatched; the workflow's stage count and tokens so far grow, and where its context
        now is (this call's model and backend, its prompt + output tokens) is remembered."""
        be = self.core.replica(call)
        self.core.complete(call, now, new_tokens)
        st = self.workflows.get(call.workflow_id, now)
        st.generated += call.tokens_seen
        st.stages += 1
        if be is not None:
            st.last_model, st.last_backend = call.model, be.name
            st.context_tokens = call.prompt_tokens + call.tokens_seen

    def fail(self, call: Call, now: float, backend_down: bool = False) -> None:
        """The call failed on its backend (or was cancelled after dispatch): free the slot, dispatch the next."""
        be = self.core.replica(call)
        if backend_down and be is not None:
            be.down_until = now + DOWN_S
            be.failures += 1
        self.core.fail(call, now)

    def abandon(self, call: Call, now: float, backend_down: bool = False) -> None:
        """The call's life ended without completing, wherever it was: dispatched (free the slot), waiting (take it
        out of the queue) or half-submitted (forget its predicted load). Safe to call more than once."""
        if self.core.running(call):
            self.fail(call, now, backend_down=backend_down)
        else:
            self.core.withdraw(call, now)

    def end_workflow(self, workflow_id: str, now: float = 0.0) -> None:
        self.workflows.pop(workflow_id)
        self.core.end_workflow(workflow_id, now)
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
