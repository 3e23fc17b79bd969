"""What several gateway replicas share on Redis, from one replica's side: a lease per running call under each backend's
global cap (granted atomically by a Lua script on Redis's clock, renewed while the call runs, so a crashed replica's
load expires within the TTL), every replica's load in the policy's congestion signal, and workflow state. With Redis
gone the replica serves on its share of each cap (degraded mode) and re-registers what it holds when Redis is back.

Queue order stays per replica: each replica dispatches its own queue in its policy's order while the global caps
allow; a slot freed on a backend goes to whichever replica asks first (no global order across replicas), except that
while other replicas' calls wait for a model a replica keeps at most its share of each backend, in proportion to its
calls (BackendPool.share), so none is starved by one that holds the slots. A replica that dispatched into a slot
another took first (their views are at most one sync old) holds the call and retries the lease with a short backoff
until it is granted or the request times out.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from chimera.sched.types import Call
from chimera.serve.clock import GatewayClock
from chimera.serve.config import StateConfig
from chimera.serve.pool import BackendPool, BackendState
from chimera.serve.shared.connection import SharedConnection
from chimera.serve.shared.leases import Leases, StageDone, SyncResult
from chimera.serve.workflows import WorkflowState
from chimera.util.periodic import Periodic

log = logging.getLogger("chimera.serve")
BACKOFF_S = (0.005, 0.05)  # first and longest wait between two tries of a lease on a globally full backend
STOP_S = 2.0  # the most a shutdown waits for the Redis connection to close
FLUSH_S = 0.005  # releases wait this long for company (or for this replica's next acquire, which carries them)
QUIET_SYNCS = 3  # a replica that has not synced for this many intervals may serve alone: it holds its share
WORKFLOW_TTL_S = 3600.0  # a shared workflow's state outlives its last call this long (without an idle timeout)


@dataclass
class _Held:
    backend: str
    member: str
    granted: bool = False  # the call runs: granted by Redis, or started on the local cap while Redis was gone


class SharedState:
    """One replica's view of the replica set: `acquire`/`release` a call's lease, a sync loop (every
    `sync_interval_s`: publish this replica's load, read the others' leases and load into the pool, renew its own
    leases every third of the TTL), workflow state, and degraded mode (local caps) while Redis is gone."""

    def __init__(self, cfg: StateConfig, pool: BackendPool, *, clock: GatewayClock | None = None,
                 workflow_ttl_s: float | None = None) -> None:
        self.cfg, self.pool = cfg, pool
        self.clock = clock if clock is not None else GatewayClock()
        self.workflow_ttl_s = max(1, round(workflow_ttl_s or WORKFLOW_TTL_S))
        self.conn = SharedConnection(cfg)
        self.replica_id = self.conn.replica_id
        self.leases = Leases(self.conn.redis, cfg.key_prefix, self.replica_id,
                             [be.name for be in pool.all_backends], cfg.lease_ttl_s,
                             shares={be.name: max(1, be.cfg.max_inflight // cfg.replicas) for be in pool.all_backends},
                             stale_s=QUIET_SYNCS * cfg.sync_interval_s)
        self.held: dict[int, _Held] = {}  # call_id -> its lease, from acquire to release
        self.lease_waits = 0  # calls that found their backend globally full and waited
        self.remote_replicas: list[str] = []  # the other live replicas at the last sync
        self._releases: list[tuple[str, str]] = []  # (backend, member) released, not yet sent
        self._stages: list[StageDone] = []  # completed calls' workflow updates, not yet sent
        self._flush_at: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task] = set()
        self._mode = "claim"  # the next sync's: claim what this replica holds (start, rejoin), renew, or read
        self._renewed_at = 0.0
        self._applied_degraded = False
        self._rejoined_at = -1e9  # monotonic time of the last rejoin: the local share holds a while after it
        self._loop = Periodic(self.sync, cfg.sync_interval_s, "shared state sync", first_after_s=0.0, logger=log)
        self.conn.on_rejoin.append(self._rejoin)

    # ---- lifespan ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """The sync loop (its first round claims this replica's leases and publishes its load) and the probe."""
        self.conn.start()
        self._loop.start()

    async def stop(self) -> None:
        """Stop syncing, send what is pending, leave the live replicas; then close the connection."""
        await self._loop.stop()
        if self._flush_at is not None:
            self._flush_at.cancel()
        await asyncio.gather(*self._flushes, self._flush(), return_exceptions=True)
        if self._flush_at is not None:  # a late answer queued its releases again: they expire with the TTL
            self._flush_at.cancel()
        await self.conn.run(lambda r: self.leases.forget(), None)
        try:  # a shutdown never waits on Redis for long
            async with asyncio.timeout(STOP_S):
                await self.conn.stop()
        except (TimeoutError, OSError, RedisError):
            log.warning("shared state: the Redis connection did not close within %.0f s", STOP_S)

    # ---- leases ----------------------------------------------------------------------------------------------
    async def try_acquire(self, call: Call, be: BackendState) -> bool:
        """One atomic try for the call's lease on `be` under its global cap (one round trip, carrying the releases
        not yet sent); True when held, or when Redis is gone (the local cap rules then); False on a late answer."""
        held = self.held.get(call.call_id)
        if held is None:
            held = self.held[call.call_id] = _Held(be.name, self.leases.member(call.call_id))
        if self.conn.degraded:
            held.granted = self._local_room(be)
            return held.granted
        releases, self._releases = self._releases, []
        answer = await self.conn.run(
            lambda r: self.leases.acquire(be.name, held.member, be.cfg.max_inflight, releases), None)
        if answer is None and not self.conn.degraded:  # too slow: not granted for now (a retry finds a grant made)
            self._resend(releases)
            held.granted = False
        else:
            held.granted = self._local_room(be) if answer is None else answer[0]  # None: Redis just went away
        return held.granted

    def _local_room(self, be: BackendState) -> bool:
        """Redis gone: whether this replica's running calls on `be` leave room in its share of the cap (calls it
        started while Redis answered count too, so a replica that loses Redis holding more than its share waits)."""
        running = sum(1 for h in self.held.values() if h.granted and h.backend == be.name)
        return running < max(1, be.cfg.max_inflight // self.cfg.replicas)

    async def acquire(self, call: Call, be: BackendState) -> None:
        """Return once the call holds its lease on `be`: a globally full backend (another replica took the slot
        first) is asked again after a short backoff; the caller bounds the wait (the request timeout)."""
        wait = BACKOFF_S[0]
        counted = False
        while not await self.try_acquire(call, be):
            if not counted:
                self.lease_waits += 1
                counted = True
            await asyncio.sleep(wait * (0.5 + random.random()))
            wait = min(BACKOFF_S[1], wait * 2)

    def release(self, call: Call, completed: bool = False) -> None:
        """The call's attempt ended: its lease is freed (carried by this replica's next acquire, or sent FLUSH_S
        later), and with `completed` (a stage of a shared workflow done) the workflow's shared state learns the stage.
        Never blocks, never raises."""
        try:
            held = self.held.pop(call.call_id, None)
            if held is None:
                return
            self._releases.append((held.backend, held.member))
            if completed:
                self._stages.append(self._stage_done(call, held.backend))
            self._flush_later()
        except Exception:
            log.exception("shared state: could not release call %s", call.call_id)

    def _resend(self, releases: list[tuple[str, str]]) -> None:
        """Releases a late answer may not have applied go out again (freeing a lease twice is harmless)."""
        if releases:
            self._releases[:0] = releases
            self._flush_later()

    def _flush_later(self) -> None:
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(FLUSH_S, self._flush_soon)

    def _flush_soon(self) -> None:
        task = asyncio.ensure_future(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        """Send the releases and workflow updates gathered since the last flush, in one round trip."""
        self._flush_at = None
        releases, self._releases = self._releases, []
        stages, self._stages = self._stages, []
        if not (releases or stages):
            return
        sent = await self.conn.run(lambda r: self._settle(releases, stages), False)
        if not sent and not self.conn.degraded:  # too slow: send the releases again (the stages may have counted)
            self._resend(releases)
        # Redis gone: the leases expire, a rejoin drops what is not held

    async def _settle(self, releases: list[tuple[str, str]], stages: list[StageDone]) -> bool:
        await self.leases.settle(releases, stages, self.workflow_ttl_s)
        return True

    # ---- the sync loop ---------------------------------------------------------------------------------------
    async def sync(self) -> None:
        """Publish this replica's load and read the others' into the pool (renewing or claiming the held leases
        when due); while Redis is gone, apply the local caps instead."""
        if self.conn.degraded:
            if not self._applied_degraded:
                self._apply(None)
            return
        mode = self._mode
        if mode == "read" and time.monotonic() - self._renewed_at >= self.cfg.lease_ttl_s / 3:
            mode = "renew"
        result = await self.conn.run(lambda r: self._exchange(mode), None)
        if result is None and not self.conn.degraded:  # too slow: this round is skipped, the last view holds
            return
        if result is None:  # Redis went away: local caps from now on
            self._mode = "claim"
            self._apply(None)
            return
        self._synced(mode, result)

    async def _exchange(self, mode: str) -> SyncResult:
        """One sync round trip: this replica's running calls' leases (renewed or claimed per `mode`) and load."""
        held: dict[str, list[str]] = {}
        for h in self.held.values():
            if h.granted:
                held.setdefault(h.backend, []).append(h.member)
        mon = self.pool.policy.monitor
        return await self.leases.sync(held, {m: (mon.calls[m], mon.pred_tokens[m]) for m in self.pool.models}, mode)

    def _synced(self, mode: str, result: SyncResult) -> None:
        if mode != "read":  # a claim is renewed on the next round (it may have raced a grant: see leases.SYNC)
            self._renewed_at = time.monotonic() if mode == "renew" else 0.0
        self._mode = "read"
        self._apply(result)

    def _apply(self, result: SyncResult | None) -> None:
        """The sync's view into the pool; None (Redis gone): local caps, no one else's load."""
        self._applied_degraded = result is None
        now = self.clock.now()
        if result is None:
            self.remote_replicas = []
            self.pool.share({}, {}, self.cfg.replicas, now)
        else:
            self.remote_replicas = result.replicas
            # just rejoined: the other replicas may still be degraded, their calls not yet in Redis (an empty Redis
            # after a restart): keep within this replica's share until each has probed (retry_s) and claimed
            settling = time.monotonic() - self._rejoined_at < self.cfg.retry_s + 2 * self.cfg.sync_interval_s
            self.pool.share(result.remote_inflight, result.remote_load, self.cfg.replicas if settling else None, now)

    async def _rejoin(self) -> None:
        """Redis answers again: claim every lease this replica holds (fresh expiry; its others dropped), publish the
        load and read the others' before the replica trusts the shared view again (an error keeps it degraded)."""
        self._rejoined_at = time.monotonic()
        async with asyncio.timeout(self.cfg.timeout_s * 4):
            self._synced("claim", await self._exchange("claim"))

    # ---- workflows -------------------------------------------------------------------------------------------
    def _workflow_key(self, workflow_id: str) -> str:
        return self.leases.key("wf", workflow_id)

    async def workflow(self, workflow_id: str) -> dict[str, Any] | None:
        """The workflow's shared fields (stages, generated, last_model, last_backend, context_tokens, first_seen:
        epoch seconds), or None when no replica has finished a stage of it (or Redis is gone)."""
        raw = await self.conn.run(lambda r: r.hgetall(self._workflow_key(workflow_id)), None)
        if not raw:
            return None
        out: dict[str, Any] = {}
        for k, v in raw.items():
            k, v = k.decode(), v.decode()
            out[k] = v if k in ("last_model", "last_backend") else float(v) if k == "first_seen" else int(v)
        return out

    async def pull_workflow(self, workflow_id: str, now: float) -> WorkflowState:
        """The pool's state of the workflow, brought up to what the replica set knows: more stages and tokens, the
        latest context's place, the earliest start."""
        st = self.pool.workflows.get(workflow_id, now)
        shared = await self.workflow(workflow_id)
        if shared is None:
            return st
        if shared.get("stages", 0) >= st.stages:
            st.stages = shared.get("stages", 0)
            st.generated = max(st.generated, shared.get("generated", 0))
            st.last_model = shared.get("last_model") or st.last_model
            st.last_backend = shared.get("last_backend") or st.last_backend
            st.context_tokens = shared.get("context_tokens", st.context_tokens)
        if "first_seen" in shared:
            st.arrival_s = min(st.arrival_s, shared["first_seen"] - self.clock.wall(0.0))
        return st

    def _stage_done(self, call: Call, backend: str) -> StageDone:
        """A completed call's update of its workflow's shared state (what pool.complete does to the local one)."""
        st = self.pool.workflows.peek(call.workflow_id)
        first = self.clock.wall(st.arrival_s if st is not None else call.workflow_arrival_s) or 0.0
        return StageDone(call.workflow_id, call.tokens_seen, first, call.model or "", backend,
                         call.prompt_tokens + call.tokens_seen)

    # ---- what it shows -----------------------------------------------------------------------------------------
    def own_leases(self) -> dict[str, int]:
        counts = Counter(h.backend for h in self.held.values() if h.granted)
        return {be.name: counts.get(be.name, 0) for be in self.pool.all_backends}

    def status(self) -> dict[str, Any]:
        """For /health: the connection's mode, this replica's leases and the other replicas' per backend."""
        out = self.conn.status()
        out["leases"] = self.own_leases()
        out["remote_inflight"] = {be.name: be.remote_inflight for be in self.pool.all_backends}
        out["peers"] = list(self.remote_replicas)
        return out

    def collector(self) -> Collector:
        return _SharedMetrics(self)


class _SharedMetrics(Collector):
    """The replica's shared-state gauges and counters, read at scrape time."""

    def __init__(self, state: SharedState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        st, conn = self.state, self.state.conn
        yield GaugeMetricFamily("chimera_shared_state_degraded", "1 while Redis is unreachable and this replica "
                                "serves on local caps", 1.0 if conn.degraded else 0.0)
        yield CounterMetricFamily("chimera_shared_state_outages", "Times this replica lost Redis",
                                  conn.degraded_count)
        yield CounterMetricFamily("chimera_shared_state_timeouts", "Redis commands that answered too late (not "
                                  "an outage until they persist)", conn.timeouts)
        yield GaugeMetricFamily("chimera_shared_state_last_outage_seconds", "How long the last Redis outage lasted, "
                                "from going degraded to rejoining", conn.last_outage_s or 0.0)
        yield CounterMetricFamily("chimera_shared_lease_waits", "Calls that found their backend globally full (a "
                                  "slot another replica took first) and waited for a lease", st.lease_waits)
        own = GaugeMetricFamily("chimera_shared_leases", "Leases this replica holds per backend", labels=["backend"])
        for name, n in st.own_leases().items():
            own.add_metric([name], n)
        remote = GaugeMetricFamily("chimera_shared_remote_inflight", "Calls the other replicas hold per backend, "
                                   "at the last sync", labels=["backend"])
        for be in st.pool.all_backends:
            remote.add_metric([be.name], be.remote_inflight)
        yield own
        yield remote
