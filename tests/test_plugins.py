"""Policies and scorers as plugins: typed parameters refused by name, capabilities, presets, predictor choice,
Chimera's scorers bit-identical to the old formula, and a toy scorer / toy policy added in one registration line."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from chimera.bench.sweep import SweepSpec, check_spec, count_runs, extra_predictions, lams_for
from chimera.perfmodel.profiles import default_cluster
from chimera.predict.oracle import OracleConfidence, OracleLength
from chimera.sched.plugin import PolicyParamsError, register_policy, register_scorer, POLICY_REGISTRY, SCORER_REGISTRY
from chimera.sched.policy import Policy, PolicyParams
from chimera.sched.registry import POLICIES, make_policy, takes_param
from chimera.serve.refusals import live_refusal
from chimera.sched.scorers.base import Scorer
from chimera.sched.types import Call, ModelInfo
from chimera.serve.config import GatewayConfigError, gateway_config_from_dict
from chimera.sim.experiment import choose_predictors, prepare, run_policy
from chimera.workload.synthetic import generate

MODELS = [
    ModelInfo("small", tokens_per_s=4000.0, tpot_s=0.010, max_inflight=2, size_rank=0, prefill_tokens_per_s=50_000.0),
    ModelInfo("mid", tokens_per_s=1500.0, tpot_s=0.020, max_inflight=2, size_rank=1, prefill_tokens_per_s=20_000.0),
    ModelInfo("large", tokens_per_s=500.0, tpot_s=0.040, max_inflight=2, size_rank=2, prefill_tokens_per_s=8_000.0),
]
NAMES = [m.name for m in MODELS]


class TableConfidence:
    """Confidence per kind (kind -> one value per model)."""

    models_ = NAMES

    def __init__(self, table):
        self.table = table

    def predict_confidence(self, calls):
        return np.array([self.table[c.kind] for c in calls], dtype=float)


class PromptLength:
    """Call tokens = prompt number / 2 on every model, remaining = the prompt number."""

    models_ = NAMES

    def predict_lengths(self, calls):
        v = np.array([[float(c.prompt)] * len(NAMES) for c in calls])
        return v / 2, v


def call(wid, t=0.0, kind="math", prompt="100", stage=0, i=[0]):
    i[0] += 1
    return Call(call_id=i[0], workflow_id=wid, kind=kind, prompt=prompt, stage=stage, prompt_tokens=10,
                arrival_s=t, workflow_arrival_s=t)


def bound(name, **kw):
    p = make_policy(name, confidence=TableConfidence({"math": [0.3, 0.6, 0.9], "easy": [0.9, 0.9, 0.92]}),
                    length=PromptLength(), **kw)
    p.bind(MODELS)
    return p


# ---- typed parameters -------------------------------------------------------------------------------------------
def test_unknown_parameter_names_policy_key_and_choices():
    with pytest.raises(PolicyParamsError, match=r"policy 'vllm' has no parameter 'lam' \(it takes: starve_s, quantum_s\)"):
        make_policy("vllm", lam=0.1)
    with pytest.raises(PolicyParamsError, match=r"policy 'chimera' has no parameter 'starv_s' \(it takes: .*starve_s"):
        make_policy("chimera", starv_s=5)
    with pytest.raises(PolicyParamsError, match="policy 'chimera-no-load' parameter 'lam'"):
        make_policy("chimera-no-load", lam=-1.0)
    with pytest.raises(PolicyParamsError, match="strong_share"):
        make_policy("routellm", strong_share=2.0)
    with pytest.raises(ValueError, match="unknown scorer"):
        make_policy("chimera", scorers={"nope": 1.0})


def test_gateway_yaml_refuses_typos_and_policies_it_cannot_run():
    backends = [{"name": "a", "model": "m", "base_url": "http://x"}]

    def cfg(policy):
        return gateway_config_from_dict({"backends": backends, "policy": policy}, source="gw.yaml")

    assert cfg({"name": "chimera", "starve_s": 5}).policy.params == {"starve_s": 5}
    assert cfg({"name": "vllm"}).policy.lam is None
    with pytest.raises(GatewayConfigError, match="gw.yaml: key 'policy': policy 'chimera' has no parameter 'starv_s'"):
        cfg({"name": "chimera", "starv_s": 5})
    with pytest.raises(GatewayConfigError, match="policy 'vllm' has no parameter 'lam'"):
        cfg({"name": "vllm", "lam": 0.05})
    with pytest.raises(GatewayConfigError, match="unknown policy 'chimra'"):
        cfg({"name": "chimra"})
    for name in ("ltr", "mlfq"):
        with pytest.raises(GatewayConfigError, match=f"policy '{name}' needs in-engine preemption"):
            cfg({"name": name})
    with pytest.raises(GatewayConfigError, match="oracle predictions"):
        cfg({"name": "chimera-oracle"})


def test_cli_refuses_unknown_parameter_before_running():
    from chimera.cli import app

    res = CliRunner().invoke(app, ["simulate", "-w", "synthetic:50", "--policy", "vllm", "--lam", "0.1"])
    assert res.exit_code != 0 and "policy 'vllm' has no parameter 'lam'" in res.output
    res = CliRunner().invoke(app, ["simulate", "-w", "synthetic:50", "--policy", "chimera", "--param", "starv_s=3"])
    assert res.exit_code != 0 and "has no parameter 'starv_s'" in res.output


def test_sweep_spec_refuses_unknown_parameters_before_running():
    check_spec(SweepSpec(policies=["vllm", "chimera"], params={"chimera": {"starve_s": 5.0}}))
    with pytest.raises(PolicyParamsError, match="policy 'chimera' has no parameter 'starv_s'"):
        check_spec(SweepSpec(policies=["chimera"], params={"chimera": {"starv_s": 5.0}}))
    with pytest.raises(PolicyParamsError, match="policy 'vllm' has no parameter 'lam'"):
        check_spec(SweepSpec(policies=["vllm"], params={"vllm": {"lam": 0.1}}))
    with pytest.raises(ValueError, match="not in the sweep"):
        check_spec(SweepSpec(policies=["vllm"], params={"sjf": {}}))
    with pytest.raises(ValueError, match="unknown predictions"):
        check_spec(SweepSpec(policies=["chimera"], predictions=("oracel",)))


def test_parameters_become_attributes_and_presets_are_parameters():
    p = make_policy("chimera-no-route", lam=0.07)
    assert (p.route, p.stjf, p.load, p.lam, p.starve_s) == (False, True, True, 0.07, 30.0)
    assert p.name == "chimera-no-route" and type(p) is type(make_policy("chimera"))
    assert make_policy("ltr", starve_steps=5).starve_steps == 5


def test_capabilities_are_class_attributes_and_lam_is_asked_not_named():
    caps = {n: (POLICY_REGISTRY.get(n).cls.preemptive, POLICY_REGISTRY.get(n).cls.needs_predictions)
            for n in ("vllm", "least-loaded", "routellm", "sjf", "ltr", "mlfq", "chimera")}
    assert caps == {"vllm": (False, False), "least-loaded": (False, False), "routellm": (False, True),
                    "sjf": (False, True), "ltr": (True, True), "mlfq": (True, False), "chimera": (False, True)}
    assert [n for n in POLICIES if takes_param(n, "lam")] == [
        "chimera", "chimera-oracle", "chimera-no-route", "chimera-no-stjf", "chimera-no-load"]
    assert live_refusal("chimera") is None and live_refusal("vllm") is None
    spec = SweepSpec(lams=(0.01, 0.02), ablation_lam=0.05, loads=(0.5,))
    assert lams_for("chimera", spec) == (0.01, 0.02) and lams_for("chimera-oracle", spec) == (0.01, 0.02)
    assert lams_for("chimera-no-load", spec) == (0.05,) and lams_for("vllm", spec) == (None,)
    assert count_runs(spec) == 6 * 1 + 2 * 2 + 3 * 1  # 6 policies without λ, chimera(-oracle) × 2 λ, 3 ablations
    more = SweepSpec(lams=(0.01, 0.02), loads=(0.5,), predictions=("oracle-scores", "oracle-lengths"))
    assert extra_predictions("chimera", more) == ("oracle-scores", "oracle-lengths")
    assert extra_predictions("chimera-oracle", more) == extra_predictions("chimera-no-load", more) == ()
    assert extra_predictions("vllm", more) == ()
    assert count_runs(more) == count_runs(spec) + 2 * 2  # chimera × 2 λ under each extra choice


# ---- Chimera's choice as weighted scorers, bit-identical to the frozen formula -----------------------------------
def old_choose(p, call, conf, call_tok, rem_tok, allowed):
    """Frozen copy of ChimeraPolicy.choose before the scorer split."""
    tps = np.array([m.tokens_per_s for m in p.models])
    tpot = np.array([m.tpot_s for m in p.models])
    prefill = np.array([m.prefill_tokens_per_s for m in p.models])
    lat = call_tok * tpot + call.prompt_tokens / prefill
    if p.load:
        inflight = np.array([p.monitor.pred_tokens[n] for n in p.names])
        lat = inflight / tps + lat
    if not p.route:
        return int(np.argmin(np.where(allowed, lat, np.inf)))
    share = call_tok / np.maximum(call.generated_so_far + rem_tok, 1.0)
    return int(np.argmax(np.where(allowed, share * conf - p.lam * lat, -np.inf)))


@pytest.mark.parametrize("name", ["chimera", "chimera-no-load", "chimera-no-route"])
def test_scorer_sum_chooses_exactly_as_the_old_formula(name):
    rng = np.random.default_rng(7)
    for trial in range(3000):
        lam = [0.0, 0.005, 0.02, 0.1, float(rng.exponential(0.05))][trial % 5]
        p = make_policy(name, lam=lam)
        p.bind(MODELS)
        for n in NAMES:
            p.monitor.pred_tokens[n] = float(rng.choice([0.0, rng.exponential(2000.0)]))
        c = call("w", prompt="1")
        c.prompt_tokens = int(rng.integers(0, 20_000))
        c.generated_so_far = int(rng.choice([0, rng.integers(0, 3000)]))
        conf = rng.choice([rng.random(3), np.round(rng.random(3), 1)])  # rounded: ties
        call_tok = rng.exponential(300.0, 3) * rng.integers(0, 2)
        rem_tok = call_tok + rng.exponential(500.0, 3)
        allowed = rng.random(3) < 0.7
        if not allowed.any():
            allowed[int(rng.integers(0, 3))] = True
        assert p.choose(c, 0.0, conf, call_tok, rem_tok, allowed) == old_choose(p, c, conf, call_tok, rem_tok, allowed)
        every = np.ones(3, dtype=bool)  # the unmasked path (`Policy.every_model`, what `admit` passes by default)
        assert p.choose(c, 0.0, conf, call_tok, rem_tok, p.every_model) == old_choose(p, c, conf, call_tok, rem_tok, every)


def test_default_weights_are_lambda_and_scorers_override():
    assert make_policy("chimera", lam=0.05).weights() == {"confidence_share": 1.0, "expected_latency": -0.05}
    assert make_policy("chimera", scorers={"expected_latency": -1.0}).weights()["expected_latency"] == -1.0


@pytest.fixture
def toy_scorer():
    """A scorer added the way a new file would: a class and one registration line."""

    @register_scorer("prefers_small")
    class PrefersSmall(Scorer):
        """+1 for the smallest model, 0 elsewhere."""

        def bind(self, policy):
            self._small = np.array([m.size_rank == 0 for m in policy.models], dtype=float)

        def score(self, call, now, prediction, allowed, policy):
            return self._small

    yield "prefers_small"
    SCORER_REGISTRY.unregister("prefers_small")


def test_toy_scorer_changes_routing_only_with_a_weight(toy_scorer):
    assert bound("chimera", lam=0.0).submit(call("a"), 0.0) == "large"
    assert bound("chimera", lam=0.0, scorers={toy_scorer: 0.0}).submit(call("b"), 0.0) == "large"
    assert bound("chimera", lam=0.0, scorers={toy_scorer: 1.0}).submit(call("c"), 0.0) == "small"


def test_toy_scorer_is_a_weight_in_the_gateway_yaml(toy_scorer):
    backends = [{"name": "a", "model": "m", "base_url": "http://x"}]
    cfg = gateway_config_from_dict({"backends": backends, "policy": {"name": "chimera", "scorers": {toy_scorer: 0.5}}})
    assert make_policy(cfg.policy.name, **cfg.policy.params).weights()[toy_scorer] == 0.5
    with pytest.raises(GatewayConfigError, match=r"key 'policy': .*unknown scorer\(s\) \['prefers_smal'\]"):
        gateway_config_from_dict({"backends": backends, "policy": {"name": "chimera", "scorers": {"prefers_smal": 1}}})


def test_toy_policy_is_one_class_and_one_registration_line():
    @register_policy("always-last")
    class AlwaysLast(Policy):
        """Routes to the last allowed model; `bias` only to show typed parameters."""

        class Params(PolicyParams):
            bias: int = 0

        def choose(self, call, now, conf, call_tok, rem_tok, allowed):
            return int(np.flatnonzero(allowed)[-1])

    try:
        p = make_policy("always-last", bias=3)
        p.bind(MODELS)
        assert p.bias == 3 and p.submit(call("t"), 0.0) == "large"
        with pytest.raises(PolicyParamsError, match="policy 'always-last' has no parameter 'lam'"):
            make_policy("always-last", lam=0.1)
    finally:
        POLICY_REGISTRY.unregister("always-last")


# ---- the Decision value ------------------------------------------------------------------------------------------
def test_submit_returns_the_model_and_records_a_decision_with_its_inputs():
    p = bound("chimera", lam=0.05)
    c = call("a", prompt="400")
    m = p.submit(c, 0.0)
    d = p.last_decision
    assert d.model == m == c.model and d.priority == c.priority == 400.0 and not d.promoted
    assert d.confidences == c.confidences == {"small": 0.3, "mid": 0.6, "large": 0.9}
    assert (d.pred_call_tokens, d.pred_remaining_tokens) == (c.pred_call_tokens, c.pred_remaining_tokens) == (200, 400)
    v = make_policy("vllm")
    v.bind(MODELS)
    v.submit(call("b", t=3.0), 3.0)
    assert v.last_decision.confidences is None and v.last_decision.priority == 3.0


def test_decision_marks_a_promoted_workflow():
    p = bound("chimera", lam=0.0, starve_s=1.0, quantum_s=50.0)
    first = call("wf", prompt="5000")
    first.pinned_model = "small"
    p.submit(first, 0.0)
    assert p.next_call("small", 2.0) is first  # waited past starve_s: promoted
    nxt = call("wf", prompt="5000", stage=1)
    p.submit(nxt, 3.0)
    assert p.last_decision.promoted and nxt.priority < 0


# ---- which predictions a run uses is a predictor choice -----------------------------------------------------------
@pytest.fixture(scope="module")
def prep():
    return prepare(generate(200, seed=2), default_cluster(), seed=2)


def test_predictor_choice_builds_full_and_partial_oracles(prep):
    conf, length, label = choose_predictors(prep, None)
    assert label == "priors" and (conf, length) == (prep.router, prep.lengths)
    conf, length, _ = choose_predictors(prep, "oracle-scores")
    assert isinstance(conf, OracleConfidence) and length is prep.lengths
    conf, length, _ = choose_predictors(prep, "oracle-lengths")
    assert conf is prep.router and isinstance(length, OracleLength)
    with pytest.raises(ValueError, match="needs trained predictors"):
        choose_predictors(prep, "trained")
    with pytest.raises(ValueError, match="predictions must be one of"):
        choose_predictors(prep, "magic")


def test_oracle_preset_is_chimera_with_oracle_predictions(prep):
    volatile = {"wall_s", "calls_per_wall_s", "scheduler_s", "scheduler_share_of_latency", "policy"}
    kw = dict(rate=1.0, n_tasks=60, seed=1, lam=0.01)
    preset = run_policy(prep, "chimera-oracle", **kw)
    chosen = run_policy(prep, "chimera", predictions="oracle", **kw)
    honest = run_policy(prep, "chimera", **kw)
    assert preset["policy"] == "chimera-oracle" and preset["predictors"] == chosen["predictors"] == "oracle"
    assert {k: v for k, v in preset.items() if k not in volatile} == {k: v for k, v in chosen.items() if k not in volatile}
    assert honest["predictors"] == "priors" and honest["per_model"] != preset["per_model"]
    part = run_policy(prep, "chimera", predictions="oracle-lengths", **kw)
    assert part["predictors"] == "oracle-lengths" and part["tasks"] == 60
