"""The gateway learning from its own traffic: online learning configured and built."""

from __future__ import annotations

import pytest

from chimera.serve import build_gateway
from chimera.serve.config import GatewayConfigError, gateway_config_from_dict


# ---- configuration ---------------------------------------------------------------------------------------------
BACKENDS = [{"name": "a", "model": "m", "base_url": "http://x/v1"}]


def test_learning_config_is_checked_by_the_online_learner():
    cfg = gateway_config_from_dict({"backends": BACKENDS, "learning": {"online": True, "explore_start": 0.3}})
    assert cfg.learning.online and cfg.learning.params == {"explore_start": 0.3}
    assert not gateway_config_from_dict({"backends": BACKENDS}).learning.online  # absent: as before
    for learning, says in [({"online": True, "explor": 0.3}, "'explor'"),
                           ({"online": True, "explore_start": 2}, "explore_start"),
                           ({"explore_start": 0.3}, "online: true"),
                           ({"online": True, "warm": "router"}, "predictors"),
                           ({"online": True, "warm": "priors"}, "labelled tasks")]:
        with pytest.raises(GatewayConfigError, match="learning") as e:
            gateway_config_from_dict({"backends": BACKENDS, "learning": learning})
        assert says in str(e.value), (learning, str(e.value))


def test_online_learning_warm_starts_from_the_router_or_model_size(tmp_path, synthetic_predictors):
    raw = {"trace_store": str(tmp_path / "t.sqlite"), "learning": {"online": True},
           "backends": [{"name": "a", "model": "qwen2.5-1.5b", "base_url": "http://x/v1"},
                        {"name": "b", "model": "qwen2.5-14b", "base_url": "http://x/v1"}]}
    cold = build_gateway(gateway_config_from_dict(raw)).state.gateway
    warm = build_gateway(gateway_config_from_dict({**raw, "predictors": str(synthetic_predictors)})).state.gateway
    try:
        assert type(cold.policy.confidence).__name__ == "LinearBandit"
        assert type(cold.policy.confidence.prior).__name__ == "SizePriorConfidence"
        assert type(warm.policy.confidence.prior).__name__ == "RouterConfidence"
        assert cold.pool.core.reward_learners == [cold.policy.confidence]
        assert warm.predict_pool is not None  # the router behind the learner runs on the prediction thread
    finally:
        for gw in (cold, warm):
            if gw.predict_pool is not None:
                gw.predict_pool.shutdown()
            gw.trace.close()
