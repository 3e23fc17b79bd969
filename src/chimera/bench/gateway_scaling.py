"""`chimera bench gateway --replicas 1,2`: throughput at saturation of 1, 2, … gateway replicas sharing state on one
Redis, with the load split evenly across them, beside a bare forwarding proxy measured in the same run.

Set-up (all on 127.0.0.1): the instant backend of the gateway-overhead benchmark (`backend_app`), the bare Starlette
+ httpx proxy (`proxy_app`), and for each replica count a `replica_set` (Redis + N gateways under uvicorn, one
config, `state:` on that Redis). The client is this process: `concurrency` workers in a closed loop (each sends its
next request as soon as its last one is answered) over one aiohttp session, worker i always to target i mod N, so
the load is split evenly and the targets are saturated. Per measurement: answered requests per second, latency
p50/p99, errors, and CPU per answered request of the gateways (all replicas together), the backend, Redis and the
client, read from /proc. Each replica count is measured in alternating blocks with the bare proxy (P G G P …), so
drift on a shared machine hits both alike.

What it can show depends on the cores: on 2 cores the client, the backend and the gateways share them, so a second
replica cannot add throughput there; the table says how busy each part was (`cores`: CPU seconds per second).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from chimera.bench.gateway_overhead import BODY, SERVED
from chimera.bench.gateway_process import FACTORY, uvicorn_cmd
from chimera.bench.loadgen import percentile
from chimera.bench.proc_cpu import TICK, cpu_seconds, machine_jiffies
from chimera.bench.replica_set import replica_set
from chimera.serve.config import backends_for_cluster, build_gateway_config
from chimera.util.procs import Spawned, spawned, wait_ready
from chimera.util.threaded import free_port


@dataclass
class Load:
    """What one closed-loop block achieved."""

    answered: int = 0
    errors: int = 0
    seconds: float = 0.0
    lat_s: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # process role -> CPU seconds over the block


async def _closed_loop(urls: list[str], concurrency: int, seconds: float, body: bytes) -> Load:
    """`concurrency` workers, worker i to urls[i mod len], each sending its next request when its last is answered."""
    import aiohttp

    out = Load()
    stop_at = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}

    async def worker(session: aiohttp.ClientSession, url: str) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            if ok:
                out.answered += 1
                out.lat_s.append(time.perf_counter() - t0)
            else:
                out.errors += 1

    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session, urls[i % len(urls)]) for i in range(concurrency)))
        out.seconds = time.perf_counter() - t0
    return out


def measure(urls: list[str], pids: dict[str, list[int]], concurrency: int, seconds: float,
            body: bytes) -> Load:
    """One closed-loop block against `urls`, with the CPU each role in `pids` (role -> its processes) spent in it."""
    before = {role: sum(cpu_seconds(p) for p in ps) for role, ps in pids.items()}
    self0, busy0 = time.process_time(), machine_jiffies()[0]
    load = asyncio.run(_closed_loop(urls, concurrency, seconds, body))
    load.cpu_s = {role: sum(cpu_seconds(p) for p in ps) - before[role] for role, ps in pids.items()}
    load.cpu_s["client"] = time.process_time() - self0
    # everything else the machine ran meanwhile (other jobs on a shared machine): the cores left to the benchmark
    load.cpu_s["other"] = max(0.0, (machine_jiffies()[0] - busy0) / TICK - sum(load.cpu_s.values()))
    return load


def _merge(loads: list[Load]) -> Load:
    out = Load()
    for x in loads:
        out.answered += x.answered
        out.errors += x.errors
        out.seconds += x.seconds
        out.lat_s += x.lat_s
        for k, v in x.cpu_s.items():
            out.cpu_s[k] = out.cpu_s.get(k, 0.0) + v
    return out


def summary(load: Load, main_role: str) -> dict[str, Any]:
    """Throughput, latency and CPU per answered request (ms) of every role, and cores each role kept busy."""
    n = max(1, load.answered)
    row = {"answered": load.answered, "errors": load.errors, "rps": load.answered / load.seconds if load.seconds
           else 0.0, "p50_ms": 1e3 * percentile(load.lat_s, 0.5), "p99_ms": 1e3 * percentile(load.lat_s, 0.99),
           "cpu_ms_per_req": 1e3 * load.cpu_s.get(main_role, float("nan")) / n}
    for role, s in load.cpu_s.items():
        row[f"{role}_cpu_ms_per_req"] = 1e3 * s / n
        row[f"{role}_cores"] = s / load.seconds if load.seconds else 0.0
    return row


@contextlib.contextmanager
def _backend_and_proxy(workdir: Path, env: dict[str, str]) -> Iterator[tuple[Spawned, Spawned]]:
    with contextlib.ExitStack() as stack:
        bp, pp = free_port(), free_port()
        b = stack.enter_context(spawned("backend", uvicorn_cmd("chimera.bench.gateway_overhead:backend_app", bp),
                                        bp, "/health", workdir / "backend.log", env=env, timeout_s=30, wait=False))
        p = stack.enter_context(spawned("proxy", uvicorn_cmd("chimera.bench.gateway_overhead:proxy_app", pp), pp,
                                        "/health", workdir / "proxy.log", timeout_s=30, wait=False,
                                        env=dict(env, CHIMERA_BENCH_UPSTREAM=b.url + "/v1")))
        wait_ready(b)
        wait_ready(p)
        yield b, p


def run_scaling(replicas: list[int], duration: float = 10.0, out: Path = Path("out/bench-gateway-replicas"),
                concurrency: int = 16, policy: str = "chimera", block_s: float = 2.5, warmup_s: float = 1.0,
                progress=None) -> dict[str, Any]:
    """For each replica count: a replica set sharing one Redis and the bare proxy, saturated in alternating
    blocks (`duration` seconds of each in all), the load split evenly across the replicas."""
    out.mkdir(parents=True, exist_ok=True)
    src = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": src + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    body = json.dumps(BODY).encode()
    rows = []
    with _backend_and_proxy(out, env) as (backend, proxy):
        cfg = build_gateway_config(
            backends_for_cluster([{"model": SERVED[0], "base_url": backend.url + "/v1", "max_inflight": 10_000}]),
            policy=policy, port=free_port(), trace_store=out / "unused.sqlite",
            limits={"max_queue": 100_000, "request_timeout_s": 60})
        for n in replicas:
            with replica_set(cfg, n, out / f"replicas-{n}", factory=FACTORY, env=env) as rs:
                gw_urls = [u + "/v1/chat/completions" for u in rs.urls]
                px_urls = [proxy.url + "/v1/chat/completions"]
                roles_gw = {"gateway": rs.pids, "backend": [backend.pid]}
                if rs.redis is not None and rs.redis.proc is not None:
                    roles_gw["redis"] = [rs.redis.proc.pid]
                roles_px = {"proxy": [proxy.pid], "backend": [backend.pid]}
                measure(gw_urls, roles_gw, concurrency, warmup_s, body)
                measure(px_urls, roles_px, concurrency, warmup_s, body)
                blocks = max(1, round(duration / block_s))
                gw, px = [], []
                for i in range(blocks):  # P G, G P, …
                    order = [("proxy", px_urls), ("gateway", gw_urls)]
                    for name, urls in (order if i % 2 == 0 else order[::-1]):
                        if name == "proxy":
                            px.append(measure(urls, roles_px, concurrency, duration / blocks, body))
                        else:
                            gw.append(measure(urls, roles_gw, concurrency, duration / blocks, body))
                row = {"replicas": n, "gateway": summary(_merge(gw), "gateway"),
                       "proxy": summary(_merge(px), "proxy")}
                rows.append(row)
                if progress is not None:
                    progress(row)
    return {"setup": {"policy": policy, "concurrency": concurrency, "duration_s": duration, "block_s": block_s,
                      "cpus": os.cpu_count(), "python": sys.version.split()[0]}, "rows": rows}


def markdown_table(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"Gateway replicas at saturation ({s['cpus']} CPUs, Python {s['python']}; policy `{s['policy']}`; "
        f"{s['concurrency']} closed-loop clients split evenly across the replicas; {s['duration_s']:g} s of each "
        f"target per replica count, in alternating blocks with the bare proxy)",
        "",
        "| replicas | **answered/s** | p50 / p99 ms | errors | **gateway CPU ms/req** (all replicas) | gateway "
        "cores | Redis CPU ms/req | bare proxy answered/s | **bare proxy CPU ms/req** | gateway / proxy CPU | "
        "backend / client / other processes, cores (gateway blocks) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        g, p = r["gateway"], r["proxy"]
        lines.append(
            f"| {r['replicas']} | **{g['rps']:.0f}** | {g['p50_ms']:.1f} / {g['p99_ms']:.1f} | {g['errors']} | "
            f"**{g['cpu_ms_per_req']:.2f}** | {g['gateway_cores']:.2f} | "
            f"{g.get('redis_cpu_ms_per_req', float('nan')):.3f} | {p['rps']:.0f} | **{p['cpu_ms_per_req']:.2f}** | "
            f"{g['cpu_ms_per_req'] / p['cpu_ms_per_req']:.2f} | {g['backend_cores']:.2f} / {g['client_cores']:.2f} / "
            f"{g['other_cores']:.2f} |")
    return "\n".join(lines) + "\n"
