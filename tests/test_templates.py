"""Workflow templates and per-task plans: determinism, homogeneous consistency, context growth, fallbacks, and
the shipped YAML against the data it was derived from (when the data directory is present)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from chimera.workload.plan import QualityRule, UnknownModelError, WorkflowPlan, plan_workflow, task_rng
from chimera.workload.schema import Outcome, StageOutcome, Task
from chimera.workload.templates import WorkflowTemplate, derive_template_parameters, load_templates, template_for


@pytest.fixture(scope="module")
def templates() -> dict[str, WorkflowTemplate]:
    return load_templates()


def _task(kind: str = "math", stages: dict | None = None, **totals: tuple[float, int]) -> Task:
    outcomes = totals or {"small": (0.0, 120), "big": (1.0, 300)}
    return Task(id=f"t-{kind}", kind=kind, prompt="What is 2+2? " * 4, prompt_tokens=20,
                outcomes={m: Outcome(score=s, output_tokens=o) for m, (s, o) in outcomes.items()}, stages=stages)


def _snapshot(p: WorkflowPlan, models: list[str]) -> tuple:
    outs = tuple(tuple(p.output_tokens(i, m) for i in range(p.n_stages)) for m in models)
    prompts = tuple(p.prompt_tokens(i, [10] * i) for i in range(p.n_stages))
    return p.n_stages, p.tool_s, p.stage_roles, p.observation_tokens, outs, prompts


def test_templates_load_and_cover_kinds(templates):
    assert {"qa", "math", "code", "default"} <= set(templates)
    for kind, t in templates.items():
        for n in sorted(t.calls_pmf):
            shares = t.shares(n)
            assert len(shares) == n and math.isclose(sum(shares), 1.0), kind
            assert not t.layout(n).tool[-1], f"{kind}: no tool after the last stage"


def test_fallback_to_default(templates):
    assert template_for("no-such-kind", templates) is templates["default"]
    assert template_for("math", templates) is templates["math"]
    with pytest.raises(KeyError, match="no template"):
        template_for("x", {"math": templates["math"]})


def test_load_rejects_bad_yaml(tmp_path: Path):
    bad = tmp_path / "t.yaml"
    bad.write_text("templates:\n  default:\n    calls_pmf: {1: 0.5, 2: 0.4}\n    roles: {a: {mean_output_tokens: 1}}\n"
                   "    pattern: [a]\n    tool_s: {median: 1.0, sigma: 0.1}\n")
    with pytest.raises(ValueError, match="sum to 1"):
        load_templates(bad)
    bad.write_text("templates:\n  math:\n    calls_pmf: {1: 1.0}\n    roles: {a: {mean_output_tokens: 1}}\n"
                   "    pattern: [a]\n    tool_s: {median: 1.0, sigma: 0.1}\n")
    with pytest.raises(ValueError, match="default"):
        load_templates(bad)


@pytest.mark.parametrize("kind", ["qa", "math", "code"])
def test_plans_are_deterministic(templates, kind):
    task = _task(kind)
    a = [_snapshot(plan_workflow(task, templates[kind], np.random.default_rng(7)), ["small", "big"]) for _ in range(2)]
    assert a[0] == a[1]
    b = _snapshot(plan_workflow(task, templates[kind], task_rng(task.id, 3)), ["small", "big"])
    assert b == _snapshot(plan_workflow(task, templates[kind], task_rng(task.id, 3)), ["small", "big"])


@pytest.mark.parametrize("kind", ["qa", "math", "code", "default"])
@pytest.mark.parametrize("rule", list(QualityRule))
def test_homogeneous_assignment_reproduces_outcomes(templates, kind, rule):
    task = _task(kind, small=(0.25, 120), big=(1.0, 3000), tiny=(0.0, 3))
    for seed in range(20):
        p = plan_workflow(task, templates[kind], np.random.default_rng(seed), rule=rule)
        for m, o in task.outcomes.items():
            outs = [p.output_tokens(i, m) for i in range(p.n_stages)]
            assert min(outs) >= 1
            assert p.score([m] * p.n_stages) == o.score  # exact, not approximate
            assert p.remaining_tokens(0, m) == sum(outs)
            assert p.remaining_tokens(p.n_stages, m) == 0
            if o.output_tokens >= p.n_stages:
                assert sum(outs) == o.output_tokens  # cumulative rounding keeps the total
            else:
                assert sum(outs) == p.n_stages  # each stage still produces one token


def test_output_split_follows_template_shares(templates):
    t = templates["math"]
    task = _task("math", big=(1.0, 1000))
    p = plan_workflow(task, t, np.random.default_rng(0))
    assert p.n_stages in t.calls_pmf
    for i, s in enumerate(t.shares(p.n_stages)):
        assert abs(p.output_tokens(i, "big") - 1000 * s) <= 1


def test_quality_rules_on_mixed_assignment(templates):
    task = _task("math", weak=(0.0, 100), strong=(1.0, 100))
    t = templates["math"]
    rng = np.random.default_rng(0)
    p = plan_workflow(task, t, rng)
    while p.n_stages != 2:  # math is 2 stages in >99.9% of draws
        p = plan_workflow(task, t, rng)
    w0, w1 = p.stage_shares
    assert p.score(["strong", "weak"]) == pytest.approx(w0)  # fractional credit by output share
    assert p.score(["weak", "strong"]) == pytest.approx(w1)
    p_last = plan_workflow(task, t, np.random.default_rng(0), rule="last")
    p_min = plan_workflow(task, t, np.random.default_rng(0), rule=QualityRule.MIN)
    if p_last.n_stages == 2:
        assert p_last.score(["weak", "strong"]) == 1.0 and p_last.score(["strong", "weak"]) == 0.0
        assert p_min.score(["weak", "strong"]) == 0.0 and p_min.score(["strong", "strong"]) == 1.0
    with pytest.raises(ValueError):
        plan_workflow(task, t, np.random.default_rng(0), rule="median")
    with pytest.raises(ValueError, match="stages"):
        p.score(["weak"])


def test_unknown_model_names_model_and_task(templates):
    p = plan_workflow(_task("qa"), templates["qa"], np.random.default_rng(0))
    for call in (lambda: p.output_tokens(0, "gpt-9"), lambda: p.remaining_tokens(0, "gpt-9"),
                 lambda: p.score(["gpt-9"] * p.n_stages)):
        with pytest.raises(KeyError) as e:
            call()
        assert isinstance(e.value, UnknownModelError)
        assert "gpt-9" in str(e.value) and "t-qa" in str(e.value)


def test_prompt_grows_with_carried_context(templates):
    t = templates["qa"]
    task = _task("qa")
    rng = np.random.default_rng(1)
    p = plan_workflow(task, t, rng)
    while p.n_stages < 3:
        p = plan_workflow(task, t, rng)
    outs = [p.output_tokens(i, "big") for i in range(p.n_stages)]
    prompts = [p.prompt_tokens(i, outs[:i]) for i in range(p.n_stages)]
    assert prompts[0] == task.prompt_tokens + t.system_prompt_tokens
    for i in range(1, p.n_stages):  # each prompt = previous prompt + previous output + its observation
        assert prompts[i] == prompts[i - 1] + outs[i - 1] + p.observation_tokens[i - 1]
        assert p.observation_tokens[i - 1] >= 1  # every non-final ReAct step calls the search tool
    # carried context is whatever actually ran: other outputs give other prompts
    assert p.prompt_tokens(2, [1, 1]) == prompts[2] - outs[0] - outs[1] + 2
    with pytest.raises(ValueError):
        p.prompt_tokens(2, [1])


def test_windowed_context_and_tools(templates):
    t = templates["code"]
    task = _task("code")
    rng = np.random.default_rng(2)
    p = plan_workflow(task, t, rng)
    while p.n_stages < 4:
        p = plan_workflow(task, t, rng)
    assert p.stage_roles[:4] == ("tests", "impl", "reflect", "impl_retry")
    # impl sees only its instructions (window 0); reflect sees the impl and its feedback (window 1)
    assert p.prompt_tokens(1, [100]) == p.prompt_tokens(1, [999])
    assert p.prompt_tokens(2, [5, 100]) - p.prompt_tokens(2, [5, 50]) == 50
    assert p.prompt_tokens(2, [5, 100]) == p.prompt_tokens(2, [999, 100])
    assert p.tool_s[0] == 0.0 and p.tool_s[1] > 0.0 and p.tool_s[2] == 0.0  # tests run only after an impl
    assert p.tool_s[-1] == 0.0
    assert all(0.0 <= x <= t.tool_s.max for x in p.tool_s)


def test_real_stage_detail_is_used(templates):
    st = {"a": [StageOutcome(output_tokens=30, observation_tokens=40, tool_s=0.5), StageOutcome(output_tokens=20)],
          "b": [StageOutcome(output_tokens=10), StageOutcome(output_tokens=11), StageOutcome(output_tokens=12)],
          "c": [StageOutcome(output_tokens=7), StageOutcome(output_tokens=9)]}
    task = _task("qa", stages=st, a=(1.0, 50), b=(0.0, 33), c=(1.0, 16))
    p = plan_workflow(task, templates["qa"], np.random.default_rng(0))
    assert p.n_stages == 2  # lower median of 2, 3, 2
    assert [p.output_tokens(i, "a") for i in range(2)] == [30, 20]  # real detail kept
    assert [p.output_tokens(i, "c") for i in range(2)] == [7, 9]
    assert sum(p.output_tokens(i, "b") for i in range(2)) == 33  # 3 real calls -> total split by template shares
    assert p.tool_s == (0.5, 0.0) and p.observation_tokens == (40, 0)  # reference model "a" (first by name)


def test_pmf_sampling_matches_template(templates):
    t = templates["qa"]
    rng = np.random.default_rng(0)
    draws = np.array([t.sample_n_stages(rng) for _ in range(20000)])
    for n, prob in t.calls_pmf.items():
        assert abs(np.mean(draws == n) - prob) < 0.012


# --------------------------------------------------------------------------------------------- shipped vs data
# Tolerances: probabilities +-0.002 (YAML keeps 4 decimals), token means +-1% (min 0.15), log-sd +-0.005,
# medians/caps/prompt counts exact to the YAML's rounding.


def _data_dir() -> Path:
    from chimera.workload.datadir import DataDirError, resolve_data_dir

    try:
        return resolve_data_dir()
    except DataDirError as e:
        pytest.skip(f"data directory not available: {e}")


def test_shipped_yaml_matches_data(templates):
    derived = derive_template_parameters(_data_dir())
    checked = 0
    for kind in ("qa", "math", "code", "chatdev"):
        if kind not in derived:
            continue
        d, t = derived[kind], templates[kind]
        assert set(d["calls_pmf"]) == set(t.calls_pmf), kind
        for n, prob in d["calls_pmf"].items():
            assert abs(t.calls_pmf[n] - prob) <= 0.002, (kind, n)
        for role, vals in d["roles"].items():
            r = t.roles[role]
            want = vals["mean_output_tokens"]
            assert abs(r.mean_output_tokens - want) <= max(0.15, 0.01 * want), (kind, role)
            if "prompt_tokens" in vals:
                assert r.prompt_tokens == vals["prompt_tokens"], (kind, role)
        if "system_prompt_tokens" in d:
            assert t.system_prompt_tokens == d["system_prompt_tokens"], kind
        if "observation_tokens" in d:
            o, fit = t.observation_tokens, d["observation_tokens"]
            assert abs(o.median - fit["median"]) <= 0.051 and abs(o.sigma - fit["sigma"]) <= 0.005, kind
            assert o.max == fit["max"], kind
        if "tool_s" in d:
            assert t.tool_s.median == pytest.approx(d["tool_s"]["median"]), kind
        checked += 1
    if not checked:
        pytest.skip("no template source folder (fireact, tora, reflexion, chatdev) in the data directory")


def test_split_keeps_total_and_floor(templates):
    from chimera.workload.plan import _split

    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 25))
        cum = tuple(np.cumsum(rng.dirichlet(np.full(n, 0.3))).tolist())
        cum = cum[:-1] + (1.0,)
        total = int(rng.integers(0, 400))
        parts = _split(total, cum)
        assert len(parts) == n and min(parts) >= 1 and sum(parts) == max(total, n)
