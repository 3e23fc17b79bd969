"""End to end: the official `openai` client → Chimera gateway → three emulated vLLM backends, all on 127.0.0.1.

Backends are `chimera.emulate` servers (simulated timing, filler text) at time_scale 50, so a call takes tens of ms.
Every fixture stops what it starts (emulators, the gateway's uvicorn thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import threading
import time
import uuid

import httpx
import openai
import pytest

from chimera.emulate import EmulatorServer
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from upstreams import Served

KEY = "e2e-client-key"
MODELS = {"qwen2.5-1.5b": "qwen2.5-1.5b@a6000", "qwen2.5-7b": "qwen2.5-7b@a6000", "qwen2.5-14b": "qwen2.5-14b@a6000"}
SCALE = 50.0


@contextlib.contextmanager
def _stack(tmp_path, max_inflight: int = 16):
    """Three emulators + the gateway (policy chimera, auth on); yields (gateway, {model: EmulatorServer})."""
    with contextlib.ExitStack() as stack:
        emus = {m: stack.enter_context(EmulatorServer(profile=p, served_model_name=m, time_scale=SCALE))
                for m, p in MODELS.items()}
        cfg = gateway_config_from_dict({
            "auth": {"api_keys": [KEY]},
            "policy": {"name": "chimera", "lam": 0.02},
            "trace_store": str(tmp_path / "traces.sqlite"),
            "backends": [{"name": f"{m}-0", "model": m, "base_url": e.base_url, "max_inflight": max_inflight,
                          "profile": MODELS[m]} for m, e in emus.items()],
            "limits": {"request_timeout_s": 30},
        })
        gw = Served(build_gateway(cfg))
        stack.callback(gw.stop)  # runs first: the gateway drains before the emulators stop
        yield gw, emus


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with _stack(tmp_path_factory.mktemp("e2e")) as s:
        yield s


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def _msgs(text: str = "Explain why the sky is blue in one paragraph.") -> list[dict]:
    return [{"role": "user", "content": text}]


def _rows(gw, wid_prefix: str) -> list[dict]:
    return gw.gw.trace.query("SELECT * FROM calls WHERE workflow_id LIKE ? ORDER BY stage, ended_at",
                             (wid_prefix + "%",))


# ---- (a) chat through the gateway, streaming and not -----------------------------------------------------------
def test_chat_nonstreaming_and_streaming_name_a_served_model(stack) -> None:
    gw, _ = stack
    c = _client(gw.url)
    wid = f"a-{uuid.uuid4().hex[:6]}"
    r = c.chat.completions.create(model="chimera", messages=_msgs(), max_tokens=24,
                                  extra_body={"chimera": {"workflow_id": wid + "-plain"}})
    assert r.model in MODELS
    assert r.choices[0].message.content and r.usage.completion_tokens > 0

    chunks = list(c.chat.completions.create(model="chimera", messages=_msgs("Name three prime numbers."),
                                            max_tokens=24, stream=True, stream_options={"include_usage": True},
                                            extra_body={"chimera": {"workflow_id": wid + "-stream"}}))
    assert chunks, "no chunks streamed"
    assert {ch.model for ch in chunks} <= set(MODELS) and len({ch.model for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    # pinned model: answered by that model
    r2 = c.chat.completions.create(model="qwen2.5-7b", messages=_msgs(), max_tokens=8)
    assert r2.model == "qwen2.5-7b"
    assert {m.id for m in c.models.list().data} == set(MODELS) | {"chimera"}


# ---- (b) + (e) a workflow of 3 calls in the trace store ----------------------------------------------------------
def test_workflow_stages_recorded_in_trace(stack) -> None:
    gw, _ = stack
    c = _client(gw.url)
    wid = f"wf-b-{uuid.uuid4().hex[:6]}"
    answered = []
    t0 = time.time()
    for i in range(3):
        r = c.chat.completions.create(model="chimera", messages=_msgs("Plan, then solve: 17 * 23?"), max_tokens=16,
                                      extra_body={"chimera": {"workflow_id": wid, "stage": i, "kind": "agent"}})
        answered.append((r.model, r.usage.completion_tokens))
    t1 = time.time()
    rows = _rows(gw, wid)
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert all(r["workflow_id"] == wid and r["status"] == "ok" and r["policy"] == "chimera" for r in rows)
    assert [(r["model"], r["completion_tokens"]) for r in rows] == answered
    for r in rows:
        assert r["backend"] == f"{r['model']}-0"
        assert r["prompt_tokens"] > 0
        assert t0 - 1 <= r["queued_at"] <= r["dispatched_at"] <= r["ended_at"] <= t1 + 1
        assert set(json.loads(r["confidences"])) == set(MODELS)
    # stages are ordered in time
    assert rows[0]["ended_at"] <= rows[1]["queued_at"] + 1e-3 and rows[1]["ended_at"] <= rows[2]["queued_at"] + 1e-3


def test_trace_has_one_row_per_completed_call(stack) -> None:
    gw, _ = stack
    c = _client(gw.url)
    prefix = f"e-{uuid.uuid4().hex[:6]}-"
    got = {}
    for i in range(6):
        wid = f"{prefix}{i}"
        if i % 2:
            chunks = list(c.chat.completions.create(model="chimera", messages=_msgs(f"question {i}"), max_tokens=12,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"chimera": {"workflow_id": wid}}))
            got[wid] = (chunks[0].model, chunks[-1].usage.completion_tokens)
        else:
            r = c.chat.completions.create(model="chimera", messages=_msgs(f"question {i}"), max_tokens=12,
                                          extra_body={"chimera": {"workflow_id": wid}})
            got[wid] = (r.model, r.usage.completion_tokens)
    rows = _rows(gw, prefix)
    assert len(rows) == 6 and {r["workflow_id"] for r in rows} == set(got)
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None
        assert (r["model"], r["completion_tokens"]) == got[r["workflow_id"]]
        assert r["completion_tokens"] > 0 and r["prompt_tokens"] > 0
        assert r["queued_at"] <= r["dispatched_at"] <= r["ended_at"]
    streamed = [r for r in rows if int(r["workflow_id"].rsplit("-", 1)[1]) % 2]
    assert all(r["dispatched_at"] <= r["first_token_at"] <= r["ended_at"] for r in streamed)


# ---- (d) errors via raw httpx -----------------------------------------------------------------------------------
def test_http_errors(stack) -> None:
    gw, _ = stack
    url = gw.url + "/v1/chat/completions"
    auth = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(url, content=b'{"model": "chimera", "messages": [',
                   headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"model": "chimera", "messages": _msgs()})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url, json={"model": "chimera", "messages": _msgs()}, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(url, json={"model": "gpt-9", "messages": _msgs()}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # the SDK maps them to its usual exceptions
    with pytest.raises(openai.AuthenticationError):
        _client(gw.url, key="nope").chat.completions.create(model="chimera", messages=_msgs())
    with pytest.raises(openai.NotFoundError):
        _client(gw.url).chat.completions.create(model="gpt-9", messages=_msgs())


# ---- (c) a backend dies in the middle of a run ------------------------------------------------------------------
def _kill_when_busy(emus: dict[str, EmulatorServer], at_least: int, within_s: float) -> str:
    """Fail the first emulator seen holding `at_least` requests in flight; returns its model name."""
    async def _fail_if_busy(state) -> bool:  # on the emulator's loop: check and kill cannot be split by a finish
        if len(state.clock.active) < at_least:
            return False
        state.fail()
        return True

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for model, emu in sorted(emus.items(), key=lambda kv: -len(kv[1].state.clock.active)):
            loop = emu.state.clock._loop
            if loop is not None and asyncio.run_coroutine_threadsafe(_fail_if_busy(emu.state), loop).result(5):
                return model
        time.sleep(0.002)
    raise AssertionError(f"no backend held {at_least} requests in flight within {within_s} s")


def test_backend_killed_mid_run_loses_no_request(tmp_path) -> None:
    n = 30
    threads_before = threading.active_count()
    with _stack(tmp_path, max_inflight=8) as (gw, emus):
        c = _client(gw.url)
        prefix = f"c-{uuid.uuid4().hex[:6]}-"
        started = threading.Barrier(n + 1)

        def one(i: int) -> dict:
            stream = i % 2 == 1
            kw = dict(model="chimera", messages=_msgs(f"request {i}: summarise the plot of Hamlet."),
                      max_tokens=160 if stream else 48,  # streams last long enough to be cut by the kill
                      extra_body={"chimera": {"workflow_id": f"{prefix}{i}"}})
            started.wait()
            time.sleep(0.004 * i)  # spread arrivals over ~120 ms
            if not stream:
                r = c.chat.completions.create(**kw)
                return {"i": i, "stream": False, "ok": True, "model": r.model}
            chunks = []
            try:
                for ch in c.chat.completions.create(stream=True, **kw):
                    chunks.append(ch)
                return {"i": i, "stream": True, "ok": True, "model": chunks[0].model}
            except openai.APIConnectionError as e:  # a dropped connection would be a lost request
                return {"i": i, "stream": True, "ok": False, "lost": True, "error": repr(e)}
            except openai.APIError as e:  # the SDK raises on the gateway's SSE `error` event
                return {"i": i, "stream": True, "ok": False, "lost": False, "chunks": len(chunks), "error": str(e)}

        with cf.ThreadPoolExecutor(n) as pool:
            futs = [pool.submit(one, i) for i in range(n)]
            started.wait()
            # kill a backend once it holds at least two requests in flight; the check and the kill run as one step
            # on that emulator's own loop, so the kill always hits live work (a timed kill could find it idle
            # on a loaded CI machine)
            victim_model = _kill_when_busy(emus, at_least=2, within_s=20)
            results = [f.result(timeout=30) for f in futs]

        plain = [r for r in results if not r["stream"]]
        assert len(plain) == n // 2 and all(r["ok"] for r in plain)  # non-streaming: all retried elsewhere
        lost = [r for r in results if r.get("lost")]
        assert not lost, lost
        for r in results:
            if r["ok"]:
                assert r["model"] in MODELS
            else:  # it had started streaming on the victim: ended by an error event, not a dropped connection
                assert "stream broke" in r["error"] or "upstream" in r["error"].lower(), r

        rows = gw.gw.trace.query("SELECT * FROM calls WHERE workflow_id LIKE ?", (prefix + "%",))
        by_wf: dict[str, list[dict]] = {}
        for row in rows:
            by_wf.setdefault(row["workflow_id"], []).append(row)
        assert set(by_wf) == {f"{prefix}{i}" for i in range(n)}
        for r in results:
            wf_rows = by_wf[f"{prefix}{r['i']}"]
            final = [x for x in wf_rows if x["status"] == "ok"]
            if r["ok"]:
                assert len(final) == 1 and final[0]["model"] == r["model"]
            else:
                assert not final and any(x["status"] == "error" for x in wf_rows)
        print(f"killed {victim_model}; ok={sum(r['ok'] for r in results)} stream-errors="
              f"{sum(not r['ok'] for r in results)} attempts={len(rows)} "
              f"retried={sum(len(v) > 1 for v in by_wf.values())}")
        killed_rows = [x for x in rows if x["backend"] == f"{victim_model}-0" and x["status"] == "error"]
        print(sorted({(x["error"] or "")[:90] for x in killed_rows}))
        retried = [wf for wf, xs in by_wf.items() if len(xs) > 1]
        # the kill actually hit work in flight (otherwise the test proved nothing)
        assert killed_rows, "the victim had no work in flight when it was killed"
        assert retried or any(not r["ok"] for r in results)
        assert gw.gw.pool.waiting_total == 0 and not any(gw.gw.pool.inflight.values())
    deadline = time.monotonic() + 5  # everything started here is stopped: no thread outlives the test
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before, [t.name for t in threading.enumerate()]


# ---- `chimera bench gateway` smoke run ----------------------------------------------------------------------------
def test_bench_gateway_smoke(tmp_path) -> None:
    from typer.testing import CliRunner

    from chimera.cli import app

    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "gateway", "--rates", "40", "--duration", "0.6", "--baseline",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    (row,) = data["rows"]
    assert row["direct_errors"] == row["gateway_errors"] == row["proxy_errors"] == 0
    assert row["gateway_n"] > 5 and row["direct_n"] > 5
    assert row["gateway_p50_ms"] > 0 and "added_p99_ms" in row
    assert "**added p50**" in (out / "results.md").read_text()


def test_bench_gateway_long_conversations_beside_a_gateway_without_inference(tmp_path) -> None:
    """`--conversation` sends long chat histories and `--identity-baseline` measures a second gateway that infers no
    workflows in the same rotation: the table carries what inference costs per request."""
    from typer.testing import CliRunner

    from chimera.bench.gateway_overhead import conversation_bodies
    from chimera.cli import app
    from chimera.workload.tokens import count_tokens

    bodies = conversation_bodies(10, 2000, n=3)
    assert len({b["messages"][0]["content"] for b in bodies}) == 3  # distinct: no request finds another's prefix
    for b in bodies:
        assert len(b["messages"]) == 10 and b["messages"][-1]["role"] == "user"
        assert 1500 < count_tokens(" ".join(m["content"] for m in b["messages"])) < 2600
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "gateway", "--rates", "30", "--duration", "0.6", "--conversation",
                                   "10,2000", "--identity-baseline", "--out", str(out)])
    assert res.exit_code == 0, res.output
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["gateway_errors"] == row["gateway_noinfer_errors"] == 0 and row["gateway_noinfer_n"] > 5
    assert row["gateway_noinfer_cpu_ms_per_req"] > 0
    assert "**inference, ms/req**" in (out / "results.md").read_text()
    bad = CliRunner().invoke(app, ["bench", "gateway", "--conversation", "10", "--out", str(out)])
    assert bad.exit_code != 0 and "--conversation" in bad.output


# ---- token accounting from the engine's own usage ----------------------------------------------------------------
def test_streamed_tokens_come_from_the_engine_usage_and_the_extra_chunk_is_hidden(stack) -> None:
    """The gateway always asks upstream for the usage chunk; a client that did not ask never sees it, and the trace
    holds the engine's count either way."""
    gw, _ = stack
    c = _client(gw.url)
    for asked in (False, True):
        wid = f"usage-{asked}-{uuid.uuid4().hex[:6]}"
        extra = {"stream_options": {"include_usage": True}} if asked else {}
        chunks = list(c.chat.completions.create(model="qwen2.5-1.5b", messages=_msgs(), max_tokens=20, stream=True,
                                                extra_body={"chimera": {"workflow_id": wid}}, **extra))
        with_usage = [ch for ch in chunks if ch.usage is not None]
        if asked:
            assert len(with_usage) == 1 and with_usage[0].usage.completion_tokens == 20 and not chunks[-1].choices
        else:
            assert not with_usage and all(ch.choices for ch in chunks)
        row = _rows(gw, wid)[0]
        assert row["status"] == "ok" and row["completion_tokens"] == 20


def test_bench_gateway_beside_a_gateway_that_learns_online(tmp_path) -> None:
    """`--online` measures a second gateway with online learning in the same rotation; both route `model: chimera`
    between two models, and the second one's learner takes part in every decision."""
    from typer.testing import CliRunner

    from chimera.cli import app
    from chimera.serve.trace import TraceStore

    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "gateway", "--rates", "30", "--duration", "0.6", "--online",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["gateway_errors"] == row["gateway_online_errors"] == 0 and row["gateway_online_n"] > 5
    assert row["gateway_feedback_errors"] == row["gateway_online_feedback_errors"] == 0  # every score taken
    assert row["gateway_online_cpu_ms_per_req"] > 0
    assert "**learning, ms/req**" in (out / "results.md").read_text()
    work = json.loads((out / "results.json").read_text())["learner_work"]
    assert 0 < work["cpu_ms_per_call_off"] < work["cpu_ms_per_call_on"]  # the learner does work on every call
    for folder in (out, out / "online"):  # both gateways chose between the two models for every call
        store = TraceStore(folder / "bench-traces.sqlite")
        try:
            models = {r["model"] for r in store.query("SELECT DISTINCT model FROM calls")}
            scored = store.query("SELECT DISTINCT workflow_id FROM feedback")
            answered = store.query("SELECT * FROM calls WHERE status = 'ok'")
        finally:
            store.close()
        assert models and models <= {"bench-model", "bench-model-b"}, models
        assert len(scored) == len(answered) > 5  # every answered request's workflow scored, once
