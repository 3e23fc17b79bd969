"""Discrete-event simulator: workflow arrivals, the gateway's policy, and continuous-batching engines.

Deterministic for a seed. Time is virtual; the same policy object the live gateway uses makes every decision.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar


from chimera.perfmodel.batching import Engine, Seq
from chimera.sched.admission import Admission, Event
from chimera.sched.policy import Policy
from chimera.sched.types import Call
from chimera.sim.cluster import ModelRuntime
from chimera.sim.hosts import SharedHosts
from chimera.sim.metrics import WorkflowRecord, summarize
from chimera.workload.arrivals import SIM_STREAM, poisson_arrivals
from chimera.workload.plan import WorkflowPlan

_WF_START, _CALL, _ENGINE, _ANSWERED = 0, 1, 2, 3
T = TypeVar("T")


@dataclass
class Workflow:
    """A task being run: its plan, and what has happened to it so far."""

    wid: str
    plan: WorkflowPlan
    prompt: str
    arrival_s: float
    stage: int = 0
    queue_s: float = 0.0
    failed: str | None = None
    explored: int = 0  # calls the policy's exploration routed (a learning predictor's)

    def __post_init__(self) -> None:
        self.outputs: list[int] = []
        self.models: list[str] = []


class Simulator:
    """Run workflows through a policy and a set of engines; `run()` returns the summary dict."""

    def __init__(
        self,
        runtimes: Sequence[ModelRuntime],
        policy: Policy,
        workflows: Sequence[tuple[str, WorkflowPlan, str]],
        rate: float | None = None,
        agents: int | None = None,
        arrivals: Sequence[float] | None = None,
        seed: int = 0,
        tick_steps: int = 16,
        record: Callable[[Event], None] | None = None,
        engine_order: str = "priority",
        hold: float | None = None,
        free_context: bool = False,
    ) -> None:
        """`engine_order`: how a replica orders the calls waiting inside it, "priority" (the call's priority, as
        vLLM's priority scheduling does; the default) or "fcfs" (arrival at the engine, vLLM's default policy).
        `hold`: admit at most hold × the batch a replica can run at a typical context (ModelInfo.batch_limit, the
        smaller of max_num_seqs and its KV room) × replicas calls per model; the rest wait at the gateway, in the
        policy's order (default: the policy's max_inflight, max_num_seqs × replicas).
        `free_context` (a what-if bound): a call after its workflow's first prefills only its newest text, as if its
        workflow's earlier context were cached on every replica of every model; no placement can save more prefill."""
        if engine_order not in ("priority", "fcfs"):
            raise ValueError(f"engine_order must be 'priority' or 'fcfs', got {engine_order!r}")
        if hold is not None and hold <= 0:
            raise ValueError(f"hold must be > 0, got {hold}")
        self.engine_order = engine_order
        self.free_context = free_context
        if (rate is None) == (agents is None) and arrivals is None:
            raise ValueError("give exactly one of rate (open loop) or agents (closed loop)")
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 workflows/s, got {rate}")
        if agents is not None and agents < 1:
            raise ValueError(f"agents must be >= 1, got {agents}")
        self.runtimes = list(runtimes)
        self.policy = policy
        self.workflows = list(workflows)
        self.rate, self.agents, self.seed = rate, agents, seed
        self._arrivals = list(arrivals) if arrivals is not None else None
        key_fn = None
        if policy.preemptive:
            def key_fn(seq: Seq, generated: int, waited: int, now: float, _p=policy) -> float:
                return _p.engine_key(seq.call, generated, waited, now)
        self.engines: dict[str, list[Engine]] = {
            r.info.name: [Engine(f"{r.info.name}#{k}", r.perf, key_fn=key_fn, tick_steps=tick_steps,
                                 prefix_block_tokens=r.spec.kv_block_tokens if r.spec.prefix_caching else 0)
                          for k in range(r.spec.replicas)]
            for r in self.runtimes
        }
        self._model_of = {e.name: m for m, engs in self.engines.items() for e in engs}
        self.hosts = SharedHosts([(e, r.spec.host, r.spec.peer_busy_slowdown, r.spec.peer_busy_batch)
                                  for r in self.runtimes for e in self.engines[r.info.name]])
        self.overhead_s = {r.info.name: r.request_overhead_s for r in self.runtimes}
        # The one admission core (chimera.sched.admission); the simulator adds the engines and the virtual clock.
        capacity = None
        if hold is not None:
            capacity = {r.info.name: max(r.info.replicas, round(hold * max(1, r.info.batch_limit) * r.info.replicas))
                        for r in self.runtimes}
        # Its hooks reach the simulator through a weak proxy: bound methods would close a cycle (simulator -> core ->
        # hook -> simulator), and a finished run, with its records, plans and engines, would linger until a full
        # collection of the cyclic garbage collector (one lands in whatever runs next) instead of being freed at once.
        me = weakref.proxy(self)
        self.admission: Admission[Engine] = Admission(
            policy, [r.info for r in self.runtimes], place=lambda model, call, now: me._place(model, call, now),
            start=lambda call, eng, now: me._start(call, eng, now), record=record, capacity=capacity)
        # Workflow affinity: the policy asks where a call's context is cached (only when engines cache prefixes).
        self._affinity = policy.affinity and any(r.spec.prefix_caching for r in self.runtimes)
        self._workflow_of: dict[int, Workflow] = {}  # call_id -> its workflow, while the call is in the core
        self.sched_s = 0.0  # wall time spent inside the scheduler (the admission core and the policy)
        self._engine_s = 0.0  # wall time spent in the engines while the core dispatched (not the scheduler's)

    # ---- event plumbing ----------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def _refresh(self, eng: Engine) -> None:
        t = eng.next_event_time()
        if t != self._engine_time.get(eng.name):
            self._engine_time[eng.name] = t
            if t < math.inf:
                self._push(t, _ENGINE, eng)

    # ---- the run -------------------------------------------------------------------------------------------
    def run(self, progress: Callable[[int], None] | None = None) -> dict:
        wall0 = time.perf_counter()
        self._events: list = []
        self._seq = itertools.count()
        self._engine_time: dict[str, float] = {}
        self._call_ids = itertools.count()
        self._workflow_of = {}
        self.records: list[WorkflowRecord] = []
        self.per_model = {r.info.name: {"calls": 0, "tokens": 0} for r in self.runtimes}
        self._progress = progress
        self._next_wf = 0
        n = len(self.workflows)
        if self._arrivals is not None:
            for i, t in enumerate(self._arrivals[:n]):
                self._push(float(t), _WF_START, i)
            self._next_wf = n
        elif self.rate is not None:
            times = poisson_arrivals(self.rate, n, self.seed, SIM_STREAM)
            for i, t in enumerate(times):
                self._push(float(t), _WF_START, i)
            self._next_wf = n
        else:
            for _ in range(min(self.agents, n)):  # type: ignore[arg-type]
                self._push(0.0, _WF_START, self._next_wf)
                self._next_wf += 1

        events = self._events
        hosts = self.hosts if self.hosts else None  # engines sharing a host re-read their speed after every event
        while events:
            t, _, kind, payload = heapq.heappop(events)
            if kind == _ENGINE:
                eng: Engine = payload
                if self._engine_time.get(eng.name) != t:
                    continue  # superseded
                self._engine_time[eng.name] = math.inf
                for seq in eng.advance():
                    ovh = self.overhead_s[seq.call.model]
                    if ovh > 0:  # the answer reaches the gateway after the server's own overhead
                        self._push(t + ovh, _ANSWERED, seq)
                    else:
                        self._finish_call(seq, t)
                self._refresh(eng)
                model = self._model_of[eng.name]
                if self.admission.can_dispatch(model):  # an engine step alone frees no admission slot: rarely true
                    self._dispatch(model, t)
            elif kind == _ANSWERED:
                self._finish_call(payload, t)
            elif kind == _WF_START:
                i = payload
                wid, plan, prompt = self.workflows[i]
                wf = Workflow(wid=wid, plan=plan, prompt=prompt, arrival_s=t)
                self._issue(wf, t)
            else:
                self._issue(payload, t)
            if hosts is not None:
                hosts.update(t, self._refresh)

        per_engine = {e.name: {"preemptions": e.preemptions, "busy_s": round(e.busy_s, 3), "steps": e.steps,
                               **e.prefix_stats()}
                      for engs in self.engines.values() for e in engs}
        wall = time.perf_counter() - wall0
        calls = sum(r.calls for r in self.records)
        lat_sum = sum(r.latency_s for r in self.records)
        extra = {
            "simulated": True,
            "calls": calls,
            "calls_per_wall_s": calls / wall if wall > 0 else 0.0,
            "scheduler_s": self.sched_s,
            "scheduler_share_of_latency": (self.sched_s / lat_sum) if lat_sum > 0 else 0.0,
            "engines": per_engine,
            "promotions": sum(q.promotions for q in self.policy.queues.values()),
        }
        return summarize(self.policy.name, self.records, self.per_model, wall, extra)

    # ---- workflow steps --------------------------------------------------------------------------------------
    def _issue(self, wf: Workflow, now: float) -> None:
        """Send the workflow's next call to the gateway (the policy)."""
        plan = wf.plan
        call = Call(
            call_id=next(self._call_ids),
            workflow_id=wf.wid,
            kind=plan.kind,
            prompt=wf.prompt,
            stage=wf.stage,
            prompt_tokens=plan.prompt_tokens(wf.stage, wf.outputs),
            arrival_s=now,
            workflow_arrival_s=wf.arrival_s,
            generated_so_far=sum(wf.outputs),
        )
        self._workflow_of[call.call_id] = wf
        if self._affinity:  # the prompt tokens each model's best replica holds for this call now
            stream = plan.token_stream(wf.stage, wf.outputs, wf.wid, 0)
            call.cached_tokens = {m: max(e.cached_prompt_tokens(stream, call.prompt_tokens) for e in engs)
                                  for m, engs in self.engines.items()}
        decision = self._in_core(self.admission.submit, call, now)
        wf.explored += decision.explored

    def _in_core(self, step: Callable[..., T], *args: object) -> T:
        """Run one step of the admission core, adding its wall time less the engines' (a dispatch starts engine
        work through `_start`) to the scheduler's own cost."""
        t0, e0 = time.perf_counter(), self._engine_s
        out = step(*args)
        self.sched_s += time.perf_counter() - t0 - (self._engine_s - e0)
        return out

    # ---- the core's hooks: replica choice and start -----------------------------------------------------------
    def _place(self, model: str, call: Call, now: float) -> Engine:
        engines = self.engines[model]
        if len(engines) == 1:
            return engines[0]
        if not self._affinity:
            return min(engines, key=lambda e: e.n_running + e.n_waiting)
        wf = self._workflow_of[call.call_id]
        stream = wf.plan.token_stream(call.stage, wf.outputs, wf.wid, 0)
        loads = [e.n_running + e.n_waiting for e in engines]
        cached = [e.cached_prompt_tokens(stream, call.prompt_tokens) for e in engines]
        return engines[self.policy.pick_replica(loads, cached)]

    def _start(self, call: Call, eng: Engine, now: float) -> None:
        t0 = time.perf_counter()
        wf = self._workflow_of[call.call_id]
        out = wf.plan.output_tokens(call.stage, call.model)
        key = call.priority if self.engine_order == "priority" else now
        if self.free_context and call.stage > 0:  # nothing to look up: the context is taken as cached
            seq = Seq(call, call.prompt_tokens, out, key=key,
                      prefill_tokens=wf.plan.new_prompt_tokens(call.stage, wf.outputs))
        else:
            stream = None if eng.prefix_cache is None else wf.plan.token_stream(call.stage, wf.outputs, wf.wid, out)
            seq = Seq(call, call.prompt_tokens, out, key=key, prefix=stream)
        rejected = eng.add(seq, now)
        for seq in rejected:
            self._finish_call(seq, now)
        self._refresh(eng)
        self._engine_s += time.perf_counter() - t0

    def _dispatch(self, model: str, now: float) -> None:
        """Move calls from the gateway queue to the model's replicas while it has room."""
        self._in_core(self.admission.dispatch, model, now)

    def _finish_call(self, seq: Seq, now: float) -> None:
        call: Call = seq.call
        wf = self._workflow_of.pop(call.call_id)
        model = call.model
        assert model is not None
        started = seq.start_s if seq.start_s is not None else now
        wf.queue_s += started - call.arrival_s
        pm = self.per_model[model]
        pm["calls"] += 1
        wf.models.append(model)
        if seq.error:
            wf.failed = seq.error
            self._end(wf, now)
            self._in_core(self.admission.fail, call, now)
            return
        pm["tokens"] += seq.output_tokens
        wf.outputs.append(seq.output_tokens)
        stage = wf.stage
        wf.stage += 1
        if wf.stage < wf.plan.n_stages:
            self._push(now + wf.plan.tool_s[stage], _CALL, wf)
        else:
            self._end(wf, now)
        self._in_core(self.admission.complete, call, now, seq.output_tokens)  # frees the slot, dispatches the next

    def _end(self, wf: Workflow, now: float) -> None:
        score = 0.0 if wf.failed else wf.plan.score(wf.models)
        self.records.append(WorkflowRecord(
            workflow_id=wf.wid, task_id=wf.plan.task_id, kind=wf.plan.kind, arrival_s=wf.arrival_s, end_s=now,
            score=score, queue_s=wf.queue_s, calls=len(wf.models), models=wf.models, failed=wf.failed,
            explored=wf.explored,
        ))
        self.admission.end_workflow(wf.wid, now)
        if not wf.failed:  # the score reaches the learners when the workflow ends, as an agent's feedback would
            self._in_core(self.admission.feedback, wf.wid, score, now)
        if self._progress is not None:
            self._progress(1)
        if self.agents is not None and self._next_wf < len(self.workflows):
            self._push(now, _WF_START, self._next_wf)
            self._next_wf += 1
