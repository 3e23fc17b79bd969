"""Read a gateway trace store into the logged decisions off-policy evaluation needs (chimera.train.ope.LoggedCalls).

A workflow counts when it has a valid feedback score and every call of it carries the routing decision's
propensity. Its calls, in stage order, are its decisions: a call with scorer terms was routed (the candidate
recomputes its choice there), one without (pinned by the client, a retry) was forced. Every skip is counted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from chimera.train.from_traces import TraceStoreError, json_object, latest_scores, read_trace_store, valid_score
from chimera.train.ope import LoggedCalls

OPE_COLUMNS = ("propensity", "explored", "epsilon", "terms", "weights")
HOW_TO_LOG = ("the gateway logs every routing decision's propensity and scorer terms from this version on, when its "
              "confidence predictor explores (the `online` predictor); `chimera simulate --predictions online ... "
              "--trace DB` writes a simulated store")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Row(NamedTuple):
    """One logged decision as the builder keeps it."""

    workflow: int
    model: str
    propensity: float
    epsilon: float
    explored: bool
    terms: dict | None
    weights: dict | None
    confidences: dict
    prompt: tuple[str, str]  # (kind, prompt text)
    tokens: float  # output tokens; NaN where not logged


class _Builder:
    """Rows of accepted workflows, appended workflow by workflow; model and scorer columns grow as they appear."""

    def __init__(self) -> None:
        self.models: dict[str, int] = {}
        self.scorers: dict[str, int] = {}
        self.calls: list[_Row] = []
        self.rewards: list[float] = []
        self.ids: list[str] = []

    def call_of(self, wf: int, r: dict[str, Any]) -> _Row | None:
        """One decision row, or None when it is malformed (its terms do not match its weights or miss the model)."""
        model, p, eps = r["model"], r["propensity"], r["epsilon"]
        if not isinstance(model, str) or not _finite(p) or not 0 < p <= 1:
            return None
        terms, weights = json_object(r["terms"]), json_object(r["weights"])
        conf = json_object(r["confidences"]) or {}
        if terms is not None:
            if weights is None or set(terms) != set(weights) or not terms:
                return None
            if not all(isinstance(t, dict) and model in t and all(_finite(x) for x in t.values())
                       for t in terms.values()) or not all(_finite(w) for w in weights.values()):
                return None
        eps = float(eps) if _finite(eps) and 0 <= eps <= 1 else 0.0
        prompt = (str(r.get("kind") or ""), str(r.get("prompt") or ""))
        tokens = r.get("completion_tokens")
        tokens = float(tokens) if _finite(tokens) and tokens >= 0 else float("nan")
        return _Row(wf, model, float(p), eps, bool(r["explored"]), terms, weights, conf, prompt, tokens)

    def add(self, wid: str, score: float, calls: list[_Row]) -> None:
        for c in calls:
            for m in [*(m for t in (c.terms or {}).values() for m in t), c.model]:  # the policy's order first (ties)
                self.models.setdefault(m, len(self.models))
            for s in c.terms or {}:
                self.scorers.setdefault(s, len(self.scorers))
        self.calls += calls
        self.rewards.append(score)
        self.ids.append(wid)

    def build(self) -> LoggedCalls:
        c, m = len(self.calls), len(self.models)
        terms = {s: np.full((c, m), np.nan) for s in self.scorers}
        weights = {s: np.zeros(c) for s in self.scorers}
        conf = np.full((c, m), np.nan)
        for i, row in enumerate(self.calls):
            for s, per_model in (row.terms or {}).items():
                weights[s][i] = float(row.weights[s])  # type: ignore[index]
                for name, x in per_model.items():
                    terms[s][i, self.models[name]] = float(x)
            for name, x in row.confidences.items():
                if name in self.models and _finite(x):
                    conf[i, self.models[name]] = float(x)
        def col(name: str, dtype: Any = float) -> np.ndarray:
            return np.array([getattr(x, name) for x in self.calls], dtype=dtype)

        return LoggedCalls(
            models=list(self.models), workflow_ids=self.ids, reward=np.array(self.rewards, dtype=float),
            workflow=col("workflow", np.int64), chosen=np.array([self.models[x.model] for x in self.calls],
                                                                dtype=np.int64),
            propensity=col("propensity"), epsilon=col("epsilon"), explored=col("explored", bool), terms=terms,
            weights=weights, routed=np.array([x.terms is not None for x in self.calls], dtype=bool),
            confidence=conf, prompts=[x.prompt for x in self.calls], tokens=col("tokens"))


def logged_calls_from_traces(db_path: str | Path) -> tuple[LoggedCalls, dict[str, Any]]:
    """The scored workflows' logged decisions, and counts of what was used and skipped. Raises FileNotFoundError or
    TraceStoreError (a ValueError naming the file and what is missing, and how to get a store that has it)."""
    path = Path(db_path)

    def columns(available: set[str]) -> list[str]:
        missing = [c for c in OPE_COLUMNS if c not in available]
        if missing:
            raise TraceStoreError(f"{path}: this trace store has no {', '.join(missing)} column(s): it was written "
                                  f"before routing propensities were logged, so no policy can be evaluated from it; "
                                  f"{HOW_TO_LOG}")
        return ["workflow_id", "model", "confidences", *OPE_COLUMNS,
                *(c for c in ("kind", "prompt", "completion_tokens") if c in available)]

    traced = read_trace_store(path, columns)
    by_wf, feedback = traced.calls, latest_scores(traced.feedback)
    stats: dict[str, Any] = {"path": str(path), "workflows": len(by_wf), "calls": traced.n_calls, "used": 0,
                             "skipped_no_feedback": 0, "skipped_bad_score": 0, "skipped_no_propensity": 0,
                             "skipped_bad_row": 0, "routed_calls": 0, "forced_calls": 0, "explored_calls": 0}
    b = _Builder()
    for wid, calls in by_wf.items():
        raw = feedback.get(wid)
        score = valid_score(raw)
        if score is None:
            stats["skipped_no_feedback" if raw is None else "skipped_bad_score"] += 1
            continue
        if any(r["propensity"] is None for r in calls):
            stats["skipped_no_propensity"] += 1
            continue
        decided = [b.call_of(len(b.ids), r) for r in calls]
        if any(d is None for d in decided):
            stats["skipped_bad_row"] += 1
            continue
        b.add(wid, score, decided)  # type: ignore[arg-type]
    stats["used"] = len(b.ids)
    if not b.ids:
        raise TraceStoreError(f"{path}: {_why_empty(stats, bool(feedback))}")
    logged = b.build()
    if not logged.routed.any():
        raise TraceStoreError(f"{path}: no routed call logged its scorer terms (the policy routed without an exploring "
                              f"predictor, or every call was pinned), so no candidate's choice can be recomputed; "
                              f"{HOW_TO_LOG}")
    stats["routed_calls"] = int(logged.routed.sum())
    stats["forced_calls"] = int((~logged.routed).sum())
    stats["explored_calls"] = int(logged.explored.sum())
    stats["models"] = logged.models
    return logged, stats


def _why_empty(st: dict[str, Any], any_feedback: bool) -> str:
    if not st["workflows"]:
        return "no calls in the trace store"
    if not any_feedback:
        return ("no workflow has a feedback score: post each workflow's score to POST /v1/chimera/feedback (or "
                "write a simulated store with `chimera simulate ... --trace DB`)")
    if st["skipped_no_propensity"] and not st["skipped_bad_row"]:
        return (f"none of the {st['workflows'] - st['skipped_no_feedback'] - st['skipped_bad_score']} scored "
                f"workflows has logged propensities (calls recorded before they were logged, or by a gateway "
                f"that did not log them); {HOW_TO_LOG}")
    return (f"no usable workflow: {st['skipped_no_feedback']} without feedback, {st['skipped_bad_score']} with a "
            f"bad score, {st['skipped_no_propensity']} without propensities, {st['skipped_bad_row']} with malformed "
            "routing columns (terms without weights, or not naming the chosen model)")


def describe_logged(st: dict[str, Any]) -> str:
    """One line on what a trace store gave OPE: workflows used, skipped and why, and the calls' kinds."""
    return (f"{st['path']}: {st['used']} of {st['workflows']} traced workflows used (skipped: "
            f"{st['skipped_no_feedback']} without feedback, {st['skipped_bad_score']} with a bad score, "
            f"{st['skipped_no_propensity']} without propensities, {st['skipped_bad_row']} malformed); "
            f"{st['routed_calls']} routed calls ({st['explored_calls']} explored), {st['forced_calls']} forced")
