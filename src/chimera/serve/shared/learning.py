"""Online learning shared by a replica set: a score posted to any replica is judged once for the whole set (learnt,
repeated, unknown, late) and teaches every replica's learner the same rows, though each replica holds only the
decisions of the calls it served (docs/gateway.md, "Online learning across replicas").

Every sync tick a replica writes which workflows it decided since the last tick (`PREFIX:learn:wf:WID`: when first
decided, calls per replica) and reads one capped stream (`PREFIX:learn:stream`). The replica a score reaches judges it
from those records, takes it once for the set (`SET NX` on `PREFIX:learn:scored:WID`) and appends it to the stream;
each replica credits the calls it decided (weight 1 / the workflow's calls across the set) and appends those ridge rows;
every replica applies every row in stream order, so all learners hold the same statistics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from typing import Any, Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from chimera.predict.bandit import LinearBandit
from chimera.sched.admission import Admission
from chimera.sched.predictors import FeedbackOutcome
from chimera.serve.shared.connection import SharedConnection
from chimera.util.periodic import Periodic

log = logging.getLogger("chimera.serve")
STREAM_MAXLEN = 10_000  # stream entries kept (about): a replica that starts replays them to catch up with the set
READ_COUNT = 256  # stream entries read per command
MAX_UNSHARED = 100_000  # workflows decided (or scored while degraded) not yet written to Redis; beyond, forgotten
MIN_KEEP_S = 60.0  # a workflow's record outlives the learner's max_age_s by at least this (late, then forgotten)
TAKEN = (FeedbackOutcome.LEARNT, FeedbackOutcome.LATE, FeedbackOutcome.IGNORED)  # outcomes that take the score
# One command per tick for every workflow decided since the last: when it was first decided on Redis's clock (kept if
# set), this replica's calls of it, and how long the record lives. KEYS: the records; ARGV: field, ttl, then (seconds
# since it was first decided here, calls) pairs.
WRITE_DECIDED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i, key in ipairs(KEYS) do
  redis.call('HSETNX', key, 'first', tostring(now - tonumber(ARGV[1 + 2 * i])))
  redis.call('HSET', key, ARGV[1], ARGV[2 + 2 * i])
  redis.call('EXPIRE', key, ARGV[2])
end
return #KEYS
"""
Local = Callable[[str, float, float], FeedbackOutcome]
Rows = tuple[list[np.ndarray], list[str], list[float], list[float]]  # features, model names, residuals, weights


class SharedLearning:
    """One replica's part: `await feedback(...)` answers a score for the set; `sync()` (every `interval_s` once
    started) writes this replica's decisions and applies the stream. `learner()` gives the online learner (None: no
    learning, scores are only taken once across the set); `local` is the single-gateway answer, used while degraded."""

    def __init__(self, conn: SharedConnection, learner: Callable[[], Any], local: Local, interval_s: float,
                 registry: CollectorRegistry | None = None) -> None:
        self.conn, self._learner_of, self.local, self.interval_s = conn, learner, local, interval_s
        self.stream = conn.key("learn", "stream")
        self._calls_field = f"calls:{conn.replica_id}".encode()
        self._last_id: bytes | str = "0-0"  # where this replica is in the stream: from its start, to catch up
        self._fresh: dict[str, float] = {}  # workflow -> when it was first decided here (monotonic), not yet written
        self._offline: deque[str] = deque(maxlen=MAX_UNSHARED)  # scores taken while degraded: the set is told later
        self._hook = self._decided
        self._warned_width = False
        self.counts = {"rows_applied": 0, "rows_published": 0, "rows_unshared": 0}
        self.taken = Counter("chimera_shared_feedback", "Scores handled for the replica set: posted here (local), "
                             "posted to another replica and credited here (peer), answered alone while Redis was "
                             "gone (degraded)", ["source"], registry=registry)
        self._write_script = conn.redis.register_script(WRITE_DECIDED)
        self._loop = Periodic(self.sync, interval_s, "shared learning sync", logger=log)
        conn.on_rejoin.append(self._rejoin)
        self.learner()  # hook it now: every decision from here on is shared

    @classmethod
    def for_core(cls, conn: SharedConnection, core: Admission, interval_s: float,
                 registry: CollectorRegistry | None = None) -> "SharedLearning":
        """For an admission core: its score learner (re-read, a reload may swap predictors) and its own answer."""
        return cls(conn, lambda: next(iter(core.reward_learners), None), core.feedback, interval_s, registry)

    # ---- keys and the learner -----------------------------------------------------------------------------------
    def _wf(self, workflow_id: str) -> str:
        return self.conn.key("learn", "wf", workflow_id)

    def _scored(self, workflow_id: str) -> str:
        return self.conn.key("learn", "scored", workflow_id)

    @staticmethod
    def _keep_s(learner: LinearBandit | None) -> int:
        """How long the set remembers a workflow's decisions and its score: past max_age_s, so late is answered."""
        age = 86_400.0 if learner is None else learner.max_age_s
        return math.ceil(age + max(age, MIN_KEEP_S))

    def learner(self) -> LinearBandit | None:
        """The online learner now (told of every decision it keeps), or None."""
        learner = self._learner_of()
        if not isinstance(learner, LinearBandit):
            return None
        if learner.on_decided is not self._hook:
            learner.on_decided = self._hook
        return learner

    def _decided(self, workflow_id: str) -> None:
        if workflow_id not in self._fresh and len(self._fresh) < MAX_UNSHARED:
            self._fresh[workflow_id] = time.monotonic()

    # ---- a score posted here ------------------------------------------------------------------------------------
    async def feedback(self, workflow_id: str, score: float, now: float) -> FeedbackOutcome:
        """What the score does for the set: taken once (learnt, late, ignored) or refused (repeated, unknown)."""
        if not (isinstance(score, (int, float)) and 0.0 <= score <= 1.0):
            return self.local(workflow_id, score, now)  # invalid: the same answer everywhere
        learner = self.learner()
        judged = None if self.conn.degraded else await self._judge(learner, workflow_id, now)
        if judged is None:
            return self._alone(workflow_id, score, now)
        outcome, calls = judged
        if outcome in TAKEN:
            keep = self._keep_s(learner)

            async def claim(r: Any) -> bool:  # SET NX answers None when the key exists: False, not a failure
                return bool(await r.set(self._scored(workflow_id), outcome.value, nx=True, ex=keep))

            claimed = await self.conn.run(claim, None)
            if claimed is None:
                return self._alone(workflow_id, score, now)
            if not claimed:
                outcome = FeedbackOutcome.REPEATED
            elif learner is None:
                outcome = self.local(workflow_id, score, now)  # ignored (no learner), as a single gateway answers
            else:
                await self._publish_score(learner, workflow_id, score, outcome, calls)
        if learner is not None:
            learner.count(outcome)
        self.taken.labels("local").inc()
        return outcome

    async def _judge(self, learner: LinearBandit | None, workflow_id: str,
                     now: float) -> tuple[FeedbackOutcome, int] | None:
        """The outcome for the set and the workflow's calls across it, from the Redis records and this learner; an
        unknown workflow is looked up again one tick later (peers write what they decided once a tick). None: Redis
        failed (degraded)."""
        async def read(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.hgetall(self._wf(workflow_id))
            pipe.exists(self._scored(workflow_id))
            pipe.time()
            return await pipe.execute()

        for attempt in range(2):
            seen = await self.conn.run(read, None)
            if seen is None:
                return None
            record, scored, (secs, micros) = seen
            if scored:
                return FeedbackOutcome.REPEATED, 0
            if learner is None:
                return FeedbackOutcome.IGNORED, 0
            here = learner.peek(workflow_id, now)
            if here is FeedbackOutcome.REPEATED:  # taken here while degraded
                return here, 0
            if record or here is not FeedbackOutcome.UNKNOWN:
                calls = sum(int(v) for k, v in record.items() if k.startswith(b"calls:") and k != self._calls_field)
                calls += learner.pending_calls(workflow_id) or 0
                first = float(record.get(b"first", b"inf"))
                late = here is FeedbackOutcome.LATE or secs + micros / 1e6 - first > learner.max_age_s
                return (FeedbackOutcome.LATE if late else FeedbackOutcome.LEARNT), calls
            if attempt == 0:
                await asyncio.sleep(self.interval_s * 1.5)
        return FeedbackOutcome.UNKNOWN, 0

    async def _publish_score(self, learner: LinearBandit, workflow_id: str, score: float, outcome: FeedbackOutcome,
                             calls: int) -> None:
        fields = {"k": "score", "wid": workflow_id, "score": repr(float(score)), "o": outcome.value,
                  "n": max(calls, 1), "by": self.conn.replica_id}
        added = await self.conn.run(lambda r: r.xadd(self.stream, fields, maxlen=STREAM_MAXLEN, approximate=True),
                                    None)
        if added is None:  # Redis went away after the score was taken: this replica's calls learn it here
            rows = self._credit(learner, workflow_id, score, outcome.value, calls)
            self._apply_alone(learner, rows)

    def _alone(self, workflow_id: str, score: float, now: float) -> FeedbackOutcome:
        """Degraded: the single gateway's answer from this replica's own knowledge; the set is told it was taken once
        Redis is back."""
        outcome = self.local(workflow_id, score, now)
        if outcome in TAKEN:
            self._offline.append(workflow_id)
        self.taken.labels("degraded").inc()
        return outcome

    async def _rejoin(self) -> None:
        """Redis is back: scores taken alone meanwhile are marked taken for the set (a repeat elsewhere is 409)."""
        if not self._offline:
            return
        pipe = self.conn.redis.pipeline(transaction=False)
        keep = self._keep_s(self.learner())
        for wid in self._offline:
            pipe.set(self._scored(wid), FeedbackOutcome.LEARNT.value, nx=True, ex=keep)
        await pipe.execute()
        self._offline.clear()

    # ---- every tick: write decisions, apply the stream ----------------------------------------------------------
    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def sync(self) -> None:
        """Write the workflows decided since the last tick, then apply what the stream holds past this replica."""
        learner = self.learner()
        if learner is None or self.conn.degraded:
            return
        await self._write_decided(learner)
        for _ in range(64):  # catching up is bounded per tick
            got = await self.conn.run(lambda r: r.xread({self.stream: self._last_id}, count=READ_COUNT), None)
            if not got:
                return
            entries = got[0][1]
            rows = self._consume(learner, entries)
            if rows[0]:
                await self._publish_rows(learner, rows)
            if len(entries) < READ_COUNT:
                return

    async def _write_decided(self, learner: LinearBandit) -> None:
        fresh, self._fresh = self._fresh, {}
        if not fresh:
            return
        keys: list[str] = []
        args: list[Any] = [self._calls_field, self._keep_s(learner)]
        now = time.monotonic()
        for wid, first in fresh.items():
            n = learner.pending_calls(wid)
            if n is not None:  # not scored or forgotten meanwhile
                keys.append(self._wf(wid))
                args += (repr(now - first), n)
        if keys and await self.conn.run(lambda r: self._write_script(keys, args, r), None) is None:
            # degraded: written on a later tick, once Redis is back
            for wid, first in fresh.items():
                if len(self._fresh) < MAX_UNSHARED:
                    self._fresh.setdefault(wid, first)

    def _consume(self, learner: LinearBandit, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> Rows:
        """Apply the stream's rows; credit this replica's calls of the scores it carries (rows to publish)."""
        out: Rows = ([], [], [], [])
        for entry_id, f in entries:
            self._last_id = entry_id
            kind = f.get(b"k")
            if kind == b"rows":
                self._apply(learner, f)
            elif kind == b"score":
                if f[b"by"].decode() != self.conn.replica_id:
                    self.taken.labels("peer").inc()
                rows = self._credit(learner, f[b"wid"].decode(), float(f[b"score"]), f[b"o"].decode(), int(f[b"n"]))
                for acc, part in zip(out, rows):
                    acc.extend(part)
        return out

    @staticmethod
    def _credit(learner: LinearBandit, workflow_id: str, score: float, outcome: str, calls: int) -> Rows:
        """This replica's rows for a score taken by the set: its decisions of the workflow, each weighted 1 / the
        workflow's calls across the set (a late score only drops them)."""
        _, decided = learner.claim(workflow_id, None)
        if outcome != FeedbackOutcome.LEARNT.value or not decided:
            return [], [], [], []
        X, models, residuals, weights = learner.credit(decided, score, max(calls, len(decided)))
        return list(X), [learner.models_[j] for j in models], residuals, weights

    async def _publish_rows(self, learner: LinearBandit, rows: Rows) -> None:
        X, names, residuals, weights = rows
        fields = {"k": "rows", "by": self.conn.replica_id, "m": json.dumps(names),
                  "x": np.asarray(X, dtype="<f8").tobytes(), "r": np.asarray(residuals, dtype="<f8").tobytes(),
                  "w": np.asarray(weights, dtype="<f8").tobytes()}
        added = await self.conn.run(lambda r: r.xadd(self.stream, fields, maxlen=STREAM_MAXLEN, approximate=True),
                                    None)
        if added is None:  # Redis went away: the rows teach this replica only
            self._apply_alone(learner, rows)
        else:
            self.counts["rows_published"] += len(names)

    def _apply_alone(self, learner: LinearBandit, rows: Rows) -> None:
        X, names, residuals, weights = rows
        if names:
            learner.partial_fit(np.asarray(X), [learner.models_.index(m) for m in names], residuals, weights)
            self.counts["rows_unshared"] += len(names)

    def _apply(self, learner: LinearBandit, f: dict[bytes, bytes]) -> None:
        """One published batch of rows into this learner (rows of a model it does not serve are skipped)."""
        names = json.loads(f[b"m"])
        X = np.frombuffer(f[b"x"], dtype="<f8").reshape(len(names), -1)
        if X.shape[1] != learner.features.width:
            if not self._warned_width:
                self._warned_width = True
                log.warning('{"event": "shared_learning_skipped", "reason": "rows of width %d, this learner has %d '
                            '(the replicas\' learning.dim differ)"}', X.shape[1], learner.features.width)
            return
        keep = [i for i, m in enumerate(names) if m in learner.models_]
        residuals, weights = np.frombuffer(f[b"r"], dtype="<f8"), np.frombuffer(f[b"w"], dtype="<f8")
        learner.partial_fit(X[keep], [learner.models_.index(names[i]) for i in keep], residuals[keep].tolist(),
                            weights[keep].tolist())
        self.counts["rows_applied"] += len(keep)

    def stats(self) -> dict[str, Any]:
        """Rows applied from the stream, published, learnt alone (Redis gone); decisions not yet written."""
        return {**self.counts, "unwritten": len(self._fresh)}
