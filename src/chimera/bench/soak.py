"""`chimera bench soak`: the gateway under steady mixed traffic, then under a flood of 429s, watching its memory.

Set-up (all on 127.0.0.1, every server a subprocess of this one): three `chimera emulate` backends (Qwen2.5
1.5B / 7B / 14B on A6000, `time_scale`× faster than real time, as `chimera bench live` starts them) and one
`chimera serve` gateway whose config (written to OUT/gateway.yaml) names trained predictors (`chimera train -w
synthetic`, trained into OUT/predictors unless a folder is given), keeps its trace store in OUT, and has a small
`limits.max_queue`. The gateway's resident memory is read from /proc/PID/status (VmRSS) of its process.

Phase 1, "steady": open-loop Poisson arrivals at `rate` requests/s from one asyncio loop and one
httpx.AsyncClient (no connection cap). Each arrival is one request, drawn from a mix: chat or legacy completions,
streaming or not, model `chimera` or a pinned served model, a stage of a multi-stage workflow
(X-Chimera-Workflow-Id / X-Chimera-Stage / X-Chimera-Kind headers, the next stage sent only after the previous one
answered) or a one-stage call; half the finished workflows post `POST /v1/chimera/feedback`. Nothing here should
be refused: the fast backends have far more slots than the traffic needs, so the gateway queue stays empty.

Phase 2, "reject": the backend of one model (the *held* model) is paused with SIGSTOP (by its process handle),
and `max_inflight + max_queue` requests pinned to that model are sent: they fill its slots and then the gateway's
whole queue (`waiting_total` ≥ `limits.max_queue`, checked on /health) and are held there. From then on the same
mix (endpoints, streaming, workflow headers) at `reject_rate`, every request pinned to the held model, goes through
the gateway's scheduling path (token count, trained predictions, `Scheduler.submit`) and is refused with 429
`queue_full` — the path on which prepared prediction rows used to leak. The held model has neither a free slot
nor queue room, so this holds whether the gateway's queue limit is global or per model. At the end the backend is
the held requests are cancelled by the client (the gateway frees their slots and queue places), the backend is
resumed (SIGCONT), and a few pinned calls check that the model serves again (`recovery`, expected all 200).
Held and recovery calls are reported on their own line, not in the windows. (Letting the held calls finish after
SIGCONT instead races the resumed uvicorn closing keep-alive connections that idled through the pause, which the
gateway cannot retry for a pinned call: a pause artefact, not a gateway error.)

Per window of `window_s` seconds: requests sent, answers by class (200, 429, other 4xx, 5xx including broken
streams, connection errors), client latency p50/p99 of 200 answers (and p50 of 429s), the gateway's RSS at the
window end and the largest 1 Hz sample in it, its CPU share, and how late the load generator sent (its p99, so a
saturated client shows). Live run against emulated backends (engine model), not real GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
from pydantic import BaseModel, ConfigDict, Field

from chimera.bench.gateway_overhead import _pct, cpu_seconds
from chimera.bench.live import MODELS, emulated_cluster
from chimera.util.procs import Spawned, chimera_cmd, spawned
from chimera.util.threaded import free_port

LABEL = "live, emulated backends (engine model), not real GPUs"
HELD_MODEL = "qwen2.5-1.5b"  # the model whose backend is paused in the reject phase
CLASSES = ("200", "429", "4xx", "5xx", "conn")
PHASES = ("steady", "reject")


class SoakConfig(BaseModel):
    """What `chimera bench soak` runs; validated before anything starts."""

    model_config = ConfigDict(extra="forbid")

    minutes: float = Field(default=10.0, gt=0)  # steady phase
    rate: float = Field(default=30.0, gt=0)  # requests/s in the steady phase
    reject_minutes: float = Field(default=5.0, ge=0)  # 0: no reject phase
    reject_rate: float | None = Field(default=None, gt=0)  # requests/s in the reject phase (default: rate)
    window_s: float = Field(default=60.0, gt=0)
    time_scale: float = Field(default=20.0, gt=0)  # emulators run this many times faster than real time
    predictors: str | None = None  # a `chimera train` folder; None: train on the synthetic workload into OUT
    train_tasks: int = Field(default=600, ge=20)  # synthetic tasks to train on when `predictors` is None
    train_trees: int = Field(default=100, ge=1)
    max_queue: int = Field(default=32, ge=1)  # the gateway's limits.max_queue
    held_inflight: int = Field(default=32, ge=1)  # max_inflight of the held model's backend
    inflight: int = Field(default=128, ge=1)  # max_inflight of the other backends
    max_tokens: int = Field(default=48, ge=1)  # upper end of each request's max_tokens
    request_timeout_s: float = Field(default=60.0, gt=0)  # client timeout of phase traffic
    seed: int = 0
    lam: float = 0.05  # λ of the gateway's chimera policy

    @property
    def steady_s(self) -> float:
        return 60.0 * self.minutes

    @property
    def reject_s(self) -> float:
        return 60.0 * self.reject_minutes


def command_line(cfg: SoakConfig) -> str:
    """The `chimera bench soak` command that reruns `cfg` (written above the results table)."""
    d = SoakConfig().model_dump()
    flags = {"minutes": "--minutes", "rate": "--rate", "reject_minutes": "--reject-minutes",
             "reject_rate": "--reject-rate", "window_s": "--window-s", "time_scale": "--time-scale",
             "predictors": "--predictors", "train_tasks": "--train-tasks", "train_trees": "--train-trees",
             "max_queue": "--max-queue", "seed": "--seed", "lam": "--lam"}
    parts = ["chimera bench soak", f"--minutes {cfg.minutes:g}", f"--rate {cfg.rate:g}"]
    for k, flag in flags.items():
        v = getattr(cfg, k)
        if k in ("minutes", "rate") or v == d[k]:
            continue
        parts.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(parts)


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS of /proc/PID/status; NaN if it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a stopped child has been waited for by `procs`)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def train_synthetic(dest: Path, n_tasks: int, trees: int, seed: int = 0) -> Path:
    """`chimera train -w synthetic:N --out DEST --trees T` (hashing encoder), as a function."""
    from chimera.train.predictors import gather, train_predictors
    from chimera.workload.source import load_workload

    tasks, _ = load_workload(f"synthetic:{n_tasks}", seed=seed)
    pred = train_predictors(gather([(f"synthetic:{n_tasks}", tasks)], 0.7), encoder="hashing", seed=seed,
                            n_estimators=trees)
    pred.save(dest)
    return dest


def gateway_config(cfg: SoakConfig, emus: dict[str, Spawned], predictors: Path, out: Path, port: int) -> dict:
    """The soak's gateway: trained predictors, trace store in OUT, loopback only, a small queue limit.

    The held calls wait for the whole reject phase, so the request timeout outlasts it."""
    trace = out / "traces.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(trace) + suffix).unlink(missing_ok=True)
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "policy": {"name": "chimera", "lam": cfg.lam},
        "predictors": str(predictors),
        "trace_store": str(trace),
        "backends": [{"name": f"{m}-0", "model": m, "base_url": e.url + "/v1", "profile": MODELS[m],
                      "workload_model": m, "max_inflight": cfg.held_inflight if m == HELD_MODEL else cfg.inflight}
                     for m, e in emus.items()],
        "limits": {"max_queue": cfg.max_queue, "request_timeout_s": cfg.reject_s + 300.0},
    }


# ---- measurements -------------------------------------------------------------------------------------------------
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
            "p50_ms": 1e3 * _pct(self.ok_lat, 0.5), "p99_ms": 1e3 * _pct(self.ok_lat, 0.99),
            "reject_p50_ms": 1e3 * _pct(self.rej_lat, 0.5),
            "send_late_p99_ms": 1e3 * _pct(self.late, 0.99),
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
    """The load generator and the window bookkeeping; one instance per run, driven by `run`."""

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
        self.inflight: set[asyncio.Task] = set()
        self.paused = False
        self.held_counts: dict[str, int] = dict.fromkeys((*CLASSES, "cancelled"), 0)
        self.held_sent = 0
        self.recovery: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.rss_samples: list[tuple[float, float]] = []
        self.client: httpx.AsyncClient | None = None

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

    async def _post(self, path: str, body: dict, headers: dict[str, str], timeout: float | None
                    ) -> tuple[int | None, str | None]:
        """(HTTP status or None on a connection error, served model); a 200 stream that breaks or carries an
        error event counts as 502."""
        assert self.client is not None
        url = self.gw.url + path
        try:
            if not body.get("stream"):
                r = await self.client.post(url, json=body, headers=headers, timeout=timeout)
                return r.status_code, r.headers.get("x-chimera-model")
            async with self.client.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    return r.status_code, None
                done = False
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                        elif '"error"' in data and "error" in json.loads(data):
                            return 502, None
                return (200 if done else 502), r.headers.get("x-chimera-model")
        except httpx.HTTPError:
            return None, None

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
        t = time.monotonic()
        status, served = await self._post(path, body, headers, self.cfg.request_timeout_s)
        dt = time.monotonic() - t
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
        assert w is not None and self.client is not None
        w.sent += 1
        w.feedback += 1
        try:
            r = await self.client.post(self.gw.url + "/v1/chimera/feedback", timeout=self.cfg.request_timeout_s,
                                       json={"workflow_id": flow.wid, "score": round(self.rng.random(), 3)})
            status: int | None = r.status_code
        except httpx.HTTPError:
            status = None
        self.win.counts[classify(status)] += 1  # type: ignore[union-attr]

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
        task = asyncio.create_task(self._request(flow))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return task

    # ---- phases --------------------------------------------------------------------------------------------
    async def _traffic(self, seconds: float, rate: float) -> None:
        """Open-loop Poisson arrivals for `seconds`: each leaves at its time whatever earlier ones are doing."""
        start = time.monotonic()
        t = self.rng.expovariate(rate)
        while t < seconds:
            delay = start + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            assert self.win is not None
            self.win.late.append(max(0.0, time.monotonic() - (start + t)))
            self.win.sent += 1
            self._arrival()
            t += self.rng.expovariate(rate)

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
                    if self.inflight:
                        await asyncio.wait(set(self.inflight), timeout=self.cfg.request_timeout_s + 10)
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
                status, _ = await self._post("/v1/chat/completions", body, {"X-Chimera-Kind": kind}, None)
            except asyncio.CancelledError:
                self.held_counts["cancelled"] += 1
                raise
            self.held_counts[classify(status)] += 1

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        self.held_sent = n
        assert self.client is not None
        deadline = time.monotonic() + 60
        h: Any = None
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                h = (await self.client.get(self.gw.url + "/health", timeout=5)).json()
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
        assert self.client is not None
        deadline = time.monotonic() + 30  # the gateway settles the cancelled calls: queue empty again
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if (await self.client.get(self.gw.url + "/health", timeout=5)).json().get("waiting", 1) == 0:
                    break
            await asyncio.sleep(0.1)
        self.resume_held()
        await asyncio.sleep(1.0)  # let the resumed backend close what timed out while it was stopped
        kind, prompt = self.prompts[1]

        async def check() -> None:
            body = self._body("/v1/chat/completions", HELD_MODEL, prompt, 0, False)
            status, _ = await self._post("/v1/chat/completions", body, {"X-Chimera-Kind": kind},
                                         self.cfg.request_timeout_s)
            self.recovery[classify(status)] += 1

        await asyncio.gather(*(check() for _ in range(n_check)))

    def resume_held(self) -> None:
        if self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.held.pid, signal.SIGCONT)
            self.paused = False

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
        self.t0 = time.monotonic()
        async with httpx.AsyncClient(limits=limits, timeout=self.cfg.request_timeout_s) as client:
            self.client = client
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
                for t in [sampler, *held, *self.inflight]:
                    t.cancel()
                await asyncio.gather(sampler, *held, *self.inflight, return_exceptions=True)


# ---- the whole benchmark ------------------------------------------------------------------------------------------
def _phase_totals(rows: list[dict], phase: str) -> dict[str, Any]:
    rs = [r for r in rows if r["phase"] == phase]
    counts = {c: sum(r["counts"][c] for r in rs) for c in CLASSES}
    return {"windows": len(rs), "sent": sum(r["sent"] for r in rs), "feedback": sum(r["feedback"] for r in rs),
            "counts": counts, "seconds": (rs[-1]["end_s"] - rs[0]["start_s"]) if rs else 0.0}


def summarise(cfg: SoakConfig, rows: list[dict], held: dict) -> dict[str, Any]:
    steady = [r for r in rows if r["phase"] == "steady"]
    warm = steady[0]["rss_end_mib"] if steady else float("nan")
    end = rows[-1]["rss_end_mib"] if rows else float("nan")
    steady_end = steady[-1]["rss_end_mib"] if steady else float("nan")
    phases = {p: _phase_totals(rows, p) for p in PHASES if any(r["phase"] == p for r in rows)}
    totals = {c: sum(ph["counts"][c] for ph in phases.values()) for c in CLASSES}  # held + recovery: on their own
    s: dict[str, Any] = {
        "rss_warmup_mib": warm, "rss_steady_end_mib": steady_end, "rss_end_mib": end,
        "rss_max_mib": max((r["rss_max_mib"] for r in rows), default=float("nan")),
        "rss_growth_pct": 100.0 * (end - warm) / warm if warm else float("nan"),
        "rss_growth_steady_pct": 100.0 * (steady_end - warm) / warm if warm else float("nan"),
        "phases": phases, "held": held, "totals": totals,
        "errors": totals["5xx"] + totals["conn"],
        "recovery_errors": sum(v for k, v in held.get("recovery", {}).items() if k != "200"),
        "steady_rejected": phases.get("steady", {}).get("counts", {}).get("429", 0),
    }
    rej = phases.get("reject")
    if rej and rej["counts"]["429"]:
        s["reject_kib_per_1000_429"] = 1024.0 * (end - steady_end) / rej["counts"]["429"] * 1000.0
    return s


def run_soak(cfg: SoakConfig, out: Path | str = "out/bench-soak",
             on_stage: Callable[[str], None] | None = None,
             on_window: Callable[[dict], None] | None = None,
             on_tick: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Train (or load) predictors, start the backends and the gateway, run both phases, stop everything,
    write OUT/results.json and OUT/results.md; returns the results."""
    from chimera.predict.artifacts import load_predictors
    from chimera.workload.schema import write_tasks
    from chimera.workload.source import load_workload

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md"):  # an interrupted run leaves none behind, not an older run's
        (out / name).unlink(missing_ok=True)
    say = on_stage or (lambda _m: None)
    t_start = time.time()
    if cfg.predictors is None:
        say(f"training predictors on synthetic:{cfg.train_tasks}")
        pred_dir = train_synthetic(out / "predictors", cfg.train_tasks, cfg.train_trees, cfg.seed)
    else:
        pred_dir = Path(cfg.predictors)
    known = load_predictors(pred_dir).models  # a bad folder fails here, before anything starts
    missing = [m for m in MODELS if m not in known]
    if missing:
        raise ValueError(f"{pred_dir} was trained on {known}; the soak's backends serve {list(MODELS)} "
                         f"(missing {missing}): train with `chimera train -w synthetic`")
    tasks, _ = load_workload("synthetic", seed=cfg.seed)
    prompts = [(t.kind, t.prompt) for t in tasks]
    wl = out / "workload.jsonl"
    write_tasks(tasks, wl)
    say("starting emulated backends and the gateway")
    pids: dict[str, int] = {}
    with emulated_cluster(wl, cfg.time_scale, cfg.seed, out) as emus:
        pids.update({f"emulator {m}": e.pid for m, e in emus.items()})
        port = free_port()
        path = out / "gateway.yaml"
        path.write_text(json.dumps(gateway_config(cfg, emus, pred_dir, out, port), indent=1))  # JSON is YAML
        with spawned("chimera gateway", chimera_cmd("serve", "--config", str(path)), port, "/health",
                     out / "gateway.log") as gw:
            pids["gateway"] = gw.pid
            soak = Soak(cfg, gw, emus[HELD_MODEL], prompts, on_window, on_tick)
            say("steady")
            try:
                asyncio.run(soak.run())
            finally:
                soak.resume_held()  # never leave a stopped process behind (Ctrl-C, errors)
            rss_final = rss_mib(gw.pid)
    held = {"model": HELD_MODEL, "sent": soak.held_sent, "counts": soak.held_counts, "recovery": soak.recovery}
    result = {
        "label": LABEL, "command": command_line(cfg), "config": cfg.model_dump(), "predictors": str(pred_dir),
        "gateway_config": str(path), "held_model": HELD_MODEL, "windows": soak.rows,
        "summary": summarise(cfg, soak.rows, held), "rss_before_stop_mib": rss_final,
        "rss_samples": [[round(t, 2), v] for t, v in soak.rss_samples], "pids": pids,
        "cpus": os.cpu_count(), "wall_s": time.time() - t_start,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    return result


# ---- report -------------------------------------------------------------------------------------------------------
def fmt_num(x: float, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


WINDOW_COLUMNS = ("phase", "window", "t (s)", "sent", "req/s", "200", "429", "4xx", "5xx", "conn err",
                  "p50 ms", "p99 ms", "429 p50 ms", "RSS end MiB", "RSS max MiB", "gw CPU %", "send late p99 ms")


def window_cells(r: dict) -> list[str]:
    c = r["counts"]
    return [r["phase"], str(r["window"]), f"{r['start_s']:.0f}–{r['end_s']:.0f}", str(r["sent"]),
            fmt_num(r["sent_per_s"]), str(c["200"]), str(c["429"]), str(c["4xx"]), str(c["5xx"]), str(c["conn"]),
            fmt_num(r["p50_ms"]), fmt_num(r["p99_ms"]), fmt_num(r["reject_p50_ms"]), fmt_num(r["rss_end_mib"]),
            fmt_num(r["rss_max_mib"]), fmt_num(r["gateway_cpu_pct"], 0), fmt_num(r["send_late_p99_ms"])]


def summary_lines(res: dict) -> list[str]:
    s = res["summary"]
    lines = [f"gateway RSS: {fmt_num(s['rss_warmup_mib'])} MiB after warm-up (end of the first window) → "
             f"{fmt_num(s['rss_steady_end_mib'])} MiB at the end of the steady phase → "
             f"{fmt_num(s['rss_end_mib'])} MiB at the end ({s['rss_growth_pct']:+.1f}%; steady phase alone "
             f"{s['rss_growth_steady_pct']:+.1f}%); max {fmt_num(s['rss_max_mib'])} MiB"]
    for p, ph in s["phases"].items():
        c = ph["counts"]
        lines.append(f"{p}: {ph['sent']} sent in {ph['seconds']:.0f} s ({ph['feedback']} feedback posts) — "
                     + ", ".join(f"{k} {c[k]}" for k in CLASSES))
    h = s["held"]
    if h["sent"]:
        lines.append(f"held on paused {h['model']} (its slots + the gateway queue, cancelled by the client at the end "
                     f"of the phase; not counted above): {h['sent']} sent — "
                     + ", ".join(f"{k} {v}" for k, v in h["counts"].items())
                     + f"; after SIGCONT, recovery calls to {h['model']}: "
                     + ", ".join(f"{k} {v}" for k, v in h["recovery"].items()))
    if "reject_kib_per_1000_429" in s:
        lines.append(f"RSS change over the reject phase per 1000 rejected requests: "
                     f"{s['reject_kib_per_1000_429']:+.0f} KiB")
    lines.append(f"errors (5xx + connection errors, both phases): {s['errors']}; 429s in the steady phase: "
                 f"{s['steady_rejected']}; recovery calls not 200: {s['recovery_errors']}")
    return lines


def markdown(res: dict) -> str:
    lines = [f"`{res['command']}`", "",
             f"Gateway soak — {res['label']}: 3 `chimera emulate` backends ({', '.join(MODELS)}, time scale "
             f"{res['config']['time_scale']:g}) behind `chimera serve` with trained predictors "
             f"(`{res['predictors']}`); {res['cpus']} CPUs. Steady: open-loop Poisson, mixed chat/completions, "
             f"streaming and not, `chimera` and pinned models, multi-stage workflows, feedback. Reject: "
             f"{res['held_model']}'s backend paused (SIGSTOP) with its slots and the gateway queue "
             f"(max_queue {res['config']['max_queue']}) held full, so the same mix pinned to it is refused with 429. "
             "Latency percentiles are of 200 answers; RSS is the gateway process's VmRSS.", "",
             "| " + " | ".join(WINDOW_COLUMNS) + " |",
             "|" + "|".join("---" if c == "phase" else "---:" for c in WINDOW_COLUMNS) + "|"]
    lines += ["| " + " | ".join(window_cells(r)) + " |" for r in res["windows"]]
    lines += [""] + [f"- {x}" for x in summary_lines(res)]
    return "\n".join(lines) + "\n"


