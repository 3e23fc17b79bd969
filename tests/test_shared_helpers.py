"""The helpers that replaced copies (arrivals, repeating tasks, per-kind accuracy, size ranks, the threaded server)
give what each copy gave: same random streams, same ids, same tables."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from chimera.perfmodel.speeds import size_ranks
from chimera.predict.priors import KindAccuracyRouter, kind_accuracy
from chimera.train.router_baselines import PriorRouter
from chimera.util.threaded import ThreadedServer, serve_in_thread
from chimera.workload.arrivals import LIVE_STREAM, SIM_STREAM, poisson_arrivals
from chimera.workload.synthetic import generate
from chimera.workload.workflows import repeat_ids


def test_arrivals_are_the_streams_the_bodies_drew() -> None:
    sim = np.cumsum(np.random.default_rng([3, 7]).exponential(1.0 / 2.5, size=50))  # the simulator's old draw
    assert np.array_equal(poisson_arrivals(2.5, 50, 3, SIM_STREAM), sim)
    gaps = np.random.default_rng([3, 2]).exponential(1.0 / 2.5, 50)  # the agent driver's and live bench's
    live = poisson_arrivals(2.5, 50, 3, LIVE_STREAM, start_at_zero=True)
    assert np.array_equal(live, np.cumsum(gaps) - gaps[0]) and live[0] == 0.0
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(0.0, 5, 0, SIM_STREAM)


def _old_experiment_order(ids: list[str], n: int, seed: int) -> list[str]:
    """Prepared.workflows' loop before repeat_ids."""
    rng = np.random.default_rng([seed, 1])
    out: list[str] = []
    cycle = 0
    while len(out) < n:
        order = rng.permutation(len(ids)) if cycle else np.arange(len(ids))
        out += [ids[int(j)] if cycle == 0 else f"{ids[int(j)]}~{cycle}" for j in order[: n - len(out)]]
        cycle += 1
    return out


def test_repeat_ids_in_order_and_shuffled() -> None:
    ids = [f"t{i}" for i in range(4)]
    assert [w for w, _ in repeat_ids(ids, ids, 10)] == [
        "t0", "t1", "t2", "t3", "t0~1", "t1~1", "t2~1", "t3~1", "t0~2", "t1~2"]
    got = [(w, item) for w, item in repeat_ids(ids, ids, 11, shuffle=np.random.default_rng([5, 1]))]
    assert [w for w, _ in got] == _old_experiment_order(ids, 11, 5)
    assert all(w.split("~")[0] == item for w, item in got)
    assert [w for w, _ in repeat_ids(ids, ids, None)] == ids
    with pytest.raises(ValueError, match="no tasks"):
        list(repeat_ids([], [], 3))
    with pytest.raises(ValueError, match=">= 1"):
        list(repeat_ids(ids, ids, 0))


def test_kind_accuracy_is_both_routers_table() -> None:
    tasks = generate(120, seed=4)
    models = sorted(tasks[0].outcomes)
    kar = KindAccuracyRouter(models).fit(tasks)
    old: dict[tuple[str, str], list[float]] = {}
    for t in tasks:  # KindAccuracyRouter.fit before kind_accuracy
        for m in models:
            for key in ((t.kind, m), ("*", m)):
                s = old.setdefault(key, [0.0, 0.0])
                s[0] += t.outcomes[m].score
                s[1] += 1
    assert kar.table_ == {k: (s + 0.5) / (n + 1) for k, (s, n) in old.items()}
    scores = np.array([[t.outcomes[m].score for m in models] for t in tasks])
    scores[::7, 0] = np.nan  # a missing label is skipped
    pr = PriorRouter().fit([t.prompt for t in tasks], scores, models, [t.kind for t in tasks])
    assert pr.table_ == kind_accuracy([t.kind for t in tasks], scores, models)
    col = scores[:, 0][np.isfinite(scores[:, 0])]
    assert pr.table_[("*", models[0])] == pytest.approx((col.sum() + 0.5) / (len(col) + 1), rel=1e-12)


def test_size_ranks_by_size_else_fallback() -> None:
    assert size_ranks([7.0, 1.5, 70.0], [0.0, 0.0, 0.0]) == [1, 0, 2]
    assert size_ranks([7.0, None, 70.0], [0.03, 0.01, 0.02]) == [2, 0, 1]  # one size unknown: all by fallback


def test_threaded_server_serves_and_stops() -> None:
    app = Starlette(routes=[Route("/ping", lambda r: PlainTextResponse("pong"))])
    srv = ThreadedServer(app).start()
    try:
        assert srv.port > 0 and httpx.get(srv.url + "/ping").text == "pong"
    finally:
        srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/ping", timeout=2)
    with serve_in_thread(app) as url:
        assert httpx.get(url + "/ping").text == "pong"
