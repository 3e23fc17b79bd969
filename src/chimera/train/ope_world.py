"""The logged traffic as simulator workflows: the world a candidate policy is replayed in (chimera.train.ope_replay).

From the trace store alone: each logged workflow keeps its arrival time (its first call queued, seconds from the
first workflow's), its calls in order (retries included, so the replay decides as many calls as the logs did), each
call's prompt and output tokens and the tool time before the next call. A call's output on a model it did not run:
the mean that model wrote at the same call of the same prompt in a workflow of as many calls elsewhere in the logs
(prompts recur), else its logged
output scaled by the two models' mean output per call on that kind of task. Those means weigh each call by its
inverse propensity, because the policy chose which model wrote what: a small model sent only the short questions
would otherwise look short-winded. A kind no call of a model ran keeps the logged length. Quality is left to the
caller (WorkflowPlan.with_scores).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from chimera.train.from_traces import TraceStoreError, ips_weight, read_trace_store
from chimera.train.ope import LoggedCalls
from chimera.workload.plan import WorkflowPlan, plan_workflow
from chimera.workload.schema import Outcome, StageOutcome, Task
from chimera.workload.templates import WorkflowTemplate, template_for

_COLUMNS = ("workflow_id", "stage", "model", "prompt_tokens", "completion_tokens", "queued_at", "ended_at", "kind",
            "prompt", "propensity")


class LoggedWorld(NamedTuple):
    """Workflows (id, plan, prompt) in arrival order, their arrival times (s from the first), and the tasks."""

    workflows: list[tuple[str, WorkflowPlan, str]]
    arrivals: list[float]
    tasks: list[Task]


def _num(x: Any, default: float = 0.0) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) else default


def _at(rows: list[dict], model: str, t: int) -> tuple:
    """The key of a model's length at call t of a workflow: its kind and prompt, the call and the workflow's calls."""
    return str(rows[0]["kind"] or ""), str(rows[0]["prompt"] or ""), model, t, len(rows)


def _means(calls: dict[str, list[dict]], models: list[str]) -> tuple[dict, dict]:
    """Inverse-propensity weighted mean output tokens per call: by (kind, model), and by (kind, prompt, model,
    position, calls in the workflow)."""
    by_kind: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_prompt: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for rows in calls.values():
        for t, r in enumerate(rows):
            if r["model"] not in models:
                continue
            tok, w = max(0.0, _num(r["completion_tokens"])), ips_weight([r["propensity"]]) or 1.0
            for table, key in ((by_kind, (str(r["kind"] or ""), r["model"])),
                               (by_prompt, _at(rows, r["model"], t))):
                table[key][0] += w * tok
                table[key][1] += w
    return ({k: v[0] / v[1] for k, v in by_kind.items() if v[1] and v[0] > 0},
            {k: v[0] / v[1] for k, v in by_prompt.items() if v[1]})


def world_from_traces(db_path: str | Path, logged: LoggedCalls, templates: dict[str, WorkflowTemplate],
                      rule: str = "weighted") -> LoggedWorld:
    """The workflows of `logged` (read from the same store) as the simulator runs them, with placeholder quality."""
    path = Path(db_path)

    def columns(available: set[str]) -> list[str]:
        missing = [c for c in _COLUMNS if c not in available]
        if missing:
            raise TraceStoreError(f"{path}: this trace store has no {', '.join(missing)} column(s): the replay "
                                  "needs each call's tokens and times")
        return list(_COLUMNS)

    calls = read_trace_store(path, columns).calls
    models = list(logged.models)
    ratio, seen = _means(calls, models)
    tasks, arrivals = [], []
    decisions = np.bincount(logged.workflow, minlength=logged.n)
    for wid, want in zip(logged.workflow_ids, decisions):
        rows = calls.get(wid, [])
        if len(rows) != want:
            raise ValueError(f"workflow {wid!r}: {len(rows)} calls in the store against {want} logged decisions")
        logged_kind = str(rows[0]["kind"] or "")
        stages: dict[str, list[StageOutcome]] = {m: [] for m in models}
        for t, r in enumerate(rows):
            tok = max(1.0, _num(r["completion_tokens"], 1.0))
            gap = (max(0.0, _num(rows[t + 1]["queued_at"]) - _num(r["ended_at"])) if t + 1 < len(rows) else None)
            base = ratio.get((logged_kind, r["model"]))
            for m in models:
                other = ratio.get((logged_kind, m))
                out = seen.get(_at(rows, m, t))
                if m == r["model"]:
                    out = tok
                elif out is None:
                    out = tok * other / base if base and other else tok
                stages[m].append(StageOutcome(output_tokens=max(1, int(round(out))),
                                              prompt_tokens=int(max(0.0, _num(r["prompt_tokens"]))), tool_s=gap))
        tasks.append(Task(id=wid, kind=logged_kind or "default", prompt=str(rows[0]["prompt"] or ""),
                          prompt_tokens=int(max(1.0, _num(rows[0]["prompt_tokens"], 1.0))),
                          outcomes={m: Outcome(score=0.5, output_tokens=sum(s.output_tokens for s in st))
                                    for m, st in stages.items()}, stages=stages))
        arrivals.append(_num(rows[0]["queued_at"]))
    order = np.argsort(arrivals, kind="stable")
    start = min(arrivals) if arrivals else 0.0
    wfs = []
    for i in order:
        t = tasks[i]
        plan = plan_workflow(t, template_for(t.kind, templates), np.random.default_rng([int(i)]), rule)
        wfs.append((t.id, plan, t.prompt))
    return LoggedWorld(wfs, [arrivals[i] - start for i in order], [tasks[i] for i in order])
