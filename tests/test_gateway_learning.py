"""The gateway learning from its own traffic: online learning configured, feedback answered by what it did (learnt
once, repeated, unknown, late, invalid) and counted, and the learner's confidence moving with the scores."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from chimera.serve import build_gateway
from chimera.serve.config import GatewayConfigError, gateway_config_from_dict
from upstreams import fake_upstream, gateway_over

MSG = [{"role": "user", "content": "Prove that the square root of two is irrational."}]
JSON = {"content-type": "application/json"}
MODELS = ("small", "big")


def gateway(tmp_path, **cfg):
    """One fast fake upstream serving both models behind a gateway (no health probes); yields (url, Gateway)."""
    return gateway_over([fake_upstream("up", delay=0.0, words=3)], lambda urls: {
        "trace_store": str(tmp_path / "t.sqlite"), "health": {"enabled": False},
        "backends": [{"name": f"{m}-0", "model": m, "base_url": urls[0] + "/v1", "max_inflight": 4} for m in MODELS],
        **cfg})


def chat(url: str, workflow_id: str, messages=MSG) -> httpx.Response:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "chimera", "messages": messages,
                                                         "chimera": {"workflow_id": workflow_id}}, timeout=10)
    assert r.status_code == 200, r.text
    return r


def feedback(url: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/v1/chimera/feedback", content=content, headers=JSON, timeout=10)


def metric(text: str, name: str) -> float | None:
    """The value of the sample `name` (with its labels, as Prometheus writes them) on a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---- configuration ---------------------------------------------------------------------------------------------
BACKENDS = [{"name": "a", "model": "m", "base_url": "http://x/v1"}]


def test_learning_config_is_checked_by_the_online_learner():
    cfg = gateway_config_from_dict({"backends": BACKENDS, "learning": {"online": True, "explore_start": 0.3}})
    assert cfg.learning.online and cfg.learning.params == {"explore_start": 0.3}
    assert not gateway_config_from_dict({"backends": BACKENDS}).learning.online  # absent: as before
    for learning, says in [({"online": True, "explor": 0.3}, "'explor'"),
                           ({"online": True, "explore_start": 2}, "explore_start"),
                           ({"explore_start": 0.3}, "online: true"),
                           ({"online": True, "warm": "router"}, "predictors"),
                           ({"online": True, "warm": "priors"}, "labelled tasks")]:
        with pytest.raises(GatewayConfigError, match="learning") as e:
            gateway_config_from_dict({"backends": BACKENDS, "learning": learning})
        assert says in str(e.value), (learning, str(e.value))


def test_online_learning_warm_starts_from_the_router_or_model_size(tmp_path, synthetic_predictors):
    raw = {"trace_store": str(tmp_path / "t.sqlite"), "learning": {"online": True},
           "backends": [{"name": "a", "model": "qwen2.5-1.5b", "base_url": "http://x/v1"},
                        {"name": "b", "model": "qwen2.5-14b", "base_url": "http://x/v1"}]}
    cold = build_gateway(gateway_config_from_dict(raw)).state.gateway
    warm = build_gateway(gateway_config_from_dict({**raw, "predictors": str(synthetic_predictors)})).state.gateway
    try:
        assert type(cold.policy.confidence).__name__ == "LinearBandit"
        assert type(cold.policy.confidence.prior).__name__ == "SizePriorConfidence"
        assert type(warm.policy.confidence.prior).__name__ == "RouterConfidence"
        assert cold.pool.core.reward_learners == [cold.policy.confidence]
        assert warm.predict_pool is not None  # the router behind the learner runs on the prediction thread
    finally:
        for gw in (cold, warm):
            if gw.predict_pool is not None:
                gw.predict_pool.shutdown()
            gw.trace.close()


# ---- feedback ----------------------------------------------------------------------------------------------------
def test_feedback_is_learnt_once_and_every_outcome_is_answered_and_counted(tmp_path):
    with gateway(tmp_path, learning={"online": True, "max_age_s": 1.0}) as (url, gw):
        chat(url, "wf-a")
        r = feedback(url, {"workflow_id": "wf-a", "score": 1.0})
        assert r.status_code == 200 and r.json() == {"ok": True, "workflow_id": "wf-a", "score": 1.0,
                                                     "outcome": "learnt"}
        r = feedback(url, {"workflow_id": "wf-a", "score": 0.0})  # a second score: refused, not learnt
        assert r.status_code == 409 and r.json()["error"]["code"] == "feedback_repeated"
        assert "wf-a" in r.json()["error"]["message"]
        r = feedback(url, {"response_id": "c1", "score": 0.0})  # the same workflow named by its answer's id
        assert r.status_code == 409 and r.json()["error"]["code"] == "feedback_repeated"
        r = feedback(url, {"workflow_id": "never-seen", "score": 0.5})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_workflow"
        for raw in (b'{"workflow_id":"wf-a","score":NaN}', b'{"workflow_id":"wf-a","score":1e400}',
                    b'{"workflow_id":"wf-a","score":1.5}'):
            assert feedback(url, raw).status_code == 400
        chat(url, "wf-late")
        time.sleep(1.2)  # longer than the learner keeps a decision
        r = feedback(url, {"workflow_id": "wf-late", "score": 1.0})
        assert r.status_code == 410 and r.json()["error"]["code"] == "feedback_late"
        assert feedback(url, {"workflow_id": "wf-late", "score": 1.0}).status_code == 409  # refused once is enough

        assert gw.trace.query("SELECT workflow_id, score FROM feedback") == [{"workflow_id": "wf-a", "score": 1.0}]
        text = httpx.get(url + "/metrics").text
        for outcome, n in (("learnt", 1), ("repeated", 3), ("unknown", 1), ("invalid", 3), ("late", 1)):
            assert metric(text, f'chimera_feedback_total{{outcome="{outcome}"}}') == n, outcome
        learner = gw.policy.confidence.stats()
        assert learner["learnt"] == 1 and learner["decided"] == 2
        assert metric(text, "chimera_learner_learnt") == 1 and metric(text, "chimera_learner_decided") == 2
        assert metric(text, "chimera_learner_pending") == learner["pending"]
        assert 0 <= metric(text, "chimera_learner_explored_share") <= 1
        assert metric(text, 'chimera_rejected_total{endpoint="/v1/chimera/feedback",reason="repeated"}') == 3


def test_without_a_learner_a_score_is_stored_once(tmp_path):
    with gateway(tmp_path) as (url, gw):
        r = feedback(url, {"workflow_id": "wf-x", "score": 0.25})
        assert r.status_code == 200 and r.json()["outcome"] == "ignored"
        r = feedback(url, {"workflow_id": "wf-x", "score": 0.75})
        assert r.status_code == 409 and r.json()["error"]["code"] == "feedback_repeated"
        assert gw.trace.query("SELECT workflow_id, score FROM feedback") == [{"workflow_id": "wf-x", "score": 0.25}]
        text = httpx.get(url + "/metrics").text
        assert metric(text, 'chimera_feedback_total{outcome="ignored"}') == 1
        assert metric(text, 'chimera_feedback_total{outcome="repeated"}') == 1
        assert "chimera_learner_decided" not in text  # no learner, no learner gauges


def test_the_learners_confidence_moves_with_the_scores(tmp_path):
    """Score every workflow of one prompt 0: the confidence of each model it ran on falls, the others' stay."""
    with gateway(tmp_path, learning={"online": True, "explore_start": 0.5, "seed": 3}) as (url, gw):
        first = None
        for i in range(12):
            chat(url, f"wf-{i}")
            [row] = gw.trace.query("SELECT model, confidences FROM calls WHERE workflow_id = ?", (f"wf-{i}",))
            first = first or json.loads(row["confidences"])
            assert feedback(url, {"workflow_id": f"wf-{i}", "score": 0.0}).json()["outcome"] == "learnt"
        chat(url, "wf-last")
        [last] = gw.trace.query("SELECT confidences FROM calls WHERE workflow_id = 'wf-last'")
        last = json.loads(last["confidences"])
        ran = {r["model"] for r in gw.trace.query("SELECT model FROM calls WHERE workflow_id != 'wf-last'")}
        assert ran, "no call ran"
        for m in MODELS:
            if m in ran:
                assert last[m] < first[m] - 0.05, (m, first, last)
            else:
                assert last[m] == pytest.approx(first[m]), (m, first, last)
