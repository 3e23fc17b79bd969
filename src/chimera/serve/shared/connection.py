"""A replica's link to the Redis its replica set shares: every command bounded by a timeout, and one place that turns a
lost Redis into degraded mode (serve on local caps, never fail a request) and a returning Redis into a rejoin (what the
replica holds is written back before it trusts the shared view again). A refused or reset connection is a lost Redis
at once; a slow answer (timeout) only when the timeouts persist past `degrade_after_s`, since a replica's own busy
event loop reads late replies too, and a replica that leaves the shared caps for a blip overfills the backends."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, TimeoutError as RedisTimeoutError
from redis.retry import Retry

from chimera.serve.config import StateConfig
from chimera.util.periodic import Periodic

log = logging.getLogger("chimera.serve")
T = TypeVar("T")


def default_replica_id() -> str:
    """host-pid-random: unique per process, readable in Redis keys and logs."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def degrade_after_s(timeout_s: float) -> float:
    """How long every command must time out before a slow Redis counts as gone: many timeouts, never under 0.5 s."""
    return max(10 * timeout_s, 0.5)


class SharedConnection:
    """The Redis client of one replica. `run(fn, default)` gives `fn`'s answer, or `default` when Redis is gone (then
    the replica is degraded and stops asking until a probe every `retry_s` answers) or the answer came too late (its
    effect unknown; the replica is not degraded then); `on_rejoin` callbacks run, in order, when it answers again, before the
    replica leaves degraded mode."""

    def __init__(self, cfg: StateConfig) -> None:
        self.cfg = cfg
        self.replica_id = cfg.replica_id or default_replica_id()
        self.redis = aioredis.Redis.from_url(cfg.redis_url, socket_timeout=cfg.timeout_s,
                                             socket_connect_timeout=cfg.timeout_s, retry=Retry(NoBackoff(), 0),
                                             health_check_interval=0)
        self.degraded = False
        self.reason: str | None = None
        self.degraded_since: float | None = None  # time.monotonic() when it last went degraded
        self.degraded_count = 0  # times it went degraded
        self.rejoined_count = 0
        self.last_outage_s: float | None = None  # how long the last outage lasted, from going degraded to rejoining
        self.timeouts = 0  # commands that got no answer in time (each one's effect unknown)
        self._slow_since: float | None = None  # monotonic time of the first timeout since the last answer
        self.on_rejoin: list[Callable[[], Awaitable[object]]] = []
        self._probe = Periodic(self.probe, cfg.retry_s, "Redis probe", first_after_s=cfg.retry_s, logger=log)

    def key(self, *parts: str) -> str:
        """A key in this replica set's namespace: `PREFIX:part:part...`."""
        return ":".join((self.cfg.key_prefix, *parts))

    async def run(self, fn: Callable[[aioredis.Redis], Awaitable[T]], default: T) -> T:
        """`await fn(redis)` within the timeout, else `default`: a Redis error (refused, reset) makes the replica
        degraded at once; a timeout (the command may or may not have run) makes it degraded only once every command
        has timed out for `degrade_after_s`. While degraded, `default` at once."""
        if self.degraded:
            return default
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.cfg.timeout_s * 4):  # no extra task per command (unlike wait_for)
                answer = await fn(self.redis)
        except (RedisTimeoutError, asyncio.TimeoutError) as e:
            self._slow(f"{type(e).__name__}: {e}"[:200])
            return default
        except (RedisError, OSError) as e:
            self.went_down(f"{type(e).__name__}: {e}"[:200])
            return default
        self._slow_since = None
        if task is not None and task.cancelling() > cancels:
            # the caller was cancelled (a request's timeout, a client gone) while the command ran, and redis-py
            # swallowed it (Python 3.11's asyncio.wait_for can return a result and drop a cancel): deliver it, or
            # the caller would run on, e.g. wait for a lease past its request timeout
            raise asyncio.CancelledError()
        return answer

    def _slow(self, reason: str) -> None:
        """A command timed out: its result is unknown; Redis counts as gone once timeouts persist (no answer since)."""
        now = time.monotonic()
        self.timeouts += 1
        if self._slow_since is None:
            self._slow_since = now
        if now - self._slow_since >= degrade_after_s(self.cfg.timeout_s):
            self.went_down(f"no answer for {now - self._slow_since:.2f} s ({reason})")

    def went_down(self, reason: str) -> None:
        self._slow_since = None
        if not self.degraded:
            self.degraded, self.reason = True, reason
            self.degraded_since = time.monotonic()
            self.degraded_count += 1
            log.warning('{"event": "shared_state_degraded", "replica": "%s", "reason": %r}', self.replica_id, reason)

    async def probe(self) -> None:
        """While degraded: PING; when Redis answers, run the rejoin callbacks and leave degraded mode (a failure in
        them keeps it degraded until the next probe)."""
        if not self.degraded:
            return
        try:
            async with asyncio.timeout(self.cfg.timeout_s * 4):  # not wait_for: in Python 3.11 it can drop a cancel
                # fresh connections: a command cancelled while it connected can leave one whose parser is closed
                # ("Buffer is closed"), which would fail every probe on it
                await self.redis.connection_pool.disconnect()
                await self.redis.ping()
            self.degraded = False  # the callbacks' own commands must reach Redis
            for fn in self.on_rejoin:
                await fn()
                if self.degraded:
                    return
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self.degraded, self.reason = True, f"{type(e).__name__}: {e}"[:200]
            return
        self.rejoined_count += 1
        self.last_outage_s = time.monotonic() - (self.degraded_since or time.monotonic())
        self.reason = None
        log.warning('{"event": "shared_state_rejoined", "replica": "%s", "outage_s": %.2f}', self.replica_id,
                    self.last_outage_s)

    def start(self) -> None:
        self._probe.start()

    async def stop(self) -> None:
        await self._probe.stop()
        await self.redis.aclose()

    def status(self) -> dict[str, Any]:
        """For /health: shared or degraded, why, and since when."""
        out: dict[str, Any] = {"mode": "degraded" if self.degraded else "shared", "replica": self.replica_id,
                               "replicas": self.cfg.replicas}
        if self.degraded:
            out["reason"] = self.reason
            out["degraded_for_s"] = round(time.monotonic() - (self.degraded_since or time.monotonic()), 3)
        if self.last_outage_s is not None:
            out["last_outage_s"] = round(self.last_outage_s, 3)
        if self.timeouts:
            out["timeouts"] = self.timeouts
        return out
