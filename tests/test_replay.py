"""One admission core, two bodies: a simulator run's recorded events (submits with their predictions, completions,
failures, workflow ends) replayed through the gateway's Scheduler give the same decisions and dispatches, for every
registered policy — no monkey-patching: both bodies run chimera.sched.admission.Admission, which records its events
as values. Preemptive policies are refused by the gateway with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from chimera.perfmodel.profiles import cluster_from_dict
from chimera.predict.priors import RunningLength
from chimera.sched.admission import (Admission, Completed, Dispatched, Failed, Progressed, Scored, Submitted, Withdrawn,
                                     WorkflowEnded)
from chimera.sched.registry import POLICIES, make_policy, policy_entry
from chimera.sched.types import Call, ModelInfo
from chimera.serve.config import Backend
from chimera.serve.pool import BackendPool as Scheduler, PolicyNotLive
from chimera.sim.experiment import choose_predictors, prepare, train_calls
from chimera.sim.simulator import Simulator
from chimera.workload.synthetic import generate


@pytest.fixture(scope="module")
def prep():
    cl = cluster_from_dict({"models": [{"profile": "qwen2.5-1.5b@a6000", "name": "small", "max_num_seqs": 2},
                                       {"profile": "qwen2.5-7b@a6000", "name": "big", "max_num_seqs": 2}]})
    return prepare(generate(80, seed=3), cl, seed=3)


def simulate(prep, name: str):
    """One simulated run of policy `name`, its admission events recorded; (policy, events)."""
    conf, length, _ = choose_predictors(prep, policy_entry(name).predictions)
    policy = make_policy(name, confidence=conf, length=length)
    events: list = []
    sim = Simulator(prep.runtimes, policy, prep.workflows(40, 0), rate=4.0, seed=1, record=events.append)
    sim.admission.prepare(train_calls(prep))
    sim.run()
    return policy, events


def gateway_scheduler(prep, policy, events: list | None = None) -> Scheduler:
    infos = [r.info for r in prep.runtimes]
    backends = [Backend(name=f"{i.name}-0", model=i.name, base_url="http://unused", max_inflight=i.max_inflight)
                for i in infos]
    return Scheduler(policy, infos, backends, max_queue=10**9, record=None if events is None else events.append)


def replay(events: list, sched: Scheduler) -> None:
    """Feed the simulator's inputs (not its outputs: Dispatched events) to the gateway's side."""
    calls: dict[int, Call] = {}
    for ev in events:
        if isinstance(ev, Submitted):
            call = calls[ev.call["call_id"]] = Call(**ev.call)
            sched.submit(call, ev.now, ev.prediction)
        elif isinstance(ev, Progressed):
            sched.progress(calls[ev.call_id], ev.tokens, ev.now)
        elif isinstance(ev, Completed):
            sched.complete(calls[ev.call_id], ev.now, ev.tokens)
        elif isinstance(ev, Failed):
            sched.fail(calls[ev.call_id], ev.now)
        elif isinstance(ev, Withdrawn):
            sched.abandon(calls[ev.call_id], ev.now)
        elif isinstance(ev, WorkflowEnded):
            sched.end_workflow(ev.workflow_id, ev.now)
        elif isinstance(ev, Scored):
            sched.core.feedback(ev.workflow_id, ev.score, ev.now)


def comparable(events: list) -> list:
    """Events with predictions as plain tuples (arrays do not compare with ==)."""
    out = []
    for ev in events:
        if isinstance(ev, Submitted) and ev.prediction is not None:
            ev = ev._replace(prediction=tuple(tuple(np.asarray(a).tolist()) for a in ev.prediction))
        out.append(ev)
    return out


@pytest.mark.parametrize("name", POLICIES)
def test_gateway_replays_the_simulators_decisions(prep, name):
    sim_policy, events = simulate(prep, name)
    submits = [e for e in events if isinstance(e, Submitted)]
    dispatches = [e for e in events if isinstance(e, Dispatched)]
    assert len(submits) > 60 and len(dispatches) == len(submits)
    assert sum(isinstance(e, Completed) for e in events) == len(submits)

    fresh = make_policy(name)
    if fresh.preemptive:  # the gateway cannot re-rank running sequences: refused, with the reason
        with pytest.raises(PolicyNotLive, match=f"policy '{name}' needs in-engine preemption"):
            gateway_scheduler(prep, fresh)
        return
    params = {}
    missing = fresh.needs_calibration()
    if missing:  # calibrated on training calls in the simulator; the gateway is given the value
        with pytest.raises(PolicyNotLive, match=f"policy '{name}' calibrates '{missing}'"):
            gateway_scheduler(prep, fresh)
        params[missing] = getattr(sim_policy, missing)
    # No predictors on the gateway's side: the predictions come in as values, from the record.
    gw_events: list = []
    replay(events, gateway_scheduler(prep, make_policy(name, **params), gw_events))
    assert comparable(gw_events) == comparable(events)
    if name == "chimera":  # the run is not trivial: queues formed, and the policy used both models
        sub_at = {e.call["call_id"]: e.now for e in submits}
        assert any(d.now > sub_at[d.call_id] for d in dispatches)
        assert {e.decision.model for e in submits} == {"small", "big"}


def test_running_lengths_learn_through_the_core_in_both_bodies(prep):
    """Online learning is the core's hook (OnlineLearner.learn), not a body's special case."""
    learner = RunningLength(prep.names)
    policy = make_policy("chimera", confidence=prep.router, length=learner)
    Simulator(prep.runtimes, policy, prep.workflows(10, 0), rate=4.0, seed=1).run()
    assert sum(learner._n.values()) > 10  # every completed call was observed

    live = RunningLength(["small", "big"])
    sched = gateway_scheduler(prep, make_policy("chimera", confidence=prep.router, length=live))
    call = Call(call_id=0, workflow_id="w", kind="math", prompt="p", stage=0, prompt_tokens=5, arrival_s=0.0,
                workflow_arrival_s=0.0, pinned_model="big")
    sched.submit(call, 0.0)
    sched.progress(call, 30, 0.5)
    sched.complete(call, 1.0, 12)
    c, _ = live.predict_lengths([call])
    assert c[0][1] == 42.0


MODELS = [ModelInfo("a", tokens_per_s=1000.0, tpot_s=0.01, max_inflight=1),
          ModelInfo("b", tokens_per_s=1000.0, tpot_s=0.01, max_inflight=1)]


class Constant:
    models_ = ["a", "b"]

    def predict_confidence(self, calls):
        return np.full((len(calls), 2), 0.5)

    def predict_lengths(self, calls):
        v = np.full((len(calls), 2), 100.0)
        return v, v


def test_progress_reaches_the_policy_when_the_call_ends():
    """One progress granularity in both bodies: streamed tokens are held by the core until the call ends."""
    started = []
    policy = make_policy("chimera", confidence=Constant(), length=Constant())
    core = Admission(policy, MODELS, place=lambda m, c, now: m, start=lambda c, r, now: started.append(c.call_id))
    call = Call(call_id=1, workflow_id="w", kind="k", prompt="", stage=0, prompt_tokens=0, arrival_s=0.0,
                workflow_arrival_s=0.0, pinned_model="a")
    d = core.submit(call, 0.0)
    assert d.model == "a" and d.pred_call_tokens == 100.0 and started == [1]
    core.progress(call, 60, 0.1)
    assert policy.monitor.pred_tokens["a"] == 100.0 and call.tokens_seen == 0
    core.complete(call, 0.2, 5)
    assert call.tokens_seen == 65 and policy.monitor.pred_tokens["a"] == 0.0 and core.inflight["a"] == 0


def test_core_dispatches_while_a_model_has_room_and_frees_on_every_end():
    released = []
    policy = make_policy("vllm")
    core = Admission(policy, MODELS, place=lambda m, c, now: f"{m}#0",
                     release=lambda c, r, now: released.append((c.call_id, r)))
    calls = [Call(call_id=i, workflow_id=f"w{i}", kind="k", prompt="", stage=0, prompt_tokens=0, arrival_s=float(i),
                  workflow_arrival_s=0.0, pinned_model="a") for i in range(3)]
    for c in calls:
        core.submit(c, c.arrival_s)
    assert core.inflight["a"] == 1 and core.waiting("a") == 2 and core.waiting_total == 2
    assert core.replica(calls[0]) == "a#0" and core.replica(calls[1]) is None
    core.abandon(calls[2], 3.0)  # waiting: withdrawn
    assert core.waiting_total == 1
    core.fail(calls[0], 4.0)  # frees the slot: the next waiting call starts
    assert released == [(0, "a#0")] and core.running(calls[1]) and core.waiting_total == 0
    core.abandon(calls[1], 5.0)
    core.abandon(calls[1], 5.0)  # safe twice
    assert core.inflight["a"] == 0 and released == [(0, "a#0"), (1, "a#0")]
    assert policy.monitor.calls == {"a": 0, "b": 0}


def test_a_failing_place_hook_puts_the_call_back_in_its_queue():
    """If the body cannot place a call it took from the queue, the call waits again: withdrawable, counted, its
    predicted load still the monitor's until it is withdrawn (nothing lost, nothing leaked)."""
    policy = make_policy("vllm")
    boom = [True]

    def place(m, c, now):
        if boom[0]:
            raise RuntimeError("no replica")
        return f"{m}#0"

    core = Admission(policy, MODELS, place=place)
    call = Call(call_id=7, workflow_id="w", kind="k", prompt="", stage=0, prompt_tokens=0, arrival_s=0.0,
                workflow_arrival_s=0.0, pinned_model="a")
    with pytest.raises(RuntimeError, match="no replica"):
        core.submit(call, 0.0)
    assert core.waiting("a") == 1 and core.waiting_total == 1 and core.inflight["a"] == 0
    boom[0] = False
    assert core.dispatch("a", 1.0) == 1 and core.running(call) and core.waiting_total == 0
    core.abandon(call, 2.0)
    assert core.inflight["a"] == 0 and policy.monitor.calls == {"a": 0, "b": 0}
    boom[0] = True
    again = Call(call_id=8, workflow_id="w2", kind="k", prompt="", stage=0, prompt_tokens=0, arrival_s=0.0,
                 workflow_arrival_s=0.0, pinned_model="a")
    with pytest.raises(RuntimeError):
        core.submit(again, 3.0)
    assert core.withdraw(again, 4.0) and core.waiting_total == 0 and policy.monitor.calls == {"a": 0, "b": 0}


def test_gateway_refuses_what_it_cannot_run_by_capability():
    from chimera.serve.config import GatewayConfigError, gateway_config_from_dict

    backends = [{"name": "a", "model": "m", "base_url": "http://x"}]
    with pytest.raises(GatewayConfigError, match="policy 'routellm' calibrates 'threshold' on training calls"):
        gateway_config_from_dict({"backends": backends, "policy": {"name": "routellm"}})
    assert gateway_config_from_dict({"backends": backends, "policy": {"name": "routellm", "threshold": 0.7}})
    for name in ("ltr", "mlfq"):
        with pytest.raises(PolicyNotLive, match=f"policy '{name}' needs in-engine preemption"):
            Scheduler(make_policy(name), MODELS, [Backend(name="x", model="a", base_url="http://x"),
                                                  Backend(name="y", model="b", base_url="http://y")])


def test_a_new_policy_runs_in_both_bodies_with_one_registration_line(prep):
    """A toy policy (one class, one registration line) is simulated and replayed through the gateway unchanged."""
    from chimera.sched.plugin import POLICY_REGISTRY, register_policy
    from chimera.sched.policy import Policy

    @register_policy("biggest-first")
    class BiggestFirst(Policy):
        """The largest allowed model; FCFS."""

        def choose(self, call, now, conf, call_tok, rem_tok, allowed):
            ranks = np.array([m.size_rank if ok else -1 for m, ok in zip(self.models, allowed)])
            return int(np.argmax(ranks))

    try:
        _, events = simulate(prep, "biggest-first")
        gw_events: list = []
        replay(events, gateway_scheduler(prep, make_policy("biggest-first"), gw_events))
        assert comparable(gw_events) == comparable(events)
        assert {e.decision.model for e in events if isinstance(e, Submitted)} == {"big"}
    finally:
        POLICY_REGISTRY.unregister("biggest-first")
