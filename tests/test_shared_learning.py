"""Online learning shared by replicas on a real Redis: a score posted to one replica teaches every replica's learner
the same rows (each credits the calls it decided), and repeated / unknown / late are decided for the whole set."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest

from chimera.predict.bandit import LinearBandit
from chimera.predict.priors import RunningLength, SizePriorConfidence
from chimera.sched.admission import Admission
from chimera.sched.predictors import FeedbackOutcome
from chimera.sched.registry import make_policy
from chimera.sched.types import Call, ModelInfo
from chimera.serve.config import StateConfig
from chimera.serve.shared.connection import SharedConnection
from chimera.serve.shared.learning import SharedLearning
from chimera.util.redis_server import RedisServer

MODELS = [ModelInfo(name=n, size_rank=i, max_inflight=1000, tokens_per_s=1000.0, tpot_s=0.01)
          for i, n in enumerate(["small", "mid", "big"])]
NAMES = [m.name for m in MODELS]
TICK = 0.05
LEARNT, REPEATED, UNKNOWN, LATE = (FeedbackOutcome.LEARNT, FeedbackOutcome.REPEATED, FeedbackOutcome.UNKNOWN,
                                   FeedbackOutcome.LATE)


class Replica:
    """One replica's admission core with an online learner, and its shared learning on the set's Redis."""

    def __init__(self, url: str, prefix: str, name: str, **learner) -> None:
        learner = {"explore_start": 0.0, "explore_min": 0.0, **learner}  # greedy: every replica routes a call alike
        self.learner = LinearBandit(NAMES, SizePriorConfidence(MODELS), **learner)
        self.core = Admission(make_policy("chimera", confidence=self.learner, length=RunningLength(NAMES), lam=0.0),
                              MODELS, place=lambda m, c, now: m)
        self.conn = SharedConnection(StateConfig(redis_url=url, key_prefix=prefix, replica_id=name, retry_s=0.1))
        self.shared = SharedLearning.for_core(self.conn, self.core, TICK)
        self._ids = iter(range(10**6))

    def serve(self, workflow_id: str, prompt: str, now: float = 0.0) -> None:
        """One call of the workflow decided here (the core tells the learner)."""
        self.core.submit(Call(call_id=next(self._ids), workflow_id=workflow_id, kind="math", prompt=prompt, stage=0,
                              prompt_tokens=10, arrival_s=now, workflow_arrival_s=now), now)

    async def score(self, workflow_id: str, score: float, now: float = 0.0) -> FeedbackOutcome:
        return await self.shared.feedback(workflow_id, score, now)

    def taken(self, source: str) -> float:
        return self.shared.taken.labels(source)._value.get()


async def ticks(*replicas: Replica, n: int = 3) -> None:
    """Sync rounds on every replica: decisions written, scores credited, rows published and applied."""
    for _ in range(n):
        for r in replicas:
            await r.shared.sync()


def prefix() -> str:
    return f"t-learn-{uuid.uuid4().hex[:6]}"


def same_statistics(a: LinearBandit, b: LinearBandit) -> bool:
    return np.array_equal(a.A_inv_, b.A_inv_) and np.array_equal(a.b_, b.b_) and np.array_equal(a.coef_, b.coef_)


def test_a_score_posted_to_one_replica_teaches_every_replica_the_same(redis_server):
    async def scenario() -> None:
        p = prefix()
        a, b = Replica(redis_server.url, p, "ra"), Replica(redis_server.url, p, "rb")
        alone = Replica(redis_server.url, prefix(), "r-alone")  # one gateway that served every call itself
        try:
            prompts = {"wf-1": [("b", "Integrate x squared."), ("b", "Now differentiate it."), ("a", "Check it.")],
                       "wf-2": [("b", "Sum the first ten primes.")]}
            for wid, calls in prompts.items():
                for who, prompt in calls:
                    (a if who == "a" else b).serve(wid, prompt)
                    alone.serve(wid, prompt)
            await ticks(a, b)
            before = b.learner.b_.copy()
            assert await a.score("wf-1", 1.0) is LEARNT  # wf-1's calls were mostly B's
            await ticks(a, b)
            assert a.learner.counts_["learnt_calls"] == b.learner.counts_["learnt_calls"] == 3
            assert not np.array_equal(b.learner.b_, before) and same_statistics(a.learner, b.learner)
            # the credit rule counts the workflow's calls across the set: what one gateway serving all three learns
            assert alone.learner.reward("wf-1", 1.0, 0.0) is LEARNT
            assert np.allclose(a.learner.b_, alone.learner.b_) and np.allclose(a.learner.A_inv_, alone.learner.A_inv_)
            # taken once for the set: a repeat on the other replica is refused, and an unknown workflow on both
            assert await b.score("wf-1", 0.0) is REPEATED and await a.score("wf-1", 0.0) is REPEATED
            assert await a.score("never-seen", 0.5) is UNKNOWN and await b.score("never-seen", 0.5) is UNKNOWN
            # two replicas taking the same score at once: exactly one takes it
            b.serve("wf-race", "Who wins?")
            await ticks(a, b)
            assert sorted(await asyncio.gather(a.score("wf-race", 1.0), b.score("wf-race", 1.0))) == [LEARNT, REPEATED]
            await ticks(a, b)
            assert a.learner.counts_["learnt_calls"] == b.learner.counts_["learnt_calls"] == 4
            # a workflow only B served is known when its score reaches A
            assert await a.score("wf-2", 0.0) is LEARNT
            await ticks(a, b)
            assert a.learner.counts_["learnt_calls"] == 5 and same_statistics(a.learner, b.learner)
            assert b.learner.pending_calls("wf-2") is None and a.taken("local") == 5 and b.taken("local") == 3
            assert a.taken("peer") + b.taken("peer") == 3  # each score taken is credited as a peer's by the other
            st = [r.learner.stats() for r in (a, b)]
            assert [sum(x[k] for x in st) for k in ("learnt", "repeated", "unknown")] == [3, 3, 2]
            # a replica that starts later replays the stream: it holds what the others learnt
            late = Replica(redis_server.url, p, "rc")
            await ticks(late)
            assert same_statistics(late.learner, a.learner)
            for r in (a, b, alone, late):
                await r.conn.stop()
        except BaseException:
            for r in (a, b, alone):
                await r.conn.stop()
            raise

    asyncio.run(scenario())


def test_late_and_a_workflow_decided_in_the_last_tick_are_judged_for_the_set(redis_server):
    async def scenario() -> None:
        p = prefix()
        a, b = Replica(redis_server.url, p, "ra", max_age_s=0.3), Replica(redis_server.url, p, "rb", max_age_s=0.3)
        for r in (a, b):
            r.shared.start()
        try:
            b.serve("wf-late", "Old question.")
            await asyncio.sleep(0.5)  # longer than the learners keep a decision
            assert await a.score("wf-late", 1.0) is LATE  # judged from when B first decided it
            assert await b.score("wf-late", 1.0) is REPEATED
            b.serve("wf-new", "Fresh question.")  # not yet written to Redis: A looks again one tick later
            assert await a.score("wf-new", 1.0) is LEARNT
            await asyncio.sleep(6 * TICK)
            assert b.learner.pending_calls("wf-late") is None  # dropped, not learnt
            assert a.learner.counts_["learnt_calls"] == b.learner.counts_["learnt_calls"] == 1
            assert same_statistics(a.learner, b.learner)
        finally:
            for r in (a, b):
                await r.shared.stop()
                await r.conn.stop()

    asyncio.run(scenario())


def test_without_redis_each_replica_answers_alone_and_the_set_learns_of_it_after():
    async def scenario(server: RedisServer) -> None:
        p = prefix()
        a, b = Replica(server.url, p, "ra"), Replica(server.url, p, "rb")
        for r in (a, b):
            r.conn.start()
        try:
            a.serve("wf-a", "Mine.")
            b.serve("wf-b", "Theirs.")
            await ticks(a, b)
            server.stop()
            t0 = time.monotonic()
            assert await a.score("wf-a", 1.0) is LEARNT  # learnt here, from A's own decisions
            assert await a.score("wf-b", 1.0) is UNKNOWN  # B's workflow: A alone does not know it
            assert time.monotonic() - t0 < 1.0 and a.conn.degraded and a.taken("degraded") == 2
            assert a.learner.counts_["learnt_calls"] == 1 and b.learner.counts_["learnt_calls"] == 0
            server.start()
            for _ in range(100):
                if not a.conn.degraded:
                    break
                await asyncio.sleep(0.05)
            assert not a.conn.degraded
            assert await b.score("wf-a", 0.0) is REPEATED  # A told the set it took wf-a's score
        finally:
            for r in (a, b):
                await r.conn.stop()

    server = RedisServer().start()
    try:
        asyncio.run(scenario(server))
    finally:
        server.stop()


def test_without_a_learner_a_score_is_taken_once_for_the_set(redis_server):
    async def scenario() -> None:
        p = prefix()
        plain = [Admission(make_policy("chimera", confidence=SizePriorConfidence(MODELS), length=None), MODELS,
                           place=lambda m, c, now: m) for _ in range(2)]
        conns = [SharedConnection(StateConfig(redis_url=redis_server.url, key_prefix=p, replica_id=f"r{i}"))
                 for i in range(2)]
        shared = [SharedLearning.for_core(c, core, TICK) for c, core in zip(conns, plain)]
        try:
            assert await shared[0].feedback("wf", 0.5, 0.0) is FeedbackOutcome.IGNORED
            assert await shared[1].feedback("wf", 0.5, 0.0) is REPEATED
            await shared[1].sync()  # nothing to learn, nothing sent
        finally:
            for c in conns:
                await c.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("score", [float("nan"), 1.5])
def test_an_invalid_score_is_refused_as_a_single_gateway_refuses_it(redis_server, score):
    async def scenario() -> None:
        a = Replica(redis_server.url, prefix(), "ra")
        a.serve("wf", "Q.")
        try:
            assert await a.score("wf", score) is FeedbackOutcome.INVALID
            assert a.learner.pending_calls("wf") == 1
        finally:
            await a.conn.stop()

    asyncio.run(scenario())


def test_two_replicas_exploring_on_split_workflows_end_with_the_same_statistics(redis_server):
    """Workflows whose calls land on either replica, each exploring with its own seed, scored on either: every score is
    learnt once, every call is credited once, and both learners end bit-identical."""
    async def scenario() -> None:
        p = prefix()
        a = Replica(redis_server.url, p, "ra", explore_start=0.5, seed=1)
        b = Replica(redis_server.url, p, "rb", explore_start=0.5, seed=2)
        rng = np.random.default_rng(0)
        replicas, served = (a, b), 0
        try:
            for w in range(120):
                for stage in range(int(rng.integers(1, 5))):
                    replicas[int(rng.integers(2))].serve(f"wf-{w}", f"task {w % 7} step {stage}", now=float(w))
                    served += 1
                await ticks(a, b, n=1)
                if w >= 3:  # scores arrive a few workflows late, on either replica
                    scored = replicas[int(rng.integers(2))]
                    assert await scored.score(f"wf-{w - 3}", float(rng.random()), float(w)) is LEARNT
            for w in range(117, 120):
                assert await a.score(f"wf-{w}", 0.5, 120.0) is LEARNT
            await ticks(a, b)
            assert a.learner.counts_["learnt_calls"] == b.learner.counts_["learnt_calls"] == served
            assert same_statistics(a.learner, b.learner)
            assert a.learner.stats()["learnt"] + b.learner.stats()["learnt"] == 120
            assert a.learner.stats()["pending"] == b.learner.stats()["pending"] == 0
        finally:
            for r in replicas:
                await r.conn.stop()

    asyncio.run(scenario())
