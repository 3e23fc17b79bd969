"""Backend health checks and vLLM /metrics scraping (serve/health.py): down/up marking, replica choice, gauges.

Two emulated vLLM backends for one model on 127.0.0.1; every fixture stops what it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from chimera.emulate import EmulatorServer
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from chimera.serve.health import backend_root, parse_vllm_gauges
from test_e2e_gateway import _Gateway

MODEL, PROFILE = "qwen2.5-1.5b", "qwen2.5-1.5b@a6000"


def _cfg(tmp_path, urls: dict[str, str], **health):
    return gateway_config_from_dict({
        "policy": {"name": "chimera", "lam": 0.02},
        "trace_store": str(tmp_path / "traces.sqlite"),
        "backends": [{"name": n, "model": MODEL, "base_url": u, "max_inflight": 8, "profile": PROFILE}
                     for n, u in urls.items()],
        "limits": {"request_timeout_s": 10},
        "health": {"interval_s": 0.1, "timeout_s": 0.5, **health},
    })


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _on_loop(emu: EmulatorServer, fn) -> None:
    async def go() -> None:
        fn()

    asyncio.run_coroutine_threadsafe(go(), emu.state.clock._loop).result(timeout=5)


def _gateway_gauges(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(s.name, s.labels.get("backend", "")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("chimera_backend_")}


def test_unhealthy_backend_is_avoided_and_recovers(tmp_path):
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=50.0))
        b = stack.enter_context(EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=50.0))
        gw = _Gateway(build_gateway(_cfg(tmp_path, {"a": a.base_url, "b": b.base_url})))
        stack.callback(gw.stop)
        bes = {be.name: be for be in gw.gw.sched.backends[MODEL]}

        # both probed and scraped: the vLLM gauges show up on the gateway's own /metrics
        _wait(lambda: all(be.kv_cache_usage is not None for be in bes.values()))
        g = _gateway_gauges(gw.url)
        for n in ("a", "b"):
            assert g[("chimera_backend_up", n)] == 1.0
            assert ("chimera_backend_waiting", n) in g
            assert ("chimera_backend_running", n) in g
            assert 0.0 <= g[("chimera_backend_kv_cache_usage", n)] <= 1.0

        # b fails: /health answers 503 → marked down within a few intervals, before any call hits it
        _on_loop(b, b.state.fail)
        _wait(lambda: not bes["b"].healthy, timeout=2.0)
        assert _gateway_gauges(gw.url)[("chimera_backend_up", "b")] == 0.0
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            for i in range(6):
                r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": f"hi {i}"}]})
                assert r.status_code == 200, r.text
                assert r.headers["x-chimera-backend"] == "a"
        retries = gw.gw.metrics.registry.get_sample_value("chimera_retries_total", {"model": MODEL})
        assert not retries  # the down backend was skipped up front, not tried and retried

        # b recovers → marked up again, and gets traffic again
        _on_loop(b, b.state.recover)
        _wait(lambda: bes["b"].healthy, timeout=2.0)
        assert _gateway_gauges(gw.url)[("chimera_backend_up", "b")] == 1.0
        bes["a"].inflight += 1  # a looks busier: the choice goes to the recovered b
        try:
            r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=10,
                           json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "back"}]})
        finally:
            bes["a"].inflight -= 1
        assert r.status_code == 200 and r.headers["x-chimera-backend"] == "b"


def test_replica_choice_uses_scraped_load(tmp_path):
    gw = build_gateway(_cfg(tmp_path, {"a": "http://127.0.0.1:9/v1", "b": "http://127.0.0.1:9/v1"})).state.gateway
    try:
        s = gw.sched
        a, b = s.backends[MODEL]
        assert s._pick_backend(MODEL, None, 0.0) is a  # no scrape data: the old order (fewest in-flight, first)
        a.scraped_waiting = 3.0
        assert s._pick_backend(MODEL, None, 0.0) is b  # in-flight + backend-reported waiting
        b.inflight = 3
        a.kv_cache_usage, b.kv_cache_usage = 0.9, 0.2
        assert s._pick_backend(MODEL, None, 0.0) is b  # tie on load: lower KV-cache usage
        b.healthy = False
        assert s._pick_backend(MODEL, None, 0.0) is a  # up before load
        a.healthy = False
        assert s._pick_backend(MODEL, None, 0.0) is b  # all down: still served by the least loaded
    finally:
        gw.trace.close()


def test_parse_and_root():
    assert backend_root("http://h:8000/v1/") == "http://h:8000"
    assert backend_root("http://h:8000") == "http://h:8000"
    assert parse_vllm_gauges("# HELP x y\n# TYPE x gauge\nx 1.0\n") == {}  # a non-vLLM server: nothing
    text = ('# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 2.0\n'
            '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.25\n')
    assert parse_vllm_gauges(text) == {"scraped_waiting": 2.0, "kv_cache_usage": 0.25}
