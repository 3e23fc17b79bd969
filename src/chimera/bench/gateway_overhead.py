"""`chimera bench gateway`: the latency the gateway ADDS in front of a backend that answers at once.

Set-up (all on 127.0.0.1):

* backend — a minimal Starlette app (`backend_app`) answering a small non-streaming chat completion immediately
  (backend time ≈ 0), served by uvicorn in its own subprocess;
* gateway — the real Chimera gateway (`chimera.serve.app:app_from_env`, one backend, `max_inflight` 10 000,
  `max_queue` 100 000, auth off, policy `chimera` with online priors unless `--policy` says otherwise), served by
  uvicorn in its own subprocess;
* client — this process: one shared `httpx.AsyncClient` (HTTP/1.1 keep-alive) sending open-loop Poisson arrivals
  (a request is started at its scheduled time whether or not earlier ones have returned).

For each rate the client alternates blocks of `block_s` seconds directly to the backend and through the gateway
in an ABBA order (D G G D D G …) so drift on a noisy machine hits both equally, after a short warm-up of each.
Latency is per request, from just before the client sends until the whole body is read. Added latency is
reported as via − direct at the same percentile (p50, p99) and in the mean; requests are not paired (each arrival
goes to one target), so there is no paired-difference median. CPU per request of each process (from /proc) is
reported too: with two cores shared by three processes, CPU time is what the added latency is made of.

`--baseline` adds a third target in the same rotation: a bare forwarding proxy (`proxy_app`: Starlette + one
httpx.AsyncClient, nothing else) in its own uvicorn subprocess — the floor this HTTP stack costs by itself, so
what the gateway adds beyond plain proxying can be read off as gateway − proxy.

`--conversation M,T` sends chat conversations of M messages and about T tokens instead of one short message (an
agent's long context), and `--identity-baseline` adds a second gateway with conversation inference off in the same
rotation: gateway − that gateway is what inferring workflows from conversations costs per request.

`--online` adds a second gateway with online learning on (`learning: {online: true}`) in the same rotation, and
both gateways then serve two models on the one backend and get `model: "chimera"` with a distinct prompt per request,
so the policy routes every call (and, in the second gateway, the online learner hashes the request's text, predicts,
explores and remembers every decision, nothing cached): that gateway − the first is what online learning costs per
request. Both gateways get each answered request's workflow scored (POST /v1/chimera/feedback, as an agent scores a
finished task): the learner learns from it, the other gateway stores it; CPU per request includes that post.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chimera.bench.gateway_process import FACTORY, gateway_process, uvicorn_cmd
from chimera.bench.loadgen import LIMITS, Answer, LoadGen, Request, percentile, poisson_gap
from chimera.bench.proc_cpu import cpu_seconds
from chimera.serve.config import backends_for_cluster, build_gateway_config
from chimera.util.procs import Spawned, spawned, wait_ready
from chimera.util.threaded import free_port

SERVED = ("bench-model", "bench-model-b")  # the backend's names for the gateways (the second only with --online)
BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
_REPLY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}).encode()


def conversation_bodies(messages: int, tokens: int, n: int = 32) -> list[dict[str, Any]]:
    """`n` distinct chat conversations of `messages` turns (user and assistant alternating, as an agent's context
    grows) and about `tokens` tokens each: distinct, so no request finds another's prefix."""
    from chimera.workload.tokens import count_tokens

    vocab = ("plan step tool result check value search query answer report table record number reason note "
             "source claim test case model output input error retry list item field name city year").split()
    per_msg = max(1, tokens // messages)
    probe = " ".join(vocab[i % len(vocab)] for i in range(200))
    words = max(1, round(per_msg * 200 / count_tokens(probe)))
    bodies = []
    for k in range(n):
        msgs = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": f"conversation {k} turn {i}: " + " ".join(vocab[(i * 7 + j + k) % len(vocab)]
                                                                    for j in range(words))}
                for i in range(messages)]
        if msgs[-1]["role"] != "user":
            msgs[-1]["role"] = "user"
        bodies.append({**BODY, "messages": msgs})
    return bodies


def routed_bodies(bodies: list[dict[str, Any]], n: int = 10_000) -> list[dict[str, Any]]:
    """`n` requests for `model: "chimera"` (the policy routes each) cycling through `bodies`, each with a prompt of its
    own (the first message numbered): the online learner hashes every request's text and asks its prior anew, as for
    a new workflow, never reading a cached row."""
    out = []
    for i in range(n):
        body = bodies[i % len(bodies)]
        first = {**body["messages"][0], "content": f"{body['messages'][0]['content']} (request {i})"}
        out.append({**body, "model": "chimera", "messages": [first, *body["messages"][1:]]})
    return out


# ---- the fake backend ------------------------------------------------------------------------------------------
def backend_app():
    """uvicorn --factory entry point: an OpenAI-style chat endpoint that answers a fixed reply immediately."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def chat(request):
        await request.body()
        return Response(_REPLY, media_type="application/json")

    async def health(request):
        return Response(b"ok")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def proxy_app():
    """uvicorn --factory entry point for the optional baseline: a bare forwarding proxy (Starlette + one shared
    httpx.AsyncClient, no auth, scheduling, tokenising, trace or metrics) to $CHIMERA_BENCH_UPSTREAM. It shows the
    floor that this HTTP stack alone costs, so the gateway's own share can be told apart."""
    import contextlib as _cl

    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    upstream = os.environ["CHIMERA_BENCH_UPSTREAM"].rstrip("/")
    state: dict[str, httpx.AsyncClient] = {}

    @_cl.asynccontextmanager
    async def lifespan(app):
        state["c"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=200))
        yield
        await state["c"].aclose()

    async def chat(request):
        body = await request.body()
        r = await state["c"].post(upstream + "/chat/completions", content=body,
                                  headers={"content-type": "application/json"})
        return Response(r.content, r.status_code, media_type="application/json")

    async def health(request):
        return Response(b"ok")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/health", health, methods=["GET"])], lifespan=lifespan)


# ---- processes --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_stack(workdir: Path, policy: str = "chimera", profile_gateway: bool = False, baseline: bool = False,
                  gateway_target: str = FACTORY, litellm: str | Path | None = None, identity_baseline: bool = False,
                  online: bool = False):
    """Backend and gateway (and, with `baseline`, the bare proxy; with `identity_baseline`, a second gateway that
    infers no workflows from conversations; with `online`, a second gateway that learns online, both gateways then
    serving two models; with `litellm`, LiteLLM's proxy routing to the same backend), each in its own subprocess
    (stopped with SIGINT, so cProfile writes its file); yields ({target: url}, {process: pid})."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": src + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    with contextlib.ExitStack() as stack:
        def start(name: str, target: str, extra_env: dict | None = None) -> Spawned:
            port = free_port()
            return stack.enter_context(spawned(name, uvicorn_cmd(target, port), port, "/health",
                                               workdir / f"{name}.log", env=dict(env, **(extra_env or {})),
                                               timeout_s=30, wait=False))

        b = start("backend", "chimera.bench.gateway_overhead:backend_app")

        served = SERVED if online else SERVED[:1]

        def gateway(folder: Path, **sections: Any) -> Spawned:
            cfg = build_gateway_config(
                backends_for_cluster([{"model": m, "base_url": b.url + "/v1", "max_inflight": 10_000}
                                      for m in served]),
                policy=policy, port=free_port(), trace_store=folder / "bench-traces.sqlite",
                limits={"max_queue": 100_000, "request_timeout_s": 60}, **sections)
            return stack.enter_context(gateway_process(
                cfg, folder, factory=gateway_target, env=env, timeout_s=30, wait=False,
                profile_to=folder / "gateway.prof" if profile_gateway and folder == workdir else None))

        procs = {"backend": b, "gateway": gateway(workdir)}
        if identity_baseline:
            (workdir / "no-inference").mkdir(exist_ok=True)
            procs["gateway_noinfer"] = gateway(workdir / "no-inference", identity={"conversation": False})
        if online:
            (workdir / "online").mkdir(exist_ok=True)
            procs["gateway_online"] = gateway(workdir / "online", learning={"online": True})
        if baseline:
            procs["proxy"] = start("proxy", "chimera.bench.gateway_overhead:proxy_app",
                                   {"CHIMERA_BENCH_UPSTREAM": b.url + "/v1"})
        for p in procs.values():
            wait_ready(p)
        urls = {"direct": b.url, **{k: p.url for k, p in procs.items() if k != "backend"}}
        pids = {k: p.pid for k, p in procs.items()}
        if litellm is not None:
            from chimera.bench.litellm_proxy import litellm_config, litellm_proxy

            ll = stack.enter_context(litellm_proxy(
                litellm_config({"bench-model": b.url + "/v1"}, "simple-shuffle", group="bench-model"),
                workdir / "litellm", binary=litellm))
            urls["litellm"], pids["litellm"] = ll.url, ll.pid
        yield urls, pids


# ---- load generation --------------------------------------------------------------------------------------------
@dataclass
class Samples:
    lat_s: list[float] = field(default_factory=list)
    errors: int = 0
    sent: int = 0
    busy_s: float = 0.0  # wall time of the blocks (for the achieved rate)
    late_s: list[float] = field(default_factory=list)  # how late each send started vs its Poisson time
    feedback_errors: int = 0  # scores posted (`--online`) that were not answered 200

    def add(self, a: Answer) -> None:
        """One answer: its latency if 200, else an error."""
        if a.status == 200:
            self.lat_s.append(a.latency_s)
        else:
            self.errors += 1


async def _block(gen: LoadGen, url: str, rate: float, seconds: float, rng: random.Random,
                 out: Samples | None, bodies: list[dict[str, Any]], feedback_url: str | None = None) -> None:
    """Open-loop Poisson arrivals at `rate` for `seconds`, cycling through `bodies`; `out=None` is a warm-up. With
    `feedback_url`, each answered request's workflow (its x-chimera-workflow-id) is then scored there, as an agent
    scores a finished task: a gateway's learning is part of what its requests cost."""
    sink = out if out is not None else Samples()
    tasks: list[asyncio.Task] = []
    start = time.perf_counter()

    async def scored(req: Request) -> None:
        a = await gen.send(req)
        sink.add(a)
        wid = a.headers.get("x-chimera-workflow-id") if a.status == 200 else None
        if wid and feedback_url:
            score = float(zlib.crc32(wid.encode()) % 2)  # right or wrong, the same for a workflow in every run
            if (await gen.send(Request(feedback_url, {"workflow_id": wid, "score": score}))).status != 200:
                sink.feedback_errors += 1

    def arrive(late_s: float) -> None:
        sink.late_s.append(late_s)
        sink.sent += 1
        req = Request(url, bodies[sink.sent % len(bodies)])
        tasks.append(gen.start(scored(req)) if feedback_url else gen.fire(req, sink.add))

    await gen.open_loop(poisson_gap(rng, rate), arrive, seconds)
    if tasks:
        await asyncio.gather(*tasks)
    sink.busy_s += max(seconds, time.perf_counter() - start)


async def _measure_rate(gen: LoadGen, urls: dict[str, str], rate: float, duration: float,
                        block_s: float, warmup_s: float, seed: int, pids: dict[str, int],
                        bodies: list[dict[str, Any]], feedback: dict[str, str]) -> dict[str, Any]:
    rng = random.Random(seed)
    samples = {k: Samples() for k in urls}
    for k, u in urls.items():
        await _block(gen, u, rate, warmup_s, rng, None, bodies, feedback.get(k))
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    self0 = time.process_time()
    n_blocks = max(1, math.ceil(duration / block_s))
    per = duration / n_blocks
    names = list(urls)
    for i in range(n_blocks):  # ABBA: D G, G D, D G, ... (with the baseline: D G P, P G D, ...)
        for k in (names if i % 2 == 0 else names[::-1]):
            await _block(gen, urls[k], rate, per, rng, samples[k], bodies, feedback.get(k))
    d, g = samples["direct"], samples["gateway"]
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    client_cpu = time.process_time() - self0
    row: dict[str, Any] = {"rate": rate, "duration_s": duration}
    # CPU per request: the gateway only works during via blocks; the backend serves both kinds of request
    row["gateway_cpu_ms_per_req"] = 1e3 * cpu["gateway"] / max(1, g.sent)
    row["backend_cpu_ms_per_req"] = 1e3 * cpu["backend"] / max(1, g.sent + d.sent)
    sent = sum(x.sent for x in samples.values())
    row["client_cpu_ms_per_req"] = 1e3 * client_cpu / max(1, sent)
    if len(samples) > 2:
        row["backend_cpu_ms_per_req"] = 1e3 * cpu["backend"] / max(1, sent)
    for other in ("proxy", "gateway_noinfer", "gateway_online"):
        if other in samples:
            row[f"{other}_cpu_ms_per_req"] = 1e3 * cpu[other] / max(1, samples[other].sent)
    for name, s in samples.items():
        row[f"{name}_n"] = len(s.lat_s)
        row[f"{name}_errors"] = s.errors
        if name in feedback:
            row[f"{name}_feedback_errors"] = s.feedback_errors
        row[f"{name}_achieved_rps"] = s.sent / s.busy_s if s.busy_s else 0.0
        row[f"{name}_p50_ms"] = 1e3 * percentile(s.lat_s, 0.50)
        row[f"{name}_p99_ms"] = 1e3 * percentile(s.lat_s, 0.99)
        row[f"{name}_mean_ms"] = 1e3 * (sum(s.lat_s) / len(s.lat_s)) if s.lat_s else float("nan")
        row[f"{name}_send_late_p99_ms"] = 1e3 * percentile(s.late_s, 0.99)
    row["added_p50_ms"] = row["gateway_p50_ms"] - row["direct_p50_ms"]
    row["added_p99_ms"] = row["gateway_p99_ms"] - row["direct_p99_ms"]
    row["added_mean_ms"] = row["gateway_mean_ms"] - row["direct_mean_ms"]
    for other in ("proxy", "litellm"):
        if other in samples:
            for q in ("p50", "p99", "mean"):
                row[f"{other}_added_{q}_ms"] = row[f"{other}_{q}_ms"] - row[f"direct_{q}_ms"]
    if "litellm" in samples:
        row["litellm_cpu_ms_per_req"] = 1e3 * cpu["litellm"] / max(1, samples["litellm"].sent)
    return row


async def _run_all(urls: dict[str, str], pids: dict[str, int], rates: list[float], duration: float, block_s: float,
                   warmup_s: float, seed: int, bodies: list[dict[str, Any]], feedback: dict[str, str],
                   progress=None) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(http1=True, http2=False, limits=LIMITS, timeout=30) as client:
        gen = LoadGen(client)
        rows = []
        for i, rate in enumerate(rates):
            rows.append(await _measure_rate(gen, urls, rate, duration, block_s, warmup_s, seed + i, pids, bodies,
                                            feedback))
            if progress is not None:
                progress(rows[-1])
        return rows


def run_benchmark(rates: list[float], duration: float = 5.0, out: Path = Path("out/bench-gateway"),
                  policy: str = "chimera", block_s: float = 1.0, warmup_s: float = 0.5, seed: int = 0,
                  profile_gateway: bool = False, baseline: bool = False, progress=None,
                  gateway_target: str = FACTORY, litellm: str | Path | None = None,
                  conversation: tuple[int, int] | None = None, identity_baseline: bool = False,
                  online: bool = False) -> dict[str, Any]:
    """Start backend + gateway (+ bare proxy, + a gateway without conversation inference, + a gateway that learns
    online, + LiteLLM) subprocesses, measure every rate, stop them. `conversation` = (messages, tokens) of each
    request's chat history; with `online` every request asks for `model: "chimera"` (the policy routes it)."""
    bodies = conversation_bodies(*conversation) if conversation is not None else [BODY]
    if online:
        bodies = routed_bodies(bodies)
    with running_stack(out, policy=policy, profile_gateway=profile_gateway, baseline=baseline,
                       gateway_target=gateway_target, litellm=litellm,
                       identity_baseline=identity_baseline, online=online) as (urls, pids):
        targets = {k: u + "/v1/chat/completions" for k, u in urls.items()}
        # with --online both gateways get every workflow's score: the learner learns, the other stores it
        feedback = {k: urls[k] + "/v1/chimera/feedback" for k in ("gateway", "gateway_online") if online}
        rows = asyncio.run(_run_all(targets, pids, rates, duration, block_s, warmup_s, seed, bodies, feedback,
                                    progress))
    result = {
        "setup": {"policy": policy, "block_s": block_s, "warmup_s": warmup_s, "duration_s": duration,
                  "cpus": os.cpu_count(), "python": sys.version.split()[0],
                  "processes": "client (this process, one httpx.AsyncClient, HTTP/1.1 keep-alive), backend "
                               "(uvicorn subprocess, minimal Starlette app), gateway (uvicorn subprocess)"
                               + (", bare proxy baseline (uvicorn subprocess: Starlette + httpx forwarding only)"
                                  if baseline else "")
                               + (", the same gateway without conversation inference (uvicorn subprocess)"
                                  if identity_baseline else "")
                               + (", the same gateway with online learning (uvicorn subprocess); both gateways "
                                  "serve two models on the backend and route model `chimera`" if online else "")
                               + (", LiteLLM proxy (its own CLI and uvicorn, one deployment, simple-shuffle)"
                                  if litellm is not None else ""),
                  "baseline": baseline, "identity_baseline": identity_baseline, "online": online,
                  "conversation": list(conversation) if conversation is not None else None,
                  "litellm": litellm is not None,
                  "target": "added p50 <= 1 ms and p99 <= 5 ms at 200 req/s"},
        "rows": rows,
    }
    if online:  # the part that differs, alone: the learner's own work per routed call, in this process
        from chimera.bench.learner_cost import learner_work

        result["learner_work"] = learner_work()
    prof = out / "gateway.prof"
    if profile_gateway and prof.exists():
        result["profile_top"] = str(write_profile_summary(prof, out / "gateway-profile.txt"))
    return result


def write_profile_summary(prof: Path, dest: Path, top: int = 40) -> Path:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(prof), stream=buf)
    st.sort_stats("tottime").print_stats(top)
    buf.write("\n\n==== by cumulative time ====\n")
    st.sort_stats("cumulative").print_stats(top)
    dest.write_text(buf.getvalue())
    return dest


def markdown_table(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"Gateway overhead (policy `{s['policy']}`, {s['cpus']} CPUs, Python {s['python']}; {s['duration_s']:g} s per "
        f"target per rate in ABBA blocks of {s['block_s']:g} s; latencies in ms)",
        "",
        "| rate (req/s) | achieved direct / via | direct p50 | via p50 | **added p50** | direct p99 | via p99 | "
        "**added p99** | added mean | errors direct / via | CPU ms/req gateway / backend / client |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['rate']:g} | {r['direct_achieved_rps']:.0f} / {r['gateway_achieved_rps']:.0f} | "
            f"{r['direct_p50_ms']:.2f} | {r['gateway_p50_ms']:.2f} | **{r['added_p50_ms']:.2f}** | "
            f"{r['direct_p99_ms']:.2f} | {r['gateway_p99_ms']:.2f} | **{r['added_p99_ms']:.2f}** | "
            f"{r['added_mean_ms']:.2f} | {r['direct_errors']} / {r['gateway_errors']} | "
            f"{r['gateway_cpu_ms_per_req']:.2f} / {r['backend_cpu_ms_per_req']:.2f} / "
            f"{r['client_cpu_ms_per_req']:.2f} |")
    if s.get("baseline"):
        lines += ["", "Baseline — a bare forwarding proxy on the same stack (uvicorn + httpx, no Chimera logic):",
                  "",
                  "| rate (req/s) | proxy p50 | **added p50** | proxy p99 | **added p99** | added mean | "
                  "errors | CPU ms/req proxy |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            lines.append(f"| {r['rate']:g} | {r['proxy_p50_ms']:.2f} | **{r['proxy_added_p50_ms']:.2f}** | "
                         f"{r['proxy_p99_ms']:.2f} | **{r['proxy_added_p99_ms']:.2f}** | "
                         f"{r['proxy_added_mean_ms']:.2f} | "
                         f"{r['proxy_errors']} | {r['proxy_cpu_ms_per_req']:.2f} |")
    if s.get("identity_baseline"):
        lines += ["", "What inferring workflows from conversations costs: the same gateway with `identity.conversation: "
                  "false` in the same rotation:", "",
                  "| rate (req/s) | CPU ms/req gateway | CPU ms/req without inference | **inference, ms/req** |",
                  "|---:|---:|---:|---:|"]
        for r in result["rows"]:
            d = r["gateway_cpu_ms_per_req"] - r["gateway_noinfer_cpu_ms_per_req"]
            lines.append(f"| {r['rate']:g} | {r['gateway_cpu_ms_per_req']:.2f} | "
                         f"{r['gateway_noinfer_cpu_ms_per_req']:.2f} | **{d:+.2f}** |")
    if s.get("online"):
        lines += ["", "What online learning costs: the same gateway with `learning: {online: true}` in the same "
                  "rotation (both route `model: chimera` between two models, a distinct prompt per request; each "
                  "answered request's workflow is then scored, and CPU per request includes that post):", "",
                  "| rate (req/s) | CPU ms/req gateway | CPU ms/req with online learning | **learning, ms/req** | "
                  "p50 gateway / online | p99 gateway / online | errors online (requests / scores) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            d = r["gateway_online_cpu_ms_per_req"] - r["gateway_cpu_ms_per_req"]
            lines.append(f"| {r['rate']:g} | {r['gateway_cpu_ms_per_req']:.2f} | "
                         f"{r['gateway_online_cpu_ms_per_req']:.2f} | **{d:+.2f}** | "
                         f"{r['gateway_p50_ms']:.2f} / {r['gateway_online_p50_ms']:.2f} | "
                         f"{r['gateway_p99_ms']:.2f} / {r['gateway_online_p99_ms']:.2f} | "
                         f"{r['gateway_online_errors']} / {r['gateway_online_feedback_errors']} |")
        w = result.get("learner_work")
        if w:
            lines += ["", f"The learner's own work, in process (the gateway's backend pool and policy, {w['calls']} "
                      f"routed calls each scored, median of {w['rounds']} alternating rounds): "
                      f"{w['cpu_ms_per_call_off']:.3f} ms of CPU per call without it, "
                      f"{w['cpu_ms_per_call_on']:.3f} ms with it: **{w['learner_ms_per_call']:+.3f} ms** per call."]
    if s.get("litellm"):
        lines += ["", "LiteLLM's proxy in the same rotation (the gateway people would otherwise deploy):", "",
                  "| rate (req/s) | achieved | LiteLLM p50 | **added p50** | LiteLLM p99 | **added p99** | added mean | "
                  "errors | CPU ms/req LiteLLM |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            lines.append(f"| {r['rate']:g} | {r['litellm_achieved_rps']:.0f} | {r['litellm_p50_ms']:.2f} | "
                         f"**{r['litellm_added_p50_ms']:.2f}** | {r['litellm_p99_ms']:.2f} | "
                         f"**{r['litellm_added_p99_ms']:.2f}** | {r['litellm_added_mean_ms']:.2f} | "
                         f"{r['litellm_errors']} | {r['litellm_cpu_ms_per_req']:.2f} |")
    conv = s.get("conversation")
    body = f"each request a {conv[0]}-message conversation of ~{conv[1]} tokens" if conv else "one short message"
    lines += ["", f"Set-up: {s['processes']}; {body}. Target: {s['target']}."]
    return "\n".join(lines) + "\n"
