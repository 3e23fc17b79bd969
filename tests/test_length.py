"""Workflow-length forest, its features, baselines and metrics (synthetic workflows; one real-data check)."""

from __future__ import annotations

import json
import zlib

import joblib
import numpy as np
import pytest
from sklearn.base import clone

from chimera.sched.predictors import LengthPredictor
from chimera.predict.length import ForestLengths, WorkflowLengthForest
from chimera.train.length_baselines import PairwiseRanker, StageMeanBaseline
from chimera.train.length_eval import evaluate_length_models, grouped_tau, kendall_tau
from chimera.predict.length_features import LengthFeaturizer, LengthRow, examples_from_plans, rows_from_calls
from chimera.sched.types import Call
from chimera.workload import synthetic
from chimera.workload.plan import plan_workflow
from chimera.workload.templates import load_templates, template_for


def _split_rows(tasks, models):
    """Per-(plan, stage, model) rows of the train and test tasks (split by id, as the experiments do)."""
    templates = load_templates()
    plans = [plan_workflow(t, template_for(t.kind, templates), np.random.default_rng([0, i]))
             for i, t in enumerate(tasks)]
    is_train = [zlib.crc32(t.id.encode()) % 10_000 < 7_000 for t in tasks]
    out = []
    for want in (True, False):
        idx = [i for i, tr in enumerate(is_train) if tr == want]
        out.append(examples_from_plans([plans[i] for i in idx], [tasks[i].prompt for i in idx], models))
    return out, plans


@pytest.fixture(scope="module")
def syn():
    tasks = synthetic.generate(360, seed=3)
    (train, test), plans = _split_rows(tasks, list(synthetic.DEFAULT_MODELS))
    forest = WorkflowLengthForest(n_estimators=60).fit(train[0], train[1], train[2])
    return {"train": train, "test": test, "forest": forest, "tasks": tasks, "plans": plans}


def _keyword_rows(n: int, seed: int) -> tuple[list[LengthRow], np.ndarray]:
    """Tasks whose instruction alone sets the length (elaborate: 10x summarize) among random filler words; model b
    writes 3x model a."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(200)]
    rows, y = [], []
    for _ in range(n):
        long = bool(rng.random() < 0.5)
        instruction = "elaborate in detail with examples" if long else "summarize briefly"
        text = " ".join([instruction, *rng.choice(vocab, 4)])
        ptok = int(rng.integers(20, 200))  # unrelated to the length
        base = (400.0 if long else 40.0) * float(np.exp(0.1 * rng.normal()))
        for model, scale in (("a", 1.0), ("b", 3.0)):
            rows.append(LengthRow("qa", model, 0, ptok, 0, text))
            y.append(round(base * scale))
    return rows, np.asarray(y, float)


@pytest.fixture(scope="module")
def keyword():
    rows, y = _keyword_rows(200, 0)
    test_rows, test_y = _keyword_rows(100, 1)
    return rows, y, test_rows, test_y


def _call(i: int, kind: str, text: str, stage: int = 0, prompt_tokens: int = 50, generated: int = 0) -> Call:
    return Call(call_id=i, workflow_id=f"w{i}", kind=kind, prompt=text, stage=stage, prompt_tokens=prompt_tokens,
                arrival_s=0.0, workflow_arrival_s=0.0, generated_so_far=generated)


# --- features -------------------------------------------------------------------------------------------------

def test_examples_from_plans_follow_the_plan(syn):
    plan, task = syn["plans"][0], syn["tasks"][0]
    rows, call_t, rem_t, groups = examples_from_plans([plan], [task.prompt], ["qwen2.5-7b", "not-a-model"])
    assert len(rows) == plan.n_stages  # the unknown model is skipped
    outs: list[int] = []
    for s, r in enumerate(rows):
        assert (r.kind, r.model, r.stage, r.text) == (task.kind, "qwen2.5-7b", s, task.prompt)
        assert r.prompt_tokens == plan.prompt_tokens(s, outs) and r.generated_so_far == sum(outs)
        assert call_t[s] == plan.output_tokens(s, "qwen2.5-7b")
        assert rem_t[s] == plan.remaining_tokens(s, "qwen2.5-7b")
        outs.append(plan.output_tokens(s, "qwen2.5-7b"))
    assert rem_t[0] == call_t.sum() and set(groups) == {task.id}


def test_featurizer_layout_unknowns_and_spec(keyword):
    rows = keyword[0]
    fz = LengthFeaturizer(text_dim=4).fit(rows)
    X = fz.transform(rows[:3] + [LengthRow("nope", "zzz", 2, 99, 10, "fresh words")])
    assert X.shape == (4, len(fz.feature_names_)) == (4, 3 + 1 + 2 + 4)
    assert X[3, :3].tolist() == pytest.approx([2, np.log1p(99), np.log1p(10)])
    kind_model = [i for i, n in enumerate(fz.feature_names_) if n.startswith(("kind=", "model="))]
    assert X[3, kind_model].sum() == 0.0 and X[0, kind_model].sum() == 2.0
    json.dumps(fz.spec())
    assert fz.spec()["feature_names"] == fz.feature_names_
    no_text = LengthFeaturizer(text_dim=0).fit(rows)
    assert not any(n.startswith("text_") for n in no_text.feature_names_)
    assert no_text.transform(rows).shape == (len(rows), 6)


def test_rows_from_calls_are_call_major():
    calls = [_call(0, "qa", "x"), _call(1, "math", "y", stage=1, generated=7)]
    rows = rows_from_calls(calls, ["m1", "m2"])
    assert [(r.kind, r.model, r.generated_so_far) for r in rows] == [
        ("qa", "m1", 0), ("qa", "m2", 0), ("math", "m1", 7), ("math", "m2", 7)]


# --- the forest against the honest prior ------------------------------------------------------------------------

def test_forest_beats_stage_mean_on_synthetic(syn):
    train, (rows, _, rem, _) = syn["train"], syn["test"]
    base = StageMeanBaseline().fit(train[0], train[1], train[2])
    res = evaluate_length_models({"forest": syn["forest"], "mean": base}, rows, rem)
    f, b = res["forest"], res["mean"]
    assert f["mae"] < b["mae"]
    assert f["tau"] > b["tau"]
    assert f["tau_within_stage"] > b["tau_within_stage"]


def test_quantiles_are_monotone_and_calibrated(syn):
    rows, _, rem, _ = syn["test"]
    forest = syn["forest"]
    q = forest.predict(rows, quantiles=[0.1, 0.5, 0.9])
    assert q.shape == (len(rows), 3)
    assert np.all(np.diff(q, axis=1) >= 0)
    assert np.allclose(q[:, 1], forest.predict(rows))  # the configured quantile (0.5)
    assert forest.predict(rows, quantiles=0.9).shape == (len(rows),)
    assert np.mean(rem <= q[:, 2]) >= 0.8
    call_q = forest.predict_call(rows, quantiles=[0.25, 0.75])
    assert np.all(call_q[:, 1] >= call_q[:, 0])
    with pytest.raises(ValueError):
        forest.predict(rows, quantiles=[1.5])


def test_text_features_carry_length_information(keyword):
    rows, y, test_rows, test_y = keyword
    with_text = WorkflowLengthForest(n_estimators=30, text_dim=4).fit(rows, y, y)
    without = WorkflowLengthForest(n_estimators=30, text_dim=0).fit(rows, y, y)
    mae_text = np.mean(np.abs(with_text.predict(test_rows) - test_y))
    mae_none = np.mean(np.abs(without.predict(test_rows) - test_y))
    assert mae_text < 0.3 * mae_none
    same_model = np.array([r.model == "a" for r in test_rows])
    assert kendall_tau(test_y[same_model], with_text.predict(test_rows)[same_model]) > 0.4  # ~0.5 = two clusters
    assert abs(kendall_tau(test_y[same_model], without.predict(test_rows)[same_model])) < 0.3


def test_pairwise_ranker_orders_the_learnable_set(keyword):
    rows, y, test_rows, test_y = keyword
    ranker = PairwiseRanker(text_dim=4).fit(rows, None, y)
    assert ranker.rank_only
    score = ranker.predict(test_rows)
    assert grouped_tau(test_y, score, [r.stage for r in test_rows]) > 0.3
    res = evaluate_length_models({"ranker": ranker}, test_rows, test_y)["ranker"]
    assert res["mae"] is None and res["cov_hi"] is None and res["tau"] > 0


# --- serving adapter, sklearn conventions, persistence ----------------------------------------------------------

def test_forest_lengths_maps_cluster_names(keyword):
    rows, y, _, _ = keyword
    forest = WorkflowLengthForest(n_estimators=20, text_dim=4).fit(rows, y, y)
    adapter = ForestLengths(forest, {"big": "b", "small": "a"})
    assert isinstance(adapter, LengthPredictor)
    assert adapter.models_ == ["big", "small"]
    texts = ["elaborate in detail with examples w1 w2", "summarize briefly w1 w2", "elaborate in detail with examples"]
    calls = [_call(i, "qa", t) for i, t in enumerate(texts)]
    call, rem = adapter.predict_lengths(calls)
    assert call.shape == rem.shape == (3, 2)
    assert np.all(rem[:, 0] > 2 * rem[:, 1])  # column order follows the mapping: "big" is model b (3x)
    assert rem[0, 1] > 3 * rem[1, 1]  # "elaborate" writes ~10x "summarize"
    assert np.all(rem >= call)
    direct = forest.predict(rows_from_calls(calls, ["b", "a"])).reshape(3, 2)
    assert np.allclose(rem, np.maximum(direct, call))
    identity = ForestLengths(forest)
    assert identity.models_ == ["a", "b"]
    assert ForestLengths(forest, quantile=0.9).predict_lengths(calls)[1].sum() >= identity.predict_lengths(calls)[1].sum()
    assert adapter.predict_lengths([])[0].shape == (0, 2)
    with pytest.raises(ValueError, match="not trained on"):
        ForestLengths(forest, {"big": "c"})


def test_get_params_and_clone():
    est = WorkflowLengthForest(n_estimators=7, text_dim=3, quantile=0.7)
    params = est.get_params()
    assert params["n_estimators"] == 7 and params["quantile"] == 0.7 and params["log_target"] is True
    twin = clone(est)
    assert twin.get_params() == params and not hasattr(twin, "remaining_forest_")
    assert twin.set_params(n_estimators=9).n_estimators == 9
    assert clone(PairwiseRanker(C=0.5)).C == 0.5


def test_joblib_round_trip(keyword, tmp_path):
    rows, y, test_rows, _ = keyword
    forest = WorkflowLengthForest(n_estimators=15, text_dim=4).fit(rows, y, y)
    path = tmp_path / "length.joblib"
    joblib.dump(forest, path)
    back = joblib.load(path)
    assert np.array_equal(back.predict(test_rows, [0.1, 0.5, 0.9]), forest.predict(test_rows, [0.1, 0.5, 0.9]))
    assert np.array_equal(back.predict_call(test_rows), forest.predict_call(test_rows))
    assert back.spec() == forest.spec()
    json.dumps(forest.spec())


# --- real data --------------------------------------------------------------------------------------------------

def test_forest_ranks_fireact_better_than_stage_mean():
    from chimera.workload.datadir import DataDirError
    from chimera.workload.loaders import load_source

    try:
        tasks = load_source("fireact-hotpotqa")
    except DataDirError as e:
        pytest.skip(f"public benchmark data not available (set CHIMERA_DATA_DIR to run this): {e}")
    models = ["Llama-2-7b-lora", "Llama-2-13b-lora", "gpt-3.5-turbo-0613-ft"]
    (train, (rows, _, rem, _)), _ = _split_rows(tasks, models)
    forest = WorkflowLengthForest(n_estimators=50).fit(train[0], train[1], train[2])
    base = StageMeanBaseline().fit(train[0], train[1], train[2])
    res = evaluate_length_models({"forest": forest, "mean": base}, rows, rem)
    assert res["forest"]["tau"] > res["mean"]["tau"]
    assert res["forest"]["tau_within_stage"] > res["mean"]["tau_within_stage"]

