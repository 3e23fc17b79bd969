"""The replayed DR (chimera.train.ope_replay): per-prompt reward tables, score shares, the estimator on logged bandits
whose true value is known, and the replay's world (chimera.bench.ope_replays) built from the logs alone."""

from __future__ import annotations

import numpy as np
import pytest

from chimera.perfmodel.profiles import default_cluster
from chimera.predict.assembly import resolve_predictions
from chimera.sim.experiment import prepare
from chimera.train.ope import LoggedCalls
from chimera.train.ope_replay import call_shares, replay_probabilities, replayed_dr, reward_tables
from chimera.workload.synthetic import generate

MODELS = ["small", "mid", "large"]


def logs(chosen, workflow, reward, propensity=None, tokens=None, ids=None) -> LoggedCalls:
    c = len(chosen)
    n = int(max(workflow)) + 1
    nan = np.full((c, 3), np.nan)
    return LoggedCalls(
        models=MODELS, workflow_ids=ids or [f"wf-{i}" for i in range(n)], reward=np.asarray(reward, dtype=float),
        workflow=np.asarray(workflow), chosen=np.asarray(chosen),
        propensity=np.ones(c) if propensity is None else np.asarray(propensity, dtype=float),
        epsilon=np.zeros(c), explored=np.zeros(c, dtype=bool), terms={"confidence_share": np.zeros((c, 3))},
        weights={"confidence_share": np.ones(c)}, routed=np.ones(c, dtype=bool), confidence=nan,
        tokens=None if tokens is None else np.asarray(tokens, dtype=float))


def test_reward_tables_learn_each_prompts_scores_and_leave_the_workflow_out():
    # prompt p: three one-call workflows on small scoring 1, one on mid scoring 0; prompt q: one on large scoring 1
    lg = logs(chosen=[0, 0, 0, 1, 2], workflow=[0, 1, 2, 3, 4], reward=[1, 1, 1, 0, 1])
    prior = np.full((5, 3), 0.5)
    t = reward_tables(lg, ["p", "p", "p", "p", "q"], prior, kappa=0.2, calibrate=False)
    assert t.full[0] == pytest.approx([3.1 / 3.2, 0.1 / 1.2, 0.5])  # (Σ score + κ·prior) / (count + κ); unseen: prior
    assert t.loo[0] == pytest.approx([2.1 / 2.2, 0.1 / 1.2, 0.5])  # its own workflow left out
    assert t.loo[3][1] == pytest.approx(0.5)  # mid on p was seen only by workflow 3: left out, the prior stands
    assert t.full[4] == pytest.approx([0.5, 0.5, 1.1 / 1.2]) and t.loo[4] == pytest.approx([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="kappa must be > 0"):
        reward_tables(lg, ["p"] * 5, prior, kappa=0.0)
    with pytest.raises(ValueError, match="one entry per workflow"):
        reward_tables(lg, ["p"] * 4, prior)


def test_the_prior_is_calibrated_on_the_pairs_the_logs_saw_once():
    """Per prompt: two workflows on small (1 each), one on mid (scoring 20% over the prompts); the prior says 0.5.
    Where mid stood alone the prior was 0.3 too high, so a pair nobody saw is guessed 0.3 lower; large never ran."""
    rng = np.random.default_rng(0)
    k = 400
    wins = (rng.random(k) < 0.2).astype(float)
    lg = logs(chosen=[0, 0, 1] * k, workflow=list(range(3 * k)), reward=np.ravel([[1, 1, w] for w in wins]))
    keys = [f"p{i // 3}" for i in range(3 * k)]
    t = reward_tables(lg, keys, np.full((3 * k, 3), 0.5))
    mid_rows = np.arange(2, 3 * k, 3)
    assert t.loo[mid_rows, 1] == pytest.approx(np.full(k, 0.5 + wins.mean() - 0.5), abs=0.01)  # calibrated guess
    assert t.loo[0, 0] == pytest.approx(1.1 / 1.2, abs=0.01)  # a pair seen elsewhere: its score, as before
    assert t.full[0, 2] == pytest.approx(0.5, abs=0.01)  # never ran, never seen alone: the prior
    raw = reward_tables(lg, keys, np.full((3 * k, 3), 0.5), calibrate=False)
    assert raw.loo[mid_rows, 1] == pytest.approx(np.full(k, 0.5))


def test_a_calls_share_is_its_share_of_the_workflows_output_tokens():
    kw = dict(chosen=[0, 1, 0, 1, 2, 2], workflow=[0, 0, 1, 1, 2, 2], reward=[1, 0, 1])
    assert call_shares(logs(**kw, tokens=[30, 10, 5, np.nan, 0, 0])) == pytest.approx(
        [0.75, 0.25, 0.5, 0.5, 0.5, 0.5])  # a missing count or a zero total: equal shares
    assert call_shares(logs(**kw)) == pytest.approx([0.5] * 6)  # no tokens logged


def logged_bandit(n: int, eps: float, seed: int, prompts: int = 60):
    """n two-call workflows over `prompts` prompts, each prompt with a true accuracy per model; routed ε-greedily
    by a noisy confidence; a call earns a 0/1 outcome, the workflow the tokens-weighted mean of its calls'."""
    rng = np.random.default_rng(seed)
    acc = rng.uniform(0.1, 0.9, (prompts, 3))
    key = rng.integers(0, prompts, n)
    c = 2 * n
    wf = np.repeat(np.arange(n), 2)
    conf = np.clip(acc[key[wf]] + rng.normal(0, 0.15, (c, 3)), 0, 1)
    greedy = conf.argmax(axis=1)
    explored = rng.random(c) < eps
    chosen = np.where(explored, rng.integers(0, 3, c), greedy)
    propensity = (1 - eps) * (chosen == greedy) + eps / 3
    tokens = rng.integers(20, 200, c).astype(float)
    share = tokens / np.bincount(wf, weights=tokens)[wf]
    outcome = rng.random(c) < acc[key[wf], chosen]
    reward = np.bincount(wf, weights=share * outcome)
    return logs(chosen, wf, reward, propensity, tokens), [f"p{k}" for k in key], acc[key[wf]], share


def test_the_replayed_dr_covers_the_candidates_value_even_with_a_wrong_prior():
    """A candidate that prefers the large model (ε 0.2 around it); its exact value follows from the true accuracies.
    Prompts rarely repeat here, so the reward model is mostly its prior, and the prior is far off (0.9 everywhere):
    the direct term alone is biased; the correction removes it."""
    lg, keys, truth, share = logged_bandit(6000, eps=0.3, seed=3, prompts=20_000)
    pi = np.full((len(lg.chosen), 3), 0.2 / 3)
    pi[:, 2] += 0.8
    value = float(np.bincount(lg.workflow, weights=share * (pi * truth).sum(axis=1)).mean())
    tables = reward_tables(lg, keys, np.full((lg.n, 3), 0.9))
    est = replayed_dr(lg, tables, [pi, pi], n_boot=500, seed=0)
    assert est.estimate.covers(value), (est, value)
    assert abs(est.direct - value) > 0.03  # the prior is wrong where a prompt never ran a model ...
    assert abs(est.estimate.value - value) < 0.02  # ... and the correction takes that out
    assert est.replay_sd == 0.0 and est.replays == 2 and 0 < est.ess < lg.n
    # replays that differ: the estimate is their mean, and their spread is in the interval
    other = np.full_like(pi, 1 / 3)
    both = replayed_dr(lg, tables, [pi, other], n_boot=500, seed=0)
    each = [replayed_dr(lg, tables, [p], n_boot=500, seed=0).estimate.value for p in (pi, other)]
    assert both.estimate.value == pytest.approx(np.mean(each))
    assert both.replay_sd == pytest.approx(np.std(each, ddof=1)) and both.replay_sd > 0
    assert both.estimate.high - both.estimate.value >= 1.95 * both.replay_sd
    with pytest.raises(ValueError, match="at least one replay"):
        replayed_dr(lg, tables, [])
    with pytest.raises(ValueError, match="every replay's probabilities must be"):
        replayed_dr(lg, tables, [pi[:-1]])


def test_replay_probabilities_are_the_replays_own_and_refuse_other_workflows():
    lg = logs(chosen=[0, 2], workflow=[0, 1], reward=[1, 0])
    rep = LoggedCalls(models=["large", "small", "mid"], workflow_ids=lg.workflow_ids, reward=lg.reward,
                      workflow=lg.workflow, chosen=np.array([0, 1]), propensity=np.array([0.9, 0.9]),
                      epsilon=np.array([0.3, 0.0]), explored=np.zeros(2, dtype=bool),
                      terms={"confidence_share": np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.2]])},
                      weights={"confidence_share": np.ones(2)}, routed=np.ones(2, dtype=bool),
                      confidence=np.full((2, 3), np.nan))
    pi = replay_probabilities(lg, rep)  # in the logs' model order: small, mid, large
    assert pi[0] == pytest.approx([0.1, 0.1, 0.8]) and pi[1] == pytest.approx([1.0, 0.0, 0.0])
    moved = LoggedCalls(**{**rep.__dict__, "workflow_ids": ["wf-0", "wf-9"]})
    with pytest.raises(ValueError, match="did not decide the same workflows"):
        replay_probabilities(lg, moved)


def test_the_replays_world_comes_from_the_logs():
    """The prior is the runs' learner taught the logged scores; a replay's world draws 0/1 quality from the tables."""
    from chimera.bench.ope_replays import draw_world, refit_prior

    prep = prepare(generate(40, seed=0), default_cluster(), seed=0)
    wfs = prep.workflows(20, 0)
    names = prep.names
    n = len(wfs)
    best = names[0]
    lg = LoggedCalls(
        models=list(names), workflow_ids=[w for w, _, _ in wfs], reward=np.ones(n), workflow=np.arange(n),
        chosen=np.zeros(n, dtype=int), propensity=np.ones(n), epsilon=np.zeros(n), explored=np.zeros(n, dtype=bool),
        terms={"confidence_share": np.zeros((n, len(names)))}, weights={"confidence_share": np.ones(n)},
        routed=np.ones(n, dtype=bool), confidence=np.full((n, len(names)), np.nan),
        prompts=[(p.kind, prompt) for _, p, prompt in wfs])
    spec, _ = resolve_predictions("online")
    cold = refit_prior(prep, spec, LoggedCalls(**{**lg.__dict__, "reward": np.zeros(n)}))[1]
    keys, warm = refit_prior(prep, spec, lg)  # every logged call on `best` scored 1
    assert np.all(warm[:, 0] > cold[:, 0]) and len(keys) == n
    tables = reward_tables(lg, keys, warm)
    world = draw_world(wfs, lg, keys, tables, np.random.default_rng(0))
    assert [w for w, _, _ in world] == lg.workflow_ids
    for (_, plan, _), (_, twin, _) in zip(wfs, world):
        assert twin.n_stages == plan.n_stages and twin.tool_s == plan.tool_s
        assert twin.score([best] * twin.n_stages) in (0.0, 1.0)
    with pytest.raises(ValueError, match="is not in the logs"):
        draw_world(wfs + [("stray", wfs[0][1], "x")], lg, keys, tables, np.random.default_rng(0))
    with pytest.raises(ValueError, match="scores must name the models"):
        wfs[0][1].with_scores({best: 1.0})


def test_the_logged_traffic_becomes_the_replays_workflows(tmp_path):
    """From the store alone: arrivals, calls, the logged model's lengths and tool times; a replay on it decides the
    same calls, so its probabilities line up with the logs."""
    from chimera.bench.ope_replays import replay_candidate
    from chimera.bench.sim_trace import SimTraceWriter
    from chimera.sim.experiment import run_policy
    from chimera.train.ope_traces import logged_calls_from_traces
    from chimera.train.ope_world import world_from_traces

    prep = prepare(generate(60, seed=1), default_cluster(), seed=1)
    wfs = prep.workflows(80, 1)
    spec, _ = resolve_predictions("online")
    db = tmp_path / "t.sqlite"
    writer = SimTraceWriter(db, "chimera")
    run_policy(prep, "chimera", rate=2.0, seed=1, lam=0.02, workflows=wfs, predictions=spec, record=writer)
    writer.close()
    lg, _ = logged_calls_from_traces(db)
    world = world_from_traces(db, lg, prep.templates, prep.rule)
    assert sorted(w for w, _, _ in world.workflows) == lg.workflow_ids
    assert world.arrivals[0] == 0.0 and world.arrivals == sorted(world.arrivals)
    truth = {w: p for w, p, _ in wfs}
    at = {w: i for i, w in enumerate(lg.workflow_ids)}
    for wid, plan, _ in world.workflows:
        rows = np.flatnonzero(lg.workflow == at[wid])
        assert plan.n_stages == len(rows) == truth[wid].n_stages
        for t, r in enumerate(rows):
            model = lg.models[lg.chosen[r]]
            assert plan.output_tokens(t, model) == max(1, int(lg.tokens[r]))  # the logged length on the logged model
        assert plan.tool_s[:-1] == pytest.approx(truth[wid].tool_s[:-1], abs=1e-6)  # tool time between calls
    # a model's length at a call of a prompt it ran elsewhere (same call, as many calls) is what it wrote there
    ran = {}
    for i, (w, (kind, prompt)) in enumerate(zip(lg.workflow_ids, (lg.prompts[j] for j in np.flatnonzero(
            np.r_[True, lg.workflow[1:] != lg.workflow[:-1]])))):
        rows = np.flatnonzero(lg.workflow == i)
        for t, r in enumerate(rows):
            ran.setdefault((prompt, lg.models[lg.chosen[r]], t, len(rows)), set()).add(w)
    plans, checked = {w: p for w, p, _ in world.workflows}, 0
    tasks_of: dict[str, set] = {}
    for w, p, pr in wfs:
        tasks_of.setdefault(pr, set()).add(p.task_id)
    for (prompt, model, t, n), ws in ran.items():
        if len(tasks_of[prompt]) > 1:  # two generated tasks with one prompt text: their lengths differ
            continue
        for w in {w for w, _, pr in wfs if pr == prompt and truth[w].n_stages == n} - ws:
            assert plans[w].output_tokens(t, model) == truth[w].output_tokens(t, model)
            checked += 1
    assert checked > 20
    keys = [f"k{i}" for i in range(lg.n)]
    tables = reward_tables(lg, keys, np.full((lg.n, len(lg.models)), 0.5))
    [pi] = replay_candidate(prep, lg, keys, tables, world, 0.05, 1, spec, 1)
    assert pi.shape == (len(lg.chosen), len(lg.models)) and np.allclose(pi.sum(axis=1), 1.0)
