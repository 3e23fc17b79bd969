"""Predictors are plugins: factories registered by name with typed parameters, built by one assembly for every body.
A new predictor (here a toy online learner, as the bandit that comes next would be) is one file with one
registration line, and runs in the simulator by name."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import numpy as np
import pytest

from chimera.perfmodel.profiles import default_cluster
from chimera.predict.assembly import (
    PREDICTOR_SETS, PolicySpec, PredictorsSpec, build_policy, predictions_need_truth, resolve_predictions,
)
from chimera.predict.context import AssemblyContext, MissingInput
from chimera.predict.oracle import OracleConfidence, OracleLength
from chimera.predict.priors import KindAccuracyRouter, RunningLength, SizePriorConfidence, StageMeanLength
from chimera.predict.registry import (
    CONFIDENCE_REGISTRY, LENGTH_REGISTRY, PredictorParamsError, confidence_factory, length_factory,
)
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


def test_the_priors_predict_a_batch_row_by_row(prep):
    """One row per call in the order given, each the call's own lookup; an empty batch is (0, models)."""
    wfs = prep.workflows(6, 3)
    calls = [Call(call_id=i, workflow_id=wid, kind=plan.kind, prompt=prompt, stage=i % 2, prompt_tokens=10,
                  arrival_s=0.0, workflow_arrival_s=0.0) for i, (wid, plan, prompt) in enumerate(wfs)]
    conf, (tok, rem) = prep.router.predict_confidence(calls), prep.lengths.predict_lengths(calls)
    assert conf.shape == tok.shape == rem.shape == (len(calls), len(prep.names))
    for i, c in enumerate(calls):
        assert (conf[i] == prep.router.predict_confidence([c])[0]).all()
        assert (tok[i] == prep.lengths.predict_lengths([c])[0][0]).all()
        assert (rem[i] == prep.lengths.predict_lengths([c])[1][0]).all()
    assert prep.router.predict_confidence([]).shape == (0, len(prep.names))
    assert [a.shape for a in prep.lengths.predict_lengths([])] == [(0, len(prep.names))] * 2


@pytest.mark.parametrize("name", POLICIES)
def test_every_presets_choice_is_a_known_set_and_the_gateway_refuses_ground_truth(name):
    from chimera.serve.refusals import live_refusal

    entry = policy_entry(name)
    if entry.predictions is not None:
        resolve_predictions(entry.predictions, trained=True)
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
def test_the_gateway_builds_its_policy_through_the_assembly(tmp_path, synthetic_predictors):
    """Cold start: size prior + running means; `predictors:` the trained router and forest, each served model read
    under its backend's explicit workload_model, else its profile's, else its own name; a folder that cannot serve
    the models fails at load, naming the key."""
    from chimera.predict.length import ForestLengths
    from chimera.predict.router import RouterConfidence
    from chimera.serve.app import build_policy
    from chimera.serve.config import GatewayConfigError, gateway_config_from_dict
    from chimera.serve.model_infos import model_infos, workload_names

    backends = [{"name": "a", "model": "small", "base_url": "http://x", "profile": "qwen2.5-1.5b@a6000"},
                {"name": "b", "model": "qwen2.5-14b", "base_url": "http://x"},
                {"name": "c", "model": "big", "base_url": "http://x", "workload_model": "qwen2.5-7b"}]
    cold = gateway_config_from_dict({"backends": backends})
    pol = build_policy(cold, model_infos(cold))
    assert isinstance(pol.confidence, SizePriorConfidence) and isinstance(pol.length, RunningLength)
    trained = gateway_config_from_dict({"backends": backends, "predictors": str(synthetic_predictors),
                                        "length_stat": "median", "policy": {"name": "chimera", "lam": 0.2}})
    assert workload_names(trained) == {"small": ("qwen2.5-1.5b", "small"), "qwen2.5-14b": (None, "qwen2.5-14b"),
                                       "big": ("qwen2.5-7b",)}
    pol = build_policy(trained, model_infos(trained))
    assert isinstance(pol.confidence, RouterConfidence) and isinstance(pol.length, ForestLengths)
    assert pol.confidence.mapping == {"small": "qwen2.5-1.5b", "qwen2.5-14b": "qwen2.5-14b", "big": "qwen2.5-7b"}
    assert pol.length.quantile is None and pol.lam == 0.2  # the median: the forest's own quantile
    for bad, says in (({"predictors": str(tmp_path / "none")}, "key 'predictors': "),
                      ({"predictors": str(synthetic_predictors),
                        "backends": [{**backends[0], "profile": None, "workload_model": "gpt-4"}, backends[1]]},
                       "served model(s) ['small'] are not among them")):
        cfg = gateway_config_from_dict({"backends": backends, **bad})
        with pytest.raises(GatewayConfigError, match="key 'predictors'") as e:
            build_policy(cfg, model_infos(cfg))
        assert says in str(e.value)
