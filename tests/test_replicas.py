"""Several gateway replicas sharing state on a real Redis, each a `chimera serve` subprocess (bench.replica_set), in
front of emulated backends whose own exact gauge (`GET /emulator/peak`) says how many requests they ever held at once.

Global caps across replicas; one replica's load steering the other's routing; a replica SIGKILLed mid-run (its leases
expire within the TTL, the survivor takes the whole cap, every acknowledged call is in its trace store); Redis stopped
mid-run and started again (no failed request, degraded mode on /health and /metrics, recovery measured). Measured
times are printed (`pytest -s`)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from typing import Iterator, Sequence

import httpx
import pytest
import redis

from chimera.bench.replica_set import ReplicaSet, replica_set
from chimera.emulate.runner import EmulatorServer
from chimera.util.redis_server import RedisServer
from chimera.workload.schema import Outcome, StageOutcome, Task

pytest.importorskip("chimera.serve.shared.state", reason="the shared-state core (serve/shared/state.py) is not here")

CAP = 8
PROFILE = "qwen2.5-7b@h100"
LONG_PROMPT = "Write a long essay."  # the emulator answers this first user message with LONG_TOKENS tokens
LONG_TOKENS = 600  # ~4 s on PROFILE at a batch of 8, time scale 1


def _long_task(model: str, tokens: int = LONG_TOKENS) -> Task:
    return Task(id="long", kind="qa", prompt=LONG_PROMPT, outcomes={model: Outcome(score=1.0, output_tokens=tokens)},
                stages={model: [StageOutcome(output_tokens=tokens)]})


@contextlib.contextmanager
def emulators(specs: Sequence[tuple[str, str]], time_scale: float = 1.0,
              long_tokens: int = LONG_TOKENS) -> Iterator[list[EmulatorServer]]:
    """One emulated backend per (served model name, profile), in threads of this process."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(EmulatorServer(profile=p, served_model_name=m, time_scale=time_scale,
                                                  workload=[_long_task(m, long_tokens)])) for m, p in specs]


def gateway_doc(emus: Sequence[EmulatorServer], prefix: str, *, cap: int = CAP, policy: str = "chimera",
                **state) -> dict:
    """One gateway config for every replica: each emulator a backend (`cap` slots), its metrics not scraped (so the
    only way a replica learns of another's load is the shared state), state under its own key prefix."""
    names: dict[str, int] = {}
    backends = []
    for e in emus:
        i = names[e.state.model] = names.get(e.state.model, -1) + 1
        backends.append({"name": f"{e.state.model}-{i}", "model": e.state.model, "base_url": e.base_url,
                         "max_inflight": cap})
    return {"policy": {"name": policy}, "backends": backends, "health": {"scrape_metrics": False},
            "limits": {"max_queue": 10_000, "request_timeout_s": 120},
            "state": {"redis_url": "redis://placeholder:1/0", "key_prefix": prefix, **state}}


def emulator_peak(e: EmulatorServer, reset: bool = False) -> dict:
    """{"requests": held now, "peak": most held at once} from the emulator's own endpoint (POST: then restart it)."""
    root = e.base_url.removesuffix("/v1")
    return (httpx.post if reset else httpx.get)(root + "/emulator/peak", timeout=5).json()


def chat(model: str = "chimera", text: str = "Explain why the sky is blue.", max_tokens: int | None = 50) -> dict:
    body: dict = {"model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))


def shared_mode(rs: ReplicaSet, i: int) -> str | None:
    with contextlib.suppress(httpx.HTTPError):
        return (rs.health(i).get("state") or {}).get("mode")
    return None


# ---- global caps ------------------------------------------------------------------------------------------------
def _burst_over(rs: ReplicaSet, n: int) -> list[int]:
    """`n` concurrent calls, spread round robin over the replicas; their status codes."""
    async def go() -> list[int]:
        async with http_client() as http:
            rs_ = await asyncio.gather(*(http.post(rs.urls[i % len(rs)] + "/v1/chat/completions", json=chat())
                                         for i in range(n)))
        return [r.status_code for r in rs_]
    return asyncio.run(go())


def test_two_replicas_never_exceed_a_backends_cap(redis_server, tmp_path):
    """300 concurrent calls over 2 replicas and 3 backends of `max_inflight: 8`: every call succeeds, no backend
    ever holds more than 8 (its own exact gauge), and each reaches 8 (the caps are used, not just respected)."""
    with emulators([("m", PROFILE)] * 3) as emus:
        with replica_set(gateway_doc(emus, f"caps-{uuid.uuid4().hex[:8]}"), 2, tmp_path, redis=redis_server) as rs:
            t0 = time.monotonic()
            statuses = _burst_over(rs, 300)
            took = time.monotonic() - t0
            states = [rs.health(i)["state"] for i in range(2)]  # a Redis outage during the burst shows here
        peaks = [emulator_peak(e)["peak"] for e in emus]
    print(f"\n300 calls over 2 replicas: {took:.2f} s; backends' peaks {peaks} (cap {CAP}); {states}")
    assert statuses == [200] * 300
    assert max(peaks) <= CAP, f"a backend held more than its cap: {peaks}; the replicas' state: {states}"
    assert peaks == [CAP] * 3, f"the burst should fill every backend: {peaks}"


@pytest.mark.slow
def test_without_shared_state_two_replicas_double_the_cap(tmp_path):
    """The control: the same burst on 2 replicas with no `state` block overruns the cap (what the test above
    guards against), so that test is not passing vacuously."""
    with emulators([("m", PROFILE)] * 3) as emus:
        with replica_set(gateway_doc(emus, "unused"), 2, tmp_path, shared=False) as rs:
            assert rs.redis is None and all(rep.config.state is None for rep in rs.replicas)
            statuses = _burst_over(rs, 300)
        peaks = [emulator_peak(e)["peak"] for e in emus]
    assert statuses == [200] * 300 and max(peaks) > CAP


# ---- steering ---------------------------------------------------------------------------------------------------
def test_load_held_on_one_replica_steers_the_others_routing(redis_server, tmp_path):
    """Least-loaded routing, two idle models: replica A sends to `big` (the first of equals). Calls held on
    replica B to `big` make A choose `small`; once B's calls end, A goes back to `big`."""
    held_n = 2
    with emulators([("big", PROFILE), ("small", "qwen2.5-1.5b@h100")]) as (big, small):
        doc = gateway_doc([big, small], f"steer-{uuid.uuid4().hex[:8]}", cap=4, policy="least-loaded")
        with replica_set(doc, 2, tmp_path, redis=redis_server) as rs:
            a, b = rs.urls

            async def go() -> tuple[list[str], list[str], list[str], float]:
                async with http_client() as http:
                    async def choice() -> str:
                        r = await http.post(a + "/v1/chat/completions", json=chat(max_tokens=3))
                        assert r.status_code == 200
                        return r.headers["x-chimera-model"]

                    idle = [await choice() for _ in range(3)]
                    held = [asyncio.create_task(http.post(b + "/v1/chat/completions",
                                                          json=chat("big", LONG_PROMPT, None)))
                            for _ in range(held_n)]
                    while emulator_peak(big)["requests"] < held_n:
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.5)  # a few sync intervals: A has read B's load
                    loaded = [await choice() for _ in range(3)]
                    for t in held:
                        t.cancel()
                    await asyncio.gather(*held, return_exceptions=True)
                    t0 = time.monotonic()
                    after = []
                    while time.monotonic() - t0 < 5 and (not after or after[-1] != "big"):
                        after.append(await choice())
                        await asyncio.sleep(0.05)
                    return idle, loaded, after, time.monotonic() - t0

            idle, loaded, after, back_s = asyncio.run(go())
    print(f"\nA's choice idle {idle}, with {held_n} calls held on B {loaded}, back to big in {back_s:.2f} s")
    assert idle == ["big"] * 3
    assert loaded == ["small"] * 3
    assert after[-1] == "big"


# ---- a replica crashes ------------------------------------------------------------------------------------------
def _redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def _leases_of(r: redis.Redis, key: str, replica: str) -> list[float]:
    """Expiries (ms of Redis TIME) of `replica`'s members of the lease ZSET `key`."""
    return [score for m, score in r.zrange(key, 0, -1, withscores=True) if m.decode().startswith(replica + ":")]


def _live_leases(r: redis.Redis, key: str, replica: str) -> int:
    """`replica`'s leases in `key` whose expiry is still ahead."""
    now = _redis_ms(r)
    return sum(1 for e in _leases_of(r, key, replica) if e > now)


def test_sigkilled_replica_frees_its_slots_within_the_ttl(redis_server, tmp_path):
    """B holds 4 of the backend's 8 slots, A 4 with 8 more waiting; B is SIGKILLed. B's leases expire within the
    TTL (read from Redis), A then runs 8 at once within TTL + 1 s, and every call A answered 200 is in A's trace
    store."""
    ttl, prefix = 2.0, f"kill-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_server.url)
    with emulators([("m", PROFILE)]) as (emu,):
        doc = gateway_doc([emu], prefix, lease_ttl_s=ttl)
        with replica_set(doc, 2, tmp_path, redis=redis_server) as rs:
            a, b = rs.urls
            key = f"{prefix}:lease:m-0"

            async def go() -> tuple[list[tuple[str, int]], float, float]:
                async with http_client() as http:
                    def send(url: str, wf: str) -> asyncio.Task:
                        return asyncio.create_task(http.post(url + "/v1/chat/completions",
                                                             json=chat("m", LONG_PROMPT, None),
                                                             headers={"x-chimera-workflow-id": wf}))

                    on_b = [send(b, f"b-{i}") for i in range(CAP // 2)]
                    while emulator_peak(emu)["requests"] < CAP // 2:
                        await asyncio.sleep(0.02)
                    on_a = {f"a-{i}": send(a, f"a-{i}") for i in range(CAP + CAP // 2)}
                    while emulator_peak(emu)["requests"] < CAP:
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.3)
                    assert _live_leases(r, key, "r1") == CAP // 2 and _live_leases(r, key, "r0") == CAP // 2
                    t_kill, kill_ms = time.monotonic(), _redis_ms(r)
                    rs.kill(1)
                    # when B's leases run out, exactly: their expiry as Redis holds it, against Redis's clock at the kill
                    expires_in = (max(_leases_of(r, key, "r1")) - kill_ms) / 1000
                    expired = full = None
                    seen_drop = False
                    while (expired is None or full is None) and time.monotonic() - t_kill < ttl + 5:
                        now = time.monotonic() - t_kill
                        if expired is None and _live_leases(r, key, "r1") == 0:
                            expired = now
                        held = emulator_peak(emu)["requests"]
                        seen_drop = seen_drop or held < CAP
                        if full is None and seen_drop and held >= CAP:
                            full = now
                        await asyncio.sleep(0.02)
                    await asyncio.gather(*on_b, return_exceptions=True)
                    answers = await asyncio.gather(*on_a.values(), return_exceptions=True)
                    acked = [(wf, x.status_code) for wf, x in zip(on_a, answers) if isinstance(x, httpx.Response)]
                    return acked, expires_in, expired, full

            acked, expires_in, expired, full = asyncio.run(go())
            peak = emulator_peak(emu)["peak"]
        # the set has stopped A gracefully: its trace store is flushed
        with sqlite3.connect(rs[0].trace_store) as db:
            traced = {wf for (wf,) in db.execute("SELECT workflow_id FROM calls WHERE status = 'ok'")}
    print(f"\nSIGKILL: B's leases expire {expires_in:.3f} s after the kill (Redis clock), seen gone after {expired} s; "
          f"A at the full cap after {full} s (TTL {ttl} s)")
    assert expires_in <= ttl, f"B's leases outlive the TTL: {expires_in} s"
    assert expired is not None and expired <= ttl + 0.5, f"B's leases were still live {expired} s after the kill"
    assert full is not None and full <= ttl + 1.0, f"A did not reach the full cap within TTL + 1 s: {full}"
    assert peak <= CAP
    assert [s for _, s in acked] == [200] * (CAP + CAP // 2)
    assert {wf for wf, _ in acked} <= traced, sorted({wf for wf, _ in acked} - traced)


async def steady_load(urls: Sequence[str], workers: int, statuses: list[int], stop: asyncio.Event) -> None:
    """`workers` clients each sending short calls one after another, round robin over `urls`, until `stop`; every
    call's status (-1: a transport error) appended to `statuses`."""
    async with http_client() as http:
        async def worker(i: int) -> None:
            while not stop.is_set():
                try:
                    r = await http.post(urls[i % len(urls)] + "/v1/chat/completions", json=chat(max_tokens=20))
                    statuses.append(r.status_code)
                except httpx.HTTPError as e:
                    statuses.append(-1)
                    print("call failed:", type(e).__name__, e)
        await asyncio.gather(*(worker(i) for i in range(workers)))


@contextlib.contextmanager
def own_redis_replicas(tmp_path, prefix: str, **state) -> Iterator[tuple[RedisServer, EmulatorServer, ReplicaSet]]:
    """A Redis of the test's own (it stops or stalls it), one emulated backend, 2 replicas over both."""
    server = RedisServer(log_dir=tmp_path / "redis").start()
    try:
        with emulators([("m", PROFILE)]) as (emu,):
            with replica_set(gateway_doc([emu], prefix, **state), 2, tmp_path, redis=server) as rs:
                yield server, emu, rs
    finally:
        server.stop()


# ---- Redis goes away --------------------------------------------------------------------------------------------
def test_redis_outage_fails_no_request_and_is_visible(tmp_path):
    """Steady load on 2 replicas; Redis stopped for ~2 s, then started on the same port: no call fails, both
    replicas say `degraded` on /health and /metrics while it is down, both return to `shared`, recovery measured,
    and the backend never holds more than its cap (local caps of cap // 2 while degraded)."""
    retry = 0.5
    with own_redis_replicas(tmp_path, "outage", retry_s=retry) as (server, emu, rs):
        statuses: list[int] = []
        marks: dict[str, float] = {}

        def wait_mode(mode: str, limit_s: float) -> float | None:
            t0 = time.monotonic()
            while time.monotonic() - t0 < limit_s:
                if all(shared_mode(rs, i) == mode for i in range(2)):
                    return time.monotonic() - t0
                time.sleep(0.02)
            return None

        async def run() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(steady_load(rs.urls, 2 * CAP, statuses, stop))
            await asyncio.sleep(1.0)
            marks["shared_before"] = await asyncio.to_thread(wait_mode, "shared", 2)
            n_before = len(statuses)
            server.stop()
            marks["to_degraded"] = await asyncio.to_thread(wait_mode, "degraded", 3)
            metrics = [httpx.get(u + "/metrics", timeout=5).text for u in rs.urls]
            marks["metrics_degraded"] = all("chimera_shared_state_degraded 1.0" in m for m in metrics)
            await asyncio.sleep(1.5)
            marks["served_while_down"] = len(statuses) - n_before
            server.start()
            marks["recovery"] = await asyncio.to_thread(wait_mode, "shared", 10)
            await asyncio.sleep(1.0)
            stop.set()
            await task

        asyncio.run(run())
        states = [rs.health(i)["state"] for i in range(2)]
        peak = emulator_peak(emu)["peak"]
    print(f"\nRedis outage: {len(statuses)} calls, {sum(s != 200 for s in statuses)} failed; degraded seen after "
          f"{marks['to_degraded']} s; {marks['served_while_down']} answered while down; back to shared "
          f"{marks['recovery']} s after Redis answered again (retry_s {retry}); peak {peak}; {states}")
    assert marks["shared_before"] is not None
    assert marks["to_degraded"] is not None and marks["metrics_degraded"]
    assert marks["served_while_down"] > 0
    assert marks["recovery"] is not None and marks["recovery"] <= retry + 1.0
    assert statuses and all(s == 200 for s in statuses), f"{sum(s != 200 for s in statuses)} failed"
    assert peak <= CAP
    assert all(s.get("last_outage_s") for s in states), states


@pytest.mark.slow  # the in-process slow-Redis test (tests/test_shared_state.py) runs in make test
def test_a_stalled_redis_keeps_the_caps_and_fails_nothing(tmp_path):
    """Redis stalls (CLIENT PAUSE: every command waits 1.5 s) under steady load on 2 replicas: they go degraded on
    their bounded timeout, keep serving, rejoin the same Redis (its leases still there) when it answers again, and
    the backend never holds more than its cap."""
    with own_redis_replicas(tmp_path, "stall", retry_s=0.5) as (server, emu, rs):
        statuses: list[int] = []
        seen: set[str] = set()

        async def run() -> None:
            stop = asyncio.Event()
            load = asyncio.create_task(steady_load(rs.urls, 3 * CAP, statuses, stop))
            await asyncio.sleep(1.0)
            redis.Redis.from_url(server.url).execute_command("CLIENT", "PAUSE", "1500")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4.0:
                for i in range(2):
                    seen.add(await asyncio.to_thread(shared_mode, rs, i) or "no answer")
                await asyncio.sleep(0.05)
            stop.set()
            await load

        asyncio.run(run())
        states = [rs.health(i)["state"] for i in range(2)]
        peak = emulator_peak(emu)["peak"]
    print(f"\nRedis stalled 1.5 s: {len(statuses)} calls, {sum(s != 200 for s in statuses)} failed; modes seen {seen}; "
          f"peak {peak}; {states}")
    assert statuses and all(s == 200 for s in statuses), f"{sum(s != 200 for s in statuses)} failed"
    assert "degraded" in seen and all(s["mode"] == "shared" for s in states)
    assert peak <= CAP
