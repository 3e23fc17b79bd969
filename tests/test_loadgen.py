"""The shared load generator (chimera.bench.loadgen) against a tiny in-process server: what it sent is what the
server got and what came back, Poisson arrivals follow the seeded draws, streams are read to the end, a closed loop
keeps exactly N in flight, and everything stops cleanly."""

from __future__ import annotations

import asyncio
import math
import random
import time

import httpx
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from chimera.bench.loadgen import LIMITS, Answer, LoadGen, LoadThread, Request, percentile, poisson_gap
from chimera.util.threaded import free_port, serve_in_thread


def _server(delay: float = 0.0):
    state = {"got": 0, "now": 0, "peak": 0}

    async def chat(request: StarletteRequest):
        body = await request.json()
        state["got"] += 1
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        try:
            await asyncio.sleep(body.get("sleep", delay))
        finally:
            state["now"] -= 1
        if body.get("refuse"):
            return JSONResponse({"error": {"message": "queue full"}}, 429)
        if body.get("stream"):
            async def events():
                yield 'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
                if body.get("error_event"):
                    yield 'data: {"error": {"message": "upstream died"}}\n\n'
                elif not body.get("break_off"):
                    yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"ok": True, "n": state["got"]}, headers={"x-chimera-model": "m"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), state


def test_open_loop_sends_the_seeded_poisson_arrivals_and_reports_every_answer() -> None:
    app, state = _server()
    rate, seconds = 200.0, 0.5
    rng = random.Random(3)
    draws, t = 0, rng.expovariate(rate)
    while t < seconds:  # how many arrivals the seeded gaps put inside the window
        draws, t = draws + 1, t + rng.expovariate(rate)
    answers: list[Answer] = []
    late: list[float] = []

    async def main(url: str) -> int:
        async with httpx.AsyncClient(limits=LIMITS, timeout=10) as client:
            gen = LoadGen(client)

            def arrive(late_s: float) -> None:
                late.append(late_s)
                gen.fire(Request(url + "/v1/chat/completions", {"model": "m"}), answers.append)

            t0 = time.perf_counter()
            n = await gen.open_loop(poisson_gap(random.Random(3), rate), arrive, seconds)
            assert time.perf_counter() - t0 < seconds + 0.5
            await gen.drain(timeout=10)
            assert not gen.pending
            return n

    with serve_in_thread(app) as url:
        n = asyncio.run(main(url))
    assert n == draws == len(late) == state["got"] == len(answers) > 50
    assert all(a.status == 200 and a.latency_s > 0 and a.bytes > 0 for a in answers)
    assert answers[0].headers["x-chimera-model"] == "m"
    assert percentile(late, 0.5) < 0.05 and math.isnan(percentile([], 0.5))


def test_streams_refusals_and_connection_errors_are_classified() -> None:
    app, _ = _server()

    async def main(url: str) -> list[int | None]:
        u = url + "/v1/chat/completions"
        async with httpx.AsyncClient(timeout=10) as client:
            gen = LoadGen(client)
            reqs = [Request(u, {"stream": True}), Request(u, {"stream": True, "error_event": True}),
                    Request(u, {"stream": True, "break_off": True}), Request(u, {"refuse": True}),
                    Request(u, {"refuse": True, "stream": True}),
                    Request(f"http://127.0.0.1:{free_port()}/v1/chat/completions", {})]
            return [(await gen.send(r)).status for r in reqs]

    with serve_in_thread(app) as url:
        assert asyncio.run(main(url)) == [200, 502, 502, 429, 429, None]


def test_closed_loop_keeps_n_in_flight_and_stops() -> None:
    app, state = _server(delay=0.05)
    got: list[Answer] = []

    async def main(url: str) -> int:
        async with httpx.AsyncClient(timeout=10) as client:
            gen = LoadGen(client)
            # stop on a count, not a clock: on a busy machine 0.6 s held fewer than 20 answers
            sent = await gen.closed_loop(lambda: Request(url + "/v1/chat/completions", {}), 4,
                                         lambda: len(got) >= 20, got.append)
            await gen.drain(timeout=5)
            return sent

    with serve_in_thread(app) as url:
        sent = asyncio.run(main(url))
    assert state["peak"] == 4 and sent == state["got"] == len(got) >= 20, (state, sent)
    assert all(a.status == 200 for a in got)


def test_load_thread_stops_and_cancels_what_is_in_flight() -> None:
    app, state = _server(delay=30.0)  # answers would take 30 s: stop must not wait for them
    with serve_in_thread(app) as url:
        lt = LoadThread(timeout_s=60)
        lt.call(lambda gen: gen.closed_loop(lambda: Request(url + "/v1/chat/completions", {}), 3, lt.stopped.is_set))
        deadline = time.monotonic() + 10
        while state["now"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state["now"] == 3
        t0 = time.monotonic()
        assert lt.stop() is True  # the thread has ended
        assert time.monotonic() - t0 < 5 and not lt.gen.pending
    assert state["got"] == 3
