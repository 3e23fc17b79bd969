"""Predictors are plugins: factories registered by name with typed parameters, built by one assembly for every body.
A new predictor (here a toy online learner, as the bandit that comes next would be) is one file with one
registration line, and runs in the simulator by name."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import numpy as np
import pytest

from chimera.perfmodel.profiles import default_cluster, profile
from chimera.predict.assembly import (
    PREDICTOR_SETS, PolicySpec, PredictorConfigError, PredictorsSpec, build_policy, gateway_policy, live_refusal,
    predictions_need_truth, resolve_predictions,
)
from chimera.predict.context import AssemblyContext, MissingInput
from chimera.predict.oracle import OracleConfidence, OracleLength
from chimera.predict.priors import KindAccuracyRouter, RunningLength, SizePriorConfidence, StageMeanLength
from chimera.predict.registry import (
    CONFIDENCE_REGISTRY, LENGTH_REGISTRY, PredictorParamsError, confidence_factory, length_factory,
)
from chimera.sched import registry as sched_registry
from chimera.sched.registry import POLICIES, policy_entry
from chimera.sched.types import Call
from chimera.sim.experiment import choose_predictors, prepare, run_policy
from chimera.workload.synthetic import generate

TOY = '''
"""`toy-bandit`: confidence learnt online, each model's share of completed calls that stayed under a token budget."""

import numpy as np
from pydantic import Field

from chimera.predict.registry import ConfidenceFactory, PredictorParams, register_confidence


class ShortAnswers:
    def __init__(self, models, budget):
        self.models_, self.budget = list(models), budget
        self.wins, self.tries = np.ones(len(models)), 2 * np.ones(len(models))

    def predict_confidence(self, calls):
        return np.tile(self.wins / self.tries, (len(calls), 1))

    def learn(self, call, tokens):  # the admission core calls this as each call completes, in both bodies
        j = self.models_.index(call.model)
        self.wins[j] += tokens <= self.budget
        self.tries[j] += 1


@register_confidence("toy-bandit")
class ToyBandit(ConfidenceFactory):
    class Params(PredictorParams):
        budget: int = Field(default=200, ge=1)

    def build(self, ctx):
        return ShortAnswers(ctx.names, self.params.budget)
'''


@pytest.fixture(scope="module")
def prep():
    return prepare(generate(200, seed=2), default_cluster(), seed=2)


@pytest.fixture
def toy_bandit(tmp_path):
    """The toy predictor dropped in as one new file; importing it runs its one registration line."""
    path = tmp_path / "toy_bandit.py"
    path.write_text(textwrap.dedent(TOY))
    spec = importlib.util.spec_from_file_location("toy_bandit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_bandit"] = module
    spec.loader.exec_module(module)
    yield "toy-bandit"
    CONFIDENCE_REGISTRY.unregister("toy-bandit")
    sys.modules.pop("toy_bandit", None)


def test_a_new_predictor_is_one_file_and_runs_in_the_simulator_by_name(prep, toy_bandit):
    res = run_policy(prep, "chimera", rate=1.0, n_tasks=40, seed=1, lam=0.01, predictions="toy-bandit/stage-mean")
    assert res["predictors"] == "toy-bandit/stage-mean" and res["tasks"] == 40
    conf, length, label = choose_predictors(prep, PredictorsSpec(confidence={"name": toy_bandit,
                                                                             "params": {"budget": 50}},
                                                                 length="stage-mean"))
    assert conf.budget == 50 and length is prep.lengths and label == "toy-bandit/stage-mean"
    # The same assembly, as a gateway builds it (no training data), learns online through the admission core.
    ctx = AssemblyContext(models=[r.info for r in prep.runtimes])
    pol = build_policy(PolicySpec(name="chimera", lam=0.01, predictors=PredictorsSpec(confidence=toy_bandit,
                                                                                      length="running-mean")), ctx)
    from chimera.sim.simulator import Simulator

    sim = Simulator(prep.runtimes, pol, prep.workflows(30, 0), rate=1.0, seed=0)
    sim.run()
    assert pol.confidence.tries.sum() > 2 * len(prep.names) and pol.length in sim.admission.learners
    with pytest.raises(PredictorParamsError, match=r"confidence predictor 'toy-bandit' has no parameter 'budgte' "
                                                   r"\(it takes: budget\)"):
        confidence_factory(toy_bandit, budgte=3)


def test_registry_refuses_unknown_names_and_parameters_naming_them():
    with pytest.raises(ValueError, match=r"unknown confidence predictor 'sise-prior'; choose one of: size-prior, "
                                         r"kind-accuracy, router"):
        confidence_factory("sise-prior")
    with pytest.raises(ValueError, match="unknown length predictor 'forrest'"):
        length_factory("forrest")
    with pytest.raises(PredictorParamsError, match=r"length predictor 'forest' has no parameter 'stats' "
                                                   r"\(it takes: stat\)"):
        length_factory("forest", stats="mean")
    with pytest.raises(PredictorParamsError, match="length predictor 'forest' parameter 'stat'"):
        length_factory("forest", stat="p90")
    with pytest.raises(ValueError, match="confidence predictor 'kind-accuracy' has no parameter 'smooth'"):
        PredictorsSpec(confidence={"name": "kind-accuracy", "params": {"smooth": 1}}, length="stage-mean")
    assert length_factory("forest", stat="median").params.stat == "median"
    assert set(CONFIDENCE_REGISTRY.names()) >= {"size-prior", "kind-accuracy", "router", "oracle"}
    assert set(LENGTH_REGISTRY.names()) >= {"running-mean", "stage-mean", "forest", "oracle"}


def test_a_factory_names_what_its_body_lacks(prep):
    ctx = AssemblyContext(models=[r.info for r in prep.runtimes])
    for spec, missing in ((PredictorsSpec(confidence="router", length="running-mean"), "needs trained predictors"),
                          (PredictorsSpec(confidence="size-prior", length="oracle"), "reads ground truth"),
                          (PredictorsSpec(confidence="size-prior", length="stage-mean"), "needs training workflow")):
        with pytest.raises(ValueError, match=missing):
            build_policy(PolicySpec(predictors=spec), ctx)
    with pytest.raises(MissingInput, match="length predictor 'oracle' reads ground truth"):
        build_policy(PolicySpec(predictors=PredictorsSpec(confidence="size-prior", length="oracle")), ctx)


def test_named_sets_resolve_in_one_table(prep):
    assert resolve_predictions(None)[1] == "priors" and resolve_predictions(None, trained=True)[1] == "trained"
    spec, _ = resolve_predictions("oracle-scores", trained=True, length_stat="median")
    assert (spec.confidence.name, spec.length.name, spec.length.params) == ("oracle", "forest", {"stat": "median"})
    spec, _ = resolve_predictions("oracle-lengths")
    assert (spec.confidence.name, spec.length.name) == ("kind-accuracy", "oracle")
    assert [s for s in PREDICTOR_SETS if predictions_need_truth(s)] == ["oracle", "oracle-scores", "oracle-lengths"]
    with pytest.raises(ValueError, match="unknown length predictor 'orcale'"):
        resolve_predictions("oracle/orcale")
    conf, length, _ = choose_predictors(prep, "oracle")
    assert isinstance(conf, OracleConfidence) and isinstance(length, OracleLength)
    assert isinstance(prep.router, KindAccuracyRouter) and isinstance(prep.lengths, StageMeanLength)
    assert prep.router is prep.router and prep.trained is None  # fitted once, shared by the runs


@pytest.mark.parametrize("name", POLICIES)
def test_every_presets_choice_is_a_known_set_and_the_gateway_refusal_is_unchanged(name):
    entry = policy_entry(name)
    if entry.predictions is not None:
        resolve_predictions(entry.predictions, trained=True)
    assert live_refusal(name) == sched_registry.live_refusal(name)
    assert (live_refusal(name) is not None and "ground truth" in live_refusal(name)) == (
        entry.predictions is not None and predictions_need_truth(entry.predictions))


def test_the_oracle_reads_the_truth_of_exactly_the_workflows_a_run_runs(prep):
    wfs = prep.workflows(20, 7)
    conf, length, _ = choose_predictors(prep, "oracle", truth={wid: plan for wid, plan, _ in wfs})
    wid, plan, prompt = wfs[3]
    call = Call(call_id=0, workflow_id=wid, kind=plan.kind, prompt=prompt, stage=0, prompt_tokens=10, arrival_s=0.0,
                workflow_arrival_s=0.0)
    assert list(conf.predict_confidence([call])[0]) == [plan.score((m,) * plan.n_stages) for m in prep.names]
    assert list(length.predict_lengths([call])[1][0]) == [plan.remaining_tokens(0, m) for m in prep.names]


# ---- the gateway's policy, built by the same assembly ----------------------------------------------------------
def _workload_names(cfg) -> dict[str, tuple]:
    """What the gateway passes as `workload_model`: a backend's explicit name, else its profile's, then its own."""
    out = {}
    for m in cfg.models:
        bes = [b for b in cfg.backends if b.model == m]
        explicit = next((b.workload_model for b in bes if b.workload_model), None)
        prof = next((b.profile for b in bes if b.profile), None)
        out[m] = (explicit,) if explicit else (profile(prof).workload_model if prof else None, m)
    return out


def _gateway_policy(cfg, infos):
    return gateway_policy(cfg.policy.name, cfg.policy.lam, cfg.policy.params, infos, cfg.predictors,
                          _workload_names(cfg), cfg.length_stat)


def test_gateway_policy_builds_what_the_gateway_builds_today(tmp_path, synthetic_predictors):
    from chimera.serve.app import build_policy as serve_build_policy
    from chimera.serve.config import GatewayConfigError, gateway_config_from_dict
    from chimera.serve.priors import model_infos

    backends = [{"name": "a", "model": "small", "base_url": "http://x", "profile": "qwen2.5-1.5b@a6000"},
                {"name": "b", "model": "qwen2.5-14b", "base_url": "http://x"},
                {"name": "c", "model": "big", "base_url": "http://x", "workload_model": "qwen2.5-7b"}]
    calls = [Call(call_id=i, workflow_id=f"w{i}", kind="math", prompt=f"What is {i}*23?", stage=i % 3,
                  prompt_tokens=9, arrival_s=0.0, workflow_arrival_s=0.0) for i in range(4)]
    for extra in ({}, {"predictors": str(synthetic_predictors)},
                  {"predictors": str(synthetic_predictors), "length_stat": "median",
                   "policy": {"name": "chimera", "lam": 0.2, "starve_s": 3.0}}):
        cfg = gateway_config_from_dict({"backends": backends, **extra})
        infos = model_infos(cfg)
        ours, theirs = _gateway_policy(cfg, infos), serve_build_policy(cfg, infos)
        assert (ours.name, ours.lam, ours.starve_s) == (theirs.name, theirs.lam, theirs.starve_s)
        assert type(ours.confidence) is type(theirs.confidence) and type(ours.length) is type(theirs.length)
        assert np.array_equal(ours.confidence.predict_confidence(calls), theirs.confidence.predict_confidence(calls))
        assert all(np.array_equal(a, b) for a, b in zip(ours.length.predict_lengths(calls),
                                                        theirs.length.predict_lengths(calls)))
        if not extra:
            assert isinstance(ours.confidence, SizePriorConfidence) and isinstance(ours.length, RunningLength)
    for bad in ({"predictors": str(tmp_path / "none")},
                {"predictors": str(synthetic_predictors),
                 "backends": [{**backends[0], "profile": None, "workload_model": "gpt-4"}, backends[1]]}):
        cfg = gateway_config_from_dict({"backends": backends, **bad})
        with pytest.raises(GatewayConfigError) as theirs_err:
            serve_build_policy(cfg, model_infos(cfg))
        with pytest.raises(PredictorConfigError) as ours_err:
            _gateway_policy(cfg, model_infos(cfg))
        assert str(ours_err.value) == str(theirs_err.value) and "key 'predictors'" in str(ours_err.value)
