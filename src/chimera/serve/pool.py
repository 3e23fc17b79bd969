"""The gateway's backend pool around the admission core (chimera.sched.admission.Admission, which the simulator runs
too): backends and replica choice, backpressure, workflow state and retry targets.

Pure with respect to time: every method takes `now`, so a recorded simulator event sequence can be replayed through
it without HTTP (tests/test_replay.py). The call's life (serve/director.py) drives it from the event loop only; a
dispatched call's backend comes back as the result of the future it handed to `submit`, not through a callback.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

from chimera.backends.kinds import BackendKind
from chimera.sched.admission import Admission, Event
from chimera.sched.decision import Decision
from chimera.sched.policy import Policy
from chimera.sched.predictors import ConfidencePredictor, LengthPredictor
from chimera.sched.types import Call, ModelInfo, Prediction
from chimera.serve.config import Backend
from chimera.serve.refusals import policy_refusal
from chimera.serve.workflows import Workflows

DOWN_S = 5.0  # a backend that just failed is avoided for this long (still used when nothing else has room)


class QueueFull(Exception):
    """No model the call may go to can take it now (no free slot, its queue or the gateway's at the cap)."""


class PolicyNotLive(ValueError):
    """A policy the gateway cannot run (serve/refusals.py); the message names it and why."""


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
    # Several gateway replicas (serve/shared/): the calls the other replicas hold on it (their leases, at the last
    # sync); the cap in force (max_inflight, or this replica's share of it while Redis is gone); and `room`, the calls
    # this gateway may run on it (the cap less the others' calls, at most its fair share while others wait).
    remote_inflight: int = 0
    cap: int = field(init=False)
    room: int = field(init=False)
    kind: BackendKind = field(init=False)  # how the gateway talks to it (the config's `kind` and its parameters)

    def __post_init__(self) -> None:
        self.kind = self.cfg.make_kind()
        self.cap = self.room = self.cfg.max_inflight

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def has_room(self) -> bool:
        return self.inflight < self.room

    def is_down(self, now: float) -> bool:
        """Failed its last health check, or a call failed on it within DOWN_S."""
        return not self.healthy or self.down_until > now

    def load_key(self) -> tuple[float, float]:
        """(gateway in-flight, every replica's, + backend-reported waiting, KV-cache usage); scraped values count 0
        when absent."""
        return (self.inflight + self.remote_inflight + (self.scraped_waiting or 0.0), self.kv_cache_usage or 0.0)


@dataclass
class _Pending:
    """What the pool holds for a submitted call until it is dispatched: who waits for its backend, what to avoid."""

    waiter: asyncio.Future | None
    avoid: Collection[str]


class BackendPool:
    """The gateway's side of the admission core: backends (replica choice, health, in-flight per backend),
    backpressure limits, workflow state and retries. Admission itself — per-model capacity (the sum of its
    backends' max_inflight), queues, dispatch, progress, completion — is chimera.sched.admission.Admission, the
    same core the simulator runs."""

    def __init__(self, policy: Policy, models: Sequence[ModelInfo], backends: Sequence[Backend],
                 max_queue: int = 1000, max_queue_per_model: int | None = None,
                 record: Callable[[Event], None] | None = None, predictor_version: str | None = None) -> None:
        refusal = policy_refusal(policy)
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
        self.core: Admission[BackendState] = Admission(policy, models, place=self._place, start=self._start,
                                                       release=self._release, capacity=cap, record=record)
        self.cap = self.core.capacity
        self.inflight = self.core.inflight  # per model (the backends' own counts are on BackendState)
        self.max_queue = max_queue
        self.max_queue_per_model = max_queue if max_queue_per_model is None else max_queue_per_model
        self.workflows = Workflows()
        self._pending: dict[int, _Pending] = {}  # call_id -> its waiter and the backends to avoid, until dispatch
        self._ids = itertools.count()
        self.predictor_version = predictor_version  # names the policy's predictors (a reload changes both at once)

    @property
    def waiting_total(self) -> int:
        return self.core.waiting_total

    @property
    def all_backends(self) -> list[BackendState]:
        return [be for bes in self.backends.values() for be in bes]

    def next_id(self) -> int:
        return next(self._ids)

    def waiting(self, model: str) -> int:
        return self.policy.waiting(model)

    def holds_nothing(self) -> bool:
        """No call queued, running or awaiting dispatch (what a drain, and a leak check, wait for)."""
        return not (self.waiting_total or any(self.inflight.values()) or self._pending)

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

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: roughly the time to drain the queue at the current service rate."""
        return max(1, min(60, round(self.waiting_total / (sum(self.cap.values()) or 1))))

    def use_predictors(self, confidence: ConfidencePredictor | None, length: LengthPredictor | None,
                       version: str) -> None:
        """Route with these predictors from the next call on, under `version` (a reload, on the event loop: queued
        and running calls keep what they were decided with). ValueError (nothing changed) if a column is missing."""
        self.policy.use_predictors(confidence, length)  # the core's learners follow the policy's predictors
        self.predictor_version = version

    # ---- the body-facing protocol: the admission core's, with backpressure in front -------------------------
    def submit(self, call: Call, now: float, prediction: Prediction | None = None, *,
               waiter: asyncio.Future | None = None, avoid: Collection[str] = ()) -> str:
        """`admit`, returning only the model name."""
        return self.admit(call, now, prediction, waiter=waiter, avoid=avoid).model

    def admit(self, call: Call, now: float, prediction: Prediction | None = None, *,
              waiter: asyncio.Future | None = None, avoid: Collection[str] = ()) -> Decision:
        """Route among the open models and enqueue (the policy), then dispatch what fits; the policy's Decision, or
        QueueFull if no model is open. `waiter` gets the BackendState when the call is dispatched; `avoid` names
        backends it already failed on."""
        allowed = self.open_models(call.pinned_model)
        if not allowed:
            raise QueueFull(self.backlog_reason(call.pinned_model))
        every = call.pinned_model is None and len(allowed) == len(self.models)
        self._note_external(now)
        if self.policy.affinity:
            st = self.workflows.peek(call.workflow_id)
            if st is not None and st.last_model is not None and st.context_tokens > 0:
                call.cached_tokens = {st.last_model: min(st.context_tokens, call.prompt_tokens)}
        if waiter is not None or avoid:
            self._pending[call.call_id] = _Pending(waiter, avoid)
        try:
            return self.core.submit(call, now, prediction, None if every else allowed)
        except BaseException:
            self._pending.pop(call.call_id, None)
            raise

    def _note_external(self, now: float) -> None:
        """Other clients' calls on each model's live engines (scraped) into the policy's load monitor."""
        ext = self.policy.monitor.external
        for m, bes in self.backends.items():
            ext[m] = float(sum(b.external_calls for b in bes if not b.is_down(now)))

    def share(self, remote_inflight: Mapping[str, int], remote_load: Mapping[str, tuple[float, float]],
              divide: int | None, now: float) -> None:
        """Apply what the replica set shares (serve/shared/): the other replicas' calls per backend (their leases)
        and per model (calls queued + running, predicted tokens: the policy's load monitor); `divide` (Redis gone):
        each backend's cap is max_inflight // divide, at least 1, else max_inflight. A backend's room is its cap less
        the others' calls; while other replicas have calls waiting for the model, at most this replica's share of
        the cap in proportion to its calls (so a replica that holds the slots does not keep them from the others'
        queues). Each model's capacity becomes its backends' room; a model whose capacity grew dispatches."""
        mon = self.policy.monitor
        for m, bes in self.backends.items():
            calls, tokens = remote_load.get(m, (0.0, 0.0))
            mon.remote_calls[m], mon.remote_tokens[m] = calls, tokens
            for be in bes:
                be.remote_inflight = remote_inflight.get(be.name, 0)
                be.cap = be.cfg.max_inflight if divide is None else max(1, be.cfg.max_inflight // divide)
            others_wait = calls > sum(be.remote_inflight for be in bes)
            share = mon.calls[m] / (mon.calls[m] + calls) if others_wait else 1.0
            for be in bes:
                be.room = max(0, min(be.cap - be.remote_inflight, max(1, round(be.cap * share))))
            old = self.core.capacity[m]
            if math.isinf(old):  # a preemptive policy's engine ranks everything (not run by the gateway)
                continue
            self.core.capacity[m] = sum(be.room for be in bes)
            if self.core.capacity[m] > old:
                self.core.dispatch(m, now)

    def dispatch(self, model: str, now: float) -> None:
        """Move calls from the policy's queue to the model's backends while it has room."""
        self.core.dispatch(model, now)

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
        self.abandon(call, now, backend_down)

    def abandon(self, call: Call, now: float, backend_down: bool = False) -> None:
        """The call's life ended without completing, wherever it was (the core frees or withdraws it); with
        `backend_down`, the backend it ran on is avoided for DOWN_S. Safe to call more than once."""
        self._pending.pop(call.call_id, None)
        be = self.core.replica(call)
        if backend_down and be is not None:
            be.down_until = now + DOWN_S
            be.failures += 1
        self.core.abandon(call, now)

    def end_workflow(self, workflow_id: str, now: float = 0.0) -> None:
        self.workflows.pop(workflow_id)
        self.core.end_workflow(workflow_id, now)

    # ---- the core's hooks: replica choice, start, release ------------------------------------------------------
    def _place(self, model: str, call: Call, now: float) -> BackendState:
        """An untried, healthy, least-loaded backend with room; with workflow affinity, the one holding the
        workflow's context unless it is busier than the least-loaded by more than the policy's margin."""
        pending = self._pending.get(call.call_id)
        avoid = pending.avoid if pending is not None else ()
        # The core dispatches only while the model's capacity (its backends' room) exceeds its in-flight calls, so one
        # has room; should a count ever drift, every backend is a candidate (the global lease still bounds it).
        room = [b for b in self.backends[model] if b.has_room] or self.backends[model]
        best = min(room, key=lambda b: (b.name in avoid, b.is_down(now), *b.load_key()))
        if not self.policy.affinity or len(room) < 2:
            return best
        st = self.workflows.peek(call.workflow_id)
        if st is None or st.last_backend is None or st.last_model != model:
            return best
        ok = [b for b in room if (b.name in avoid, b.is_down(now)) == (best.name in avoid, best.is_down(now))]
        ok.sort(key=lambda b: b.load_key())
        cached = [st.context_tokens if b.name == st.last_backend else 0 for b in ok]
        return ok[self.policy.pick_replica([b.load_key()[0] for b in ok], cached)]

    def _start(self, call: Call, be: BackendState, now: float) -> None:
        be.inflight += 1
        pending = self._pending.pop(call.call_id, None)
        if pending is not None and pending.waiter is not None and not pending.waiter.done():
            pending.waiter.set_result(be)

    def _release(self, call: Call, be: BackendState, now: float) -> None:
        be.inflight -= 1

    # ---- retries -------------------------------------------------------------------------------------------
    def retry_target(self, call: Call, now: float, tried: Collection[str] = (),
                     other_models: bool = True) -> str | None:
        """Where a failed call goes next: the same model if it has an untried healthy backend, else (when the
        client let the policy choose) the other model with the highest confidence the policy recorded
        (ties: least busy); None if nothing is left."""

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
