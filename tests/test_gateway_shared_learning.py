"""Two gateway replicas sharing state on a real Redis learn as one: feedback posted to either teaches the learner of
the replica that served the workflow and the other's, and is answered for the set (409 on the other replica, 404 on
both for a workflow neither served); completions served by either teach both running-mean length predictors."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Iterator

import httpx
import numpy as np

from chimera.predict.priors import RunningLength
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from test_gateway_learning import MODELS, chat, feedback, metric
from upstreams import Served, fake_upstream


def replica(tmp_path, upstream: str, redis_url: str, prefix: str, name: str) -> Served:
    return Served(build_gateway(gateway_config_from_dict({
        "trace_store": str(tmp_path / f"{name}.sqlite"), "health": {"enabled": False},
        "backends": [{"name": f"{m}-0", "model": m, "base_url": upstream + "/v1", "max_inflight": 4} for m in MODELS],
        "learning": {"online": True, "explore_start": 0.0, "explore_min": 0.0},
        "state": {"redis_url": redis_url, "key_prefix": prefix, "replica_id": name, "sync_interval_s": 0.05}})))


@contextlib.contextmanager
def two_replicas(tmp_path, redis_url: str, words: int) -> Iterator[tuple[Served, Served]]:
    """Replicas ra and rb of one set (a fresh key prefix) in front of one fake upstream, stopped at the end."""
    up = Served(fake_upstream("up", delay=0.0, words=words))
    prefix = f"t-gw-learn-{uuid.uuid4().hex[:6]}"
    started: list[Served] = [up]
    try:
        for name in ("ra", "rb"):
            started.append(replica(tmp_path, up.url, redis_url, prefix, name))
        yield started[1], started[2]
    finally:
        for s in reversed(started):
            s.stop()


def wait_for(what, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_feedback_to_one_replica_teaches_the_replica_that_served_it_and_is_answered_for_the_set(tmp_path,
                                                                                                 redis_server):
    with two_replicas(tmp_path, redis_server.url, words=3) as (a, b):
        la, lb = a.gw.policy.confidence, b.gw.policy.confidence
        chat(b.url, "wf-b")  # served by B alone
        chat(b.url, "wf-b")
        before = lb.b_.copy()
        r = feedback(a.url, {"workflow_id": "wf-b", "score": 0.0})
        assert r.status_code == 200 and r.json()["outcome"] == "learnt", r.text
        wait_for(lambda: la.counts_["learnt_calls"] == lb.counts_["learnt_calls"] == 2)
        assert not np.array_equal(lb.b_, before)  # B's statistics learnt from a score it never saw
        assert np.array_equal(la.b_, lb.b_) and np.array_equal(la.A_inv_, lb.A_inv_)  # and A holds the same
        r = feedback(b.url, {"workflow_id": "wf-b", "score": 1.0})
        assert r.status_code == 409 and r.json()["error"]["code"] == "feedback_repeated"
        for gw in (a, b):
            r = feedback(gw.url, {"workflow_id": "never-served", "score": 0.5})
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_workflow"
        # the score is stored once, by the replica it was posted to
        assert a.gw.trace.query("SELECT workflow_id, score FROM feedback") == [{"workflow_id": "wf-b", "score": 0.0}]
        assert b.gw.trace.query("SELECT workflow_id FROM feedback") == []
        text_a, text_b = httpx.get(a.url + "/metrics").text, httpx.get(b.url + "/metrics").text
        assert metric(text_a, 'chimera_shared_feedback_total{source="local"}') == 2
        assert metric(text_b, 'chimera_shared_feedback_total{source="peer"}') == 1
        assert metric(text_b, 'chimera_feedback_total{outcome="repeated"}') == 1


def test_completions_on_one_replica_teach_the_other_replicas_length_predictor(tmp_path, redis_server):
    with two_replicas(tmp_path, redis_server.url, words=7) as (a, b):
        la, lb = a.gw.policy.length, b.gw.policy.length
        assert isinstance(la, RunningLength) and isinstance(lb, RunningLength)
        chat(a.url, "wf-a")  # served by A alone
        chat(a.url, "wf-a")
        wait_for(lambda: sum(n for _, n in la.totals().values()) == 2)
        wait_for(lambda: lb.totals() == la.totals())  # B predicts from A's completions
        assert metric(httpx.get(b.url + "/metrics").text, "chimera_shared_lengths_keys") >= 1
