"""The gateway in front of real vLLM CPU servers (random-weight models): token accounting, priority, errors,
OpenAI features passed through, metric scraping, and a server killed mid-run and restarted (the `vllm` marker).

Needs `.venv-vllm` and `out/models/{tiny,wide}` (built by `make test`); skipped, naming the missing piece, otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import openai
import pytest

from chimera.backends.vllm_cpu import ROOT, ServerSpec, vllm_cluster
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from upstreams import Served, vllm_missing

pytestmark = pytest.mark.vllm
IGNORE_EOS = {"ignore_eos": True}
MSG = [{"role": "user", "content": "Tell me about the weather in Paris."}]


@pytest.fixture(scope="module")
def servers():
    """`tiny` runs vLLM's priority policy one sequence at a time (so calls wait inside the engine) with tool calling
    on; `wide` is a plain fcfs server."""
    why = vllm_missing()
    if why:
        pytest.skip(f"real vLLM not available: {why}")
    specs = [ServerSpec("tiny", priority=True, max_num_seqs=1,
                        extra_args=["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]),
             ServerSpec("wide")]
    with vllm_cluster(specs, workdir=ROOT / "out" / "test-real-gateway") as cluster:  # temp and caches in out/
        yield cluster


@contextlib.contextmanager
def gateway(servers, tmp_path, policy: str = "chimera", priority: bool = True, health: bool = True, **limits):
    backends = [{"name": f"{s.served_model_name}-0", "model": s.served_model_name, "base_url": s.base_url,
                 "max_inflight": 8, "priority": priority and s.spec.priority} for s in servers]
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "trace.sqlite"), "policy": {"name": policy}, "backends": backends,
        "health": {"enabled": health, "interval_s": 0.5}, "limits": {"request_timeout_s": 120, **limits}})
    gw = Served(build_gateway(cfg))
    try:
        yield gw
    finally:
        gw.stop()


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=120)


def rows(gw, wid: str) -> list[dict]:
    return gw.gw.trace.query("SELECT * FROM calls WHERE workflow_id = ? ORDER BY rowid", (wid,))


def test_token_counts_are_the_engines_own(servers, tmp_path):
    with gateway(servers, tmp_path) as gw:
        c = client(gw)
        chunks = list(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=17, stream=True,
                                                extra_body={**IGNORE_EOS, "chimera": {"workflow_id": "s"}}))
        assert all(ch.usage is None for ch in chunks)  # the usage chunk the gateway asked for stays hidden
        assert rows(gw, "s")[0]["completion_tokens"] == 17
        chunks = list(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=9, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={**IGNORE_EOS, "chimera": {"workflow_id": "u"}}))
        assert chunks[-1].usage.completion_tokens == 9 and rows(gw, "u")[0]["completion_tokens"] == 9
        r = c.chat.completions.create(model="wide", messages=MSG, max_tokens=6, n=2,
                                      extra_body={**IGNORE_EOS, "chimera": {"workflow_id": "n"}})
        assert len(r.choices) == 2 and r.usage.completion_tokens == 12
        assert rows(gw, "n")[0]["completion_tokens"] == 12 and rows(gw, "n")[0]["prompt_tokens"] == r.usage.prompt_tokens


def _finish_order(gw, long_tokens: int, running_tokens: int) -> list[str]:
    """One long call runs on `tiny` (one sequence at a time), three long ones and then a short one wait in the
    engine; returns the workflow ids in the order they finished."""
    async def run() -> list[str]:
        done: list[str] = []
        async with httpx.AsyncClient(base_url=gw.url, timeout=120) as h:
            async def one(wid: str, kind: str, n: int, delay: float) -> None:
                await asyncio.sleep(delay)
                r = await h.post("/v1/chat/completions", json={
                    "model": "tiny", "messages": MSG, "max_tokens": n, "ignore_eos": True,
                    "chimera": {"workflow_id": wid, "kind": kind, "stage": 0}})
                assert r.status_code == 200, r.text
                done.append(wid)
            await asyncio.gather(one("running", "long", running_tokens, 0.0),
                                 *[one(f"long-{i}", "long", long_tokens, 0.15 + 0.05 * i) for i in range(3)],
                                 one("short", "short", 4, 0.4))
        return done
    return asyncio.run(run())


def test_forwarded_priority_is_accepted_by_real_servers(servers, tmp_path):
    """vLLM takes the gateway's `priority` field (an int, clamped to int32) on the priority server and the fcfs one
    (which ignores it); the ordering it buys is the slow test below."""
    from chimera.backends.kinds.vllm import vllm_priority

    assert vllm_priority(1e30) == 2**31 - 1 and vllm_priority(4.6) == 5
    backends = [{"name": f"{s.served_model_name}-0", "model": s.served_model_name, "base_url": s.base_url,
                 "max_inflight": 8, "priority": True} for s in servers]
    cfg = gateway_config_from_dict({"trace_store": str(tmp_path / "t.sqlite"), "policy": {"name": "sjf"},
                                    "backends": backends, "health": {"enabled": False}})
    gw = Served(build_gateway(cfg))
    try:
        c = client(gw)
        for model in ("tiny", "wide"):
            assert c.chat.completions.create(model=model, messages=MSG, max_tokens=3).choices
        assert gw.gw.pool.inflight == {"tiny": 0, "wide": 0}
    finally:
        gw.stop()


@pytest.mark.slow  # `make bench`: the order depends on this shared machine's scheduling (see the comment below)
def test_priority_lets_a_short_call_overtake_waiting_ones_on_a_real_server(servers, tmp_path):
    """SJF's priority (predicted tokens of the call, learnt online per kind) forwarded to a server running vLLM's
    priority policy: the short call finishes before the long calls that arrived before it; the same gateway
    without forwarding (fcfs order in the engine) finishes it last."""
    want = {True: lambda o: o.index("short") <= 2,  # right after the call(s) already running when it came
            False: lambda o: o.index("short") == 4}
    orders: dict[bool, list[list[str]]] = {True: [], False: []}
    for forward in (True, False):
        with gateway(servers, tmp_path / str(forward), policy="sjf", priority=forward, health=False) as gw:
            c = client(gw)
            for kind, n in (("long", 600), ("short", 4)) * 2:  # the prior learns each kind's length
                c.chat.completions.create(model="tiny", messages=MSG, max_tokens=n,
                                          extra_body={**IGNORE_EOS, "chimera": {"kind": kind, "stage": 0}})
            # The order depends on when each call reaches the engine. While a vLLM CPU server generates, the
            # processes beside it on this 2-core machine, its own API server included, can go without a CPU for
            # over a second (measured: a 10 ms sleep overran by up to 1.9 s, and /metrics went unanswered until the
            # generation ended, in some runs and not others); a call sent meanwhile reaches the engine late. So the
            # running call lasts ~4 s (the others are sent within 0.4 s) and each case gets up to 4 tries.
            for _ in range(4):
                orders[forward].append(_finish_order(gw, 600, 1800))
                if want[forward](orders[forward][-1]):
                    break
    assert want[True](orders[True][-1]), orders
    assert want[False](orders[False][-1]), orders


def test_engine_errors_pass_through_and_free_the_slot(servers, tmp_path):
    with gateway(servers, tmp_path) as gw:
        c = client(gw)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="wide", messages=MSG, max_tokens=5000)
        assert "max" in str(e.value).lower() and e.value.status_code == 400
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="wide", messages=[{"role": "user", "content": "word " * 3000}],
                                      max_tokens=4)
        with pytest.raises(openai.BadRequestError):  # streaming too: the engine's 400 before any event
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=5000, stream=True)
        assert gw.gw.pool.inflight == {"tiny": 0, "wide": 0} and gw.gw.pool.waiting_total == 0
        assert c.chat.completions.create(model="wide", messages=MSG, max_tokens=3).choices


def test_logprobs_response_format_and_tools_pass_through_untouched(servers, tmp_path):
    with gateway(servers, tmp_path) as gw:
        c = client(gw)
        r = c.chat.completions.create(model="wide", messages=MSG, max_tokens=4, logprobs=True, top_logprobs=2,
                                      extra_body=IGNORE_EOS)
        lp = r.choices[0].logprobs.content
        assert len(lp) == 4 and all(len(t.top_logprobs) == 2 for t in lp)
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                  "required": ["city"], "additionalProperties": False}
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=200,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "place", "schema": schema}})
        text = r.choices[0].message.content  # the engine's grammar shapes even random weights' noise into JSON
        assert text.lstrip().startswith("{")
        if r.choices[0].finish_reason == "stop":  # strict=False: the grammar lets raw control characters into strings
            assert set(json.loads(text, strict=False)) == {"city"}
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}
        # The wiring, not the content (random weights): `tools` reaches the engine untouched, so a server started
        # with tool calling answers, and one without it refuses `tool_choice: auto` with its own 400.
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, tools=[tool], tool_choice="auto")
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="wide", messages=MSG, max_tokens=4, tools=[tool], tool_choice="auto")
        assert "tool" in str(e.value).lower()


def test_real_metric_names_are_scraped_for_the_replica_choice(servers, tmp_path):
    with gateway(servers, tmp_path) as gw:
        deadline = time.monotonic() + 10
        bes = [b for bs in gw.gw.pool.backends.values() for b in bs]
        while time.monotonic() < deadline and any(b.kv_cache_usage is None for b in bes):
            time.sleep(0.2)
        for b in bes:
            assert b.healthy and b.scraped_running is not None and b.scraped_waiting is not None
            assert 0.0 <= b.kv_cache_usage <= 1.0  # vLLM reports a fraction
        text = httpx.get(gw.url + "/metrics").text
        assert 'chimera_backend_kv_cache_usage{backend="tiny-0",model="tiny"}' in text


def test_a_real_server_killed_mid_run_loses_only_started_streams(servers, tmp_path):
    """`tiny` is SIGKILLed while calls run on it: every non-streaming call is answered (retried on `wide`); a
    stream that had started ends with an SSE error event (documented). Runs last in `make test`: `tiny` stays down
    (its restart, a second start-up, is the slow test below)."""
    tiny = servers.by_name("tiny")
    with gateway(servers, tmp_path) as gw:
        async def run():
            async with httpx.AsyncClient(base_url=gw.url, timeout=120) as h:
                async def plain(i):
                    return await h.post("/v1/chat/completions", json={
                        "model": "chimera", "messages": MSG, "max_tokens": 60, "ignore_eos": True})

                started = asyncio.Event()

                async def stream():
                    async with h.stream("POST", "/v1/chat/completions", json={
                            "model": "tiny", "messages": MSG, "max_tokens": 1800, "ignore_eos": True,
                            "stream": True}) as r:
                        lines = []
                        async for line in r.aiter_lines():
                            lines.append(line)
                            if line.startswith("data: {"):
                                started.set()
                        return r.status_code, "".join(lines)

                async def kill():  # once the stream has begun (a fixed delay raced a fast stream on a busy machine)
                    await asyncio.sleep(0.3)
                    await asyncio.wait_for(started.wait(), 60)
                    await asyncio.to_thread(tiny.kill_hard)

                return await asyncio.gather(stream(), *[plain(i) for i in range(8)], kill())
        (status, text), *plain, _ = asyncio.run(run())
        assert [r.status_code for r in plain] == [200] * 8
        assert status == 200 and '"error"' in text and text.rstrip().endswith("[DONE]")
        assert gw.gw.pool.inflight == {"tiny": 0, "wide": 0}


@pytest.mark.slow
def test_a_killed_real_server_comes_back_into_the_gateway(servers, tmp_path):
    """A `tiny` killed (above, or here) and started again on its port: the gateway's health checker marks it up again
    and it serves (slow: a second start-up; the same rule on emulated backends is in tests/test_gateway_health.py)."""
    tiny = servers.by_name("tiny")
    if tiny.alive():
        tiny.kill_hard()
    with gateway(servers, tmp_path) as gw:
        be = gw.gw.pool.backends["tiny"][0]
        tiny.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not be.healthy:
            time.sleep(0.2)
        assert be.healthy
        r = client(gw).chat.completions.create(model="tiny", messages=MSG, max_tokens=3)
        assert r.model == "tiny"
