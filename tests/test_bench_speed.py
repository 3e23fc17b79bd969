"""Simulator speed: the full 10,000-workflow check runs under `make bench`; `make test` runs a small smoke version."""

from __future__ import annotations

import time

import pytest

from chimera.bench.sweep import capacity_workflows_per_s
from chimera.perfmodel.profiles import default_cluster
from chimera.sim.experiment import prepare, run_policy
from chimera.workload.synthetic import generate


def _run(n: int) -> tuple[dict, float]:
    prep = prepare(generate(2000, seed=0), default_cluster(), seed=0)
    rate = 0.7 * capacity_workflows_per_s(prep)
    t0 = time.perf_counter()
    res = run_policy(prep, "chimera", rate=rate, workflows=prep.workflows(n, 0))
    return res, time.perf_counter() - t0


def test_many_workflows_complete_quick():
    res, _ = _run(1000)
    assert res["tasks"] == 1000 and res["failed"] == 0


@pytest.mark.slow
def test_ten_thousand_workflows_under_20_seconds():
    res, wall = _run(10_000)
    assert res["tasks"] == 10_000
    print(f"10,000 workflows, {res['calls']} calls in {wall:.2f} s ({res['calls'] / wall:,.0f} calls/s)")
    assert wall < 20.0
