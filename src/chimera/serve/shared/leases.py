"""The Redis side of the replica set's leases and load: the key layout and the server-side (Lua) scripts that decide
atomically, on Redis's own clock (TIME), so the replicas' clocks never matter.

Keys (PREFIX is the state config's `key_prefix`):
- `PREFIX:lease:BACKEND`  ZSET, member `REPLICA:CALL_ID`, score = the lease's expiry (ms of Redis TIME). A call holds
  one while it runs on BACKEND; its replica renews it every third of the TTL, so a crashed replica's leases expire.
- `PREFIX:replicas`       ZSET, member REPLICA, score = expiry: the replicas alive (each sync renews its own); one
  whose last sync (expiry - TTL) is older than the stale bound is quiet: it counts as holding at least its share.
- `PREFIX:load:REPLICA`   HASH `calls:MODEL`, `tokens:MODEL`: the replica's calls and predicted tokens in flight
  (queued + running), PEXPIRE = the TTL.
- `PREFIX:wf:WORKFLOW`    HASH: the workflow's shared state (serve/shared/state.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] the backend's lease ZSET, KEYS[2] the replicas ZSET, KEYS[3..] lease ZSETs of releases to apply first (so
# a slot freed by this replica is free for its next call in the same round trip); ARGV: member, cap, ttl ms, a
# replica's share of the cap, stale ms, this replica's member prefix (`REPLICA:`), then the releases' members.
# A quiet replica (see SYNC) counts as holding at least its share here too, so no grant takes a slot it may be
# running without a lease. Returns {1 granted | 0 full, leases on the backend after it}.
ACQUIRE = _NOW + """
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i + 4]) end
local key, member, cap, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local share, stale, own = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local n = redis.call('ZCARD', key)
if redis.call('ZSCORE', key, member) then
  redis.call('ZADD', key, now + ttl, member)
  return {1, n}
end
local reserved = 0
local quiet = redis.call('ZRANGEBYSCORE', KEYS[2], now, now + ttl - stale)
if #quiet > 0 and share > 0 then
  local per = {}
  for _, r in ipairs(quiet) do if r .. ':' ~= own then per[r] = 0 end end
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local r = string.match(m, '^(.*):[^:]*$')
    if r and per[r] then per[r] = per[r] + 1 end
  end
  for _, held in pairs(per) do reserved = reserved + math.max(0, share - held) end
end
if n + reserved < cap then
  redis.call('ZADD', key, now + ttl, member)
  return {1, n + 1}
end
return {0, n}
"""

# KEYS[1] replicas ZSET, KEYS[2] this replica's load HASH, KEYS[3..] every backend's lease ZSET.
# ARGV: replica id, ttl ms, load key prefix (`PREFIX:load:`), own member prefix (`REPLICA:`), mode (0 read only,
# 1 renew: ZADD the held members a fresh expiry, 2 claim: renew and drop this replica's other members), stale ms,
# then per lease key: a replica's share of its cap, the number of held members and them, then the load HASH's
# field/value pairs. Renewing re-adds a held lease that is missing (it expired while the replica stalled, or a claim
# raced its grant): its call does run. A live replica that has not synced for `stale ms` (it may have lost Redis and
# serve on its share alone) counts as holding at least its share of every backend; an expired one (crashed) holds
# nothing but its leases, until they expire too.
# Returns {other replicas' live leases per backend (stale ones at least their share), {replica, its load HASH
# (flat), ...}}.
SYNC = _NOW + """
local rid, ttl, loadp, own, mode, stale = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5]),
  tonumber(ARGV[6])
redis.call('ZADD', KEYS[1], now + ttl, rid)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local quiet = {}
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now + ttl - stale)) do quiet[r] = true end
local a = 7
local counts = {}
for i = 3, #KEYS do
  local key = KEYS[i]
  local share = tonumber(ARGV[a]); a = a + 1
  local n = tonumber(ARGV[a]); a = a + 1
  local held = {}
  for j = 1, n do held[ARGV[a]] = true; a = a + 1 end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if mode > 0 then
    for m, _ in pairs(held) do redis.call('ZADD', key, now + ttl, m) end
  end
  local others = 0
  local per = {}
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(m, 1, #own) ~= own then
      others = others + 1
      local r = string.match(m, '^(.*):[^:]*$')
      if r and quiet[r] then per[r] = (per[r] or 0) + 1 end
    elseif mode == 2 and not held[m] then redis.call('ZREM', key, m) end
  end
  for r, _ in pairs(quiet) do others = others + math.max(0, share - (per[r] or 0)) end
  counts[#counts + 1] = others
end
redis.call('DEL', KEYS[2])
if #ARGV >= a then
  redis.call('HSET', KEYS[2], unpack(ARGV, a))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
local loads = {}
for _, r in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if r ~= rid then
    local h = redis.call('HGETALL', loadp .. r)
    if #h > 0 then loads[#loads + 1] = r; loads[#loads + 1] = h end
  end
end
return {counts, loads}
"""

# KEYS: NR lease ZSETs, then NW workflow HASHes. ARGV: NR, the NR members to release, the workflows' TTL in
# seconds, then per workflow: generated tokens, first seen (epoch s), last model, last backend, context tokens.
# Each workflow gains a stage and the tokens, keeps its first sighting, and its context is where this call ran.
SETTLE = """
local nr = tonumber(ARGV[1])
for i = 1, nr do redis.call('ZREM', KEYS[i], ARGV[i + 1]) end
local ttl = tonumber(ARGV[nr + 2])
local a = nr + 3
for i = nr + 1, #KEYS do
  local key = KEYS[i]
  redis.call('HINCRBY', key, 'stages', 1)
  redis.call('HINCRBY', key, 'generated', ARGV[a])
  redis.call('HSETNX', key, 'first_seen', ARGV[a + 1])
  redis.call('HSET', key, 'last_model', ARGV[a + 2], 'last_backend', ARGV[a + 3], 'context_tokens', ARGV[a + 4])
  redis.call('EXPIRE', key, ttl)
  a = a + 5
end
return 1
"""

MODES = {"read": 0, "renew": 1, "claim": 2}


@dataclass(frozen=True)
class StageDone:
    """A completed call's update of its workflow's shared state."""

    workflow_id: str
    generated: int
    first_seen: float  # epoch seconds the workflow was first seen
    model: str
    backend: str
    context_tokens: int


@dataclass
class SyncResult:
    """What one sync read: other replicas' live leases per backend, and their load per model."""

    remote_inflight: dict[str, int]
    remote_load: dict[str, tuple[float, float]]  # model -> (calls, predicted tokens) on the other replicas
    replicas: list[str]  # the other live replicas that published a load


class Leases:
    """The scripts, registered once on the replica's client, and the keys of one replica set."""

    def __init__(self, redis: aioredis.Redis, prefix: str, replica_id: str, backends: Sequence[str],
                 ttl_s: float, *, shares: Mapping[str, int] | None = None, stale_s: float | None = None) -> None:
        """`shares`: a replica's share of each backend's cap (what a replica that stopped syncing for `stale_s` may
        run on its own); without them (or `stale_s`), a quiet replica counts by its leases alone."""
        self.redis, self.prefix, self.replica_id = redis, prefix, replica_id
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.stale_ms = self.ttl_ms if stale_s is None else max(1, round(stale_s * 1000))
        self.shares = dict(shares or {})
        self.backends = list(backends)
        self.lease_keys = {b: self.key("lease", b) for b in self.backends}
        self.own = replica_id + ":"
        self._acquire = redis.register_script(ACQUIRE)
        self._sync = redis.register_script(SYNC)
        self._settle = redis.register_script(SETTLE)
        self._sync_keys = [self.key("replicas"), self.key("load", replica_id), *self.lease_keys.values()]

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def member(self, call_id: int) -> str:
        return f"{self.own}{call_id}"

    async def acquire(self, backend: str, member: str, cap: int,
                      releases: Sequence[tuple[str, str]] = ()) -> tuple[bool, int]:
        """One atomic try for a lease on `backend` under `cap`, less what quiet replicas may run unleased (after
        applying `releases`, (backend, member) pairs): (granted, leases on the backend now). One round trip."""
        keys = [self.lease_keys[backend], self.key("replicas"), *(self.lease_keys[b] for b, _ in releases)]
        args = [member, cap, self.ttl_ms, self.shares.get(backend, 0), self.stale_ms, self.own,
                *(m for _, m in releases)]
        granted, n = await self._eval(self._acquire, keys, args)
        return bool(granted), int(n)

    async def sync(self, held: Mapping[str, Sequence[str]], load: Mapping[str, tuple[float, float]],
                   mode: str = "read") -> SyncResult:
        """Publish this replica's `load` (model -> (calls, predicted tokens)), purge expired leases, renew or claim
        the `held` members (backend -> members) per `mode`, and read the other replicas' leases (a quiet replica's at
        least its share) and load. One round trip, atomic."""
        args: list[Any] = [self.replica_id, self.ttl_ms, self.key("load", ""), self.own, MODES[mode], self.stale_ms]
        for b in self.backends:
            members = held.get(b, ()) if mode != "read" else ()
            args += [self.shares.get(b, 0), len(members), *members]
        for model, (calls, tokens) in load.items():
            args += [f"calls:{model}", calls, f"tokens:{model}", tokens]
        counts, loads = await self._eval(self._sync, self._sync_keys, args)
        remote_load: dict[str, list[float]] = {}
        replicas = []
        for i in range(0, len(loads), 2):
            replicas.append(_text(loads[i]))
            flat = loads[i + 1]
            for j in range(0, len(flat), 2):
                what, _, model = _text(flat[j]).partition(":")
                slot = remote_load.setdefault(model, [0.0, 0.0])
                slot[0 if what == "calls" else 1] += float(flat[j + 1])
        return SyncResult(dict(zip(self.backends, (int(c) for c in counts))),
                          {m: (v[0], v[1]) for m, v in remote_load.items()}, replicas)

    async def settle(self, releases: Sequence[tuple[str, str]], stages: Sequence[StageDone],
                     workflow_ttl_s: int) -> None:
        """Free the `releases` ((backend, member) pairs) and apply the `stages` to their workflows: one round trip."""
        keys = [*(self.lease_keys[b] for b, _ in releases), *(self.key("wf", st.workflow_id) for st in stages)]
        args: list[Any] = [len(releases), *(m for _, m in releases), workflow_ttl_s]
        for st in stages:
            args += [st.generated, repr(st.first_seen), st.model, st.backend, st.context_tokens]
        await self._eval(self._settle, keys, args)

    async def forget(self) -> None:
        """This replica leaves: its load and its place among the live replicas go (leases are released per call)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.key("load", self.replica_id))
            pipe.zrem(self.key("replicas"), self.replica_id)
            await pipe.execute()

    async def _eval(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA; a Redis that lost its script cache (restarted) gets the script again, once."""
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            script.sha = await self.redis.script_load(script.script)
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
