"""Length learning shared by a replica set: the running-mean length predictor (predict/priors.py RunningLength) of
every replica predicts from every replica's completions, not only the calls it happened to serve (docs/replicas.md,
"What the replicas share").

Every sync tick a replica adds the (kind, stage, model) -> (tokens sum, count) it observed since its last tick to one
Redis hash (`PREFIX:lengths`) and reads the whole hash back in the same script, then installs the set's totals (plus
what it observed meanwhile) into its predictor. While Redis is gone it keeps learning alone and adds what it observed
once Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from chimera.predict.priors import RunningLength
from chimera.serve.shared.connection import SharedConnection
from chimera.util.periodic import Periodic

log = logging.getLogger("chimera.serve")
KEEP_S = 86_400  # the set's totals outlive the last write by a day, then a new set starts from nothing
Key = tuple[str, int, str]
Totals = dict[Key, tuple[float, int]]
# Add the deltas and read the totals back, atomically, so a tick neither loses nor double counts a delta; a replica
# that may have lost the set's totals (Redis restarted empty) also sends its whole table, which raises every cell that
# holds fewer completions than the replica knows of to what it knows (a max, so sending it twice counts nothing twice).
# KEYS[1]: the hash; ARGV: ttl, the number of delta cells, then per cell (sum field, sum, count field, count): the
# deltas, then the whole table.
ADD_AND_READ = """
local deltas = 2 + 4 * tonumber(ARGV[2])
for i = 3, deltas, 4 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[1], ARGV[i + 2], ARGV[i + 3])
end
for i = deltas + 1, #ARGV, 4 do
  if tonumber(redis.call('HGET', KEYS[1], ARGV[i + 2]) or '0') < tonumber(ARGV[i + 3]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
  end
end
if #ARGV > 2 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('HGETALL', KEYS[1])
"""


def _field(key: Key, part: str) -> str:
    return json.dumps([key[0], key[1], key[2], part])


def parse_totals(flat: list[Any]) -> Totals:
    """The hash's fields (`["kind", stage, "model", "s"|"n"]` -> value) as (kind, stage, model) -> (sum, count);
    a field this version cannot read is skipped."""
    out: dict[Key, list[float]] = {}
    for name, value in zip(flat[::2], flat[1::2]):
        try:
            kind, stage, model, part = json.loads(name)
            pair = out.setdefault((str(kind), int(stage), str(model)), [0.0, 0.0])
            pair[part == "n"] = float(value)
        except (ValueError, TypeError, IndexError):
            continue
    return {key: (s, int(n)) for key, (s, n) in out.items() if n > 0}


class SharedLengths:
    """One replica's part: `sync()` (every `interval_s` once started, and once at start) adds what this replica's
    RunningLength observed to the set's totals and installs them. `length()` gives the policy's length predictor now;
    any other predictor (a trained forest, calibrated or not) is not shared and the ticks do nothing."""

    def __init__(self, conn: SharedConnection, length: Callable[[], Any], interval_s: float,
                 registry: CollectorRegistry | None = None) -> None:
        self.conn, self._length_of, self.interval_s = conn, length, interval_s
        self.hash = conn.key("lengths")
        self._pending: Totals = {}  # taken from the predictor, not yet written (Redis gone, or a failed tick)
        self._lock = asyncio.Lock()  # a tick and a rejoin never write the same deltas twice
        self.cells = 0  # (kind, stage, model) cells in the set's totals, as last read
        self._held = 0  # completions the set's totals held, as last read
        self._reseed = False  # send the whole table too: it seeds the hash if Redis lost it
        self._script = conn.redis.register_script(ADD_AND_READ)
        self._loop = Periodic(self.sync, interval_s, "shared lengths sync", first_after_s=0.0, logger=log)
        self.flushes = Counter("chimera_shared_lengths_flushes", "Sync ticks that added this replica's completion "
                               "lengths to the replica set's totals and read them back", registry=registry)
        self.keys = Gauge("chimera_shared_lengths_keys", "(kind, stage, model) cells in the replica set's shared "
                          "length totals, as last read", registry=registry)
        self.unshared = Gauge("chimera_shared_lengths_unshared", "Completions this replica observed that the set's "
                              "totals do not hold yet (Redis gone)", registry=registry)
        conn.on_rejoin.append(self._rejoin)

    def length(self) -> RunningLength | None:
        """The policy's length predictor when it is a running mean (a reload may swap it), else None."""
        length = self._length_of()
        return length if isinstance(length, RunningLength) else None

    async def _rejoin(self) -> None:
        """Redis is back, perhaps restarted empty: what this replica observed alone is added, and what it knows
        refills the totals if they are gone."""
        self._reseed = True
        await self.sync()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Stop ticking and hand the set what was observed since the last tick (if Redis answers)."""
        await self._loop.stop()
        try:
            await self.sync()
        except Exception:  # stopping never fails on a last write
            log.exception("shared lengths: the last write failed")

    async def sync(self) -> None:
        """Take this replica's new observations, add them to the set's totals, install the totals."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        length = self.length()
        if length is None:
            return
        for key, (ds, dn) in length.take_deltas().items():
            s0, n0 = self._pending.get(key, (0.0, 0))
            self._pending[key] = (s0 + ds, n0 + dn)
        self.unshared.set(sum(n for _, n in self._pending.values()))
        if self.conn.degraded:
            return
        args: list[Any] = [KEEP_S, len(self._pending)]
        for table in (self._pending, length.totals() if self._reseed else {}):
            for key, (s, n) in table.items():
                args += (_field(key, "s"), repr(float(s)), _field(key, "n"), n)
        flat = await self.conn.run(lambda r: self._script([self.hash], args, r), None)
        if flat is None:  # degraded: written on a later tick, once Redis is back
            return
        self._pending = {}
        self.unshared.set(0)
        totals = parse_totals(flat)
        held = sum(n for _, n in totals.values())
        # the set's totals shrank (Redis lost them, silently): not installed; the next tick refills them with what
        # this replica knows
        self._reseed = held < self._held
        if self._reseed:
            return
        self._held = held
        if length is self.length():  # not swapped by a reload meanwhile
            length.install_totals(totals)
        self.flushes.inc()
        self.cells = len(totals)
        self.keys.set(self.cells)

    def stats(self) -> dict[str, Any]:
        """Cells in the set's totals as last read, completions not yet shared (the metrics hold the same)."""
        return {"keys": self.cells, "unshared": sum(n for _, n in self._pending.values())}
