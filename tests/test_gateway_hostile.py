"""Hostile input and faults never cost the gateway (F1–F7 and the rest): each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from chimera.sched.types import Call
from chimera.serve import app as app_module
from chimera.serve import director as director_module
from chimera.serve import relay as relay_module
from chimera.serve.edge import KeyRing
from chimera.predict.priors import TRACKED_STAGES, RunningLength
from upstreams import fake_upstream, gateway_over

MSG = [{"role": "user", "content": "What is 2+2?"}]
JSON = {"content-type": "application/json"}


def gateway(tmp_path, backends: list[dict], **cfg):
    """Fake upstreams (one per backend, `delay` and `words` from the backend dict) behind a gateway."""
    apps = [fake_upstream(b["name"], delay=b.pop("delay", 0.01), words=b.pop("words", 5)) for b in backends]

    def config(urls: list[str]) -> dict:
        for b, u in zip(backends, urls):
            b.setdefault("base_url", u + "/v1")
        return {"trace_store": str(tmp_path / "t.sqlite"), "backends": backends, "health": {"enabled": False}, **cfg}

    return gateway_over(apps, config)


def chat(url: str, body: dict | bytes | None = None, headers: dict | None = None, **kw) -> httpx.Response:
    body = body if body is not None else {"model": "chimera", "messages": MSG}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/v1/chat/completions", content=content, headers={**JSON, **(headers or {})},
                      timeout=10, **kw)


def assert_nothing_held(url: str, gw) -> None:
    """No slot, queue entry, predicted load or waiting count left behind, in the scheduler and on /health."""
    s = gw.pool
    assert s.inflight == {m: 0 for m in s.models} and s.waiting_total == 0
    assert all(len(q) == 0 for q in gw.policy.queues.values())
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in gw.policy.monitor.pred_tokens.values())
    assert all(v == 0 for v in gw.policy.monitor.calls.values())
    assert s.core.n_running() == 0 and s.holds_nothing()
    h = httpx.get(url + "/health", timeout=2).json()
    assert h["waiting"] == 0 and h["active"] == 0 and set(h["inflight"].values()) == {0}


ONE = [{"name": "m0", "model": "m", "max_inflight": 2}]


# ---- F1: the stage value ---------------------------------------------------------------------------------------
def test_f1_stage_out_of_range_is_400_naming_the_field_and_costs_nothing(tmp_path):
    with gateway(tmp_path, [dict(b) for b in ONE]) as (url, gw):
        for headers, body, field in [
            ({"x-chimera-stage": "-10000000"}, None, "x-chimera-stage"),
            ({"x-chimera-stage": "99999999999999999999"}, None, "x-chimera-stage"),
            ({}, {"model": "chimera", "messages": MSG, "chimera": {"stage": -1000000}}, "chimera.stage"),
            ({}, {"model": "chimera", "messages": MSG, "chimera": {"stage": 1000000}}, "chimera.stage"),
            ({}, {"model": "chimera", "messages": MSG, "chimera": {"stage": "3"}}, "chimera.stage"),
        ]:
            t0 = time.perf_counter()
            r = chat(url, body, headers)
            assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
            assert time.perf_counter() - t0 < 1.0
        assert chat(url, headers={"x-chimera-stage": "10000", "x-chimera-kind": "k"}).status_code == 200
        assert chat(url, headers={"x-chimera-stage": "0", "x-chimera-kind": "k"}).status_code == 200
        assert_nothing_held(url, gw)


def test_f1_running_length_work_does_not_grow_with_the_stage_number(monkeypatch):
    rl = RunningLength(["a", "b"])
    rl.observe("k", 10_000, "a", 50)
    rl.observe("k", 0, "a", 10)
    calls = {"n": 0}
    mean = rl._mean

    def counted(*a):
        calls["n"] += 1
        return mean(*a)

    monkeypatch.setattr(rl, "_mean", counted)
    c = Call(call_id=0, workflow_id="w", kind="k", prompt="", stage=0, prompt_tokens=1, arrival_s=0,
             workflow_arrival_s=0)
    _, rem = rl.predict_lengths([c])
    assert calls["n"] <= 2 * (TRACKED_STAGES + 1)  # it was 2 × 10,002 before
    assert rem[0, 0] == pytest.approx(10 + 50 + 256 * (TRACKED_STAGES - 2))  # the gap stages count the default
    for k in range(2000):  # a client inventing kinds cannot grow the prior without bound
        rl.observe(f"kind-{k}", 1, "a", 1)
    assert len(rl._max_stage) <= 1025


# ---- F2 / F6: bodies that cannot be forwarded --------------------------------------------------------------------
HOSTILE_BODIES = [
    (b'{"model":"chimera","messages":[{"role":"user","content":"hi"}],"temperature":NaN}', "temperature"),
    (b'{"model":"chimera","messages":[{"role":"user","content":"hi"}],"temperature":Infinity}', "temperature"),
    (b'{"model":"chimera","messages":[{"role":"user","content":"hi"}],"top_p":-Infinity}', "top_p"),
    (b'{"model":"chimera","messages":[{"role":"user","content":"hi"}],"temperature":1e400}', "temperature"),
    (b'{"model":"chimera","messages":[{"role":"user","content":"\\ud800"}]}', "messages[0].content"),
    (b'{"model":"chimera","messages":[{"role":"user","content":"hi"}],"user":"\\udfff x"}', "user"),
    (b'{"model":"chimera","messages":[{"role":"user","content":"hi"}],"\\ud800":1}', "body"),
    (b'{"model":"chimera","messages":[{"role":"user","content":"hi"}],"seed":' + b"9" * 5000 + b"}", "seed"),
    (b"[" * 100_000, "nested"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested"),
]


def test_f2_unforwardable_bodies_are_400_naming_the_field_and_leak_no_slot(tmp_path, caplog):
    with gateway(tmp_path, [dict(b) for b in ONE]) as (url, gw):
        with caplog.at_level(logging.ERROR):
            for _ in range(3):  # more than max_inflight: each used to leak a slot for good
                for raw, field in HOSTILE_BODIES:
                    r = chat(url, raw)
                    assert r.status_code == 400, (raw[:80], r.text)
                    err = r.json()["error"]
                    assert field in err["message"] and set(err) == {"message", "type", "code"}
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # refused, not crashed
        assert chat(url).status_code == 200
        assert_nothing_held(url, gw)


def test_f6_feedback_refuses_deep_nesting_huge_numbers_and_nan(tmp_path):
    with gateway(tmp_path, [dict(b) for b in ONE]) as (url, gw):
        for raw in (b"[" * 100_000, b'{"workflow_id":"w","score":' + b"1" * 5000 + b"}",
                    b'{"workflow_id":"w","score":NaN}', b'{"workflow_id":"\\ud800","score":1}',
                    b'{"workflow_id":"w\\u0007","score":1}', b'{"workflow_id":"w","score":1,"extra":1}'):
            r = httpx.post(url + "/v1/chimera/feedback", content=raw, headers=JSON)
            assert r.status_code == 400, (raw[:60], r.text)
        ok = httpx.post(url + "/v1/chimera/feedback", json={"workflow_id": "w", "score": 1.0})
        assert ok.status_code == 200
        assert gw.trace.query("SELECT score FROM feedback") == [{"score": 1.0}]


def test_content_type_must_be_json(tmp_path):
    with gateway(tmp_path, [dict(b) for b in ONE]) as (url, gw):
        body = json.dumps({"model": "chimera", "messages": MSG}).encode()
        for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"content-type": ct} if ct else {}
            r = httpx.post(url + "/v1/chat/completions", content=body, headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", ct
        r = httpx.post(url + "/v1/chat/completions", content=body,
                       headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200


# ---- F3: tracing survives ----------------------------------------------------------------------------------------
def test_f3_hostile_hints_are_refused_and_tracing_goes_on(tmp_path):
    with gateway(tmp_path, [dict(b) for b in ONE]) as (url, gw):
        r = chat(url, b'{"model":"chimera","messages":[{"role":"user","content":"hi"}],"chimera":{"kind":"\\ud800"}}')
        assert r.status_code == 400 and "chimera.kind" in r.json()["error"]["message"]
        r = chat(url, headers={"x-chimera-workflow-id": "w" * 300})
        assert r.status_code == 400 and "x-chimera-workflow-id" in r.json()["error"]["message"]
        gw.trace.log_call({"workflow_id": "\ud800", "stage": 10**30, "kind": "\udfff"})  # past the edge anyway
        assert chat(url, headers={"x-chimera-workflow-id": "after"}).status_code == 200
        rows = gw.trace.query("SELECT status FROM calls WHERE workflow_id = 'after'")
        assert rows == [{"status": "ok"}]
        health = httpx.get(url + "/health").json()["trace"]
        assert health["alive"] and health["dropped"] == 0 and health["written"] >= 2


# ---- F4: secure defaults -----------------------------------------------------------------------------------------
def test_f4_metrics_need_a_key_whenever_api_keys_are_set(tmp_path):
    with gateway(tmp_path, [dict(b) for b in ONE], auth={"api_keys": ["ck"]}) as (url, gw):
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(url + "/metrics", headers={"authorization": "Bearer ck"}).status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/chimera/feedback", json={"workflow_id": "w", "score": 1})
        assert r.status_code == 401
        r = httpx.post(url + "/v1/chimera/feedback", json={"workflow_id": "w", "score": 2},
                       headers={"authorization": "Bearer ck"})
        assert r.status_code == 400
        text = httpx.get(url + "/metrics", headers={"authorization": "Bearer ck"}).text
        for line in ('chimera_rejected_total{endpoint="/metrics",reason="auth"} 2.0',
                     'chimera_rejected_total{endpoint="/v1/models",reason="auth"} 1.0',
                     'chimera_rejected_total{endpoint="/v1/chimera/feedback",reason="auth"} 1.0',
                     'chimera_rejected_total{endpoint="/v1/chimera/feedback",reason="bad_field"} 1.0'):
            assert line in text, line
    with gateway(tmp_path, [dict(b) for b in ONE], auth={"api_keys": ["ck"], "admin_keys": ["ak"]}) as (url, gw):
        assert httpx.get(url + "/metrics", headers={"authorization": "Bearer ck"}).status_code == 401
        assert httpx.get(url + "/metrics", headers={"authorization": "Bearer ak"}).status_code == 200
        assert chat(url, headers={"authorization": "Bearer ak"}).status_code == 200  # admins are clients too


def test_keyring_accepts_exactly_its_keys():
    ring = KeyRing(["secret-1", "secret-2"])
    assert ring.accepts("secret-1") and ring.accepts("secret-2")
    for wrong in (None, "", "secret", "secret-10", "Secret-1", "\ud800"):
        assert not ring.accepts(wrong)
    assert not KeyRing([]) and not KeyRing([]).accepts("x")


# ---- F5: fair, cheap backpressure --------------------------------------------------------------------------------
def _burst(url: str, n: int, bodies) -> list[httpx.Response]:
    async def fire():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as c:
            return await asyncio.gather(*[c.post(url + "/v1/chat/completions", json=bodies(i)) for i in range(n)])
    return asyncio.run(fire())


def test_f5_a_saturated_model_never_closes_one_with_free_slots(tmp_path):
    """Every call prefers `big` (RouteLLM, threshold 0); once big's slot and the queue are full, the rest must go
    to `small`, which has room, instead of being refused (before: 9 × 429 while small served nothing)."""
    backends = [{"name": "big", "model": "big", "max_inflight": 1, "delay": 1.0, "profile": "qwen2.5-14b@a6000"},
                {"name": "small", "model": "small", "max_inflight": 10, "delay": 0.05, "profile": "qwen2.5-1.5b@a6000"}]
    with gateway(tmp_path, backends, limits={"max_queue": 2},
                 policy={"name": "routellm", "threshold": 0.0}) as (url, gw):
        rs = _burst(url, 12, lambda i: {"model": "chimera", "messages": MSG})
        assert [r.status_code for r in rs] == [200] * 12
        served = [r.json()["model"] for r in rs]
        assert served.count("big") == 3 and served.count("small") == 9
        assert_nothing_held(url, gw)


def test_f5_per_model_queue_cap_refuses_only_that_model(tmp_path):
    backends = [{"name": "big", "model": "big", "max_inflight": 1, "delay": 1.0},
                {"name": "small", "model": "small", "max_inflight": 1, "delay": 0.05}]
    with gateway(tmp_path, backends, limits={"max_queue": 100, "max_queue_per_model": 1}) as (url, gw):
        rs = _burst(url, 4, lambda i: {"model": "big" if i < 3 else "small", "messages": MSG})
        codes = [r.status_code for r in rs]
        assert sorted(codes[:3]) == [200, 200, 429] and codes[3] == 200
        refused = next(r for r in rs if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1 and "big" in refused.json()["error"]["message"]


def test_f5_f7_a_429_is_decided_before_tokenising_or_predicting(tmp_path, monkeypatch, synthetic_predictors):
    counted = {"tokenise": 0, "predict": 0}
    real_count = director_module.count_tokens

    def count_tokens(text):
        counted["tokenise"] += 1
        return real_count(text)

    monkeypatch.setattr(director_module, "count_tokens", count_tokens)
    backends = [{"name": "s0", "model": "qwen2.5-7b", "max_inflight": 1, "delay": 1.5}]
    with gateway(tmp_path, backends, predictors=str(synthetic_predictors), limits={"max_queue": 0}) as (url, gw):
        predict = gw.policy.predict

        def counted_predict(call):
            counted["predict"] += 1
            return predict(call)

        gw.policy.predict = counted_predict
        before = dict(counted)

        async def fire():
            async with httpx.AsyncClient(timeout=30) as c:
                first = asyncio.ensure_future(c.post(url + "/v1/chat/completions",
                                                     json={"model": "chimera", "messages": MSG}))
                await asyncio.sleep(0.5)  # the first call holds the only slot
                t0 = time.perf_counter()
                refused = await asyncio.gather(*[c.post(url + "/v1/chat/completions",
                                                        json={"model": "chimera", "messages": MSG})
                                                 for _ in range(50)])
                return await first, refused, time.perf_counter() - t0
        first, refused, took = asyncio.run(fire())
        assert first.status_code == 200 and {r.status_code for r in refused} == {429}
        assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        assert counted["tokenise"] - before["tokenise"] == 1 and counted["predict"] == 1  # the first call's only
        assert_nothing_held(url, gw)


def test_f7_a_call_refused_after_its_prediction_keeps_nothing(tmp_path, synthetic_predictors):
    """Two calls pass the cheap check together; the one that loses the slot while predicted gets 429 and leaves
    no prediction, queue entry or load behind (the prediction is a value: there is no side table to leak from)."""
    backends = [{"name": "s0", "model": "qwen2.5-7b", "max_inflight": 1, "delay": 0.5}]
    with gateway(tmp_path, backends, predictors=str(synthetic_predictors), limits={"max_queue": 0}) as (url, gw):
        predict = gw.policy.predict

        def slow_predict(call):
            time.sleep(0.3)
            return predict(call)

        gw.policy.predict = slow_predict
        rs = _burst(url, 2, lambda i: {"model": "chimera", "messages": MSG})
        assert sorted(r.status_code for r in rs) == [200, 429]
        assert_nothing_held(url, gw)


# ---- a call's life releases everything on every exit ----------------------------------------------------------
def _raise(*_a, **_k):
    raise RuntimeError("injected fault")


STEPS = {  # step -> (what to patch on the gateway, or on a module of the call's life)
    "tokenise": lambda gw, mp: mp.setattr(director_module, "count_tokens", _raise),
    "route": lambda gw, mp: mp.setattr(gw.policy, "choose", _raise),
    "enqueue": lambda gw, mp: mp.setattr(gw.policy.queues["m"], "push", _raise),
    "dispatch": lambda gw, mp: mp.setattr(gw.pool.core, "_place", _raise),
    "upstream_body": lambda gw, mp: mp.setattr(gw.pool.backends["m"][0].kind, "request_body", _raise),
    "open_upstream": lambda gw, mp: mp.setattr(director_module, "open_upstream", _raise),
    "response": lambda gw, mp: (mp.setattr(director_module, "rewrite_model", _raise),
                                mp.setattr(relay_module, "rewrite_model", _raise)),
    "progress": lambda gw, mp: mp.setattr(gw.pool, "progress", _raise),
    "policy_complete": lambda gw, mp: mp.setattr(gw.policy, "on_complete", _raise),
    "trace": lambda gw, mp: mp.setattr(gw.trace, "log_call", _raise),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("step", list(STEPS))
def test_an_exception_at_any_step_leaks_nothing(tmp_path, step, stream):
    with gateway(tmp_path, [dict(b) for b in ONE]) as (url, gw):
        with pytest.MonkeyPatch.context() as mp:
            STEPS[step](gw, mp)
            r = chat(url, {"model": "chimera", "messages": MSG, "stream": stream})
            assert r.status_code in (200, 500), r.text
            if r.status_code == 500:
                assert r.json()["error"]["code"] == "internal_error"
        assert_nothing_held(url, gw)
        ok = chat(url, {"model": "chimera", "messages": MSG, "stream": stream})
        assert ok.status_code == 200 and "error" not in ok.text
        assert_nothing_held(url, gw)


# ---- the surface users expect ------------------------------------------------------------------------------------
def test_openapi_document_and_model_lookup(tmp_path):
    with gateway(tmp_path, [dict(b) for b in ONE]) as (url, gw):
        doc = httpx.get(url + "/openapi.json").json()
        assert doc["openapi"].startswith("3.1")
        assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}",
                "/v1/chimera/feedback", "/health", "/metrics", "/openapi.json"} <= set(doc["paths"])
        assert {"ChatCompletionRequest", "CompletionRequest", "Feedback", "WorkflowHints"} <= \
            set(doc["components"]["schemas"])
        assert httpx.get(url + "/v1/models/m").json()["id"] == "m"
        assert httpx.get(url + "/v1/models/chimera").status_code == 200
        r = httpx.get(url + "/v1/models/gpt-9")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_upstream_client_logging_is_off_by_default():
    for name in app_module.UPSTREAM_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    app_module.quiet_upstream_logs()
    assert all(logging.getLogger(n).getEffectiveLevel() >= logging.WARNING for n in app_module.UPSTREAM_LOGGERS)


def test_health_reports_backends_and_the_trace_writer(tmp_path):
    with gateway(tmp_path, [dict(b) for b in ONE]) as (url, gw):
        h = httpx.get(url + "/health").json()
        assert h["backends"]["m0"] == {"model": "m", "up": True, "reason": None, "inflight": 0}
        assert set(h["trace"]) >= {"alive", "backlog", "dropped", "written"} and h["trace"]["alive"]


def test_a_trickled_body_times_out_with_408(tmp_path):
    import socket

    with gateway(tmp_path, [dict(b) for b in ONE], limits={"body_timeout_s": 0.5}) as (url, gw):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\":")
            t0 = time.perf_counter()
            reply = sock.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply and time.perf_counter() - t0 < 3
        assert chat(url).status_code == 200
