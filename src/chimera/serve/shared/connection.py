"""A replica's link to the Redis its replica set shares: every command bounded by a timeout, and one place that turns a
failed or slow command into degraded mode (serve on local caps, never fail a request) and a returning Redis into a
rejoin (what the replica holds is written back before it trusts the shared view again)."""

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
from redis.exceptions import RedisError
from redis.retry import Retry

from chimera.serve.config import StateConfig
from chimera.util.periodic import Periodic

log = logging.getLogger("chimera.serve")
T = TypeVar("T")


def default_replica_id() -> str:
    """host-pid-random: unique per process, readable in Redis keys and logs."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class SharedConnection:
    """The Redis client of one replica. `run(fn, default)` gives `fn`'s answer, or `default` when Redis is gone (then
    the replica is degraded and stops asking until a probe every `retry_s` answers); `on_rejoin` callbacks run, in
    order, when it answers again, before the replica leaves degraded mode."""

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
        self.on_rejoin: list[Callable[[], Awaitable[object]]] = []
        self._probe = Periodic(self.probe, cfg.retry_s, "Redis probe", first_after_s=cfg.retry_s, logger=log)

    def key(self, *parts: str) -> str:
        """A key in this replica set's namespace: `PREFIX:part:part...`."""
        return ":".join((self.cfg.key_prefix, *parts))

    async def run(self, fn: Callable[[aioredis.Redis], Awaitable[T]], default: T) -> T:
        """`await fn(redis)` within the timeout; on any Redis error or timeout the replica goes degraded and gets
        `default`. While degraded, `default` at once (no command is sent)."""
        if self.degraded:
            return default
        try:
            async with asyncio.timeout(self.cfg.timeout_s * 4):  # no extra task per command (unlike wait_for)
                return await fn(self.redis)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self.went_down(f"{type(e).__name__}: {e}"[:200])
            return default

    def went_down(self, reason: str) -> None:
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
            await asyncio.wait_for(self.redis.ping(), self.cfg.timeout_s * 4)
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
        return out
