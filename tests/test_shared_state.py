"""Several gateway replicas in one process sharing a real Redis: global caps under concurrency, one replica's load
steering another's routing, a dead replica's leases expiring, and Redis going away and coming back mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio

from chimera.sched.monitor import LoadMonitor
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from chimera.serve.shared.leases import Leases
from chimera.util.redis_server import RedisServer
from upstreams import Served, fake_upstream

MSG = [{"role": "user", "content": "What is 2 + 2?"}]


@contextlib.contextmanager
def served(app) -> Iterator[Served]:
    s = Served(app)
    try:
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def replicas(tmp_path, redis_url: str, prefix: str, backends: list[dict], n: int = 2, policy: str = "least-loaded",
             limits: dict | None = None, **state: Any) -> Iterator[list[Served]]:
    """`n` gateways (replica ids r0..) over `backends`, sharing `redis_url` under `prefix`."""
    served: list[Served] = []
    try:
        for i in range(n):
            cfg = gateway_config_from_dict({
                "policy": {"name": policy}, "trace_store": str(tmp_path / f"r{i}.sqlite"),
                "health": {"enabled": False}, "backends": backends, "limits": limits or {},
                "state": {"redis_url": redis_url, "key_prefix": prefix, "replica_id": f"r{i}", "replicas": n,
                          "sync_interval_s": 0.05, **state}})
            served.append(Served(build_gateway(cfg)))
        yield served
        for s in served:  # every call's life ended: nothing held locally (else the shutdown drain would wait for it)
            _until(lambda: not s.gw.busy(), 5.0, lambda: f"{s.gw.shared.replica_id} to hold nothing: {_held(s.gw)}")
    finally:
        for s in served:
            s.stop()


def _held(gw) -> dict[str, Any]:
    p = gw.pool
    return {"active": gw.active, "waiting": p.waiting_total, "inflight": dict(p.inflight), "pending": list(p._pending),
            "leases": dict(gw.shared.held), "room": {be.name: (be.inflight, be.remote_inflight, be.room)
                                                   for be in p.all_backends}}


def _until(cond: Callable[[], bool], timeout_s: float = 5.0, what: str | Callable[[], str] = "condition") -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.02)
    return time.monotonic() - t0


async def _calls(urls: list[str], n: int, model: str = "chimera", timeout: float = 30.0) -> list[httpx.Response]:
    """`n` concurrent chat calls, spread round-robin over `urls`."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*(client.post(urls[i % len(urls)] + "/v1/chat/completions",
                                                  json={"model": model, "messages": MSG,
                                                        "chimera": {"workflow_id": f"wf-{i}"}})
                                      for i in range(n)))


def test_global_cap_holds_across_replicas(tmp_path, redis_server):
    """A backend capped at 3 under 24 concurrent calls split over two replicas never runs more than 3 (the
    upstream's own count); the replicas raced for slots (lease waits) and no lease is left behind."""
    up = fake_upstream("m", delay=0.2)
    with served(up) as u, replicas(tmp_path, redis_server.url, "t-cap", [
            {"name": "m-0", "model": "m", "base_url": u.url + "/v1", "max_inflight": 3}]) as gws:
        out = asyncio.run(_calls([g.url for g in gws], 24))
        assert [r.status_code for r in out] == [200] * 24
        assert up.state.live["max"] == 3  # used the whole cap, never more
        assert sum(g.gw.shared.lease_waits for g in gws) > 0  # both replicas dispatched into the same slots
        _until(lambda: redis.Redis.from_url(redis_server.url).zcard("t-cap:lease:m-0") == 0, 2.0, "leases freed")
        health = httpx.get(gws[0].url + "/health").json()
        assert health["state"]["mode"] == "shared" and health["state"]["leases"] == {"m-0": 0}
        metrics = httpx.get(gws[0].url + "/metrics").text
        assert "chimera_shared_state_degraded 0.0" in metrics and "chimera_shared_lease_waits_total" in metrics


def test_calls_held_on_one_replica_steer_the_other(tmp_path, redis_server):
    """Alone, replica A sends a 'chimera' call to model x (least loaded, first); with three calls pinned to x held
    on replica B, A sees B's load (its calls, its leases) and routes to y."""
    x, y = fake_upstream("x", delay=1.5), fake_upstream("y", delay=0.05)
    with served(x) as ux, served(y) as uy, replicas(tmp_path, redis_server.url, "t-steer", [
            {"name": "x-0", "model": "x", "base_url": ux.url + "/v1", "max_inflight": 4},
            {"name": "y-0", "model": "y", "base_url": uy.url + "/v1", "max_inflight": 4}]) as (a, b):
        alone = httpx.post(a.url + "/v1/chat/completions", json={"model": "chimera", "messages": MSG}, timeout=10)
        assert alone.headers["x-chimera-model"] == "x"

        async def scenario() -> httpx.Response:
            held = asyncio.ensure_future(_calls([b.url], 3, model="x"))
            # B publishes its calls at admission and takes their leases after dispatch: a busy machine can show A
            # the first before the second, so wait for both
            await asyncio.to_thread(_until, lambda: a.gw.policy.monitor.remote_calls["x"] == 3
                                    and a.gw.shared.status()["remote_inflight"]["x-0"] == 3, 3.0, "B's load and leases")
            assert a.gw.pool.cap["x"] == 1
            async with httpx.AsyncClient(timeout=10) as client:
                steered = await client.post(a.url + "/v1/chat/completions",
                                            json={"model": "chimera", "messages": MSG})
            assert all(r.status_code == 200 for r in await held)
            return steered

        assert asyncio.run(scenario()).headers["x-chimera-model"] == "y"
        _until(lambda: a.gw.pool.cap["x"] == 4, 2.0, "x's full cap once B's calls ended")


def test_a_replica_holding_the_slots_shares_them_with_the_others_queue(tmp_path, redis_server):
    """Replica A fills a 2-slot backend and queues 6 more; B's 3 calls arriving next are not starved until A's queue
    drains: A keeps its share of the cap, so B's first answer comes before A's last."""
    up = fake_upstream("m", delay=0.3)
    with served(up) as u, replicas(tmp_path, redis_server.url, "t-fair", [
            {"name": "m-0", "model": "m", "base_url": u.url + "/v1", "max_inflight": 2}]) as (a, b):

        async def timed(url: str, n: int) -> list[float]:
            async def one(client: httpx.AsyncClient) -> float:
                r = await client.post(url + "/v1/chat/completions", json={"model": "m", "messages": MSG})
                assert r.status_code == 200
                return time.monotonic()
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(one(client) for _ in range(n)))

        async def scenario() -> tuple[list[float], list[float]]:
            first = asyncio.ensure_future(timed(a.url, 8))
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(timed(b.url, 3))
            return await first, await second

        a_done, b_done = asyncio.run(scenario())
        assert min(b_done) < max(a_done)  # alone, A's queue would take 4 rounds before any of B's ran
        assert up.state.live["max"] == 2


def test_remote_tokens_reach_the_congestion_signal():
    """Other replicas' predicted tokens and calls add to the monitor's in-flight load; zero leaves it untouched."""
    mon = LoadMonitor(["x", "y"])
    inflight, typical = np.array([10.0, 0.0]), np.array([5.0, 5.0])
    assert mon.inflight_tokens(["x", "y"], inflight, typical) is inflight
    mon.remote_tokens["y"], mon.remote_calls["y"] = 300.0, 2.0
    assert list(mon.inflight_tokens(["x", "y"], inflight, typical)) == [10.0, 300.0]
    assert list(mon.inflight_calls(["x", "y"])) == [0.0, 2.0]


def test_dead_replicas_leases_expire_and_live_ones_are_renewed(tmp_path, redis_server):
    """A replica that died holding every slot of a backend (leases never renewed) blocks it for at most the TTL:
    the survivor's queued call runs within TTL + 1 s, and the survivor's own call, longer than the TTL, keeps its
    lease (renewed) until it ends."""
    ttl = 0.6
    up = fake_upstream("m", delay=1.5)
    with served(up) as u, replicas(tmp_path, redis_server.url, "t-dead", [
            {"name": "m-0", "model": "m", "base_url": u.url + "/v1", "max_inflight": 2}], n=1,
            lease_ttl_s=ttl) as (a,):

        async def scenario() -> tuple[float, list[httpx.Response]]:
            r = redis.asyncio.Redis.from_url(redis_server.url)
            dead = Leases(r, "t-dead", "dead", ["m-0"], ttl)
            for i in (1, 2):
                assert (await dead.acquire("m-0", dead.member(i), 2))[0]
            t0 = time.monotonic()
            await asyncio.to_thread(_until, lambda: a.gw.pool.cap["m"] == 0, 2.0, "the dead replica's leases seen")
            calls = asyncio.ensure_future(_calls([a.url], 1, model="m"))
            await asyncio.to_thread(_until, lambda: a.gw.pool.cap["m"] == 2, ttl + 1.0, "full cap again")
            freed = time.monotonic() - t0
            await asyncio.sleep(ttl * 1.5)  # the survivor's call runs past its lease's first expiry
            assert await r.zcard("t-dead:lease:m-0") == 1 and (await r.zrange("t-dead:lease:m-0", 0, -1)) == [b"r0:0"]
            done = await calls
            await r.aclose()
            return freed, done

        freed, done = asyncio.run(scenario())
        assert freed <= ttl + 1.0 and [r.status_code for r in done] == [200]


def test_a_call_waiting_for_a_lease_times_out_and_leaves_nothing(tmp_path, redis_server):
    """A replica that has not yet seen the slot taken (no sync since) dispatches, finds the backend globally full and
    waits for the lease; at the request timeout it answers 504 and holds nothing, locally or in Redis."""
    up = fake_upstream("m", delay=0.0)
    with served(up) as u, replicas(tmp_path, redis_server.url, "t-wait", [
            {"name": "m-0", "model": "m", "base_url": u.url + "/v1", "max_inflight": 1}], n=1,
            limits={"request_timeout_s": 1.0}, sync_interval_s=60) as (a,):
        time.sleep(0.3)  # the first sync (at start) is done; the next is a minute away

        async def take_slot() -> None:
            r = redis.asyncio.Redis.from_url(redis_server.url)
            other = Leases(r, "t-wait", "other", ["m-0"], 30)
            assert (await other.acquire("m-0", other.member(1), 1))[0]
            await r.aclose()

        asyncio.run(take_slot())
        t0 = time.monotonic()
        r = httpx.post(a.url + "/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["code"] == "queue_timeout" and time.monotonic() - t0 < 3
        assert a.gw.shared.lease_waits == 1 and not a.gw.shared.held and a.gw.pool.holds_nothing()
        _until(lambda: redis.Redis.from_url(redis_server.url).zrange("t-wait:lease:m-0", 0, -1) == [b"other:1"], 2.0,
               "only the other replica's lease left")


def test_redis_outage_degrades_to_local_caps_and_rejoins(tmp_path):
    """Redis stops mid-run: no request fails, /health and /metrics say degraded, each replica serves on half the
    cap (so the set stays within it once the calls running at the outage end); Redis returns: both rejoin (leases of
    running calls re-registered) and the global cap is back."""
    server = RedisServer().start()
    up = fake_upstream("m", delay=0.3)
    try:
        with served(up) as u, replicas(tmp_path, server.url, "t-out", [
                {"name": "m-0", "model": "m", "base_url": u.url + "/v1", "max_inflight": 4}],
                retry_s=0.2) as gws:
            urls = [g.url for g in gws]

            async def scenario() -> list[httpx.Response]:
                first = asyncio.ensure_future(_calls(urls, 16))
                await asyncio.sleep(0.4)
                server.stop()
                await asyncio.to_thread(_until, lambda: all(g.gw.pool.backends["m"][0].cap == 2 for g in gws), 3.0,
                                        "degraded, on half the cap")
                before = await first  # calls running at the outage keep running (a replica may be over its share)
                up.state.live["max"] = up.state.live["now"]
                during = await _calls(urls, 12)
                health = httpx.get(urls[0] + "/health").json()
                assert health["status"] == "ok" and health["state"]["mode"] == "degraded"
                assert "chimera_shared_state_degraded 1.0" in httpx.get(urls[0] + "/metrics").text
                held = asyncio.ensure_future(_calls(urls, 4))
                await asyncio.sleep(0.1)
                server.start()
                t0 = time.monotonic()
                await asyncio.to_thread(_until, lambda: not any(g.gw.shared.conn.degraded for g in gws), 3.0,
                                        "rejoined")
                rejoined_in = time.monotonic() - t0
                running = sum(sum(g.gw.shared.own_leases().values()) for g in gws)
                assert redis.Redis.from_url(server.url).zcard("t-out:lease:m-0") == running  # re-registered
                assert rejoined_in < 1.0
                # the full cap once the others have had time to rejoin and claim (retry_s + 2 syncs after a rejoin)
                await asyncio.to_thread(_until, lambda: all(g.gw.pool.backends["m"][0].cap == 4 for g in gws), 2.0,
                                        "the global cap back")
                return [*before, *during, *(await held), *(await _calls(urls, 8))]

            out = asyncio.run(scenario())
            assert [r.status_code for r in out] == [200] * len(out)
            assert up.state.live["max"] <= 4
            st = httpx.get(urls[0] + "/health").json()["state"]
            assert st["mode"] == "shared" and st["last_outage_s"] > 0
    finally:
        server.stop()


def test_a_slow_redis_is_not_a_lost_one_and_the_cap_holds(tmp_path, redis_server):
    """Redis answers late for a stretch shorter than the degrade bound (CLIENT PAUSE 0.3 s; 0.5 s here) in the middle
    of a burst over two replicas: the late commands count as not granted and are retried, neither replica goes
    degraded (so neither leaves the global caps for its local share), every call succeeds and the cap holds."""
    up = fake_upstream("m", delay=0.2)
    with served(up) as u, replicas(tmp_path, redis_server.url, "t-slow", [
            {"name": "m-0", "model": "m", "base_url": u.url + "/v1", "max_inflight": 4}]) as gws:

        async def scenario() -> list[httpx.Response]:
            calls = asyncio.ensure_future(_calls([g.url for g in gws], 32))
            await asyncio.sleep(0.3)
            r = redis.asyncio.Redis.from_url(redis_server.url)
            await r.execute_command("CLIENT", "PAUSE", "300")
            await r.aclose()
            return await calls

        out = asyncio.run(scenario())
        assert [r.status_code for r in out] == [200] * 32
        assert [g.gw.shared.conn.degraded_count for g in gws] == [0, 0]
        assert sum(g.gw.shared.conn.timeouts for g in gws) > 0  # the pause was felt
        assert up.state.live["max"] <= 4
        _until(lambda: redis.Redis.from_url(redis_server.url).zcard("t-slow:lease:m-0") == 0, 2.0, "leases freed")


def test_a_retried_acquire_finds_the_grant_a_late_answer_made(redis_server):
    """A lease granted on Redis whose answer came too late is granted again to the same call's retry, even on a
    backend full since, and counts once."""

    async def scenario() -> None:
        r = redis.asyncio.Redis.from_url(redis_server.url)
        a = Leases(r, "t-again", "a", ["m-0"], 30)
        assert await a.acquire("m-0", a.member(1), 2) == (True, 1)
        assert await a.acquire("m-0", a.member(2), 2) == (True, 2)
        assert await a.acquire("m-0", a.member(1), 2) == (True, 2)  # the retry: still one lease
        assert await a.acquire("m-0", a.member(3), 2) == (False, 2)
        await r.aclose()

    asyncio.run(scenario())


def test_a_quiet_replica_holds_its_share_until_its_entry_expires(redis_server):
    """A replica that stopped syncing but has not expired (it may have lost Redis and serve alone on its share)
    counts as holding max(its leases, its share) on every backend; once its entry expires (crashed) nothing."""
    ttl, shares = 1.0, {"m-0": 4, "m-1": 4}

    async def scenario() -> None:
        r = redis.asyncio.Redis.from_url(redis_server.url)
        quiet, me = (Leases(r, "t-quiet", rid, ["m-0", "m-1"], ttl, shares=shares, stale_s=0.2) for rid in "qm")
        held = {"m-0": [quiet.member(0)], "m-1": [quiet.member(i) for i in range(1, 6)]}
        for b, members in held.items():
            for m in members:
                assert (await quiet.acquire(b, m, 8))[0]
        await quiet.sync(held, {}, "renew")
        assert (await me.sync({}, {})).remote_inflight == {"m-0": 1, "m-1": 5}  # syncing: its leases
        await asyncio.sleep(0.3)
        assert (await me.sync({}, {})).remote_inflight == {"m-0": 4, "m-1": 5}  # quiet: at least its share
        await asyncio.sleep(ttl)
        assert (await me.sync({}, {})).remote_inflight == {"m-0": 0, "m-1": 0}  # expired: nothing held
        await r.aclose()

    asyncio.run(scenario())


def test_a_grant_leaves_a_quiet_replicas_share_free(redis_server):
    """The atomic grant keeps the room a quiet replica may be running without leases (its share, less its leases):
    another replica is granted cap − that; once the quiet replica's entry expires, the whole cap again."""
    ttl, shares = 1.0, {"m-0": 4}

    async def scenario() -> None:
        r = redis.asyncio.Redis.from_url(redis_server.url)
        quiet, me = (Leases(r, "t-grant-quiet", rid, ["m-0"], ttl, shares=shares, stale_s=0.2) for rid in "qm")
        assert (await quiet.acquire("m-0", quiet.member(0), 8))[0]
        await quiet.sync({"m-0": [quiet.member(0)]}, {}, "renew")
        await asyncio.sleep(0.3)  # quiet now: it counts as 4 (1 lease + 3 it may run alone)
        grants = [(await me.acquire("m-0", me.member(i), 8))[0] for i in range(5)]
        assert grants == [True] * 4 + [False]
        await asyncio.sleep(ttl)  # its entry and its lease expired: the whole cap (mine renewed)
        await me.sync({"m-0": [me.member(i) for i in range(4)]}, {}, "renew")
        grants = [(await me.acquire("m-0", me.member(i), 8))[0] for i in range(4, 9)]
        assert grants == [True] * 4 + [False]
        await r.aclose()

    asyncio.run(scenario())


def test_workflow_state_is_shared(tmp_path, redis_server):
    """A hinted workflow's stages and tokens finished on one replica are its state on the other: the next stage's
    number, its tokens so far."""
    up = fake_upstream("m", delay=0.0, words=5)
    with served(up) as u, replicas(tmp_path, redis_server.url, "t-wf", [
            {"name": "m-0", "model": "m", "base_url": u.url + "/v1", "max_inflight": 4}]) as (a, b):
        body = {"model": "m", "messages": MSG, "chimera": {"workflow_id": "wf-shared"}}
        assert httpx.post(a.url + "/v1/chat/completions", json=body).headers["x-chimera-stage"] == "0"
        _until(lambda: redis.Redis.from_url(redis_server.url).hget("t-wf:wf:wf-shared", "stages") == b"1", 2.0,
               "the stage written")
        second = httpx.post(b.url + "/v1/chat/completions", json=body)
        assert second.headers["x-chimera-stage"] == "1"
        assert b.gw.pool.workflows.peek("wf-shared").generated == 10  # 5 from A's stage, 5 from its own
        _until(lambda: asyncio.run(_fields(redis_server.url))["stages"] == 2, 2.0, "the second stage written")
        fields = asyncio.run(_fields(redis_server.url))
        assert fields["stages"] == 2 and fields["generated"] == 10 and fields["last_backend"] == "m-0"


async def _fields(url: str) -> dict[str, Any]:
    r = redis.asyncio.Redis.from_url(url)
    raw = await r.hgetall("t-wf:wf:wf-shared")
    await r.aclose()
    return {k.decode(): v.decode() if k in (b"last_model", b"last_backend") else float(v) for k, v in raw.items()}


@pytest.mark.parametrize("bad", [{"replicas": 0}, {"lease_ttl_s": 0}])
def test_state_config_refuses_bad_values_naming_them(bad):
    from chimera.serve.config import GatewayConfigError

    with pytest.raises(GatewayConfigError, match=f"state.{next(iter(bad))}"):
        gateway_config_from_dict({"backends": [{"name": "a", "model": "m", "base_url": "http://127.0.0.1:1/v1"}],
                                  "state": {"redis_url": "redis://127.0.0.1:1", **bad}})


def _pool(max_inflight: int = 8):
    from chimera.sched.registry import make_policy
    from chimera.sched.types import ModelInfo
    from chimera.serve.config import Backend
    from chimera.serve.pool import BackendPool

    return BackendPool(make_policy("least-loaded"), [ModelInfo("m", 1000.0, 0.02, max_inflight)],
                       [Backend(name="m-0", model="m", base_url="http://127.0.0.1:1/v1", max_inflight=max_inflight)])


def _call(i: int):
    from chimera.sched.types import Call

    return Call(call_id=i, workflow_id=f"w{i}", kind="chat", prompt="p", stage=0, prompt_tokens=5, arrival_s=0.0,
                workflow_arrival_s=0.0)


def test_pool_room_follows_the_replica_set():
    """Capacity is the cap less the other replicas' leases; a replica holding slots gives up to its fair share while
    others' calls wait; Redis gone: the cap divided by the replicas; a grown capacity dispatches what waits."""
    pool = _pool(8)
    pool.share({"m-0": 8}, {"m": (8.0, 400.0)}, None, 0.0)
    assert pool.cap["m"] == 0 and pool.policy.monitor.remote_tokens["m"] == 400.0
    waiting = _call(0)
    pool.submit(waiting, 0.0)
    assert not pool.core.running(waiting) and pool.waiting("m") == 1
    pool.share({"m-0": 2}, {"m": (10.0, 0.0)}, None, 1.0)  # 8 of theirs wait: this replica's share is 1 of 11 calls
    assert pool.cap["m"] == 1 and pool.core.running(waiting)  # the grown capacity dispatched the waiting call
    for i in range(1, 8):
        pool.submit(_call(i), 1.0)
    pool.share({"m-0": 0}, {"m": (0.0, 0.0)}, None, 2.0)
    assert pool.cap["m"] == 8 and pool.inflight["m"] == 8  # alone again: the whole cap
    pool.share({"m-0": 0}, {"m": (8.0, 0.0)}, None, 3.0)  # 8 of theirs wait, none of theirs runs: half each
    assert pool.backends["m"][0].room == 4 and not pool.backends["m"][0].has_room
    pool.share({}, {}, 2, 4.0)
    assert pool.backends["m"][0].cap == 4 and pool.cap["m"] == 4
    pool.share({"m-0": 3}, {}, None, 5.0)
    assert pool.backends["m"][0].cap == 8 and pool.cap["m"] == 5
