"""Length learning shared by replicas on a real Redis: the running mean of every replica predicts from every replica's
completions (a stage seen on one replica only is predicted alike on the other), a replica that starts reads the set's
totals, and one that lost Redis keeps learning alone and adds what it learnt once Redis is back."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from chimera.predict.priors import DEFAULT_CALL_TOKENS, TRACKED_STAGES, RunningLength
from chimera.sched.types import Call
from chimera.serve.config import StateConfig
from chimera.serve.shared.connection import SharedConnection
from chimera.serve.shared.lengths import SharedLengths
from chimera.util.redis_server import RedisServer

NAMES = ["small", "big"]
TICK = 0.05


class Replica:
    """One replica's running-mean length predictor and its share of the set's totals."""

    def __init__(self, url: str, prefix: str, name: str) -> None:
        self.length = RunningLength(NAMES)
        self.conn = SharedConnection(StateConfig(redis_url=url, key_prefix=prefix, replica_id=name, retry_s=0.1))
        self.shared = SharedLengths(self.conn, lambda: self.length, TICK)

    def predict(self, stage: int) -> tuple[np.ndarray, np.ndarray]:
        c, r = self.length.predict_lengths([call(stage)])
        return c[0], r[0]

    async def close(self) -> None:
        await self.conn.stop()


def call(stage: int) -> Call:
    return Call(call_id=0, workflow_id="w", kind="math", prompt="p", stage=stage, prompt_tokens=10, arrival_s=0.0,
                workflow_arrival_s=0.0)


def prefix() -> str:
    return f"t-lengths-{uuid.uuid4().hex[:6]}"


def observe(length: RunningLength, stage: int, model: str, *tokens: int) -> None:
    for t in tokens:
        length.observe("math", stage, model, t)


def test_observations_on_one_replica_reach_the_other_and_both_predict_as_one_gateway(redis_server):
    async def scenario() -> None:
        p = prefix()
        a, b = Replica(redis_server.url, p, "ra"), Replica(redis_server.url, p, "rb")
        alone = RunningLength(NAMES)  # one gateway that saw every completion
        try:
            observe(a.length, 0, "small", 100, 120)
            observe(b.length, 1, "big", 400)
            observe(b.length, 0, "small", 140)
            for length, stage, model, toks in ((alone, 0, "small", (100, 120, 140)), (alone, 1, "big", (400,))):
                observe(length, stage, model, *toks)
            assert a.predict(1)[0][1] == DEFAULT_CALL_TOKENS  # A never saw stage 1: the blind default
            for r in (a, b, a):
                await r.shared.sync()
            want = alone.predict_lengths([call(0)])
            for r in (a, b):
                got_call, got_rem = r.predict(0)
                assert np.array_equal(got_call, want[0][0]) and np.array_equal(got_rem, want[1][0])
            assert a.predict(1)[0][1] == 400.0  # stage 1 seen on B only, predicted on A
            # observed after a tick: counted once, on top of the set's totals
            observe(a.length, 0, "small", 180)
            observe(alone, 0, "small", 180)
            await a.shared.sync()
            await b.shared.sync()
            assert b.predict(0)[0][0] == a.predict(0)[0][0] == (100 + 120 + 140 + 180) / 4
            assert a.shared.stats() == {"keys": 2, "unshared": 0} and a.shared.flushes._value.get() >= 2
            # a replica that starts reads the set's totals at once
            c = Replica(redis_server.url, p, "rc")
            try:
                c.shared.start()
                for _ in range(50):
                    if c.shared.cells:
                        break
                    await asyncio.sleep(0.02)
                assert c.predict(0)[0][0] == 135.0 and c.predict(1)[0][1] == 400.0
            finally:
                await c.shared.stop()
                await c.close()
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_only_a_running_mean_is_shared(redis_server):
    async def scenario() -> None:
        a = Replica(redis_server.url, prefix(), "ra")
        try:
            a.length = None  # no length predictor (or a trained forest): nothing written, nothing read
            await a.shared.sync()
            assert a.shared.flushes._value.get() == 0
            assert await a.conn.redis.exists(a.shared.hash) == 0
        finally:
            await a.close()

    asyncio.run(scenario())


def test_a_replica_without_redis_learns_alone_and_shares_it_when_redis_is_back():
    async def scenario(server: RedisServer) -> None:
        p = prefix()
        a, b = Replica(server.url, p, "ra"), Replica(server.url, p, "rb")
        a.conn.start()  # its probe loop rejoins when Redis answers again
        try:
            observe(a.length, 0, "small", 100)
            await a.shared.sync()
            await b.shared.sync()
            assert b.predict(0)[0][0] == 100.0
            server.stop()
            observe(a.length, 0, "small", 200, 300)
            await a.shared.sync()  # Redis gone: degraded, kept
            assert a.conn.degraded and a.shared.stats()["unshared"] == 2
            assert a.predict(0)[0][0] == 200.0  # still learning alone
            server.start()  # empty: the set's totals are gone
            for _ in range(100):
                if not a.conn.degraded and a.shared.stats()["unshared"] == 0 and a.shared.cells:
                    break
                await asyncio.sleep(0.05)
            assert not a.conn.degraded and a.shared.stats()["unshared"] == 0
            for _ in range(100):  # B's link may fail once on the new server, then rejoins
                await b.shared.sync()
                if not b.conn.degraded and b.shared.cells:
                    break
                await b.conn.probe()
                await asyncio.sleep(0.05)
            # A seeded the empty hash with all it knew (including its first completion), counted once
            assert b.predict(0)[0][0] == a.predict(0)[0][0] == 200.0
            assert b.length.totals() == a.length.totals() == {("math", 0, "small"): (600.0, 3)}
        finally:
            await a.close()
            await b.close()

    server = RedisServer().start()
    try:
        asyncio.run(scenario(server))
    finally:
        server.stop()


def test_totals_that_vanish_from_redis_are_refilled_not_forgotten(redis_server):
    async def scenario() -> None:
        p = prefix()
        a, b = Replica(redis_server.url, p, "ra"), Replica(redis_server.url, p, "rb")
        try:
            observe(a.length, 0, "small", 100, 200)
            observe(b.length, 0, "small", 300)
            for r in (a, b, a):
                await r.shared.sync()
            await a.conn.redis.delete(a.shared.hash)  # lost without any replica noticing an outage
            observe(b.length, 0, "small", 400)
            for r in (b, a, b, a, b):
                await r.shared.sync()
                assert r.predict(0)[0][0] >= 200.0  # never predicted from the emptied totals
            # refilled to the most any replica knew, once: the three completions before the loss and the one after
            assert a.length.totals() == b.length.totals() == {("math", 0, "small"): (1000.0, 4)}
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_totals_pool_stages_past_the_tracked_ones_and_deltas_are_taken_once():
    length = RunningLength(NAMES)
    length.install_totals({("math", 0, "small"): (300.0, 3), ("math", 99, "big"): (50.0, 1)})
    assert length.totals() == {("math", 0, "small"): (300.0, 3), ("math", TRACKED_STAGES - 1, "big"): (50.0, 1)}
    observe(length, 0, "small", 500)
    assert length.take_deltas() == {("math", 0, "small"): (500.0, 1)}
    assert length.take_deltas() == {}
    assert length.totals()[("math", 0, "small")] == (800.0, 4)
