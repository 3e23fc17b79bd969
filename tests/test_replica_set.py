"""The replica-set harness: one gateway config becomes N replica configs that differ only where they must."""

from __future__ import annotations

import httpx
import pytest

from chimera.bench.replica_set import replica_config, replica_set
from chimera.emulate.runner import EmulatorServer

BASE = {"backends": [{"name": "b0", "model": "m", "base_url": "http://127.0.0.1:1/v1", "max_inflight": 8}],
        "state": {"redis_url": "redis://ignored:1/0", "lease_ttl_s": 2}}


def test_replica_configs_differ_in_port_id_and_trace_store(tmp_path):
    a, b = (replica_config(BASE, i, 2, "redis://127.0.0.1:7000/0", tmp_path) for i in range(2))
    assert (a.state.replica_id, b.state.replica_id) == ("r0", "r1")
    assert a.listen.port != b.listen.port
    assert (a.trace_store, b.trace_store) == (str(tmp_path / "r0.sqlite"), str(tmp_path / "r1.sqlite"))
    for c in (a, b):  # the set's Redis, the replica count, and the caller's own state keys
        assert c.state.redis_url == "redis://127.0.0.1:7000/0" and c.state.replicas == 2 and c.state.lease_ttl_s == 2
        assert c.backends == a.backends
    assert replica_config({**BASE, "state": {"replicas": 5}}, 0, 2, "redis://h:1/0", tmp_path).state.replicas == 5


def test_replica_set_serves_kills_and_stops(tmp_path):
    with EmulatorServer(profile="qwen2.5-7b@h100", served_model_name="m", time_scale=20) as emu:
        cfg = {**BASE, "backends": [{**BASE["backends"][0], "base_url": emu.base_url}]}
        with replica_set(cfg, 2, tmp_path) as rs:
            assert rs.redis.running and len(rs) == 2
            for url in rs.urls:
                r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
                    "model": "chimera", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200 and r.headers["x-chimera-model"] == "m"
            rs.kill(1)
            assert not rs[1].alive and rs[0].alive and rs.health(0)["status"] == "ok"
        assert not rs[0].alive and not rs.redis.running  # a Redis the set started, it stops
    assert {p.name for p in tmp_path.glob("r*.yaml")} == {"r0.yaml", "r1.yaml"}


def test_replica_set_refuses_zero(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        with replica_set(BASE, 0, tmp_path):
            pass


def test_unshared_replicas_have_no_state_block(tmp_path):
    c = replica_config(BASE, 1, 2, None, tmp_path)
    assert c.state is None and c.trace_store == str(tmp_path / "r1.sqlite")
