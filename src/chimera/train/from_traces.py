"""The learning loop's input: turn the gateway's own trace store into training Tasks.

One Task per traced workflow that got feedback (POST /v1/chimera/feedback): its prompt is the router's prompt text of
the workflow's first call, its outcome is the feedback score and the workflow's output tokens, credited to the model
that served it, and its `stages` detail is the real per-call lengths (so the length forest learns real per-stage
lengths instead of template splits). Only calls with status `ok` count; failed attempts (retries, timeouts) do not.

A workflow whose stages ran on different models is credited to the model that produced most of its output tokens
(ties: more calls, then the name); the mixed count is reported. Nothing is dropped silently: every skip is counted
in the returned stats.

Selection bias: the policy sent each model the prompts it already thought that model good at. Where the store logs
each routing decision's propensity, a task's `weight` is the workflow's inverse propensity, 1 / Π p over its calls
(the probability the logging policy had of making exactly those choices), clipped at MAX_IPS_WEIGHT so that one
workflow explored twice cannot outweigh thousands; the router fit uses it. A served model that no workflow credits
has no labels at all: it is reported (`unlabelled`), and its router head falls back to the prior with a warning.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from chimera.workload.schema import Outcome, StageOutcome, Task
from chimera.workload.templates import DEFAULT_KIND

_NEEDED_ORDER = ("workflow_id", "stage", "model", "prompt_tokens", "completion_tokens", "status")
_NEEDED = set(_NEEDED_ORDER)
_OPTIONAL = ("kind", "prompt", "queued_at", "ended_at", "propensity", "confidences")
MAX_IPS_WEIGHT = 100.0  # one exploration among three models at ε = 3% (1/p = K/ε) is kept whole; more is clipped


class TraceStoreError(ValueError):
    """A path that is not a readable gateway trace store; the message names the file."""


def open_trace_store(path: Path) -> sqlite3.Connection:
    """The trace store at `path`, read-only; FileNotFoundError or TraceStoreError (naming the file) otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: trace store not found")
    if not path.is_file():
        raise TraceStoreError(f"{path}: not a trace store (not a file)")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise TraceStoreError(f"{path}: not a trace store ({e})") from None
    missing = {"calls", "feedback"} - tables
    if missing:
        db.close()
        raise TraceStoreError(f"{path}: not a trace store (no {' or '.join(sorted(missing))} table; "
                              "give the gateway's trace_store file)")
    cols = {r[1] for r in db.execute("PRAGMA table_info(calls)")}
    if not _NEEDED <= cols:
        db.close()
        raise TraceStoreError(f"{path}: not a trace store (table calls lacks {', '.join(sorted(_NEEDED - cols))})")
    return db


class TracedCalls(NamedTuple):
    calls: dict[str, list[dict[str, Any]]]  # workflow id -> its calls in stage order, each {column: value}
    feedback: list[tuple[Any, Any]]  # (workflow_id, score) in the order posted
    n_calls: int
    columns: list[str]  # the columns read


def read_trace_store(path: Path, columns: Callable[[set[str]], Sequence[str]]) -> TracedCalls:
    """A trace store's calls grouped by workflow and its feedback rows; `columns(available)` picks the calls'
    columns to read (the first must be workflow_id) or raises for what is missing."""
    db = open_trace_store(path)
    try:
        sel = list(columns({r[1] for r in db.execute("PRAGMA table_info(calls)")}))
        rows = db.execute(f"SELECT {', '.join(sel)} FROM calls ORDER BY workflow_id, stage, rowid").fetchall()
        fb_rows = db.execute("SELECT workflow_id, score FROM feedback ORDER BY at, rowid").fetchall()
    except sqlite3.DatabaseError as e:
        raise TraceStoreError(f"{path}: cannot read the trace store ({e})") from None
    finally:
        db.close()
    by_wf: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_wf[str(r[0])].append(dict(zip(sel, r)))
    return TracedCalls(dict(by_wf), fb_rows, len(rows), sel)


def latest_scores(rows: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Workflow id -> its latest feedback score (rows of (workflow_id, score) in the order they were posted)."""
    feedback: dict[str, Any] = {}
    for wid, score in rows:
        feedback[str(wid)] = score
    return feedback


def json_object(text: Any) -> dict | None:
    """A JSON object column as a dict; None when absent or not an object."""
    if not isinstance(text, str):
        return None
    try:
        v = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return v if isinstance(v, dict) else None


def ips_weight(propensities: list[Any]) -> float | None:
    """1 / Π p clipped at MAX_IPS_WEIGHT; None when a call has no valid propensity (logged before they were)."""
    prod = 1.0
    for p in propensities:
        if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            return None
        prod *= p
    return min(1.0 / prod, MAX_IPS_WEIGHT) if prod > 0 else MAX_IPS_WEIGHT


def valid_score(score: Any) -> float | None:
    """`score` as a float in [0, 1], or None (not a number, NaN, or out of range)."""
    try:
        score = float(score)
    except (TypeError, ValueError):
        return None
    return score if 0.0 <= score <= 1.0 else None


def tasks_from_traces(db_path: str | Path) -> tuple[list[Task], dict[str, Any]]:
    """Tasks from one trace store, and counts of what was used and skipped.

    Raises FileNotFoundError for a missing file and TraceStoreError (a ValueError) for a file that is not a trace
    store; both name the file.
    """
    path = Path(db_path)
    traced = read_trace_store(path, lambda cols: [*_NEEDED_ORDER, *(c for c in _OPTIONAL if c in cols)])
    by_wf, fb_rows = traced.calls, traced.feedback
    feedback = latest_scores(fb_rows)

    stats: dict[str, Any] = {
        "path": str(path), "workflows": len(by_wf), "calls": traced.n_calls, "feedback_rows": len(fb_rows),
        "tasks": 0, "skipped_no_feedback": 0, "skipped_no_ok_calls": 0, "skipped_bad_score": 0,
        "feedback_without_calls": sum(1 for w in feedback if w not in by_wf), "mixed_models": 0,
        "missing_prompt": 0, "calls_used": 0, "tasks_per_model": {}, "ips_weighted": 0, "unweighted": 0,
        "clipped": 0, "max_weight": MAX_IPS_WEIGHT, "served_models": [], "unlabelled": {},
    }
    chosen: Counter[str] = Counter(str(r["model"]) for rows in by_wf.values() for r in rows if r["model"])
    served = set(chosen)
    tasks: list[Task] = []
    per_model: Counter[str] = Counter()
    for wid, rows in by_wf.items():
        for r in rows:
            served.update(json_object(r.get("confidences")) or ())
        score = feedback.get(wid)
        if score is None:
            stats["skipped_no_feedback"] += 1
            continue
        ok = [r for r in rows if r["status"] == "ok" and r["model"]]
        if not ok:
            stats["skipped_no_ok_calls"] += 1
            continue
        score = valid_score(score)
        if score is None:
            stats["skipped_bad_score"] += 1
            continue
        toks = [max(0, int(r["completion_tokens"] or 0)) for r in ok]
        by_model_toks: Counter[str] = Counter()
        by_model_calls: Counter[str] = Counter()
        for r, t in zip(ok, toks):
            by_model_toks[r["model"]] += t
            by_model_calls[r["model"]] += 1
        model = max(by_model_toks, key=lambda m: (by_model_toks[m], by_model_calls[m], m))
        if len(by_model_toks) > 1:
            stats["mixed_models"] += 1
        stages = []
        for i, (r, t) in enumerate(zip(ok, toks)):
            st: dict[str, Any] = {"output_tokens": t}
            if r["prompt_tokens"] is not None:
                st["prompt_tokens"] = max(0, int(r["prompt_tokens"]))
            if i + 1 < len(ok):  # client-side time between this call's end and the next call (tools, thinking)
                end, nxt = r.get("ended_at"), ok[i + 1].get("queued_at")
                if end is not None and nxt is not None:
                    st["tool_s"] = max(0.0, float(nxt) - float(end))
            stages.append(StageOutcome(**st))
        first = rows[0]  # the router's prompt is the workflow's first call's (any status)
        prompt = next((r.get("prompt") for r in rows if r.get("prompt")), None)
        if not prompt:
            stats["missing_prompt"] += 1
        kind = next((r.get("kind") for r in rows if r.get("kind")), None) or DEFAULT_KIND
        pt = first["prompt_tokens"]
        weight = ips_weight([r.get("propensity") for r in rows]) if "propensity" in traced.columns else None
        stats["ips_weighted" if weight is not None else "unweighted"] += 1
        stats["clipped"] += weight == MAX_IPS_WEIGHT
        tasks.append(Task(
            id=wid, kind=str(kind), prompt=prompt or "",
            prompt_tokens=max(0, int(pt)) if pt is not None else None,
            outcomes={model: Outcome(score=score, output_tokens=sum(toks))},
            stages={model: stages}, weight=weight,
        ))
        per_model[model] += 1
        stats["calls_used"] += len(ok)
    stats["tasks"] = len(tasks)
    stats["tasks_per_model"] = dict(sorted(per_model.items()))
    stats["served_models"] = sorted(served)
    stats["unlabelled"] = {m: (f"chosen on {chosen[m]} calls, credited no scored workflow" if chosen[m] else
                               "never chosen") for m in sorted(served - set(per_model))}
    return tasks, stats


def describe_stats(path: str | Path, st: dict[str, Any]) -> str:
    """One line on what a trace store gave (`tasks_from_traces`'s counts): tasks made, workflows skipped and why."""
    return (f"{path}: {st['tasks']} tasks from {st['workflows']} traced workflows "
            f"(skipped: {st['skipped_no_feedback']} without feedback, {st['skipped_no_ok_calls']} "
            f"without a successful call, {st['skipped_bad_score']} with a bad score; "
            f"{st['mixed_models']} mixed-model, {st['missing_prompt']} without prompt text); "
            f"{st['ips_weighted']} weighted by inverse propensity ({st['clipped']} clipped at {st['max_weight']:g}), "
            f"{st['unweighted']} unweighted (no propensities logged); workflows per model: "
            + ", ".join(f"{m} {n}" for m, n in st["tasks_per_model"].items()))


def unlabelled_warnings(st: dict[str, Any]) -> list[str]:
    """One line per served model the traces hold no label for (the router head falls back to the prior)."""
    return [f"{st['path']}: model {m!r} was served but has no labels ({why}); its router head falls back to the "
            "prior (the mean of the labelled models'), not learnt: log explored traffic to learn it"
            for m, why in st["unlabelled"].items()]
