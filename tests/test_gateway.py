"""The live gateway against tiny fake OpenAI upstreams on 127.0.0.1 (its decisions against the simulator's: test_replay.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from chimera.sched.registry import make_policy
from chimera.sched.types import Call
from chimera.serve import build_gateway, load_gateway_config
from chimera.serve.config import GatewayConfigError, gateway_config_from_dict
from chimera.util.threaded import free_port
from upstreams import Served, fake_upstream

CLIENT_KEY, ADMIN_KEY = "client-key", "admin-key"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Model 'small' on a failing and a healthy replica, model 'big' on one; the gateway in front."""
    bad, small, big = fake_upstream("bad", fail=True), fake_upstream("up-small"), fake_upstream("up-big")
    ups = [Served(a) for a in (bad, small, big)]
    cfg = gateway_config_from_dict({
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "policy": {"name": "chimera", "lam": 0.02},
        "trace_store": str(tmp_path_factory.mktemp("gw") / "traces.sqlite"),
        "backends": [
            {"name": "small-bad", "model": "small", "base_url": ups[0].url + "/v1", "max_inflight": 4},
            {"name": "small-ok", "model": "small", "base_url": ups[1].url + "/v1", "max_inflight": 4},
            {"name": "big-0", "model": "big", "base_url": ups[2].url + "/v1", "max_inflight": 4, "priority": True},
        ],
    })
    app = build_gateway(cfg)
    gw = Served(app)
    yield {"url": gw.url, "gw": app.state.gateway, "apps": {"bad": bad, "small": small, "big": big}}
    gw.stop()
    for u in ups:
        u.stop()


def _client(cluster, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster["url"] + "/v1", api_key=key, max_retries=0, timeout=20)


MSG = [{"role": "user", "content": "What is 2 + 2?"}]


# ---- HTTP behaviour ------------------------------------------------------------------------------------------
def test_failing_replica_is_retried_elsewhere(cluster):
    """The first 'small' call lands on the failing replica (config order) and must succeed on the other one."""
    out = _client(cluster).chat.completions.create(model="small", messages=MSG,
                                                   extra_body={"chimera": {"workflow_id": "wf-retry"}})
    assert out.model == "small" and out.choices[0].message.content.startswith("w0")
    rows = cluster["gw"].trace.query("SELECT backend, status FROM calls WHERE workflow_id='wf-retry' ORDER BY rowid")
    assert [(r["backend"], r["status"]) for r in rows] == [("small-bad", "error"), ("small-ok", "ok")]
    assert len(cluster["apps"]["bad"].state.hits) >= 1


def test_chimera_routes_and_traces_predictions(cluster):
    out = _client(cluster).chat.completions.create(model="chimera", messages=MSG,
                                                   extra_headers={"X-Chimera-Workflow-Id": "wf-route",
                                                                  "X-Chimera-Stage": "0"})
    assert out.model in ("small", "big")
    assert out.usage.completion_tokens == 5
    [row] = cluster["gw"].trace.query("SELECT * FROM calls WHERE workflow_id='wf-route'")
    assert row["model"] == out.model and row["status"] == "ok" and row["stage"] == 0
    assert set(json.loads(row["confidences"])) == {"small", "big"}
    assert row["pred_call_tokens"] > 0 and row["pred_remaining_tokens"] >= row["pred_call_tokens"]
    assert row["policy"] == "chimera" and row["completion_tokens"] == 5
    assert row["queued_at"] <= row["dispatched_at"] <= row["ended_at"]
    assert row["kind"] == "chat" and row["prompt"] == next(m["content"] for m in MSG if m["role"] == "user")
    # the routing Decision reached the trace: no exploring predictor, so a sure choice and no terms logged
    assert (row["propensity"], row["explored"], row["epsilon"], row["terms"]) == (1.0, 0, 0.0, None)


def test_pinned_model_is_honoured_and_priority_forwarded_only_where_enabled(cluster):
    big_hits, small_hits = cluster["apps"]["big"].state.hits, cluster["apps"]["small"].state.hits
    nb, ns = len(big_hits), len(small_hits)
    c = _client(cluster)
    assert c.chat.completions.create(model="big", messages=MSG).model == "big"
    assert len(big_hits) == nb + 1 and isinstance(big_hits[-1]["priority"], int)
    assert big_hits[-1]["model"] == "big" and "chimera" not in big_hits[-1]
    assert c.chat.completions.create(model="small", messages=MSG).model == "small"
    assert len(small_hits) == ns + 1 and "priority" not in small_hits[-1]


def test_streaming_names_the_chosen_model(cluster):
    stream = _client(cluster).chat.completions.create(model="chimera", messages=MSG, stream=True,
                                                      extra_body={"chimera": {"workflow_id": "wf-stream"}})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "w0 w1 w2 w3 w4 "
    assert {ch.model for ch in chunks} <= {"small", "big"} and len({ch.model for ch in chunks}) == 1
    [row] = cluster["gw"].trace.query("SELECT * FROM calls WHERE workflow_id='wf-stream'")
    assert row["status"] == "ok" and row["completion_tokens"] == 5 and row["first_token_at"] is not None


def test_workflow_stages_accumulate(cluster):
    c = _client(cluster)
    for _ in range(2):
        c.chat.completions.create(model="chimera", messages=MSG, extra_body={"chimera": {"workflow_id": "wf-two"}})
    rows = cluster["gw"].trace.query("SELECT stage FROM calls WHERE workflow_id='wf-two' ORDER BY rowid")
    assert [r["stage"] for r in rows] == [0, 1]


def test_errors_are_openai_shaped(cluster):
    with pytest.raises(openai.AuthenticationError):
        _client(cluster, key="wrong").chat.completions.create(model="chimera", messages=MSG)
    with pytest.raises(openai.NotFoundError):
        _client(cluster).chat.completions.create(model="no-such-model", messages=MSG)
    h = {"Authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}
    url = cluster["url"] + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"messages": MSG}, headers=h)
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "chimera"}, headers=h)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "chimera", "messages": [{"role": "user", "content": "x" * 1_100_000}]},
                   headers=h)
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "code"}
    assert httpx.post(url, json={"model": "chimera", "messages": MSG}).status_code == 401


def test_models_feedback_metrics_health(cluster):
    c = _client(cluster)
    assert {m.id for m in c.models.list()} == {"small", "big", "chimera"}
    h = {"Authorization": f"Bearer {CLIENT_KEY}"}
    r = httpx.post(cluster["url"] + "/v1/chimera/feedback", json={"workflow_id": "wf-route", "score": 0.75},
                   headers=h)
    assert r.status_code == 200
    assert httpx.post(cluster["url"] + "/v1/chimera/feedback", json={"workflow_id": "x", "score": 2},
                      headers=h).status_code == 400
    rows = cluster["gw"].trace.query("SELECT * FROM feedback WHERE workflow_id='wf-route'")
    assert [r["score"] for r in rows] == [0.75]
    assert httpx.get(cluster["url"] + "/metrics", headers=h).status_code == 401
    m = httpx.get(cluster["url"] + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert m.status_code == 200
    for name in ("chimera_queue_depth{model=\"big\"}", "chimera_inflight_predicted_tokens{model=\"small\"}",
                 "chimera_decisions_total{model=", "chimera_request_latency_seconds_bucket",
                 "chimera_queue_wait_seconds_count", "chimera_retries_total{model=\"small\"} 1.0"):
        assert name in m.text, name
    assert httpx.get(cluster["url"] + "/health").json()["status"] == "ok"


def test_burst_respects_max_inflight_and_leaks_nothing(tmp_path):
    apps = [fake_upstream("u0", delay=0.05), fake_upstream("u1", delay=0.05)]
    ups = [Served(a) for a in apps]
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"),
        "backends": [{"name": "a0", "model": "a", "base_url": ups[0].url + "/v1", "max_inflight": 2},
                     {"name": "b0", "model": "b", "base_url": ups[1].url + "/v1", "max_inflight": 3}],
    })
    app = build_gateway(cfg)
    gw = Served(app)
    try:
        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as c:
                return await asyncio.gather(*[
                    c.post(gw.url + "/v1/chat/completions",
                           json={"model": ["chimera", "a", "b"][i % 3], "messages": MSG, "stream": i % 2 == 0})
                    for i in range(60)])
        rs = asyncio.run(fire())
        assert [r.status_code for r in rs] == [200] * 60
        assert apps[0].state.live["max"] <= 2 and apps[1].state.live["max"] <= 3
        s = app.state.gateway.pool
        assert s.inflight == {"a": 0, "b": 0} and s.waiting_total == 0
        rows = app.state.gateway.trace.query("SELECT status, count(*) AS n FROM calls GROUP BY status")
        assert rows == [{"status": "ok", "n": 60}]
    finally:
        gw.stop()
        for u in ups:
            u.stop()


def test_queue_overflow_is_429_with_retry_after(tmp_path):
    up = Served(fake_upstream("slow", delay=1.0))
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"), "limits": {"max_queue": 1},
        "backends": [{"name": "s0", "model": "slow", "base_url": up.url + "/v1", "max_inflight": 1}],
    })
    gw = Served(build_gateway(cfg))
    try:
        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as c:
                async def one(delay: float) -> httpx.Response:
                    await asyncio.sleep(delay)
                    return await c.post(gw.url + "/v1/chat/completions", json={"model": "chimera", "messages": MSG})
                return await asyncio.gather(one(0), one(0.2), one(0.4))
        rs = asyncio.run(fire())
        assert [r.status_code for r in rs] == [200, 200, 429]
        assert int(rs[2].headers["Retry-After"]) >= 1 and rs[2].json()["error"]["code"] == "queue_full"
    finally:
        gw.stop()
        up.stop()


def test_client_disconnect_frees_the_slot(tmp_path):
    """A streaming client that leaves mid-answer must not keep its backend slot."""
    up = Served(fake_upstream("slow", delay=0.0, words=200))
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"),
        "backends": [{"name": "s0", "model": "slow", "base_url": up.url + "/v1", "max_inflight": 1}],
    })
    app = build_gateway(cfg)
    gw = Served(app)
    try:
        with httpx.Client(timeout=10) as c:
            with c.stream("POST", gw.url + "/v1/chat/completions",
                          json={"model": "slow", "messages": MSG, "stream": True}) as r:
                next(r.iter_lines())
        deadline = time.time() + 5
        while app.state.gateway.pool.inflight["slow"] and time.time() < deadline:
            time.sleep(0.02)
        assert app.state.gateway.pool.inflight["slow"] == 0
        rows = app.state.gateway.trace.query("SELECT status FROM calls")
        assert [r["status"] for r in rows] == ["cancelled"]
    finally:
        gw.stop()
        up.stop()


def test_all_backends_down_gives_502_not_a_hang(tmp_path):
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"),
        "backends": [{"name": "dead", "model": "m", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                      "max_inflight": 2}],
    })
    gw = Served(build_gateway(cfg))
    try:
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "chimera", "messages": MSG}, timeout=20)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    finally:
        gw.stop()


def test_legacy_completions(cluster):
    out = _client(cluster).completions.create(model="chimera", prompt="2 + 2 =")
    assert out.model in ("small", "big") and out.choices[0].text == " four"


def test_reroute_to_another_model_only_when_the_policy_chooses(tmp_path):
    """'a' (the policy's favourite: largest by config order) is down: a 'chimera' call ends on 'b'; a call pinned
    to 'a' is not moved to another model and gets 502."""
    up = Served(fake_upstream("up-b"))
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"),
        "backends": [{"name": "b0", "model": "b", "base_url": up.url + "/v1", "max_inflight": 2},
                     {"name": "a0", "model": "a", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                      "max_inflight": 2}],
    })
    app = build_gateway(cfg)
    gw = Served(app)
    try:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20)
        assert c.chat.completions.create(model="chimera", messages=MSG).model == "b"
        rows = app.state.gateway.trace.query("SELECT model, backend, status FROM calls ORDER BY rowid")
        assert [(r["model"], r["status"]) for r in rows] == [("a", "error"), ("b", "ok")]
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="a", messages=MSG)
        assert e.value.status_code == 502
    finally:
        gw.stop()
        up.stop()


def test_midstream_failure_ends_with_an_sse_error(tmp_path):
    up = Served(fake_upstream("flaky", drop_after=2))
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"),
        "backends": [{"name": "f0", "model": "flaky", "base_url": up.url + "/v1", "max_inflight": 2}],
    })
    app = build_gateway(cfg)
    gw = Served(app)
    try:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=20,
                          json={"model": "flaky", "messages": MSG, "stream": True}) as r:
            data = [ln[5:].strip() for ln in r.iter_lines() if ln.startswith("data:")]
        assert data[-1] == "[DONE]"
        events = [json.loads(d) for d in data[:-1]]
        assert [e["model"] for e in events[:2]] == ["flaky", "flaky"]
        assert "error" in events[-1] and events[-1]["error"]["type"] == "server_error"
        [row] = app.state.gateway.trace.query("SELECT status, completion_tokens FROM calls")
        assert row == {"status": "error", "completion_tokens": 2}
        assert app.state.gateway.pool.inflight["flaky"] == 0
    finally:
        gw.stop()
        up.stop()


def test_non_streaming_client_that_leaves_is_cancelled(tmp_path):
    up = Served(fake_upstream("slow", delay=3.0))
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"),
        "backends": [{"name": "s0", "model": "slow", "base_url": up.url + "/v1", "max_inflight": 1}],
    })
    app = build_gateway(cfg)
    gw = Served(app)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/chat/completions", json={"model": "slow", "messages": MSG}, timeout=0.5)
        deadline = time.time() + 2
        while app.state.gateway.pool.inflight["slow"] and time.time() < deadline:
            time.sleep(0.02)
        assert app.state.gateway.pool.inflight["slow"] == 0
        [row] = app.state.gateway.trace.query("SELECT status FROM calls")
        assert row["status"] == "cancelled"
    finally:
        gw.stop()
        up.stop()


def test_shutdown_drains_in_flight_calls(tmp_path):
    up = Served(fake_upstream("slow", delay=1.0))
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"),
        "backends": [{"name": "s0", "model": "slow", "base_url": up.url + "/v1", "max_inflight": 1}],
    })
    gw = Served(build_gateway(cfg))
    got: list[httpx.Response] = []
    t = threading.Thread(target=lambda: got.append(httpx.post(
        gw.url + "/v1/chat/completions", json={"model": "slow", "messages": MSG}, timeout=20)))
    try:
        t.start()
        time.sleep(0.3)
    finally:
        gw.stop()  # while the call is still on the backend
        t.join(20)
        up.stop()
    assert got and got[0].status_code == 200 and got[0].json()["model"] == "slow"


# ---- config --------------------------------------------------------------------------------------------------
def test_config_errors_name_the_key(tmp_path):
    p = tmp_path / "gw.yaml"
    p.write_text("backends:\n  - {name: a, model: m, base_url: 'http://x', max_inflight: many}\nlisten: {port: 1}\n"
                 "polcy: {}\n")
    with pytest.raises(GatewayConfigError) as e:
        load_gateway_config(p)
    assert "backends.0.max_inflight" in str(e.value) and "polcy" in str(e.value)
    p.write_text("backends:\n  - {name: a, model: m, base_url: 'http://x', max_inflight: 2, profile: qwen2.5-7b@a6000}\n"
                 "policy: {name: chimera, lam: 0.1, starve_s: 5}\n")
    cfg = load_gateway_config(p)
    assert cfg.policy.params == {"starve_s": 5} and cfg.listen.port == 8000 and cfg.limits.max_queue == 1000


def test_the_gateway_reads_the_length_forest_at_the_configured_statistic(tmp_path, synthetic_predictors):
    """Mean by default, as the simulator and `chimera tune` read it; a tuned `length_stat:` block is honoured."""
    raw = {"trace_store": str(tmp_path / "t.sqlite"), "predictors": str(synthetic_predictors),
           "backends": [{"name": "a", "model": "qwen2.5-1.5b", "base_url": "http://x/v1"},
                        {"name": "b", "model": "qwen2.5-14b", "base_url": "http://x/v1"}]}
    readings = {}
    for stat in (None, "median", "mean"):
        cfg = gateway_config_from_dict(raw if stat is None else {**raw, "length_stat": stat})
        gw = build_gateway(cfg).state.gateway
        call = Call(call_id=0, workflow_id="w", kind="math", prompt="What is 17*23?", stage=0, prompt_tokens=9,
                    arrival_s=0.0, workflow_arrival_s=0.0)
        readings[stat] = (gw.pool.policy.length.quantile, gw.pool.policy.length.predict_lengths([call])[1])
        gw.predict_pool.shutdown()
        gw.trace.close()
    assert readings[None][0] == readings["mean"][0] == "mean" and readings["median"][0] is None
    assert (readings[None][1] == readings["mean"][1]).all() and (readings["median"][1] != readings["mean"][1]).any()
    with pytest.raises(GatewayConfigError, match="length_stat"):
        gateway_config_from_dict({**raw, "length_stat": "p90"})
    no_forest = {k: v for k, v in raw.items() if k != "predictors"}
    with pytest.raises(GatewayConfigError, match="length_stat.*predictors"):
        gateway_config_from_dict({**no_forest, "length_stat": "mean"})
    assert gateway_config_from_dict(no_forest).length_stat == "mean"  # unset: fine without predictors


def test_trained_predictors_are_mapped_by_workload_model(tmp_path, synthetic_predictors):
    raw = {"trace_store": str(tmp_path / "t.sqlite"), "predictors": str(synthetic_predictors),
           "backends": [{"name": "a", "model": "small", "base_url": "http://x/v1", "workload_model": "qwen2.5-1.5b"},
                        {"name": "b", "model": "large", "base_url": "http://x/v1"}]}
    with pytest.raises(GatewayConfigError, match="workload_model"):
        build_gateway(gateway_config_from_dict(raw))
    raw["backends"][1]["workload_model"] = "qwen2.5-14b"
    gw = build_gateway(gateway_config_from_dict(raw)).state.gateway
    call = Call(call_id=0, workflow_id="w", kind="math", prompt="What is 17*23?", stage=0, prompt_tokens=9,
                arrival_s=0.0, workflow_arrival_s=0.0)
    assert gw.pool.submit(call, 0.0) in ("small", "large")  # computed inside submit
    assert set(call.confidences) == {"small", "large"} and call.pred_call_tokens > 0
    # The gateway's path: the Prediction computed on the prediction thread is passed in as a value.
    again = Call(call_id=1, workflow_id="w2", kind="math", prompt="What is 17*23?", stage=0, prompt_tokens=9,
                 arrival_s=0.0, workflow_arrival_s=0.0)
    prediction = asyncio.run(gw.director._predict(again))
    assert prediction is not None
    gw.pool.submit(again, 0.0, prediction)
    assert again.confidences == call.confidences and again.pred_call_tokens == call.pred_call_tokens
    gw.predict_pool.shutdown()
    gw.trace.close()
