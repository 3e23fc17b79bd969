"""Backend health checks and vLLM /metrics scraping (serve/health.py): down/up marking, replica choice, gauges.

Two emulated vLLM backends for one model on 127.0.0.1; every fixture stops what it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import HTMLResponse
from starlette.routing import Route

from chimera.emulate import EmulatorServer
from chimera.serve import build_gateway
from chimera.serve.config import Backend, Health, gateway_config_from_dict
from chimera.backends.kinds.vllm import parse_vllm_gauges
from chimera.sched.types import Call
from chimera.serve.health import HealthChecker, backend_root, parse_model_ids
from chimera.serve.pool import BackendState
from upstreams import Served

MODEL, PROFILE = "qwen2.5-1.5b", "qwen2.5-1.5b@a6000"
FOREIGN = "llama-3.1-8b"  # what a foreign server on the configured port serves


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
        gw = Served(build_gateway(_cfg(tmp_path, {"a": a.base_url, "b": b.base_url})))
        stack.callback(gw.stop)
        bes = {be.name: be for be in gw.gw.pool.backends[MODEL]}

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
        s = gw.pool
        a, b = s.backends[MODEL]
        call = Call(call_id=0, workflow_id="w", kind="qa", prompt="p", stage=0, prompt_tokens=1, arrival_s=0.0,
                    workflow_arrival_s=0.0)
        assert s._place(MODEL, call, 0.0) is a  # no scrape data: the old order (fewest in-flight, first)
        a.scraped_waiting = 3.0
        assert s._place(MODEL, call, 0.0) is b  # in-flight + backend-reported waiting
        b.inflight = 3
        a.kv_cache_usage, b.kv_cache_usage = 0.9, 0.2
        assert s._place(MODEL, call, 0.0) is b  # tie on load: lower KV-cache usage
        b.healthy = False
        assert s._place(MODEL, call, 0.0) is a  # up before load
        a.healthy = False
        assert s._place(MODEL, call, 0.0) is b  # all down: still served by the least loaded
    finally:
        gw.trace.close()


def test_parse_and_root():
    assert backend_root("http://h:8000/v1/") == "http://h:8000"
    assert backend_root("http://h:8000") == "http://h:8000"
    assert parse_vllm_gauges("# HELP x y\n# TYPE x gauge\nx 1.0\n") == {}  # a non-vLLM server: nothing
    text = ('# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 2.0\n'
            '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.25\n')
    assert parse_vllm_gauges(text) == {"waiting": 2.0, "kv_cache_usage": 0.25}
    bad = ('# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} NaN\n'
           '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} -4\n'
           '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} +Inf\n')
    assert parse_vllm_gauges(bad) == {}  # a broken exporter's values are dropped, not summed into the load


def test_other_clients_calls_on_an_engine_steer_the_policy(tmp_path):
    """Calls a backend's engine runs beyond the gateway's own (other clients, from the scraped gauges) count as load:
    least-loaded and chimera's expected latency both move the next call to the other model."""
    from chimera.sched.types import Call
    from chimera.serve.health import external_calls

    assert external_calls(None, None, 3) == 0.0  # no gauges: nothing known
    assert external_calls(10.0, 2.0, 4) == 8.0 and external_calls(1.0, 0.0, 4) == 0.0  # ours in transit: not negative
    for policy in ({"name": "least-loaded"}, {"name": "chimera", "lam": 100.0}):
        cfg = gateway_config_from_dict({
            "policy": policy, "trace_store": str(tmp_path / f"{policy['name']}.sqlite"),
            "backends": [{"name": f"{m}-0", "model": m, "base_url": "http://127.0.0.1:9/v1", "max_inflight": 8,
                          "profile": "qwen2.5-7b@a6000"} for m in ("qwen2.5-1.5b", "qwen2.5-7b")]})
        gw = build_gateway(cfg).state.gateway
        try:
            s = gw.pool
            busy, idle = s.backends["qwen2.5-1.5b"][0], s.backends["qwen2.5-7b"][0]

            def route(i: int) -> str:
                call = Call(call_id=s.next_id(), workflow_id=f"w{i}", kind="qa", prompt="Why is the sky blue?",
                            stage=0, prompt_tokens=100, arrival_s=0.0, workflow_arrival_s=0.0)
                model = s.submit(call, 0.0)
                s.abandon(call, 0.0)
                return model

            first = route(0)
            (s.backends[first][0]).external_calls = 40.0  # its engine is full of someone else's work
            assert route(1) != first, policy
            busy.external_calls = idle.external_calls = 0.0
            s.backends[first][0].healthy = False  # a down backend's last scrape does not count
            s.backends[first][0].external_calls = 40.0
            s._note_external(0.0)
            assert s.policy.monitor.external[first] == 0.0
        finally:
            if gw.predict_pool is not None:
                gw.predict_pool.shutdown()
            gw.trace.close()


# --- backend identity: GET {base_url}/models must list the configured model ---------------------------------


def _state(name: str, base_url: str, api_key: str | None = None) -> BackendState:
    return BackendState(cfg=Backend(name=name, model=MODEL, base_url=base_url, max_inflight=8, api_key=api_key))


def _rounds(backends: list[BackendState], n: int, between=None, **health) -> HealthChecker:
    """`n` probe rounds of a fresh checker over `backends`, on a fresh loop; `between(i)` runs after round i."""
    async def go() -> HealthChecker:
        async with httpx.AsyncClient() as client:
            hc = HealthChecker(backends, Health(**{"interval_s": 0.1, "timeout_s": 0.5, **health}), client)
            for i in range(n):
                await hc.check_all()
                if between is not None:
                    between(i)
            return hc

    return asyncio.run(go())


def _warnings(caplog, *words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chimera.serve.health"
            and r.levelno == logging.WARNING and all(w in r.getMessage() for w in words)]


def _replace_models_route(emu: EmulatorServer, handler=None) -> None:
    """Before start: drop the emulator's /v1/models (a server without that route), or answer it with `handler`."""
    routes = [r for r in emu.app.router.routes if getattr(r, "path", None) != "/v1/models"]
    if handler is not None:
        routes.append(Route("/v1/models", handler, methods=["GET"]))
    emu.app.router.routes[:] = routes


def test_foreign_model_is_marked_down_once_and_up_when_listed(caplog):
    caplog.set_level(logging.DEBUG, logger="chimera.serve.health")
    with EmulatorServer(profile=PROFILE, served_model_name=FOREIGN, time_scale=50.0) as emu:
        be = _state("a", emu.base_url)

        def serve_right_model(i: int) -> None:
            if i == 3:  # after four rounds against the foreign model, the server lists the configured name
                _on_loop(emu, lambda: setattr(emu.state, "model", MODEL))
            elif i == 1:
                assert not be.healthy  # down from the first round on
                assert MODEL in be.down_reason and FOREIGN in be.down_reason, be.down_reason

        hc = _rounds([be], 4, between=serve_right_model)
        assert hc.rounds == 4
        assert not be.healthy and be.down_reason == f"serves [{FOREIGN!r}], not {MODEL!r}"
        assert be.kv_cache_usage is None  # a foreign server's load does not count
        down = _warnings(caplog, "down")
        assert len(down) == 1, down  # once on the transition, not every round
        assert "a" in down[0] and repr(MODEL) in down[0] and FOREIGN in down[0], down[0]

        caplog.clear()
        _rounds([be], 3)
        assert be.healthy and be.down_reason is None
        assert be.kv_cache_usage is not None  # up again: scraped again
        up = _warnings(caplog)
        assert len(up) == 1 and "marked up" in up[0] and "a" in up[0], up


def test_gateway_avoids_backend_serving_another_model(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="chimera.serve.health")
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=50.0))
        b = stack.enter_context(EmulatorServer(profile=PROFILE, served_model_name=FOREIGN, time_scale=50.0))
        gw = Served(build_gateway(_cfg(tmp_path, {"b": b.base_url, "a": a.base_url})))
        stack.callback(gw.stop)
        bes = {be.name: be for be in gw.gw.pool.backends[MODEL]}
        _wait(lambda: not bes["b"].healthy, timeout=3.0)
        assert bes["a"].healthy and bes["a"].down_reason is None
        assert FOREIGN in bes["b"].down_reason and MODEL in bes["b"].down_reason
        assert _gateway_gauges(gw.url)[("chimera_backend_up", "b")] == 0.0
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            for i in range(4):
                r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": f"hi {i}"}]})
                assert r.status_code == 200, r.text
                assert r.headers["x-chimera-backend"] == "a"  # never the server that would answer 404
        start = gw.gw.health_checker.rounds
        _wait(lambda: gw.gw.health_checker.rounds >= start + 3, timeout=3.0)
        assert len(_warnings(caplog, "marked down", FOREIGN)) == 1


def test_server_without_models_route_stays_up(caplog):
    caplog.set_level(logging.INFO, logger="chimera.serve.health")

    async def html(request):
        return HTMLResponse("<html>not an API</html>")

    with contextlib.ExitStack() as stack:
        plain = EmulatorServer(profile=PROFILE, served_model_name=FOREIGN, time_scale=50.0)
        _replace_models_route(plain)  # GET /v1/models -> 404
        stack.enter_context(plain)
        other = EmulatorServer(profile=PROFILE, served_model_name=FOREIGN, time_scale=50.0)
        _replace_models_route(other, html)  # 200, but not JSON
        stack.enter_context(other)
        assert httpx.get(f"{plain.base_url}/models", timeout=5).status_code == 404
        bes = [_state("plain", plain.base_url), _state("html", other.base_url)]
        hc = _rounds(bes, 4)
        assert hc.rounds == 4
        assert all(be.healthy and be.down_reason is None for be in bes)
        assert not _warnings(caplog)
        notes = [r for r in caplog.records if r.name == "chimera.serve.health" and "cannot verify" in r.getMessage()]
        assert len(notes) == 2, [r.getMessage() for r in notes]  # once per backend, not every round
        assert all(r.levelno == logging.INFO for r in notes)
        by_name = {r.getMessage().split()[1].rstrip(":"): r.getMessage() for r in notes}
        assert "HTTP 404" in by_name["plain"] and "not an OpenAI model list" in by_name["html"]

        # /health still judges liveness: a 503 marks it down, with the reason recorded
        _on_loop(plain, plain.state.fail)
        _rounds(bes[:1], 1)
        assert not bes[0].healthy and bes[0].down_reason == "/health: HTTP 503"


def test_models_probe_sends_key_and_connection_error_keeps_health_verdict(caplog):
    caplog.set_level(logging.DEBUG, logger="chimera.serve.health")
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        if request.url.path == "/v1/models":
            raise httpx.ConnectError("models route unreachable", request=request)
        return httpx.Response(200, text="")

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            hc = HealthChecker([be], Health(interval_s=0.1, timeout_s=0.5, scrape_metrics=False), client)
            for _ in range(3):
                await hc.check_all()

    be = _state("k", "http://127.0.0.1:9/v1", api_key="sekret")
    asyncio.run(go())
    assert ("/v1/models", "Bearer sekret") in seen and ("/health", "Bearer sekret") in seen
    assert be.healthy and be.down_reason is None
    assert not _warnings(caplog)


def test_check_all_before_start_then_loop_continues():
    with EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=50.0) as emu:
        be = _state("a", emu.base_url)

        async def go() -> list[int]:
            async with httpx.AsyncClient() as client:
                hc = HealthChecker([be], Health(interval_s=0.6, timeout_s=0.5), client)
                await asyncio.wait_for(hc.check_all(), timeout=5)  # what the gateway's lifespan does
                seen = [hc.rounds]
                hc.start()
                await asyncio.sleep(0.3)
                seen.append(hc.rounds)  # no second round at once: the loop waits out the interval
                await asyncio.sleep(0.8)
                seen.append(hc.rounds)
                await hc.stop()
                return seen

        seen = asyncio.run(go())
        assert seen[0] == 1 and seen[1] == 1 and seen[2] >= 2, seen
        assert be.healthy and be.kv_cache_usage is not None


def test_parse_model_ids():
    assert parse_model_ids({"object": "list", "data": [{"id": "m"}, {"id": "n", "root": "m"}]}) == ["m", "n"]
    assert parse_model_ids({"object": "list", "data": []}) == []
    assert parse_model_ids({"detail": "Not Found"}) is None
    assert parse_model_ids(["m"]) is None
    assert parse_model_ids({"data": [{"id": 3}]}) is None
