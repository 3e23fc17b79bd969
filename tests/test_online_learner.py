"""The online confidence learner: exploration with known propensities under a budget, learning from workflow scores
(each score once), and the simulator running it from no labels with the same feedback delay a gateway sees."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chimera.perfmodel.profiles import default_cluster
from chimera.predict.bandit import LinearBandit
from chimera.predict.priors import RunningLength, SizePriorConfidence
from chimera.predict.registry import PredictorParamsError, confidence_factory
from chimera.sched.admission import Admission, Scored
from chimera.sched.decision import Decision
from chimera.sched.predictors import FeedbackOutcome
from chimera.sched.registry import make_policy
from chimera.sched.types import Call, ModelInfo
from chimera.sim.experiment import prepare, run_policy
from chimera.workload.synthetic import generate

MODELS = [ModelInfo(name=n, size_rank=i, max_inflight=1000, tokens_per_s=1000.0, tpot_s=0.01) for i, n in enumerate(["small", "mid", "big"])]
NAMES = [m.name for m in MODELS]


def bandit(**kw) -> LinearBandit:
    return LinearBandit(NAMES, SizePriorConfidence(MODELS), **kw)


def call(i: int, kind: str = "math", prompt: str = "", wid: str | None = None) -> Call:
    return Call(call_id=i, workflow_id=wid or f"wf{i}", kind=kind, prompt=prompt or f"question {kind}", stage=0,
                prompt_tokens=10, arrival_s=0.0, workflow_arrival_s=0.0)


def test_propensities_match_the_frequencies_of_choices():
    b = bandit(explore_start=0.3, explore_decay=1e12, explore_min=0.3, budget=1.0, seed=1)
    allowed = np.array([True, True, True])
    n, picks, props = 30_000, np.zeros(3), {}
    for i in range(n):
        j, p, explored, eps = b.explore(call(i), 2, allowed)
        picks[j] += 1
        props[j] = p
        assert eps == pytest.approx(0.3)
    assert props[2] == pytest.approx(0.7 + 0.1) and props[0] == pytest.approx(0.1)
    assert np.allclose(picks / n, [0.1, 0.1, 0.8], atol=0.01)
    # a model that is not allowed is never explored, and a single allowed model is not a choice
    for i in range(200):
        assert b.explore(call(i), 0, np.array([True, False, True]))[0] != 1
    assert b.explore(call(0), 1, np.array([False, True, False])) == (1, 1.0, False, 0.0)


def test_exploration_decays_and_stays_within_its_budget():
    b = bandit(explore_start=0.5, explore_decay=100, explore_min=0.01, budget=0.1, seed=0)
    allowed = np.ones(3, dtype=bool)
    first = b.epsilon()
    for i in range(5000):
        b.explore(call(i), 0, allowed)
    st = b.stats()
    assert first == 0.5 and b.epsilon() < 0.1
    assert st["explored_share"] <= 0.1 + 1e-3  # the budget caps the share explored so far
    assert st["decided"] == 5000


def learn_world(b: LinearBandit, n: int, truth: dict[tuple[str, str], float], seed: int = 0) -> None:
    """Route n one-call workflows (the bandit's own exploration over a fixed greedy choice) and post their scores."""
    rng = np.random.default_rng(seed)
    kinds = sorted({k for k, _ in truth})
    for i in range(n):
        kind = kinds[i % len(kinds)]
        c = call(i, kind)
        j, p, explored, eps = b.explore(c, 2, np.ones(3, dtype=bool))
        b.decided(c, Decision(NAMES[j], 0.0, propensity=p), now=float(i))
        score = float(rng.random() < truth[(kind, NAMES[j])])
        assert b.reward(c.workflow_id, score, now=float(i) + 1) is FeedbackOutcome.LEARNT


def test_it_learns_which_model_is_right_for_which_kind_from_scores_alone():
    # the size prior says big > mid > small everywhere; the world says small is best at "easy", big at "hard"
    truth = {("easy", "small"): 0.9, ("easy", "mid"): 0.6, ("easy", "big"): 0.5,
             ("hard", "small"): 0.1, ("hard", "mid"): 0.4, ("hard", "big"): 0.8}
    b = bandit(explore_start=0.5, explore_decay=1e12, explore_min=0.5, budget=1.0, seed=3)
    before = b.predict_confidence([call(0, "easy"), call(1, "hard")])
    assert before[0].argmax() == 2  # the prior: the biggest model
    learn_world(b, 3000, truth)
    after = b.predict_confidence([call(0, "easy"), call(1, "hard")])
    for r, kind in enumerate(("easy", "hard")):
        assert after[r] == pytest.approx([truth[(kind, m)] for m in NAMES], abs=0.08)
    assert after[0].argmax() == 0 and after[1].argmax() == 2


def test_a_score_teaches_once_and_bad_scores_never():
    b = bandit(max_age_s=100.0)
    c = call(1, wid="w1")
    b.decided(c, Decision("small", 0.0), now=0.0)
    coef = b.coef_.copy()
    for bad in (float("nan"), float("inf"), -0.1, 1.5):
        assert b.reward("w1", bad, now=1.0) is FeedbackOutcome.INVALID
    assert np.array_equal(b.coef_, coef)  # nothing learnt, and the workflow still waits for a good score
    assert b.reward("w1", 1.0, now=1.0) is FeedbackOutcome.LEARNT
    learnt = b.coef_.copy()
    assert not np.array_equal(learnt, coef)
    assert b.reward("w1", 1.0, now=2.0) is FeedbackOutcome.REPEATED
    assert b.reward("never-seen", 1.0, now=2.0) is FeedbackOutcome.UNKNOWN
    b.decided(call(2, wid="w2"), Decision("big", 0.0), now=10.0)
    assert b.reward("w2", 0.0, now=10.0 + 101.0) is FeedbackOutcome.LATE
    assert b.reward("w2", 0.0, now=10.0 + 102.0) is FeedbackOutcome.REPEATED
    assert np.array_equal(b.coef_, learnt)  # repeated, unknown and late scores taught nothing
    st = b.stats()
    assert (st["learnt"], st["repeated"], st["unknown"], st["late"], st["invalid"]) == (1, 2, 1, 1, 4)


def test_pending_workflows_are_bounded():
    b = bandit(max_pending=10)
    for i in range(25):
        b.decided(call(i), Decision("small", 0.0), now=0.0)
    assert b.stats()["pending"] == 10 and b.stats()["evicted"] == 15
    assert b.reward("wf0", 1.0, now=1.0) is FeedbackOutcome.UNKNOWN
    assert b.reward("wf24", 1.0, now=1.0) is FeedbackOutcome.LEARNT


def test_the_admission_core_feeds_the_learner_and_records_scores():
    events: list = []
    b = bandit(explore_start=0.0, explore_min=0.0, seed=0)
    policy = make_policy("chimera", confidence=b, length=RunningLength(NAMES), lam=0.0)
    core = Admission(policy, MODELS, place=lambda m, c, now: m, record=events.append)
    c = call(1, wid="w")
    d = core.submit(c, 0.0)
    assert d.model == "big" and d.propensity == pytest.approx(1.0) and d.epsilon == 0.0
    assert d.terms is not None and set(d.terms) == {"confidence_share", "expected_latency"}
    assert d.weights == {"confidence_share": 1.0, "expected_latency": -0.0}
    core.complete(c, 1.0, 5)
    assert core.feedback("w", 0.0, 2.0) is FeedbackOutcome.LEARNT
    assert core.feedback("w", 0.0, 3.0) is FeedbackOutcome.REPEATED
    assert core.feedback("w", math.nan, 3.0) is FeedbackOutcome.INVALID
    assert [e for e in events if isinstance(e, Scored)][0] == Scored(2.0, "w", 0.0)
    # a policy whose predictors do not learn from scores ignores them
    plain = Admission(make_policy("chimera", confidence=SizePriorConfidence(MODELS), length=None),
                      MODELS, place=lambda m, c, now: m)
    assert plain.feedback("w", 1.0, 0.0) is FeedbackOutcome.IGNORED
    assert plain.submit(call(2), 0.0).terms is None  # no explorer: nothing extra is logged


def test_online_plugin_refuses_unknown_keys_by_name():
    with pytest.raises(PredictorParamsError, match="explore"):
        confidence_factory("online", explore=0.1)
    assert confidence_factory("online", budget=0.05).params.budget == 0.05


@pytest.fixture(scope="module")
def prep():
    return prepare(generate(900, seed=0), default_cluster(), seed=0)


def test_the_simulator_learns_online_from_no_labels(prep):
    a = run_policy(prep, "chimera", rate=1.5, n_tasks=1200, seed=0, lam=0.02, predictions="online")
    b = run_policy(prep, "chimera", rate=1.5, n_tasks=1200, seed=0, lam=0.02, predictions="online")
    assert a["predictors"] == "online"
    assert a["accuracy"] == b["accuracy"] and a["latency_s"] == b["latency_s"]  # the same for a seed
    w = a["windows"]
    assert [x["workflows"] for x in w] == [500, 700]
    assert all(0.0 < x["exploration"] <= 0.25 for x in w)
    assert w[-1]["exploration"] < w[0]["exploration"]  # epsilon decays as decisions accumulate
    priors = run_policy(prep, "chimera", rate=1.5, n_tasks=1200, seed=0, lam=0.02, predictions="priors")
    assert all(x["exploration"] == 0.0 for x in priors["windows"])


def test_a_new_prior_keeps_what_was_learnt():
    """`use_prior` (a gateway reloading its router): the learnt correction stays and now corrects the new prior; a
    decision pending from before is learnt against the prior it was made with."""
    b = bandit()
    c = call(0, prompt="prove it")
    b.decided(c, Decision("big", 0.0), 0.0)
    assert b.reward("wf0", 0.0, 1.0) is FeedbackOutcome.LEARNT
    b.decided(call(1, prompt="prove it"), Decision("big", 0.0), 1.0)  # pending across the swap
    before = b.predict_confidence([c])[0]
    correction = before - SizePriorConfidence(MODELS).predict_confidence([c])[0]
    flat = [ModelInfo(name=m.name, size_rank=0, max_inflight=1, tokens_per_s=1.0, tpot_s=0.1) for m in MODELS]
    coef = b.coef_.copy()
    b.use_prior(SizePriorConfidence(flat))  # every model 0.5 now
    assert (b.coef_ == coef).all() and b.stats()["learnt"] == 1 and b.stats()["pending"] == 1
    assert np.allclose(b.predict_confidence([c])[0], np.clip(0.5 + correction, 0, 1))
    b_big = b.b_[2].copy()
    assert b.reward("wf1", 1.0, 2.0) is FeedbackOutcome.LEARNT
    x = b.features.transform("prove it", "math")
    assert np.allclose(b.b_[2] - b_big, (1.0 - 0.9) * x)  # its residual against the old prior of `big`, 0.9
    with pytest.raises(ValueError, match="no column"):
        b.use_prior(SizePriorConfidence(MODELS[:2]))
