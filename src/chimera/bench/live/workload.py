"""The workload on a cluster's models: outcomes renamed onto the served models, and plans scaled for the real engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from chimera.bench.live.config import CONTEXT_MARGIN, MODELS, REAL_MAX_MODEL_LEN, LiveBenchConfig
from chimera.workload.schema import Task


def to_served_models(tasks: Sequence[Task], names: Sequence[str], what: str = "emulated"
                     ) -> tuple[list[Task], dict[str, str]]:
    """Tasks whose outcomes name the cluster's models `names` (ordered for the weakest workload model first). A
    workload that already names them is kept; otherwise its max(N, 3) most-covered models are ranked by mean score
    and N of them, evenly spread over that ranking (weakest -> names[0], strongest -> names[-1]), are renamed;
    tasks lacking any of them are dropped. Returns (tasks, {served name: workload model})."""
    names = list(names)
    if all(all(m in t.outcomes for m in names) for t in tasks):
        return list(tasks), {m: m for m in names}
    cover: dict[str, list[float]] = {}
    for t in tasks:
        for m, o in t.outcomes.items():
            cover.setdefault(m, []).append(o.score)
    if len(cover) < len(names):
        raise ValueError(f"the workload names {len(cover)} model(s); the {what} cluster needs {len(names)}")
    top = sorted(cover, key=lambda m: (-len(cover[m]), m))[: max(len(names), 3)]
    ranked = sorted(top, key=lambda m: float(np.mean(cover[m])))
    k, n = len(names), len(ranked)
    picked = [ranked[round(i * (n - 1) / (k - 1))] for i in range(k)] if k > 1 else [ranked[-1]]
    mapping = dict(zip(names, picked))
    out = []
    for t in tasks:
        if all(w in t.outcomes for w in picked):
            stages = {e: t.stages[w] for e, w in mapping.items() if t.stages and w in t.stages} or None
            out.append(t.model_copy(update={"outcomes": {e: t.outcomes[w] for e, w in mapping.items()},
                                            "stages": stages}))
    if not out:
        raise ValueError(f"no task of the workload has outcomes for all of {', '.join(picked)}")
    return out, mapping


def to_emulated_models(tasks: Sequence[Task]) -> tuple[list[Task], dict[str, str]]:
    """Tasks whose outcomes name the three emulated models (weakest -> 1.5B, strongest -> 14B); see
    `to_served_models`."""
    return to_served_models(tasks, list(MODELS), "emulated")


@dataclass
class ScaleReport:
    """What scaling the plans for the real engine did (reported in results.json `engine.workload`)."""

    length_scale: float
    prompt_scale: float
    tool_scale: float
    max_model_len: int
    calls: int = 0
    capped_calls: int = 0  # output (or, rarely, the prompt) cut so that prompt + output + margin fit max_model_len
    output_tokens: int = 0
    prompt_tokens: int = 0


def scale_plan(plan, models: Sequence[str], length_scale: float, prompt_scale: float, tool_scale: float,
               max_model_len: int, report: ScaleReport | None = None, margin: int = CONTEXT_MARGIN):
    """The plan as the real engine runs it: per-stage output tokens the same for every model (the client sets
    `max_tokens` before the gateway picks the model; `ignore_eos` makes it exact): the mean over `models` of the
    plan's outputs × `length_scale`; fixed prompt parts × `prompt_scale`; tool sleeps × `tool_scale`; each call's
    prompt + output within `max_model_len` − `margin` (the output is cut, then the prompt). Scores are the plan's."""
    from chimera.workload.plan import WorkflowPlan

    n = plan.n_stages
    common = [max(1, round(length_scale * float(np.mean([plan.output_tokens(i, m) for m in models]))))
              for i in range(n)]
    fixed = [max(1, round(prompt_scale * f)) for f in plan._pfixed]
    lo = plan._plo
    for i in range(n):
        prompt = fixed[i] + (sum(common[lo[i]:i]) if lo[i] != i else 0)
        room = max_model_len - margin - prompt
        if room < common[i]:
            if room >= 1:
                common[i] = room
            else:
                fixed[i] = max(1, fixed[i] - (1 - room))
                common[i] = 1
            if report is not None:
                report.capped_calls += 1
        if report is not None:
            report.calls += 1
            report.output_tokens += common[i]
            report.prompt_tokens += fixed[i] + (sum(common[lo[i]:i]) if lo[i] != i else 0)
    outs = tuple(common)
    return WorkflowPlan(
        task_id=plan.task_id, kind=plan.kind, tool_s=tuple(t * tool_scale for t in plan.tool_s),
        stage_shares=plan.stage_shares, cum_shares=plan._cum, stage_roles=plan.stage_roles,
        observation_tokens=tuple(round(o * prompt_scale) for o in plan.observation_tokens),
        prompt_fixed=tuple(fixed), prompt_lo=lo, scores={m: plan._scores[m] for m in models},
        totals={m: sum(outs) for m in models}, real={m: outs for m in models}, rule=plan.rule,
        prompt_base=tuple(round(prompt_scale * b) for b in plan._pbase), prompt_full=plan._pfull)


def real_workflows(tasks: Sequence[Task], cfg: LiveBenchConfig) -> tuple[list[tuple[str, Any, Task]], ScaleReport]:
    """The driver's workflows (`make_workflows`: same ids, plans and order) with plans scaled for the real engine."""
    from chimera.agents.driver import make_workflows

    ps = cfg.prompt_scale if cfg.prompt_scale is not None else cfg.length_scale
    rep = ScaleReport(cfg.length_scale, ps, cfg.tool_scale, REAL_MAX_MODEL_LEN)
    cache: dict[int, Any] = {}
    out = []
    for wid, plan, task in make_workflows(tasks, cfg.tasks, cfg.seed):
        if id(plan) not in cache:
            cache[id(plan)] = scale_plan(plan, cfg.real_models, cfg.length_scale, ps, cfg.tool_scale,
                                         REAL_MAX_MODEL_LEN, rep)
        out.append((wid, cache[id(plan)], task))
    return out, rep
