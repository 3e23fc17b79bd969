"""The replica's Redis link: bounded commands, degraded mode when Redis is gone, rejoin when it is back."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from chimera.serve.config import StateConfig
from chimera.serve.shared.connection import SharedConnection
from chimera.util.redis_server import RedisServer


def _on_own_server(scenario: Callable[[RedisServer], Awaitable[None]]) -> None:
    """Run `scenario` against a Redis of its own (it may stop and start it), stopped afterwards."""
    server = RedisServer().start()
    try:
        asyncio.run(scenario(server))
    finally:
        server.stop()


def test_degrades_without_failing_and_rejoins():
    async def scenario(server: RedisServer) -> None:
        conn = SharedConnection(StateConfig(redis_url=server.url, retry_s=0.1, key_prefix="t-conn"))
        rejoined: list[str] = []

        async def rejoin() -> None:
            await conn.redis.set(conn.key("rejoined"), "1")
            rejoined.append("yes")

        conn.on_rejoin.append(rejoin)
        conn.start()
        try:
            assert await conn.run(lambda r: r.incr(conn.key("n")), -1) == 1
            server.stop()
            t0 = time.monotonic()
            assert await conn.run(lambda r: r.incr(conn.key("n")), -1) == -1  # Redis gone: the default, at once
            assert time.monotonic() - t0 < 1.0
            assert conn.degraded and conn.status()["mode"] == "degraded" and conn.status()["reason"]
            assert await conn.run(lambda r: r.incr(conn.key("n")), -1) == -1  # no command sent while degraded
            server.start()
            for _ in range(100):
                if not conn.degraded:
                    break
                await asyncio.sleep(0.05)
            assert not conn.degraded and rejoined == ["yes"]
            assert await conn.redis.get(conn.key("rejoined")) == b"1"  # the callback ran against the new server
            assert conn.status()["mode"] == "shared" and conn.status()["last_outage_s"] > 0
        finally:
            await conn.stop()

    _on_own_server(scenario)


def test_late_answers_degrade_only_when_they_persist():
    """A command answered later than timeout_s gets the default without degrading the replica; an answer in between
    clears the count; only timeouts lasting the whole bound (max(10 x timeout_s, 0.5 s)) make it degraded."""
    async def scenario(server: RedisServer) -> None:
        conn = SharedConnection(StateConfig(redis_url=server.url, key_prefix="t-late"))
        admin = conn.redis.__class__.from_url(server.url)
        try:
            await admin.execute_command("CLIENT", "PAUSE", "300")
            assert await conn.run(lambda r: r.incr(conn.key("n")), -1) == -1  # late: the default, not degraded
            assert not conn.degraded and conn.timeouts == 1 and conn.status()["timeouts"] == 1
            await asyncio.sleep(0.35)
            assert await conn.run(lambda r: r.ping(), False) is True  # it answers again
            await admin.execute_command("CLIENT", "PAUSE", "3000")
            t0 = time.monotonic()
            while not conn.degraded and time.monotonic() - t0 < 2.0:
                assert await conn.run(lambda r: r.incr(conn.key("n")), -1) == -1
            took = time.monotonic() - t0
            assert conn.degraded and 0.5 <= took < 1.0 and "no answer for" in conn.status()["reason"]
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
            await conn.stop()

    _on_own_server(scenario)


def test_state_config_refuses_a_bad_url_naming_it():
    import pytest
    from chimera.serve.config import GatewayConfigError, gateway_config_from_dict

    with pytest.raises(GatewayConfigError, match="state.redis_url"):
        gateway_config_from_dict({"backends": [{"name": "a", "model": "m", "base_url": "http://127.0.0.1:1/v1"}],
                                  "state": {"redis_url": "http://x"}})
    with pytest.raises(GatewayConfigError, match="state.ttl"):
        gateway_config_from_dict({"backends": [{"name": "a", "model": "m", "base_url": "http://127.0.0.1:1/v1"}],
                                  "state": {"redis_url": "redis://127.0.0.1:1", "ttl": 3}})


def test_a_connection_a_cancel_left_broken_does_not_keep_the_replica_degraded(redis_server) -> None:
    """A Redis command cancelled while it connected can leave a pooled connection whose parser is closed (every
    command on it: "Buffer is closed."); the probe starts from fresh connections, so the replica rejoins."""

    async def scenario() -> None:
        conn = SharedConnection(StateConfig(redis_url=redis_server.url, key_prefix="t-broken", replica_id="x"))
        assert await conn.run(lambda r: r.ping(), None) is True
        (pooled,) = conn.redis.connection_pool._available_connections
        pooled._parser.on_disconnect()  # what the cancel leaves: the socket open, the parser closed
        assert await conn.run(lambda r: r.ping(), None) is None and conn.degraded and "Buffer" in conn.reason
        await conn.probe()
        assert not conn.degraded and await conn.run(lambda r: r.ping(), None) is True
        await conn.stop()

    asyncio.run(scenario())


def test_a_cancel_swallowed_inside_a_command_reaches_the_caller():
    """redis-py's Python 3.11 `asyncio.wait_for` can finish a command and drop a cancel that came meanwhile; the
    caller (a request waiting for a lease, bounded by its timeout) must still be cancelled, not run on."""
    async def scenario() -> None:
        conn = SharedConnection(StateConfig(redis_url="redis://127.0.0.1:1", key_prefix="t-swallow"))
        started = asyncio.Event()

        async def swallowing(_redis) -> str:  # what the dropped cancel looks like from outside: a normal answer
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass
            return "answer"

        async def caller() -> str:
            answer = await conn.run(swallowing, "default")
            await asyncio.sleep(10)  # a lease wait's backoff: never reached when the cancel is delivered
            return answer

        task = asyncio.ensure_future(caller())
        await started.wait()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        assert task in done and task.cancelled()
        await conn.redis.aclose()

    asyncio.run(scenario())
