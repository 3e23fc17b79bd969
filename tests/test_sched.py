"""Scheduling decisions: queue order, aging, routing under congestion, baselines' rules."""

from __future__ import annotations

import numpy as np
import pytest

from chimera.sched.queue import WaitQueue
from chimera.sched.registry import POLICIES, make_policy
from chimera.sched.types import Call, ModelInfo

MODELS = [
    ModelInfo("small", tokens_per_s=4000.0, tpot_s=0.010, max_inflight=2, size_rank=0),
    ModelInfo("large", tokens_per_s=500.0, tpot_s=0.040, max_inflight=2, size_rank=1),
]


class FixedConfidence:
    def __init__(self, table):  # kind -> [conf small, conf large]
        self.models_ = ["small", "large"]
        self.table = table

    def predict_confidence(self, calls):
        return np.array([self.table[c.kind] for c in calls], dtype=float)


class PromptLength:
    """Predicts remaining tokens from a number in the prompt (so tests control it)."""

    models_ = ["small", "large"]

    def predict_lengths(self, calls):
        v = np.array([[float(c.prompt)] * 2 for c in calls])
        return v / 2, v


_ids = iter(range(10**6))


def call(wid, t, kind="math", prompt="100", stage=0):
    return Call(call_id=next(_ids), workflow_id=wid, kind=kind, prompt=prompt, stage=stage, prompt_tokens=10,
                arrival_s=t, workflow_arrival_s=t)


def test_wait_queue_orders_by_key_then_arrival():
    q = WaitQueue()
    for i, k in enumerate([5.0, 1.0, 3.0, 1.0]):
        c = call(f"w{i}", float(i))
        q.push(c, k)
    got = [q.pop(0.0)[0].workflow_id for _ in range(4)]
    assert got == ["w1", "w3", "w2", "w0"]
    assert q.pop(0.0) is None


def test_wait_queue_promotes_starving_call():
    q = WaitQueue(starve_s=10.0)
    old = call("old", 0.0)
    old.enqueued_s = 0.0
    q.push(old, 1e9)  # would otherwise never be served before the short ones
    for i in range(3):
        c = call(f"short{i}", 1.0)
        c.enqueued_s = 1.0
        q.push(c, 1.0)
    assert q.pop(5.0)[0].workflow_id == "short0"
    popped, promoted = q.pop(10.0)
    assert popped.workflow_id == "old" and promoted
    assert q.promotions == 1


def make(name, **kw):
    p = make_policy(name, confidence=FixedConfidence({"math": [0.4, 0.9], "easy": [0.9, 0.92]}),
                    length=PromptLength(), **kw)
    p.bind(MODELS)
    return p


def test_chimera_routes_to_confident_model_when_idle():
    p = make("chimera", lam=0.05)
    assert p.submit(call("a", 0.0, kind="math"), 0.0) == "large"
    # where both models are about as good, the faster one wins
    assert p.submit(call("b", 0.0, kind="easy"), 0.0) == "small"
    assert p.submit(call("b", 0.0, kind="easy"), 0.0) == "small"


def test_chimera_congestion_shifts_load_to_small_model():
    p = make("chimera", lam=0.05)
    routed = [p.submit(call(f"w{i}", 0.0, prompt="200"), 0.0) for i in range(40)]
    assert routed[:5] == ["large"] * 5
    assert "small" in routed[5:]  # in-flight predicted tokens on the large model make it expensive
    no_load = make("chimera-no-load", lam=0.05)
    assert {no_load.submit(call(f"w{i}", 0.0, prompt="200"), 0.0) for i in range(40)} == {"large"}


def test_chimera_stjf_serves_shortest_remaining_workflow_first():
    p = make("chimera-no-route", lam=0.0, starve_s=None)
    for wid, rem in [("long", "900"), ("short", "50"), ("mid", "300")]:
        c = call(wid, 0.0, prompt=rem)
        c.pinned_model = "small"
        p.submit(c, 0.0)
    order = [p.next_call("small", 1.0).workflow_id for _ in range(3)]
    assert order == ["short", "mid", "long"]
    fcfs = make("chimera-no-stjf", starve_s=None)
    for wid, rem in [("long", "900"), ("short", "50")]:
        c = call(wid, 0.0, prompt=rem)
        c.pinned_model = "small"
        fcfs.submit(c, 0.0)
    assert fcfs.next_call("small", 1.0).workflow_id == "long"


def test_aging_promotes_workflow_for_quantum():
    p = make("chimera", lam=0.0, starve_s=5.0, quantum_s=20.0)
    long = call("long", 0.0, prompt="5000")
    long.pinned_model = "small"
    p.submit(long, 0.0)
    short = call("short", 6.0, prompt="10")
    short.pinned_model = "small"
    p.submit(short, 6.0)
    assert p.next_call("small", 6.0).workflow_id == "long"  # waited 6 s > S=5
    p.on_complete(long, 7.0)
    # the next stage of the promoted workflow stays ahead within Q
    nxt = call("long", 8.0, prompt="5000", stage=1)
    nxt.pinned_model = "small"
    p.submit(nxt, 8.0)
    assert nxt.priority < short.priority
    assert p.next_call("small", 8.0).workflow_id == "long"


def test_monitor_tracks_inflight_predicted_tokens():
    p = make("chimera", lam=0.0)
    c = call("a", 0.0, prompt="400")
    model = p.submit(c, 0.0)
    assert p.monitor.pred_tokens[model] == pytest.approx(200.0)
    p.on_progress(c, 150, 1.0)
    assert p.monitor.pred_tokens[model] == pytest.approx(50.0)
    p.on_progress(c, 500, 2.0)  # more than predicted: never negative
    assert p.monitor.pred_tokens[model] == 0.0
    p.on_complete(c, 3.0)
    assert p.monitor.calls[model] == 0


def test_vllm_round_robin_and_fcfs():
    p = make("vllm")
    assert [p.submit(call(f"w{i}", float(i)), float(i)) for i in range(4)] == ["small", "large", "small", "large"]
    assert p.next_call("small", 9.0).workflow_id == "w0"


def test_routellm_threshold_calibrated_to_share():
    p = make_policy("routellm", confidence=FixedConfidence({"math": [0.4, 0.9], "easy": [0.9, 0.5]}),
                    length=PromptLength(), strong_share=0.5)
    p.bind(MODELS)
    train = [call(f"t{i}", 0.0, kind="math" if i % 2 else "easy") for i in range(100)]
    p.prepare(train)
    routed = [p.submit(c, 0.0) for c in train]
    assert routed.count("large") == 50
    assert all(m == "large" for c, m in zip(train, routed) if c.kind == "math")


def test_ltr_starvation_boost_and_mlfq_demotion():
    ltr = make("ltr")
    c = call("x", 0.0, prompt="1000")
    ltr.submit(c, 0.0)
    assert ltr.engine_key(c, 0, 0, 0.0) == pytest.approx(500.0)
    assert ltr.engine_key(c, 0, 200, 0.0) < 0
    mlfq = make("mlfq")
    m = call("y", 0.0)
    mlfq.submit(m, 0.0)
    k0 = mlfq.engine_key(m, 0, 0, 0.0)
    k_late = mlfq.engine_key(m, 1000, 0, 0.0)
    assert k_late > k0 + 1  # demoted by several levels after long service
    assert mlfq.engine_key(m, 1000, 10**6, 0.0) < 0  # starving: promoted


def test_unknown_policy_and_pinned_model_errors():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    p = make("vllm")
    c = call("z", 0.0)
    c.pinned_model = "gpt-9"
    with pytest.raises(KeyError, match="gpt-9"):
        p.submit(c, 0.0)
    assert set(POLICIES) >= {"vllm", "least-loaded", "routellm", "sjf", "ltr", "mlfq", "chimera", "chimera-oracle",
                             "chimera-no-route", "chimera-no-stjf", "chimera-no-load"}


def test_short_final_stage_does_not_claim_the_large_model():
    """The confidence term is weighted by the call's share of the workflow's output (its weight in the score)."""
    p = make("chimera", lam=0.05)
    final = call("wf", 0.0, prompt="20", stage=1)
    final.generated_so_far = 1000
    assert p.submit(final, 0.0) == "small"
    first = call("wf2", 0.0, prompt="20", stage=0)
    assert p.submit(first, 0.0) == "large"
