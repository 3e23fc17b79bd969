"""The soak's traffic and its windows: the mix of requests (endpoints, streaming, pinned or chosen models,
multi-stage workflows, feedback), sent open loop through the shared load generator, and per window what came back,
the gateway's memory and CPU; the reject phase's held calls on the paused backend."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from chimera.bench.live.config import MODELS
from chimera.bench.loadgen import LIMITS, Answer, LoadGen, Request, percentile, poisson_gap
from chimera.bench.proc_cpu import cpu_seconds, rss_mib
from chimera.bench.soak.config import CLASSES, HELD_MODEL, SoakConfig
from chimera.util.procs import Spawned


@dataclass
class Window:
    """What happened in one window (answers are counted when they arrive, sends when they leave)."""

    phase: str
    index: int
    start_s: float  # since the first phase began
    end_s: float = 0.0
    sent: int = 0
    feedback: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    ok_lat: list[float] = field(default_factory=list)
    rej_lat: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    per_model: dict[str, int] = field(default_factory=dict)
    rss_max_mib: float = float("nan")
    rss_end_mib: float = float("nan")
    cpu0: float = float("nan")

    def row(self, cpu_s: float) -> dict[str, Any]:
        dur = max(1e-9, self.end_s - self.start_s)
        return {
            "phase": self.phase, "window": self.index, "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3), "sent": self.sent, "sent_per_s": self.sent / dur,
            "feedback": self.feedback, "counts": dict(self.counts),
            "p50_ms": 1e3 * percentile(self.ok_lat, 0.5), "p99_ms": 1e3 * percentile(self.ok_lat, 0.99),
            "reject_p50_ms": 1e3 * percentile(self.rej_lat, 0.5),
            "send_late_p99_ms": 1e3 * percentile(self.late, 0.99),
            "per_model": dict(sorted(self.per_model.items())),
            "rss_end_mib": self.rss_end_mib, "rss_max_mib": max(self.rss_max_mib, self.rss_end_mib),
            "gateway_cpu_pct": 100.0 * cpu_s / dur,
        }


def classify(status: int | None) -> str:
    if status is None:
        return "conn"
    if status == 200:
        return "200"
    if status == 429:
        return "429"
    return "4xx" if 400 <= status < 500 else "5xx"


@dataclass
class _Flow:
    """A multi-stage workflow of the mix: the next stage leaves only after the previous one answered 200."""

    wid: str
    kind: str
    prompt: str
    model: str
    stages: int
    done: int = 0


class Soak:
    """The mix of requests (sent through the shared load generator) and the window bookkeeping; one instance per
    run, driven by `run`."""

    def __init__(self, cfg: SoakConfig, gateway: Spawned, held: Spawned, prompts: list[tuple[str, str]],
                 on_window: Callable[[dict], None] | None = None,
                 on_tick: Callable[[str, float], None] | None = None) -> None:
        self.cfg, self.gw, self.held = cfg, gateway, held
        self.prompts = prompts
        self.on_window, self.on_tick = on_window, on_tick
        self.rng = random.Random(cfg.seed)
        self.models = list(MODELS)
        self.rows: list[dict] = []
        self.win: Window | None = None
        self.t0 = 0.0
        self.phase_start = 0.0
        self.ready: list[_Flow] = []  # workflows whose next stage may be sent
        self.n_wf = 0
        self.paused = False
        self.held_counts: dict[str, int] = dict.fromkeys((*CLASSES, "cancelled"), 0)
        self.held_sent = 0
        self.recovery: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.rss_samples: list[tuple[float, float]] = []
        self.gen: LoadGen | None = None  # the load generator over the run's one client

    # ---- clock, windows, memory --------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _open(self, phase: str, index: int) -> None:
        self.win = Window(phase, index, self.now(), cpu0=cpu_seconds(self.gw.pid))

    def _close(self) -> dict:
        w = self.win
        assert w is not None
        w.end_s = self.now()
        w.rss_end_mib = rss_mib(self.gw.pid)
        self.rss_samples.append((w.end_s, w.rss_end_mib))
        row = w.row(cpu_seconds(self.gw.pid) - w.cpu0)
        self.rows.append(row)
        if self.on_window is not None:
            self.on_window(row)
        return row

    async def _sample_rss(self) -> None:
        while True:
            v = rss_mib(self.gw.pid)
            if self.win is not None and not math.isnan(v):
                self.win.rss_max_mib = v if math.isnan(self.win.rss_max_mib) else max(self.win.rss_max_mib, v)
            self.rss_samples.append((self.now(), v))
            if self.on_tick is not None and self.win is not None:
                self.on_tick(self.win.phase, self.now() - self.phase_start)
            await asyncio.sleep(1.0)

    # ---- one request ---------------------------------------------------------------------------------------
    def _body(self, path: str, model: str, prompt: str, stage: int, stream: bool) -> dict[str, Any]:
        mt = self.rng.randint(max(1, self.cfg.max_tokens // 4), self.cfg.max_tokens)
        if path == "/v1/completions":
            body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": mt}
        else:
            msgs = [{"role": "system", "content": "You are a careful assistant."},
                    {"role": "user", "content": prompt}]
            for s in range(stage):  # a ReAct-like context that grows with the stage
                msgs += [{"role": "assistant", "content": f"Thought {s}: call the tool."},
                         {"role": "user", "content": f"Observation {s}: result {s * 7 + 3}."}]
            body = {"model": model, "messages": msgs, "max_tokens": mt}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def _post(self, path: str, body: dict, headers: dict[str, str] | None, timeout: float | None) -> Answer:
        """One call to the gateway through the load generator's client (a broken or failed stream: 502)."""
        assert self.gen is not None
        return await self.gen.send(Request(self.gw.url + path, body, headers, timeout))

    async def _health(self) -> Any:
        assert self.gen is not None
        return (await self.gen.client.get(self.gw.url + "/health", timeout=5)).json()

    async def _request(self, flow: _Flow | None) -> None:
        """One arrival: a workflow stage (`flow`) or a one-stage call; counted in the window it answers in."""
        rng = self.rng
        path = "/v1/chat/completions" if rng.random() < 0.75 else "/v1/completions"
        stream = rng.random() < 0.5
        headers: dict[str, str] = {}
        if flow is not None:
            model, prompt, stage = flow.model, flow.prompt, flow.done
            headers = {"X-Chimera-Workflow-Id": flow.wid, "X-Chimera-Stage": str(stage),
                       "X-Chimera-Kind": flow.kind}
        else:
            kind, prompt = rng.choice(self.prompts)
            model, stage = self._pick_model(), 0
            if rng.random() < 0.5:
                headers = {"X-Chimera-Kind": kind}
        body = self._body(path, model, prompt, stage, stream)
        ans = await self._post(path, body, headers, self.cfg.request_timeout_s)
        status, dt, served = ans.status, ans.latency_s, ans.headers.get("x-chimera-model")
        w = self.win
        assert w is not None
        cls = classify(status)
        w.counts[cls] += 1
        if cls == "200":
            w.ok_lat.append(dt)
            if served:
                w.per_model[served] = w.per_model.get(served, 0) + 1
        elif cls == "429":
            w.rej_lat.append(dt)
        if flow is None or cls != "200":
            return  # a refused stage ends its workflow (an agent would back off)
        flow.done += 1
        if flow.done < flow.stages:
            self.ready.append(flow)
        elif rng.random() < 0.5:
            await self._feedback(flow)

    async def _feedback(self, flow: _Flow) -> None:
        w = self.win
        assert w is not None
        w.sent += 1
        w.feedback += 1
        ans = await self._post("/v1/chimera/feedback", {"workflow_id": flow.wid, "score": round(self.rng.random(), 3)},
                               None, self.cfg.request_timeout_s)
        self.win.counts[classify(ans.status)] += 1  # type: ignore[union-attr]

    def _pick_model(self) -> str:
        """Steady: `chimera` (the policy chooses) or a pinned served model. Reject: pinned to the held model,
        whose slots and queue are full, so the gateway has nowhere to put the call whatever its queue rules."""
        if self.win is not None and self.win.phase == "reject":
            return HELD_MODEL
        return "chimera" if self.rng.random() < 0.6 else self.rng.choice(self.models)

    def _arrival(self) -> asyncio.Task:
        """Draw what the next arrival is: the next stage of a waiting workflow, a new workflow, or one call."""
        rng = self.rng
        flow = None
        if self.ready and (rng.random() < 0.5 or len(self.ready) > 64):
            flow = self.ready.pop(rng.randrange(len(self.ready)))
        elif rng.random() < 0.3:
            kind, prompt = rng.choice(self.prompts)
            self.n_wf += 1
            flow = _Flow(f"soak-{self.cfg.seed}-{self.n_wf}", kind, prompt, self._pick_model(), rng.randint(2, 4))
        assert self.gen is not None
        return self.gen.start(self._request(flow))

    # ---- phases --------------------------------------------------------------------------------------------
    async def _traffic(self, seconds: float, rate: float) -> None:
        """Open-loop Poisson arrivals for `seconds`: each leaves at its time whatever earlier ones are doing."""
        def arrive(late_s: float) -> None:
            assert self.win is not None
            self.win.late.append(late_s)
            self.win.sent += 1
            self._arrival()

        assert self.gen is not None
        await self.gen.open_loop(poisson_gap(self.rng, rate), arrive, seconds)

    async def _phase(self, phase: str, seconds: float, rate: float) -> None:
        """Traffic for `seconds` in windows of `window_s`; the last window also waits for the phase's answers."""
        start = self.phase_start = self.now()
        end = start + seconds
        self._open(phase, 0)
        gen = asyncio.create_task(self._traffic(seconds, rate))
        try:
            k = 0
            while True:
                w_end = start + (k + 1) * self.cfg.window_s
                last = w_end >= end - 1e-6 or end - w_end < 0.25 * self.cfg.window_s  # no sliver window at the end
                await asyncio.sleep(max(0.0, (end if last else w_end) - self.now()))
                if last:
                    await gen
                    await self.gen.drain(timeout=self.cfg.request_timeout_s + 10)  # type: ignore[union-attr]
                    self._close()
                    return
                self._close()
                k += 1
                self._open(phase, k)
        finally:
            gen.cancel()
            self.ready.clear()  # workflows left half-done are abandoned

    async def _fill_held(self) -> list[asyncio.Task]:
        """Pause the held model's backend and occupy its slots plus the whole gateway queue with pinned calls."""
        os.kill(self.held.pid, signal.SIGSTOP)
        self.paused = True
        n = self.cfg.held_inflight + self.cfg.max_queue
        kind, prompt = self.prompts[0]

        async def one() -> None:
            body = self._body("/v1/chat/completions", HELD_MODEL, prompt, 0, False)
            try:
                ans = await self._post("/v1/chat/completions", body, {"X-Chimera-Kind": kind}, None)
            except asyncio.CancelledError:
                self.held_counts["cancelled"] += 1
                raise
            self.held_counts[classify(ans.status)] += 1

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        self.held_sent = n
        deadline = time.monotonic() + 60
        h: Any = None
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                h = await self._health()
                if h.get("waiting", 0) >= self.cfg.max_queue:
                    return tasks
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway queue did not fill in 60 s (last /health: {h}); see {self.gw.log}")
            await asyncio.sleep(0.1)

    async def _release_held(self, held: list[asyncio.Task], n_check: int = 8) -> None:
        """Cancel the held calls (client disconnects), resume the backend, then check the model answers again."""
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        deadline = time.monotonic() + 30  # the gateway settles the cancelled calls: queue empty again
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if (await self._health()).get("waiting", 1) == 0:
                    break
            await asyncio.sleep(0.1)
        self.resume_held()
        await asyncio.sleep(1.0)  # let the resumed backend close what timed out while it was stopped
        kind, prompt = self.prompts[1]

        async def check() -> None:
            body = self._body("/v1/chat/completions", HELD_MODEL, prompt, 0, False)
            ans = await self._post("/v1/chat/completions", body, {"X-Chimera-Kind": kind}, self.cfg.request_timeout_s)
            self.recovery[classify(ans.status)] += 1

        await asyncio.gather(*(check() for _ in range(n_check)))

    def resume_held(self) -> None:
        if self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.held.pid, signal.SIGCONT)
            self.paused = False

    async def run(self) -> None:
        self.t0 = time.monotonic()
        async with httpx.AsyncClient(limits=LIMITS, timeout=self.cfg.request_timeout_s) as client:
            self.gen = LoadGen(client)
            sampler = asyncio.create_task(self._sample_rss())
            held: list[asyncio.Task] = []
            try:
                await self._phase("steady", self.cfg.steady_s, self.cfg.rate)
                if self.cfg.reject_s > 0:
                    held = await self._fill_held()
                    await self._phase("reject", self.cfg.reject_s, self.cfg.reject_rate or self.cfg.rate)
                    await self._release_held(held)
            finally:
                self.resume_held()
                for t in [sampler, *held]:
                    t.cancel()
                await asyncio.gather(sampler, *held, return_exceptions=True)
                await self.gen.drain(cancel=True)
