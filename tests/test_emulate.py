"""The emulated vLLM backend, exercised through the official openai client (127.0.0.1 only, everything stopped)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from chimera.emulate import EmulatorServer, running_emulator
from chimera.perfmodel.batching import Engine, Seq
from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import profile
from chimera.workload.schema import Outcome, StageOutcome, Task
from chimera.workload.tokens import count_tokens

PROFILE = "qwen2.5-7b@a6000"
MODEL = "emu-7b"


def _task() -> Task:
    return Task(id="t1", kind="qa", prompt="Who wrote Hamlet?",
                outcomes={MODEL: Outcome(score=1.0, output_tokens=305)},
                stages={MODEL: [StageOutcome(output_tokens=300),
                                StageOutcome(output_tokens=5, text="It was Shakespeare.")]})


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=20)


def _msgs(text: str = "hello") -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def emu():
    with EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=50, workload=[_task()]) as srv:
        yield srv


def test_nonstreaming_usage_capped_by_max_tokens(emu: EmulatorServer) -> None:
    r = _client(emu.base_url).chat.completions.create(
        model=MODEL, messages=_msgs(), max_tokens=40, extra_body={"chimera": {"task_id": "t1", "stage": 0}})
    assert r.model == MODEL
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == count_tokens("hello")
    assert len(r.choices[0].message.content.split()) == 40


def test_workload_stage_length_and_text_via_headers(emu: EmulatorServer) -> None:
    r = _client(emu.base_url).chat.completions.create(
        model=MODEL, messages=_msgs(), extra_headers={"X-Chimera-Task-Id": "t1", "X-Chimera-Stage": "1"})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "It was Shakespeare."


def test_plausible_length_is_deterministic(emu: EmulatorServer) -> None:
    c = _client(emu.base_url)
    a = c.completions.create(model=MODEL, prompt="Tell me a story about a cat.")
    b = c.completions.create(model=MODEL, prompt="Tell me a story about a cat.")
    assert a.usage.completion_tokens == b.usage.completion_tokens >= 1
    assert a.object == "text_completion"


def test_streaming_chunks_add_up(emu: EmulatorServer) -> None:
    stream = _client(emu.base_url).chat.completions.create(
        model=MODEL, messages=_msgs(), max_tokens=60, stream=True, stream_options={"include_usage": True},
        extra_body={"chimera": {"task_id": "t1", "stage": 0}})
    parts, usage, finish = [], None, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            finish = c.finish_reason or finish
    assert len(parts) == 60 and len("".join(parts).split()) == 60
    assert usage is not None and usage.completion_tokens == 60 and finish == "length"


def test_completions_streaming_ends_with_done(emu: EmulatorServer) -> None:
    with httpx.stream("POST", emu.base_url + "/completions", timeout=20,
                      json={"model": MODEL, "prompt": "x", "max_tokens": 7, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    texts = [json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]]
    assert len("".join(texts).split()) == 7


def _predicted_seconds(prompt_tokens: int, output_tokens: int) -> float:
    eng = Engine("p", StepTimeModel(profile(PROFILE)))
    seq = Seq(None, prompt_tokens, output_tokens)
    eng.add(seq, 0.0)
    while seq.end_s is None:
        eng.advance()
    return seq.end_s


def test_wall_time_follows_time_scale() -> None:
    pred = _predicted_seconds(count_tokens("time me"), 200)
    with running_emulator(profile=PROFILE, served_model_name=MODEL, time_scale=20, workload=[_task()]) as url:
        c = _client(url)
        c.chat.completions.create(model=MODEL, messages=_msgs(), max_tokens=1)  # warm connection and client
        t0 = time.perf_counter()
        r = c.chat.completions.create(model=MODEL, messages=_msgs("time me"), max_tokens=200,
                                      extra_body={"chimera": {"task_id": "t1", "stage": 0}})
        wall = time.perf_counter() - t0
    assert r.usage.completion_tokens == 200
    print(f"wall {wall:.3f}s vs engine {pred:.2f}s / 20 = {pred / 20:.3f}s")
    assert 0.5 * pred / 20 <= wall <= 1.5 * pred / 20, (wall, pred / 20)


def test_priority_orders_the_queue() -> None:
    async def run(url: str) -> list[str]:
        c = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=20)
        order: list[str] = []

        async def call(name: str, prio: int, n: int) -> None:
            await c.chat.completions.create(model=MODEL, messages=_msgs(name), max_tokens=n,
                                            extra_body={"priority": prio, "chimera": {"task_id": "t1"}})
            order.append(name)

        blocker = asyncio.create_task(call("blocker", 0, 150))
        await asyncio.sleep(0.05)
        low = asyncio.create_task(call("low", 10, 20))
        await asyncio.sleep(0.02)
        high = asyncio.create_task(call("high", -1, 20))
        await asyncio.gather(blocker, low, high)
        await c.close()
        return order

    with running_emulator(profile=PROFILE, served_model_name=MODEL, time_scale=20, scheduling_policy="priority",
                          max_num_seqs=1, workload=[_task()]) as url:
        assert asyncio.run(run(url)) == ["blocker", "high", "low"]


def test_priority_rejected_under_fcfs(emu: EmulatorServer) -> None:
    with pytest.raises(openai.BadRequestError, match="[Pp]riority"):
        _client(emu.base_url).chat.completions.create(model=MODEL, messages=_msgs(), max_tokens=3,
                                                      extra_body={"priority": 5})


def test_metrics_models_health(emu: EmulatorServer) -> None:
    root = emu.base_url[: -len("/v1")]
    text = httpx.get(root + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        assert f'{name}{{model_name="{MODEL}"}}' in text
    assert httpx.get(root + "/health").status_code == 200
    assert [m.id for m in _client(emu.base_url).models.list()] == [MODEL]


def test_bad_requests(emu: EmulatorServer) -> None:
    r = httpx.post(emu.base_url + "/chat/completions", content=b"{not json")
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "code"}
    r = httpx.post(emu.base_url + "/chat/completions", json={"model": MODEL})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        _client(emu.base_url).chat.completions.create(model="nope", messages=_msgs())


def _running(root: str) -> float:
    for line in httpx.get(root + "/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no running gauge")


def test_client_disconnect_cancels_sequence() -> None:
    with EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=0.2) as srv:
        root = srv.base_url[: -len("/v1")]
        with httpx.stream("POST", srv.base_url + "/chat/completions", timeout=20,
                          json={"model": MODEL, "messages": _msgs(), "stream": True}) as r:
            it = r.iter_lines()
            assert next(it).startswith("data: ")  # the role chunk; the client then goes away
        deadline = time.monotonic() + 2
        while _running(root) > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _running(root) == 0  # the plausible-length request (seconds at scale 0.2) left the batch
        assert srv.state.success["abort"] == 1


def test_fail_after_and_kill() -> None:
    with EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=20, fail_after=1,
                        workload=[_task()]) as srv:
        c = _client(srv.base_url)
        c.chat.completions.create(model=MODEL, messages=_msgs(), max_tokens=2)
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model=MODEL, messages=_msgs(), max_tokens=2)
        assert httpx.get(srv.base_url[:-3] + "/health").status_code == 503
        srv.state.recover()
        srv.state.fail_after = None
        with pytest.raises(httpx.HTTPError):  # killed mid-stream: the connection drops without [DONE]
            with httpx.stream("POST", srv.base_url + "/chat/completions", timeout=20,
                              json={"model": MODEL, "messages": _msgs(), "stream": True,
                                    "chimera": {"task_id": "t1", "stage": 0}}) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i == 4:
                        srv.kill()
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model=MODEL, messages=_msgs(), max_tokens=2)


def test_no_threads_leak() -> None:
    before = threading.active_count()
    with running_emulator(profile=PROFILE, served_model_name=MODEL) as url:
        assert httpx.get(url + "/models").status_code == 200
    assert threading.active_count() == before


def test_cancel_seq_keeps_engine_consistent() -> None:
    from chimera.emulate.clock import cancel_seq
    from chimera.perfmodel.batching import DECODE, DONE, PREFILL

    spec = profile(PROFILE).model_copy(update={"max_num_seqs": 1})
    eng = Engine("c", StepTimeModel(spec), max_segment_steps=4)
    a, b, c = Seq(None, 10, 500), Seq(None, 10, 20), Seq(None, 10, 20)
    for s in (a, b, c):
        eng.add(s, 0.0)
    assert a.state == PREFILL
    cancel_seq(eng, c, 0.0)  # waiting
    eng.advance()
    eng.advance()
    assert a.state == DECODE and eng.generated(a) > 1
    cancel_seq(eng, a, eng.t)  # decoding: b takes the slot at the next step
    done = []
    while eng.next_event_time() != float("inf"):
        done += eng.advance()
    assert done == [b] and b.generated == 20
    assert (a.state, c.state) == (DONE, DONE) and eng.kv_used() == 0 and eng.n_running == eng.n_waiting == 0
    d = Seq(None, 50, 5)
    eng.add(d, eng.t + 1)
    cancel_seq(eng, d, eng.t)  # prefilling, mid-segment
    while eng.next_event_time() != float("inf"):
        assert eng.advance() == []
    assert eng.kv_used() == 0 and eng.n_running == 0


def test_stop_with_open_stream_is_prompt() -> None:
    before = threading.active_count()
    srv = EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=0.1).start()
    errors: list[str] = []

    def client() -> None:
        try:
            with httpx.stream("POST", srv.base_url + "/chat/completions", timeout=20,
                              json={"model": MODEL, "messages": _msgs(), "stream": True}) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError as e:
            errors.append(type(e).__name__)

    th = threading.Thread(target=client)
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    srv.stop()
    th.join(5)
    assert time.monotonic() - t0 < 3 and errors and not th.is_alive()
    assert threading.active_count() == before


def _gauge(root: str, name: str) -> float:
    for line in httpx.get(root + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}")


def test_peak_requests_counts_running_and_waiting() -> None:
    """The peak gauge is exact (counted at each submit), waiting requests included: 6 concurrent calls on one batch
    slot peak at 6 though only one ever runs; POST /emulator/peak restarts the count from what is held now."""
    with EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=20, max_num_seqs=1) as srv:
        root = srv.base_url[: -len("/v1")]
        assert httpx.get(root + "/emulator/peak").json() == {"requests": 0, "peak": 0}

        async def burst(n: int) -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                rs = await asyncio.gather(*(http.post(srv.base_url + "/chat/completions", json={
                    "model": MODEL, "messages": _msgs(), "max_tokens": 200}) for _ in range(n)))
            assert all(r.status_code == 200 for r in rs)

        asyncio.run(burst(6))
        assert _gauge(root, "chimera_emulator_peak_requests") == 6 and _gauge(root, "chimera_emulator_requests") == 0
        assert httpx.post(root + "/emulator/peak").json() == {"requests": 0, "peak": 6}
        asyncio.run(burst(2))
        assert httpx.get(root + "/emulator/peak").json() == {"requests": 0, "peak": 2}
