"""Off-policy evaluation (chimera.train.ope) on logged bandits whose true value is known."""

from __future__ import annotations

import numpy as np
import pytest

from chimera.train.ope import Candidate, LoggedCalls, _segment_cumprod, evaluate, target_probabilities

MODELS = ["small", "mid", "large"]
SPEED = np.array([1.0, 2.0, 4.0])  # seconds per unit of work: the large model is slow


def logged_bandit(n: int, lam: float, eps: float, seed: int, calls: int = 2, confidence: str = "noisy",
                  coin: bool = True) -> tuple[LoggedCalls, np.ndarray]:
    """n workflows of `calls` calls routed ε-greedily by confidence − λ·latency (uniform exploration over 3 models).
    Each call earns 1/calls with the chosen model's true accuracy (`coin`; else that accuracy / calls). The reward model is the routing confidence
    ("noisy") or a useless 0.5 ("flat"). Returns the logs and each call's true accuracies (n·calls, 3), from which
    any candidate's exact value on these contexts follows."""
    rng = np.random.default_rng(seed)
    c = n * calls
    truth = np.repeat(rng.uniform(0.1, 0.9, (n, 3)), calls, axis=0)
    conf = np.clip(truth + rng.normal(0.0, 0.1, (c, 3)), 0.0, 1.0)
    latency = rng.uniform(0.5, 3.0, (c, 3)) * SPEED
    greedy = (conf - lam * latency).argmax(axis=1)
    explored = rng.random(c) < eps
    chosen = np.where(explored, rng.integers(0, 3, c), greedy)
    propensity = (1 - eps) * (chosen == greedy) + eps / 3
    acc = truth[np.arange(c), chosen]
    earned = ((rng.random(c) < acc) if coin else acc) / calls
    wf = np.repeat(np.arange(n), calls)
    return LoggedCalls(
        models=MODELS, workflow_ids=[f"wf-{i}" for i in range(n)], reward=np.bincount(wf, weights=earned),
        workflow=wf, chosen=chosen, propensity=propensity, epsilon=np.full(c, eps), explored=explored,
        terms={"confidence_share": conf, "expected_latency": latency},
        weights={"confidence_share": np.ones(c), "expected_latency": np.full(c, -lam)},
        routed=np.ones(c, dtype=bool), confidence=conf if confidence == "noisy" else np.full((c, 3), 0.5)), truth


def true_value(logs: LoggedCalls, truth: np.ndarray, lam: float, calls: int) -> float:
    """The candidate's exact expected score on the logged contexts: Σ_a π'(a)·accuracy(a) per call."""
    greedy = (logs.terms["confidence_share"] - lam * logs.terms["expected_latency"]).argmax(axis=1)
    pi = target_probabilities(logs, greedy)
    return float((pi * truth).sum(axis=1).sum() / calls / logs.n)


@pytest.mark.parametrize("confidence", ["noisy", "flat"])
def test_estimators_cover_the_known_value_of_other_policies(confidence):
    """IPS, SNIPS and DR are unbiased: each interval covers the candidate's exact value, for a good reward model
    and for a useless one (flat confidences: DR stays unbiased, it only loses its variance reduction). The score
    adds up over calls here and contexts do not depend on earlier choices, so the additive DR is unbiased too."""
    logs, truth = logged_bandit(4000, lam=0.05, eps=0.3, seed=1, confidence=confidence)
    lams = (0.0, 0.02, 0.1, 0.2)
    rep = evaluate(logs, [Candidate.chimera(x) for x in lams], n_boot=1000, seed=0)
    assert rep.replay == 1.0  # the logged weights re-choose every greedy call
    for lam, c in zip(lams, rep.candidates):
        v = true_value(logs, truth, lam, 2)
        for name in ("ips", "snips", "dr", "dr_additive"):
            est = getattr(c, name)
            assert est.covers(v), (lam, name, est, v)
            assert est.high - est.low < 0.15, (lam, name, est)
        assert c.mean_weight.covers(1.0), (lam, c.mean_weight)  # E[W] = 1 under correct propensities
        assert 0 < c.ess < logs.n and c.share_positive == 1.0  # ε > 0: every workflow has weight
    # the estimates tell the candidates apart: the value falls with λ here, and so do the DR estimates
    assert [round(true_value(logs, truth, x, 2), 3) for x in lams] == sorted(
        [round(true_value(logs, truth, x, 2), 3) for x in lams], reverse=True)
    assert rep.candidates[0].dr.value > rep.candidates[-1].dr.value


def test_the_dr_interval_is_narrower_with_a_good_reward_model():
    lam = 0.15
    good, _ = logged_bandit(4000, lam=0.05, eps=0.3, seed=2, calls=1, confidence="noisy", coin=False)
    flat, _ = logged_bandit(4000, lam=0.05, eps=0.3, seed=2, calls=1, confidence="flat", coin=False)
    width = [(lambda e: e.high - e.low)(evaluate(x, [Candidate.chimera(lam)], n_boot=500).candidates[0].dr)
             for x in (good, flat)]
    assert width[0] < 0.8 * width[1]


def test_the_additive_estimator_wastes_fewer_workflows_when_they_have_many_calls():
    logs, truth = logged_bandit(3000, lam=0.05, eps=0.2, seed=7, calls=5)
    [c] = evaluate(logs, [Candidate.chimera(0.15)], n_boot=500).candidates
    v = true_value(logs, truth, 0.15, 5)
    assert c.ess_additive > 1.5 * c.ess
    assert c.dr_additive.covers(v) and c.dr.covers(v)
    assert c.dr_additive.high - c.dr_additive.low < c.dr.high - c.dr.low


def test_the_logging_policy_itself_is_its_own_mean():
    logs, _ = logged_bandit(500, lam=0.05, eps=0.2, seed=3)
    rep = evaluate(logs, [Candidate("logged"), Candidate.chimera(0.05)], n_boot=200)
    for c in rep.candidates:
        assert c.ips.value == pytest.approx(logs.reward.mean()) and c.snips.value == pytest.approx(logs.reward.mean())
        assert c.dr.covers(logs.reward.mean()) and c.ess == pytest.approx(logs.n)  # DR: the same in expectation
    assert rep.logged.value == pytest.approx(logs.reward.mean()) and rep.logged.covers(logs.reward.mean())


def test_without_exploration_a_disagreeing_policy_gets_no_weight():
    logs, _ = logged_bandit(300, lam=0.05, eps=0.0, seed=4)
    [c] = evaluate(logs, [Candidate.chimera(5.0)], n_boot=100).candidates
    assert c.share_positive < 0.5 and c.agreement < 1.0  # W = 0 wherever the candidate chose otherwise


def test_forced_calls_weigh_one():
    """A call without terms (pinned by the client, a retry) is taken by both policies: its ratio is 1."""
    logs, _ = logged_bandit(200, lam=0.05, eps=0.2, seed=5, calls=1)
    forced = LoggedCalls(**{**vars(logs), "routed": np.zeros(len(logs.chosen), dtype=bool),
                            "propensity": np.ones(len(logs.chosen))})
    [c] = evaluate(forced, [Candidate.chimera(3.0)], n_boot=50).candidates
    assert c.ips.value == pytest.approx(logs.reward.mean()) and c.ess == pytest.approx(logs.n)


def test_segment_cumprod_matches_a_loop_and_keeps_zeros():
    rng = np.random.default_rng(0)
    group = np.sort(rng.integers(0, 40, 200))
    ratio = rng.uniform(0.0, 30.0, 200)
    ratio[rng.random(200) < 0.1] = 0.0
    got = _segment_cumprod(ratio, group)
    want = np.concatenate([np.cumprod(ratio[group == g]) for g in np.unique(group)])
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert np.all(got[want == 0] == 0)


def test_bad_logs_and_candidates_are_refused():
    logs, _ = logged_bandit(20, lam=0.05, eps=0.2, seed=6)
    with pytest.raises(ValueError, match="propensity"):
        LoggedCalls(**{**vars(logs), "propensity": np.zeros(len(logs.chosen))})
    with pytest.raises(ValueError, match="grouped by workflow"):
        LoggedCalls(**{**vars(logs), "workflow": logs.workflow[::-1].copy()})
    with pytest.raises(ValueError, match=r"no terms for scorer\(s\) \['prefill'\]"):
        evaluate(logs, [Candidate("x", {"prefill": 1.0})])
    with pytest.raises(ValueError, match="n_boot"):
        evaluate(logs, [Candidate.chimera(0.1)], n_boot=1)
