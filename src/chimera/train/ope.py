"""Off-policy evaluation: what a candidate scorer-weighted policy (another λ) would have scored on logged traffic.

The logs are the routing decisions of scored workflows: per call the chosen model, the probability the logging
policy had of choosing it (its propensity), the exploration probability in force (ε), and the unweighted scorer
terms the routing used (per scorer, per model). A candidate keeps the terms and changes the weights; its choice at a
call is ε-greedy around its own argmax with the LOGGED ε, exploring uniformly over the K models present in the
terms: π'(a) = (1 − ε)·[a = argmax'] + ε/K. A call without terms (pinned by the client, or a retry) is forced: both
policies take the logged model.

Estimators, per workflow i with calls t = 1..T and score R (W_{1:t} = Π_{s≤t} π'(a_s)/p_s, W = W_{1:T}):
- IPS = mean W·R; SNIPS = Σ W·R / Σ W.
- DR (per-decision, terminal reward): DR_i = W·R − (1/T) Σ_t [W_{1:t}·q_t(a_t) − W_{1:t−1}·V_t] with the reward
  model q_t(a) = the logged confidence of model a at call t and V_t = Σ_a π'(a)·q_t(a). Each bracket has mean zero
  under the logging policy whatever q is, so DR is unbiased where IPS is; for one-call workflows it is the usual
  V + W·(R − q(a)). The estimate is the mean of DR_i.
- DR, additive (the pseudo-inverse estimator of slate evaluation, Swaminathan et al. 2017, with the same reward
  model): DRA_i = (1/T) Σ_t V_t + (Σ_t ρ_t − T + 1)·(R − (1/T) Σ_t q_t(a_t)), ρ_t = π'(a_t)/p_t. It assumes the
  workflow's score adds up over its calls (the simulator's default quality rule: Σ stage share × the stage model's
  score) and that a call's choice barely changes what later calls see; then it is unbiased with single-call ratios
  instead of their product, so far fewer workflows are wasted when a workflow has many calls. Where the score does not
  add up (a last-stage or minimum rule), trust DR.
Intervals: percentile bootstrap over workflows (`n_boot` resamples, seeded), the same resamples for every estimator.

What this cannot see: the candidate's effect on the load its own calls meet (the latency terms are the logged run's)
and on what an online learner would have learnt from its own choices; both are biases no interval covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

_BOOT_CELLS = 4_000_000  # resample indices held at once (n_boot × workflows), so memory stays bounded


@dataclass(frozen=True)
class LoggedCalls:
    """The logged decisions of n scored workflows, one row per call, grouped by workflow in call order."""

    models: list[str]  # column order of `terms` and `confidence`
    workflow_ids: list[str]
    reward: np.ndarray  # (n,) the workflows' scores in [0, 1]
    workflow: np.ndarray  # (c,) index of each call's workflow, non-decreasing
    chosen: np.ndarray  # (c,) column of the model the call ran on
    propensity: np.ndarray  # (c,) the logging policy's probability of that choice, in (0, 1]
    epsilon: np.ndarray  # (c,) exploration probability in force
    explored: np.ndarray  # (c,) bool: the exploration coin said explore
    terms: Mapping[str, np.ndarray]  # scorer -> (c, M) unweighted values, NaN where a model was not allowed
    weights: Mapping[str, np.ndarray]  # scorer -> (c,) the logged weight
    routed: np.ndarray  # (c,) bool: the call was routed (has terms); False: forced (pinned)
    confidence: np.ndarray  # (c, M) the reward model q, NaN where unknown
    prompts: Sequence[tuple[str, str]] | None = None  # (c,) each call's (kind, prompt), where the logs have them
    tokens: np.ndarray | None = None  # (c,) each call's output tokens, where the logs have them

    def __post_init__(self) -> None:
        c, m = len(self.chosen), len(self.models)
        for name in ("workflow", "propensity", "epsilon", "explored", "routed", "prompts", "tokens"):
            rows = getattr(self, name)
            if rows is not None and len(rows) != c:
                raise ValueError(f"LoggedCalls.{name} has {len(rows)} rows for {c} calls")
        if self.confidence.shape != (c, m) or any(v.shape != (c, m) for v in self.terms.values()):
            raise ValueError(f"terms and confidence must be ({c}, {m})")
        if c and (np.any(np.diff(self.workflow) < 0) or self.workflow[0] != 0
                  or self.workflow[-1] != len(self.reward) - 1 or np.any(np.diff(self.workflow) > 1)):
            raise ValueError("calls must be grouped by workflow, in workflow order, every workflow with a call")
        if not np.all((self.propensity > 0) & (self.propensity <= 1)):
            raise ValueError("every propensity must lie in (0, 1]")

    @property
    def n(self) -> int:
        return len(self.reward)


@dataclass(frozen=True)
class Candidate:
    """A policy with the logged scorer terms and other weights: `weights` override the logged ones by scorer name
    (chimera at λ: {"expected_latency": -λ}); empty = the logging policy's own weights."""

    label: str
    weights: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def chimera(cls, lam: float) -> "Candidate":
        return cls(f"chimera λ={lam:g}", {"expected_latency": -float(lam)})


@dataclass
class Estimate:
    value: float
    low: float
    high: float

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass
class CandidateReport:
    """One candidate's estimates and how far the logs support it."""

    label: str
    weights: dict[str, float]
    ips: Estimate
    snips: Estimate
    dr: Estimate
    dr_additive: Estimate
    mean_weight: Estimate  # E[W] is 1 under correct propensities: far from 1 flags a mismatch
    ess: float  # (Σ W)² / Σ W²: how many workflows the trajectory estimates are worth
    ess_additive: float  # the same of the additive estimator's factor Σ ρ_t − T + 1
    share_positive: float  # workflows whose every call the candidate could have made (W > 0)
    agreement: float  # routed calls where the candidate's greedy choice is the logged model


@dataclass
class OPEReport:
    n_workflows: int
    n_calls: int
    level: float
    n_boot: int
    logged: Estimate  # the logging policy's own value (the on-policy mean)
    replay: float  # routed, not explored calls whose logged weights' argmax is the logged model (sanity: ≈ 1)
    candidates: list[CandidateReport]

    def as_dict(self) -> dict[str, Any]:
        def est(e: Estimate) -> dict[str, float]:
            return {"value": e.value, "low": e.low, "high": e.high}

        return {"workflows": self.n_workflows, "calls": self.n_calls, "level": self.level, "n_boot": self.n_boot,
                "interval": "percentile bootstrap over workflows", "logged": est(self.logged), "replay": self.replay,
                "candidates": [{"label": c.label, "weights": c.weights, "ips": est(c.ips), "snips": est(c.snips),
                                "dr": est(c.dr), "dr_additive": est(c.dr_additive),
                                "mean_weight": est(c.mean_weight), "ess": c.ess, "ess_additive": c.ess_additive,
                                "share_positive": c.share_positive, "agreement": c.agreement}
                               for c in self.candidates]}


def _values(logged: LoggedCalls, override: Mapping[str, float]) -> np.ndarray:
    """(c, M) Σ weight·term per call and model (override, else the logged weight); -inf where not allowed."""
    unknown = sorted(set(override) - set(logged.terms))
    if unknown:
        raise ValueError(f"the logs have no terms for scorer(s) {unknown}; logged: {sorted(logged.terms)}")
    total = np.zeros_like(logged.confidence)
    for name, term in logged.terms.items():
        w = override.get(name)
        total = total + (logged.weights[name][:, None] if w is None else w) * term
    return np.where(np.isnan(total), -np.inf, total)


def greedy_choices(logged: LoggedCalls, override: Mapping[str, float]) -> np.ndarray:
    """The candidate's argmax per call; a forced call keeps the logged model."""
    return np.where(logged.routed, _values(logged, override).argmax(axis=1), logged.chosen)


def target_probabilities(logged: LoggedCalls, greedy: np.ndarray) -> np.ndarray:
    """(c, M) π'(a) = (1 − ε)·[a = greedy] + ε/K over the K models present in the terms; forced: one-hot."""
    c, m = logged.confidence.shape
    present = np.zeros((c, m), dtype=bool)
    for term in logged.terms.values():
        present |= ~np.isnan(term)
    present[~logged.routed] = False
    k = np.maximum(present.sum(axis=1), 1)
    eps = np.where(logged.routed, logged.epsilon, 0.0)
    pi = np.where(present, (eps / k)[:, None], 0.0)
    pi[np.arange(c), greedy] += 1.0 - eps
    return pi


def _segment_cumprod(ratio: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Cumulative product of `ratio` within each group (rows grouped, in order), through sums of logs; a zero
    ratio makes the rest of its group exactly zero."""
    pos = ratio > 0
    logs = np.where(pos, np.log(np.where(pos, ratio, 1.0)), 0.0)
    zeros = (~pos).astype(np.int64)
    cum_logs, cum_zeros = np.cumsum(logs), np.cumsum(zeros)
    first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])  # each group's first row
    first = np.repeat(first, np.diff(np.r_[first, len(group)]))  # ... for every row
    before_logs, before_zeros = cum_logs[first] - logs[first], cum_zeros[first] - zeros[first]
    return np.where(cum_zeros > before_zeros, 0.0, np.exp(cum_logs - before_logs))


class PerWorkflow(NamedTuple):
    """A candidate's per-workflow quantities; every estimate is a mean (or ratio of sums) of these."""

    w: np.ndarray  # importance weight W
    wr: np.ndarray  # W·R
    dr: np.ndarray  # the DR term
    factor: np.ndarray  # Σ_t ρ_t − T + 1 (the additive estimator's weight)
    dr_additive: np.ndarray  # the additive DR term


def workflow_terms(logged: LoggedCalls, candidate: Candidate, baseline: float) -> PerWorkflow:
    """Per workflow: W, W·R, DR, the additive factor and DR; `baseline` stands in for unknown confidences."""
    greedy = greedy_choices(logged, candidate.weights)
    pi = target_probabilities(logged, greedy)
    rows = np.arange(len(logged.chosen))
    ratio = pi[rows, logged.chosen] / logged.propensity
    cum = _segment_cumprod(ratio, logged.workflow)  # W_{1:t}
    prev = np.where(np.r_[True, logged.workflow[1:] != logged.workflow[:-1]], 1.0, np.r_[1.0, cum[:-1]])
    q = np.where(np.isnan(logged.confidence), baseline, logged.confidence)
    v = (pi * q).sum(axis=1)  # V_t under the candidate
    qa = q[rows, logged.chosen]
    n = logged.n
    calls = np.bincount(logged.workflow, minlength=n)

    def per_wf(x: np.ndarray) -> np.ndarray:
        return np.bincount(logged.workflow, weights=x, minlength=n)

    w = cum[np.cumsum(calls) - 1]
    wr = w * logged.reward
    dr = wr - per_wf(cum * qa - prev * v) / calls
    factor = per_wf(ratio) - calls + 1
    dr_additive = per_wf(v) / calls + factor * (logged.reward - per_wf(qa) / calls)
    return PerWorkflow(w, wr, dr, factor, dr_additive)


def _ess(w: np.ndarray) -> float:
    sw2 = float((w * w).sum())
    return float(w.sum()) ** 2 / sw2 if sw2 > 0 else 0.0


class Bootstrap:
    """The same resamples of workflows for every statistic: sums of per-workflow values over each resample."""

    def __init__(self, n: int, n_boot: int, seed: int) -> None:
        self.n, self.n_boot, self.seed = n, n_boot, seed

    def sums(self, *columns: np.ndarray) -> list[np.ndarray]:
        """For each column, (n_boot,) its sum over each resample."""
        rng = np.random.default_rng(self.seed)
        out = [np.empty(self.n_boot) for _ in columns]
        chunk = max(1, _BOOT_CELLS // max(self.n, 1))
        for b0 in range(0, self.n_boot, chunk):
            idx = rng.integers(0, self.n, size=(min(chunk, self.n_boot - b0), self.n))
            for o, col in zip(out, columns):
                o[b0:b0 + len(idx)] = col[idx].sum(axis=1)
        return out


def _interval(point: float, boots: np.ndarray, level: float) -> Estimate:
    a = (1.0 - level) / 2.0
    finite = boots[np.isfinite(boots)]
    if not len(finite):
        return Estimate(point, float("nan"), float("nan"))
    lo, hi = np.quantile(finite, [a, 1.0 - a])
    return Estimate(float(point), float(lo), float(hi))


def evaluate(logged: LoggedCalls, candidates: Sequence[Candidate], n_boot: int = 2000, seed: int = 0,
             level: float = 0.95) -> OPEReport:
    """Estimate every candidate's mean workflow score on the logged traffic (IPS, SNIPS, DR) with bootstrap
    intervals, beside the logging policy's own mean."""
    if logged.n == 0:
        raise ValueError("no logged workflows to evaluate on")
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n, r = logged.n, logged.reward
    boot = Bootstrap(n, n_boot, seed)
    (r_sum,) = boot.sums(r)
    baseline = float(r.mean())
    replay_rows = logged.routed & ~logged.explored
    logged_greedy = greedy_choices(logged, {})
    replay = float((logged_greedy[replay_rows] == logged.chosen[replay_rows]).mean()) if replay_rows.any() else 1.0
    reports = []
    for cand in candidates:
        t = workflow_terms(logged, cand, baseline)
        greedy = greedy_choices(logged, cand.weights)
        w_s, wr_s, dr_s, dra_s = boot.sums(t.w, t.wr, t.dr, t.dr_additive)
        with np.errstate(invalid="ignore", divide="ignore"):
            snips_b = wr_s / w_s
        sw = float(t.w.sum())
        reports.append(CandidateReport(
            label=cand.label, weights=dict(cand.weights),
            ips=_interval(t.wr.mean(), wr_s / n, level),
            snips=_interval(t.wr.sum() / sw if sw > 0 else float("nan"), snips_b, level),
            dr=_interval(t.dr.mean(), dr_s / n, level),
            dr_additive=_interval(t.dr_additive.mean(), dra_s / n, level),
            mean_weight=_interval(t.w.mean(), w_s / n, level),
            ess=_ess(t.w), ess_additive=_ess(t.factor),
            share_positive=float((t.w > 0).mean()),
            agreement=float((greedy[logged.routed] == logged.chosen[logged.routed]).mean())
            if logged.routed.any() else 1.0,
        ))
    return OPEReport(n_workflows=n, n_calls=len(logged.chosen), level=level, n_boot=n_boot,
                     logged=_interval(baseline, r_sum / n, level), replay=replay, candidates=reports)
