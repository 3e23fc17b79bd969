"""Doubly robust with a replayed candidate: what another λ would score, when its own load and learning change what
it decides.

The plain estimators (chimera.train.ope) recompute a candidate's choice from the logged scorer terms: the latency
terms the *logged* λ caused and the confidences the *logged* run's learner had. A candidate that routes differently
meets another load and learns from other choices, and that bias grows with the distance and with the log. Here the
candidate's decisions come from replays instead: it runs again on the logged workflows and arrivals in a world
model (the simulator) whose quality per (prompt, model) is a reward model fit on the logged scores, and its
probabilities of each model at each logged call are read from those replays.

Per workflow i (calls t = 1..T; s_t the call's share of the workflow's output tokens: a trace knows a workflow's
score, not how it splits, and the calls that write more carry more of the answer):
- reward model q_i(a): per prompt, a ridge fit of the logged workflow scores on the share of each model in them,
  pulled toward a prior row (the logged run's learner refit on the logs, shifted per model by its mean error on the
  pairs the logs saw once) with strength κ; `full` uses every workflow of the prompt, `loo` leaves workflow i out (so
  i's residual is honest: cross-fitting).
- direct term DM_i = Σ_t s_t Σ_a π'_t(a)·q_i^loo(a), π'_t the candidate's probabilities at call t, averaged over the
  replays;
- correction (the additive DR of chimera.train.ope with the replays' π'): f_i·(R_i − Σ_t s_t q_i^loo(a_t)),
  f_i = Σ_t ρ_t − T + 1, ρ_t = π'_t(a_t)/p_t: it removes the reward model's error under the candidate's choices, in
  expectation, whatever the reward model (the "doubly" of doubly robust).
The estimate is the mean of DM_i + correction_i. Interval: normal, its variance the bootstrap variance over
workflows plus the variance between replays (each replay a plausible world: quality drawn per (prompt, model) from
the reward model, and the candidate's learning and load following from it), so the spread of one run is in it.

What it assumes: the world model's load and timing are right (the simulator's engine model and the lengths rebuilt
from the logs, chimera.train.ope_world), a prompt's quality on a model does not change with load, the score adds up over a workflow's calls (as
for the additive DR), and a call's choice barely changes what later calls of its workflow see. Its variance is the
additive DR's: a few explored workflows carry large ratios (≈ K/ε), so a candidate far from the logged λ is noisy.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple, Sequence

import numpy as np

from chimera.train.ope import Bootstrap, Estimate, LoggedCalls, greedy_choices, target_probabilities


class RewardTables(NamedTuple):
    """(n, M) per workflow and model: `full` fit on every workflow of its prompt, `loo` on the others."""

    full: np.ndarray
    loo: np.ndarray


def call_shares(logged: LoggedCalls) -> np.ndarray:
    """(c,) each call's share of its workflow's score: its share of the workflow's output tokens (the calls that
    write more carry more of the answer), 1/T in a workflow whose tokens are not all logged or sum to 0."""
    wf, n = logged.workflow, logged.n
    equal = 1.0 / np.bincount(wf, minlength=n)[wf]
    if logged.tokens is None:
        return equal
    tok = np.nan_to_num(logged.tokens, nan=-1.0)
    total = np.bincount(wf, weights=np.maximum(tok, 0.0), minlength=n)[wf]
    bad = np.bincount(wf, weights=(tok < 0).astype(float), minlength=n)[wf] > 0
    return np.where(bad | (total <= 0), equal, np.maximum(tok, 0.0) / np.where(total > 0, total, 1.0))


def _usage(logged: LoggedCalls, shares: np.ndarray) -> np.ndarray:
    """(n, M) the share of each model in each workflow."""
    x = np.zeros((logged.n, len(logged.models)))
    np.add.at(x, (logged.workflow, logged.chosen), shares)
    return x


def _fit(x: np.ndarray, reward: np.ndarray, groups: dict[str, list[int]], prior: np.ndarray,
         kappa: float) -> RewardTables:
    n, m = x.shape
    full, loo = np.empty((n, m)), np.empty((n, m))
    eye = kappa * np.eye(m)
    for idx in groups.values():
        xs, r = x[idx], reward[idx]
        a = eye + xs.T @ xs
        b = kappa * prior[idx[0]] + xs.T @ r
        full[idx] = np.linalg.solve(a, b)
        for i, xi, ri in zip(idx, xs, r):
            loo[i] = np.linalg.solve(a - np.outer(xi, xi), b - xi * ri)
    return RewardTables(np.clip(full, 0.0, 1.0), np.clip(loo, 0.0, 1.0))


def reward_tables(logged: LoggedCalls, keys: Sequence[str], prior: np.ndarray, kappa: float = 0.2,
                  calibrate: bool = True) -> RewardTables:
    """Per prompt `keys[i]`: the ridge solution of score ≈ usage·q toward the prior row (κ·I), clipped to [0, 1];
    with one workflow that ran one model, q(model) = (R + κ·prior)/(1 + κ).

    `calibrate`: the prior is first shifted per model by its mean error where it stood alone, measured on the
    workflows whose prompt ran that model nowhere else (their leave-one-out residual, regressed on those models'
    shares): the learner's guess for a pair the logs never saw is off the way it was off for the pairs they saw once."""
    n, m = logged.n, len(logged.models)
    if len(keys) != n or prior.shape != (n, m):
        raise ValueError(f"keys and prior must have one entry per workflow ({n}), prior ({n}, {m})")
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    shares = call_shares(logged)
    x = _usage(logged, shares)
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    tables = _fit(x, logged.reward, groups, prior, kappa)
    if not calibrate:
        return tables
    used = x > 0
    lone = np.zeros((n, m))
    for idx in groups.values():
        others = used[idx].sum(axis=0) - used[idx]  # per workflow: how many other workflows of the prompt ran each
        lone[idx] = np.where(others == 0, x[idx], 0.0)
    rows = lone.sum(axis=1) > 0
    if not rows.any():
        return tables
    wf, chosen = logged.workflow, logged.chosen
    resid = logged.reward - np.bincount(wf, weights=shares * tables.loo[wf, chosen], minlength=n)
    z = lone[rows]
    offset = np.linalg.solve(z.T @ z + 1e-3 * np.eye(m), z.T @ resid[rows])
    return _fit(x, logged.reward, groups, np.clip(prior + offset, 0.0, 1.0), kappa)


def replay_probabilities(logged: LoggedCalls, replayed: LoggedCalls) -> np.ndarray:
    """(c, M) the replayed candidate's probability of each model (in `logged.models` order) at each logged call: the
    replay's own ε-greedy distribution at its call of the same workflow and position. The replay must have decided
    the same workflows with the same number of calls each."""
    if replayed.workflow_ids != logged.workflow_ids or not np.array_equal(replayed.workflow, logged.workflow):
        raise ValueError("the replay did not decide the same workflows with the same calls as the logs "
                         f"({replayed.n} workflows / {len(replayed.chosen)} calls against {logged.n} / "
                         f"{len(logged.chosen)})")
    missing = [m for m in logged.models if m not in replayed.models]
    pi = target_probabilities(replayed, greedy_choices(replayed, {}))
    out = np.zeros((len(logged.chosen), len(logged.models)))
    for j, name in enumerate(logged.models):
        if name not in missing:
            out[:, j] = pi[:, replayed.models.index(name)]
    return out


@dataclass
class ReplayedEstimate:
    """The estimate with its parts: the direct term, the correction, the support and the spread between replays."""

    estimate: Estimate
    direct: float  # mean DM_i
    correction: float  # mean correction
    ess: float  # (Σ f)² / Σ f² of the correction's factors (first replay): workflows' worth of support
    replay_sd: float  # standard deviation of the estimate between replays
    replays: int

    def as_dict(self) -> dict:
        e = self.estimate
        return {"value": e.value, "low": e.low, "high": e.high, "direct": self.direct, "correction": self.correction,
                "ess": self.ess, "replay_sd": self.replay_sd, "replays": self.replays}


def replayed_dr(logged: LoggedCalls, tables: RewardTables, replays: Sequence[np.ndarray], n_boot: int = 2000,
                seed: int = 0, level: float = 0.95) -> ReplayedEstimate:
    """The candidate's mean workflow score from its replays' probabilities (`replay_probabilities`, one (c, M) per
    replay) and the reward tables, with its interval (module docstring)."""
    if not replays:
        raise ValueError("at least one replay is needed")
    c = len(logged.chosen)
    if any(p.shape != (c, len(logged.models)) for p in replays):
        raise ValueError(f"every replay's probabilities must be ({c}, {len(logged.models)})")
    n, rows, wf = logged.n, np.arange(c), logged.workflow
    shares = call_shares(logged)
    calls = np.bincount(wf, minlength=n)
    q = tables.loo[wf]  # (c, M) each call's workflow's row
    resid = logged.reward - np.bincount(wf, weights=shares * q[rows, logged.chosen], minlength=n)
    direct, corr = np.zeros(n), np.zeros(n)
    between, ess = [], 0.0
    for k, pi in enumerate(replays):
        d = np.bincount(wf, weights=shares * (pi * q).sum(axis=1), minlength=n)
        factor = np.bincount(wf, weights=pi[rows, logged.chosen] / logged.propensity, minlength=n) - calls + 1
        x = factor * resid
        direct, corr = direct + d / len(replays), corr + x / len(replays)
        between.append(float((d + x).mean()))
        if k == 0:
            ff = float((factor * factor).sum())
            ess = float(factor.sum()) ** 2 / ff if ff > 0 else 0.0
    per_wf = direct + corr
    value = float(per_wf.mean())
    replay_sd = float(np.std(between, ddof=1)) if len(between) > 1 else 0.0
    (sums,) = Bootstrap(n, n_boot, seed).sums(per_wf)
    se = float(np.sqrt(np.var(sums / n) + replay_sd ** 2))
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    return ReplayedEstimate(Estimate(value, value - z * se, value + z * se), float(direct.mean()), float(corr.mean()),
                            ess, replay_sd, len(replays))
