"""The typed gateway-config builder (chimera.serve.config): backends named per replica, only what was given set,
written as YAML that `chimera serve --config` (load_gateway_config) reads back to the same config."""

from __future__ import annotations

import pytest
import yaml

from chimera.serve.config import (GatewayConfigError, backends_for_cluster, build_gateway_config,
                                  gateway_config_document, load_gateway_config, write_gateway_config)


def test_backends_are_named_per_replica_of_a_model() -> None:
    bs = backends_for_cluster([{"model": "a", "base_url": "http://h:1/v1", "max_inflight": 4},
                               {"model": "b", "base_url": "http://h:2/v1", "priority": True, "profile": "p.yaml"},
                               {"model": "a", "base_url": "http://h:3/v1", "workload_model": "A"}])
    assert [(b.name, b.model, b.max_inflight, b.params.get("priority", False)) for b in bs] == [
        ("a-0", "a", 4, False), ("b-0", "b", 64, True), ("a-1", "a", 64, False)]
    assert bs[1].profile == "p.yaml" and bs[2].workload_model == "A"
    with pytest.raises(GatewayConfigError, match="a-0: backend kind 'vllm' has no parameter 'max_inflght'"):
        backends_for_cluster([{"model": "a", "base_url": "u", "max_inflght": 4}])
    with pytest.raises(GatewayConfigError, match="max_inflight"):
        backends_for_cluster([{"model": "a", "base_url": "u", "max_inflight": 0}])


def test_config_round_trips_through_yaml(tmp_path) -> None:
    backends = backends_for_cluster([{"model": "small", "base_url": "http://127.0.0.1:9001/v1", "max_inflight": 8,
                                      "profile": "qwen2.5-1.5b@a6000"},
                                     {"model": "big", "base_url": "http://127.0.0.1:9002/v1", "priority": True}])
    cfg = build_gateway_config(backends, lam=0.05, starve_s=30.0, port=8123, trace_store=tmp_path / "t.sqlite",
                               predictors=tmp_path / "pred", limits={"max_queue": 7, "request_timeout_s": 60})
    assert cfg.policy.name == "chimera" and cfg.policy.lam == 0.05 and cfg.policy.params == {"starve_s": 30.0}
    assert (cfg.listen.host, cfg.listen.port, cfg.limits.max_queue) == ("127.0.0.1", 8123, 7)
    path = write_gateway_config(cfg, tmp_path / "sub" / "gateway.yaml", header="first line\nsecond line")
    text = path.read_text()
    assert text.startswith("# first line\n# second line\n")
    back = load_gateway_config(path)  # what `chimera serve --config` reads
    assert back.model_dump() == cfg.model_dump()
    assert gateway_config_document(back) == gateway_config_document(cfg)
    doc = yaml.safe_load(text)
    # only what was given: no auth, health or length_stat; defaults of the given sections left out
    assert set(doc) == {"listen", "policy", "predictors", "trace_store", "backends", "limits"}
    assert doc["backends"][0] == {"name": "small-0", "model": "small", "base_url": "http://127.0.0.1:9001/v1",
                                  "max_inflight": 8, "profile": "qwen2.5-1.5b@a6000"}
    assert doc["limits"] == {"max_queue": 7, "request_timeout_s": 60}


def test_defaults_stay_defaults_and_bad_input_names_the_key(tmp_path) -> None:
    cfg = build_gateway_config(backends_for_cluster([{"model": "m", "base_url": "http://x/v1"}]), policy="vllm")
    assert gateway_config_document(cfg) == {
        "policy": {"name": "vllm"}, "backends": [{"name": "m-0", "model": "m", "base_url": "http://x/v1"}]}
    assert load_gateway_config(write_gateway_config(cfg, tmp_path / "g.yaml")).model_dump() == cfg.model_dump()
    one = backends_for_cluster([{"model": "m", "base_url": "u"}])
    with pytest.raises(GatewayConfigError, match="vllm"):
        build_gateway_config(one, policy="vllm", lam=0.1)  # vllm takes no λ
    with pytest.raises(GatewayConfigError, match="limits.max_queue"):
        build_gateway_config(one, limits={"max_queue": -1})
    with pytest.raises(GatewayConfigError, match="backends"):
        build_gateway_config([])


def test_replica_overrides_and_the_replicas_example() -> None:
    """`chimera serve --port/--trace-store/--replica-id`: one config file for every replica of a set."""
    from pathlib import Path

    from chimera.serve.config import override_gateway_config

    cfg = load_gateway_config(Path(__file__).resolve().parents[1] / "examples" / "gateway-replicas.yaml")
    assert cfg.state is not None and cfg.state.replicas == 2 and cfg.state.redis_url.startswith("redis://")
    r1 = override_gateway_config(cfg, port=8101, trace_store="out/r1.sqlite", replica_id="r1")
    assert (r1.listen.port, r1.trace_store, r1.state.replica_id) == (8101, "out/r1.sqlite", "r1")
    assert r1.backends == cfg.backends and r1.state.lease_ttl_s == cfg.state.lease_ttl_s
    assert override_gateway_config(cfg) == cfg
    alone = override_gateway_config(cfg.model_copy(update={"state": None}), port=9000)
    assert alone.state is None and alone.listen.port == 9000
    with pytest.raises(GatewayConfigError, match="replica_id: the config has no `state` block"):
        override_gateway_config(alone, replica_id="r0")
    with pytest.raises(GatewayConfigError, match="state.replica_id"):
        override_gateway_config(cfg, replica_id="no spaces")
