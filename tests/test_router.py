"""Semantic router: learns text->correctness, calibrates, falls back to priors, pickles; baselines and metrics."""

from __future__ import annotations

import pickle
import warnings
import zlib

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from chimera.sched.predictors import ConfidencePredictor
from chimera.predict.encoders import HashingEncoder, MiniLMEncoder, make_encoder
from chimera.predict.priors import KindAccuracyRouter
from chimera.predict.router import RouterConfidence, SemanticRouter, tasks_to_arrays
from chimera.train.router_baselines import KnnRouter, MatrixFactorizationRouter, PriorRouter, RandomRouter
from chimera.train.router_eval import (
    area_under_routing_curve,
    ece,
    evaluate_routers,
    model_metrics,
    oracle_curve,
    routing_curve,
)
from chimera.sched.types import Call
from chimera.workload.datadir import DataDirError, resolve_data_dir
from chimera.workload.schema import Outcome, Task

MODELS = ["m-alpha", "m-beta", "m-coin"]
TOPICS = {
    "alpha": ["integral", "derivative", "matrix", "eigenvalue", "polynomial"],
    "beta": ["poem", "novel", "metaphor", "sonnet", "narrator"],
    "gamma": ["river", "mountain", "climate", "glacier", "desert"],
}
FILLER = "the a of to and please explain why what how is this that question about answer briefly".split()


def synthetic(n: int, seed: int, fractional: bool = False) -> tuple[list[str], list[str], np.ndarray]:
    """Texts whose topic words decide which model is right: m-alpha on alpha, m-beta on beta, m-coin a coin flip."""
    rng = np.random.default_rng(seed)
    texts, kinds, scores = [], [], np.zeros((n, 3))
    for i in range(n):
        topic = rng.choice(list(TOPICS))
        words = list(rng.choice(FILLER, 8)) + list(rng.choice(TOPICS[topic], 2))
        rng.shuffle(words)
        texts.append(" ".join(words))
        kinds.append("qa" if i % 2 else "math")
        p = [0.9 if topic == "alpha" else 0.15, 0.9 if topic == "beta" else 0.15, 0.5]
        scores[i] = p if fractional else rng.random(3) < p
    return texts, kinds, scores


@pytest.fixture(scope="module")
def data():
    return synthetic(800, seed=1), synthetic(600, seed=2)


@pytest.fixture(scope="module")
def fitted(data):
    (x, k, s), _ = data
    return SemanticRouter(encoder="hashing").fit(x, s, MODELS, k)


# --- encoders -------------------------------------------------------------------------------------------------


def test_hashing_encoder_shape_norm_and_pickle(tmp_path):
    texts = [f"question {i} about integral number {i % 7}" for i in range(50)]
    enc = HashingEncoder(svd_dim=16).fit(texts)
    e = enc.encode(texts[:5])
    assert e.shape == (5, 16) and e.dtype == np.float32 and enc.dim == 16
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    joblib.dump(enc, tmp_path / "enc.joblib")
    assert np.array_equal(joblib.load(tmp_path / "enc.joblib").encode(texts[:5]), e)
    assert make_encoder("hashing", svd_dim=None).fit(texts).encode(texts[:1]).shape == (1, 2**12)
    with pytest.raises(ValueError):
        make_encoder("bert-huge")


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder(device="cpu")


def test_minilm_bundled_embeddings(minilm):
    """Loads the bundled weights (no download; a few seconds on CPU)."""
    e = minilm.encode(
        ["How do I reset my password?", "What are the steps to change my password?", "The tide is high at noon."]
    )
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    state = pickle.loads(pickle.dumps(minilm))
    assert state._model is None and minilm._model is not None


def test_minilm_fine_tune_step_changes_weights_and_pickles(minilm, tmp_path):
    """One CPU step of the paper's recipe (per-model sigmoid head, masked BCE) on 16 texts; ~1 s."""
    enc = MiniLMEncoder(device="cpu", max_seq_length=32)
    texts = [f"solve {i} plus {i + 1}" if i % 2 else f"write a poem about item {i}" for i in range(16)]
    labels = np.array([[i % 2, 1 - i % 2, np.nan if i % 3 == 0 else 0.5] for i in range(16)], dtype=float)
    before = enc.encode(texts[:2])
    name = "0.auto_model.encoder.layer.0.attention.self.query.weight"
    w0 = {k: v.clone() for k, v in enc.model.state_dict().items()}
    enc.fine_tune(texts, labels, epochs=1, lr=1e-4, batch_size=16)
    assert len(enc.fine_tune_losses_) == 1 and np.isfinite(enc.fine_tune_losses_[0])
    changed = [k for k, v in enc.model.state_dict().items() if not np.array_equal(v.numpy(), w0[k].numpy())]
    assert changed, "fine-tuning did not change any weight"
    assert name not in w0 or name in changed
    after = enc.encode(texts[:2])
    assert not np.allclose(before, after)
    joblib.dump(enc, tmp_path / "tuned.joblib")
    again = joblib.load(tmp_path / "tuned.joblib")
    assert again.finetuned_state_ is not None
    assert np.allclose(again.encode(texts[:2]), after, atol=1e-5)


# --- router ---------------------------------------------------------------------------------------------------


def test_router_learns_keywords_and_beats_prior_and_random(data, fitted):
    (x, k, s), (xt, kt, st) = data
    probs = fitted.predict_proba(xt, kt)
    assert probs.shape == (len(xt), 3) and np.all((probs >= 0) & (probs <= 1))
    for j in (0, 1):
        assert model_metrics(probs[:, j], st[:, j])["auc"] > 0.8
    prior = PriorRouter().fit(x, s, MODELS, k)
    rand = RandomRouter(0).fit(x, s, MODELS, k)
    routers = {"router": fitted, "prior": prior, "random": rand}
    table = evaluate_routers(routers, xt, kt, st, MODELS, "m-alpha", "m-beta")
    area = {n: r["area"] for n, r in table["routers"].items()}
    assert area["router"] > area["prior"] + 0.05 and area["router"] > area["random"] + 0.05
    assert area["router"] <= table["oracle_area"] + 1e-9
    assert abs(table["routers"]["prior"]["per_model"]["m-alpha"]["auc"] - 0.5) < 0.05  # per-kind prior only


def test_isotonic_calibration_lowers_ece(data):
    (x, k, s), (xt, kt, st) = data
    raw = SemanticRouter(C=0.05, calibration=None).fit(x, s, MODELS, k).predict_proba(xt, kt)
    cal = SemanticRouter(C=0.05, calibration="isotonic").fit(x, s, MODELS, k).predict_proba(xt, kt)
    platt = SemanticRouter(C=0.05, calibration="sigmoid").fit(x, s, MODELS, k).predict_proba(xt, kt)
    for j in (0, 1):
        e_raw, e_cal = ece(raw[:, j], st[:, j]), ece(cal[:, j], st[:, j])
        assert e_cal < e_raw and e_cal <= 0.1
        assert ece(platt[:, j], st[:, j]) <= 0.1


def test_fractional_scores_are_soft_labels(data):
    _, (xt, kt, _) = data
    x, k, s = synthetic(800, seed=1, fractional=True)
    r = SemanticRouter().fit(x, s, MODELS, k)
    p = r.predict_proba(xt, kt)
    topic_alpha = np.array([any(w in t.split() for w in TOPICS["alpha"]) for t in xt])
    assert p[topic_alpha, 0].mean() > 0.7 and p[~topic_alpha, 0].mean() < 0.3
    assert abs(p[:, 2].mean() - 0.5) < 0.1
    assert r.priors_["*"]["m-coin"] == pytest.approx(0.5)


def test_unknown_and_unlabelled_models_fall_back_with_one_warning(data):
    (x, k, s), (xt, kt, _) = data
    s4 = np.column_stack([s, np.full(len(s), np.nan), np.full(len(s), np.nan)])
    s4[:10, 4] = 1.0  # "m-rare": 10 labels, all correct -> prior known, no head
    r = SemanticRouter().fit(x, s4, MODELS + ["m-ghost", "m-rare"], k)
    assert r.heads_["m-ghost"] is None and "head" in r.skipped_["m-ghost"]
    assert r.heads_["m-rare"] is None and r.priors_["*"]["m-rare"] == 1.0
    mean_prior = np.mean([r.priors_["*"][m] for m in MODELS + ["m-rare"]])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p1 = r.predict_proba(xt[:5], kt[:5], models=["m-alpha", "nobody"])
        p2 = r.predict_proba(xt[5:9], kt[5:9], models=["nobody", "m-alpha"])
    assert len(w) == 1 and "nobody" in str(w[0].message)
    assert np.allclose(p1[:, 1], mean_prior) and np.allclose(p2[:, 0], mean_prior)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p3 = r.predict_proba(xt[:3], kt[:3], models=["m-rare", "m-ghost"])
        r.predict_proba(xt[:3], kt[:3], models=["m-rare", "m-ghost"])
    assert len(w) == 2 and {"m-rare", "m-ghost"} == {m for m in ("m-rare", "m-ghost") for x in w if m in str(x.message)}
    assert np.allclose(p3[:, 0], 1.0) and np.allclose(p3[:, 1], mean_prior)


def test_inverse_propensity_weights_undo_selection_bias(data):
    """Labels seen only where a logging policy sent each text (m-alpha mostly on alpha texts): unweighted, its prior
    is the accuracy on the texts it was sent; weighted by 1/propensity, the accuracy on all texts."""
    (x, k, s), (xt, kt, _) = data
    rng = np.random.default_rng(5)
    alpha = np.array([any(w in t.split() for w in TOPICS["alpha"]) for t in x])
    p_alpha = np.where(alpha, 0.9, 0.1)  # the logging policy's probability of choosing m-alpha
    chose_alpha = rng.random(len(x)) < p_alpha
    logged = np.full_like(s, np.nan)
    logged[chose_alpha, 0] = s[chose_alpha, 0]
    logged[~chose_alpha, 1] = s[~chose_alpha, 1]
    ips = np.where(chose_alpha, 1 / p_alpha, 1 / (1 - p_alpha))
    plain = SemanticRouter().fit(x, logged, MODELS, k)
    weighted = SemanticRouter().fit(x, logged, MODELS, k, sample_weight=ips)
    population = float(np.mean(s[:, 0]))
    assert abs(weighted.priors_["*"]["m-alpha"] - population) < 0.06
    assert plain.priors_["*"]["m-alpha"] - population > 0.2
    assert "head" in weighted.skipped_["m-coin"]  # never chosen: no head, left to the prior
    # equal weights change nothing (each head's weights are scaled to mean 1)
    np.testing.assert_allclose(SemanticRouter().fit(x, s, MODELS, k, sample_weight=np.full(len(x), 3.0))
                               .predict_proba(xt[:50], kt[:50]),
                               SemanticRouter().fit(x, s, MODELS, k).predict_proba(xt[:50], kt[:50]), atol=1e-6)
    with pytest.raises(ValueError, match="sample_weight must be 800 finite weights > 0"):
        SemanticRouter().fit(x, s, MODELS, k, sample_weight=np.zeros(len(x)))


def test_router_confidence_columns_follow_the_mapping(data, fitted):
    _, (xt, kt, _) = data
    conf = RouterConfidence(fitted, mapping={"big-gpu": "m-beta", "small-gpu": "m-alpha"})
    assert isinstance(conf, ConfidencePredictor) and conf.models_ == ["big-gpu", "small-gpu"]
    calls = [
        Call(call_id=i, workflow_id=f"w{i % 3}", kind=kt[i % 3], prompt=xt[i % 3], stage=i, prompt_tokens=10,
             arrival_s=0.0, workflow_arrival_s=0.0)
        for i in range(7)
    ]
    got = conf.predict_confidence(calls)
    want = fitted.predict_proba([c.prompt for c in calls], [c.kind for c in calls], models=["m-beta", "m-alpha"])
    assert got.shape == (7, 2) and np.allclose(got, want)
    assert np.allclose(conf.predict_confidence(calls[:1]), got[:1])  # served from the per-prompt cache
    assert RouterConfidence(fitted).models_ == MODELS
    uncached = RouterConfidence(fitted, {"a": "m-coin"}, cache_size=0)
    want_coin = fitted.predict_proba([c.prompt for c in calls], [c.kind for c in calls], models=["m-coin"])
    assert np.allclose(uncached.predict_confidence(calls), want_coin) and len(uncached._cache) == 0


def test_get_params_clone_and_joblib_round_trip(data, fitted, tmp_path):
    (x, k, s), (xt, kt, _) = data
    params = fitted.get_params()
    assert params["encoder"] == "hashing" and params["calibration"] == "sigmoid" and params["C"] == 1.0
    c = clone(fitted).set_params(C=2.0)
    assert c.C == 2.0 and not hasattr(c, "heads_")
    with pytest.raises(NotFittedError):
        c.predict_proba(xt[:1])
    with pytest.raises(ValueError, match="calibration"):
        SemanticRouter(calibration="beta").fit(x, s, MODELS, k)
    joblib.dump(fitted, tmp_path / "router.joblib")
    back = joblib.load(tmp_path / "router.joblib")
    assert np.array_equal(back.predict_proba(xt, kt), fitted.predict_proba(xt, kt))
    enc = HashingEncoder(svd_dim=32)
    r = SemanticRouter(encoder=enc).fit(x, s, MODELS, k)
    assert not hasattr(enc, "tfidf_") and r.encoder_.dim == 32  # the encoder param is not mutated


def test_baselines_share_the_interface(data, tmp_path):
    (x, k, s), (xt, kt, st) = data
    enc = HashingEncoder().fit(x)
    for r in (KnnRouter(enc, k=20), MatrixFactorizationRouter(enc, epochs=100), PriorRouter(), RandomRouter(3)):
        r.fit(x, s, MODELS, k)
        p = r.predict_proba(xt, kt)
        assert p.shape == (len(xt), 3) and np.all((p >= 0) & (p <= 1))
        joblib.dump(r, tmp_path / "r.joblib")
        if not isinstance(r, RandomRouter):
            assert np.allclose(joblib.load(tmp_path / "r.joblib").predict_proba(xt, kt), p)
    for r in (KnnRouter(enc, k=20).fit(x, s, MODELS, k), MatrixFactorizationRouter(enc).fit(x, s, MODELS, k)):
        assert model_metrics(r.predict_proba(xt, kt)[:, 0], st[:, 0])["auc"] > 0.75


def test_prior_router_matches_kind_accuracy_router():
    tasks = [
        Task(id=f"t{i}", kind="qa" if i % 3 else "math", prompt=f"p{i}",
             outcomes={"a": Outcome(score=float(i % 2), output_tokens=1), "b": Outcome(score=0.25, output_tokens=1)})
        for i in range(30)
    ]
    texts, scores, kinds = tasks_to_arrays(tasks, ["a", "b"])
    pr = PriorRouter().fit(texts, scores, ["a", "b"], kinds)
    kr = KindAccuracyRouter(["a", "b"]).fit(tasks)
    calls = [Call(i, "w", kind, "p", 0, 1, 0.0, 0.0) for i, kind in enumerate(["qa", "math", "other"])]
    assert np.allclose(pr.predict_proba(["p"] * 3, ["qa", "math", "other"]), kr.predict_confidence(calls))


# --- metrics --------------------------------------------------------------------------------------------------


def test_routing_curve_shares_span_and_ordering():
    rng = np.random.default_rng(0)
    s = (rng.random((200, 2)) < [0.8, 0.4]).astype(float)
    strong_only, weak_only = s[:, 0].mean(), s[:, 1].mean()
    oracle = oracle_curve(s, 0, 1)
    assert [round(c[0], 3) for c in oracle] == [round(q, 3) for q in np.linspace(0, 1, 21)]
    assert oracle[0][1] == pytest.approx(weak_only) and oracle[-1][1] == pytest.approx(strong_only)
    blind = routing_curve(np.full((200, 2), 0.5), s, 0, 1)  # ties: random assignment in expectation
    assert area_under_routing_curve(blind) == pytest.approx((strong_only + weak_only) / 2)
    assert area_under_routing_curve(oracle) > area_under_routing_curve(blind)


def test_model_metrics_and_ece():
    assert model_metrics(np.array([0.2, 0.3]), np.array([1.0, 1.0]))["auc"] is None
    m = model_metrics(np.array([0.1, 0.9, 0.5, 0.7]), np.array([0.0, 1.0, np.nan, 1.0]))
    assert m["n"] == 3 and m["auc"] == 1.0 and m["brier"] == pytest.approx((0.01 + 0.01 + 0.09) / 3)
    p = np.repeat([0.05, 0.55, 0.95], 100)
    s = np.concatenate([np.arange(100) < n for n in (5, 55, 95)]).astype(float)  # 5 %, 55 %, 95 % correct
    assert ece(p, s) == pytest.approx(0.0, abs=1e-12)
    assert ece(np.full(10, 0.9), np.zeros(10)) == pytest.approx(0.9)


# --- real data ------------------------------------------------------------------------------------------------


def test_routellm_gsm8k_router_beats_chance():
    """Real RouteLLM GSM8K labels (800 questions, 70/30 split by id hash): text predicts GPT-4-1106's failures."""
    try:
        resolve_data_dir()
    except DataDirError as e:
        pytest.skip(f"public benchmark data not available: {e}")
    from chimera.workload.loaders import load_source

    tasks = load_source("routellm-gsm8k", limit=800)
    models = ["GPT-4-1106", "Mixtral-8x7B-Instruct"]
    train = [t for t in tasks if zlib.crc32(t.id.encode()) % 10000 < 7000]
    test = [t for t in tasks if zlib.crc32(t.id.encode()) % 10000 >= 7000]
    texts, scores, kinds = tasks_to_arrays(train, models)
    r = SemanticRouter().fit(texts, scores, models, kinds)
    xt, st, kt = tasks_to_arrays(test, models)
    p = r.predict_proba(xt, kt)
    auc = [model_metrics(p[:, j], st[:, j])["auc"] for j in range(2)]
    assert auc[0] >= 0.55 and np.mean(auc) >= 0.55, f"AUC GPT-4 {auc[0]:.3f}, Mixtral {auc[1]:.3f}"
