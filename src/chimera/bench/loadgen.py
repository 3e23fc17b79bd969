"""One load generator for the benchmarks that send HTTP traffic of their own (gateway overhead, soak, the live
benchmark's background load): requests over one shared httpx.AsyncClient, sent open loop (Poisson arrivals, each
at its time whatever earlier ones are doing) or closed loop (a fixed number in flight), every answer reported.

Each benchmark keeps its own measurements: it builds the requests and reads the `Answer`s.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import httpx

LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=1000)  # open loop: no client-side queue


@dataclass(frozen=True)
class Request:
    """One HTTP call. A JSON body with `"stream": true` is read as an OpenAI server-sent event stream."""

    url: str
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    timeout: Any = httpx.USE_CLIENT_DEFAULT  # seconds, None (no limit) or the client's default
    method: str = "POST"


@dataclass(frozen=True)
class Answer:
    """What came back: `status` None on a connection error; a 200 stream that breaks or carries an error event
    counts as 502. `latency_s` runs from just before sending until the whole body is read."""

    status: int | None
    latency_s: float
    bytes: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)


async def send(client: httpx.AsyncClient, req: Request) -> Answer:
    """Send `req` and read the whole answer."""
    t0 = time.perf_counter()
    try:
        if not (req.body or {}).get("stream"):
            r = await client.request(req.method, req.url, json=req.body, headers=req.headers, timeout=req.timeout)
            await r.aread()
            return Answer(r.status_code, time.perf_counter() - t0, r.num_bytes_downloaded, r.headers)
        async with client.stream(req.method, req.url, json=req.body, headers=req.headers, timeout=req.timeout) as r:
            status = await _read_events(r)
            return Answer(status, time.perf_counter() - t0, r.num_bytes_downloaded, r.headers)
    except httpx.HTTPError:
        return Answer(None, time.perf_counter() - t0)


async def _read_events(r: httpx.Response) -> int:
    """The status of a streamed answer: its own when not 200; 200 when it ends with [DONE]; 502 when it breaks off
    or an event carries an error."""
    if r.status_code != 200:
        await r.aread()
        return r.status_code
    done = False
    async for line in r.aiter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
            elif '"error"' in data and "error" in json.loads(data):
                return 502
    return 200 if done else 502


class LoadGen:
    """Requests in flight over one client; `fire` starts one, `drain` waits for (or cancels) what is left."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.pending: set[asyncio.Task] = set()

    async def send(self, req: Request) -> Answer:
        """Send `req` over the shared client and wait for its answer."""
        return await send(self.client, req)

    def start(self, coro: Awaitable[Any]) -> asyncio.Task:
        """Run `coro` as a tracked task (one arrival whose work is more than one request, e.g. a workflow step)."""
        task = asyncio.ensure_future(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    def fire(self, req: Request, sink: Callable[[Answer], Any] | None = None) -> asyncio.Task:
        """Send `req` now; `sink(answer)` when it is back."""
        async def one() -> None:
            a = await self.send(req)
            if sink is not None:
                sink(a)

        return self.start(one())

    async def drain(self, timeout: float | None = None, cancel: bool = False) -> None:
        """Wait for the requests in flight (up to `timeout`); with `cancel`, cancel them first."""
        left = set(self.pending)
        if not left:
            return
        if cancel:
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        else:
            await asyncio.wait(left, timeout=timeout)

    async def open_loop(self, gap: Callable[[], float], on_arrival: Callable[[float], Any],
                        seconds: float = math.inf, first_at_zero: bool = False,
                        stop: Callable[[], bool] | None = None) -> int:
        """Open-loop arrivals for `seconds` (or until `stop()`): the first after `gap()` (at once with
        `first_at_zero`), then every `gap()` after the one before, each leaving at its time whatever the earlier
        ones are doing: `on_arrival(late_s)` (how late it left) sends it. Returns the number of arrivals."""
        start = time.perf_counter()
        t = 0.0 if first_at_zero else gap()
        n = 0
        while t < seconds:
            delay = start + t - time.perf_counter()
            while delay > 0:
                await asyncio.sleep(min(delay, 0.1) if stop is not None else delay)
                if stop is not None and stop():
                    return n
                delay = start + t - time.perf_counter()
            if stop is not None and stop():
                return n
            on_arrival(max(0.0, time.perf_counter() - (start + t)))
            n += 1
            t += gap()
        return n

    async def closed_loop(self, make: Callable[[], Request], in_flight: int, stop: Callable[[], bool],
                          sink: Callable[[Answer], Any] | None = None, poll_s: float = 0.02) -> int:
        """Keep `in_flight` requests from `make()` in flight (each answer replaced by a new request) until
        `stop()`; returns the number sent."""
        sent = 0
        refill = asyncio.Event()
        busy: set[asyncio.Task] = set()

        def done(t: asyncio.Task) -> None:
            busy.discard(t)
            refill.set()

        while not stop():
            while len(busy) < in_flight:
                t = self.fire(make(), sink)
                busy.add(t)
                t.add_done_callback(done)
                sent += 1
            refill.clear()
            try:
                await asyncio.wait_for(refill.wait(), poll_s)
            except asyncio.TimeoutError:
                pass
        return sent


def poisson_gap(rng: Any, rate: float) -> Callable[[], float]:
    """Exponential gaps of mean 1/`rate` from `rng` (a random.Random)."""
    return lambda: rng.expovariate(rate)


class LoadThread:
    """A LoadGen on its own event loop in a daemon thread (for callers that are not async): `call(fn)` runs
    `fn(gen)` on that loop (it may start loops), `stop()` ends every loop, cancels what is in flight and joins."""

    def __init__(self, timeout_s: float = 600.0, name: str = "load") -> None:
        self.stopped = threading.Event()
        self._ready = threading.Event()
        self._timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self.gen: LoadGen | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name=name, daemon=True)
        self._thread.start()
        self._ready.wait(30)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(timeout=self._timeout_s, limits=LIMITS) as client:
            self.gen = LoadGen(client)
            self._ready.set()
            while not self.stopped.is_set():
                await asyncio.sleep(0.02)
            await self.gen.drain(cancel=True)

    def call(self, fn: Callable[[LoadGen], Any]) -> None:
        """Run `fn(gen)` on the thread's loop (a coroutine it returns becomes a tracked task)."""
        assert self._loop is not None and self.gen is not None

        def run() -> None:
            res = fn(self.gen)  # type: ignore[arg-type]
            if asyncio.iscoroutine(res):
                self.gen.start(res)  # type: ignore[union-attr]

        self._loop.call_soon_threadsafe(run)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """End the loops, cancel what is in flight, join the thread; True when it has ended."""
        self.stopped.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def percentile(xs: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `xs`, linear between order statistics; NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
