"""`chimera demo` (live): two runs (vllm, chimera) through the gateway against 3 emulated backends, tiny settings,
each with its simulated twin."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from chimera.bench.html_report import summary_rows
from chimera.bench.live_demo import (DEMO_LAM, DEMO_LOAD, DEMO_TASKS, DEMO_TIME_SCALE, LABEL, MODELS, run_live_demo,
                                     twin_versus, versus)

ROW_KEYS = {"policy", "tasks", "accuracy", "latency_mean_s", "latency_p50_s", "latency_p99_s",
            "throughput_tasks_per_s", "calls_per_model", "failed"}
SUMMARY_KEYS = {"policy", "tasks", "accuracy", "latency_s", "queue_s", "throughput_tasks_per_s", "per_model",
                "failed", "wall_s", "simulated"}


def test_live_demo_tiny(tmp_path) -> None:
    d = run_live_demo(n=12, time_scale=100.0, out=tmp_path / "demo")
    assert [r.policy for r in d.runs] == ["vllm", "chimera"]
    for r in d.runs:
        s = r.summary
        assert SUMMARY_KEYS <= set(s)
        assert s["simulated"] is False and s["tasks"] == 12 and s["failed"] == 0
        assert set(s["per_model"]) <= set(MODELS)
        assert sum(v["calls"] for v in s["per_model"].values()) == len(r.calls) > 0
        assert all(c["dispatched_at"] >= c["queued_at"] for c in r.calls)
        # the twin: the simulator on the same 12 workflows, same policy, lengths learnt online as the gateway does
        t = r.twin
        assert t is not None and SUMMARY_KEYS <= set(t)
        assert t["simulated"] is True and t["tasks"] == 12 and t["policy"] == r.policy
        assert t["sim_lengths"].startswith("online")
    # vllm round-robins over all three models, live and in the twin
    assert set(d.runs[0].summary["per_model"]) == set(MODELS)
    assert all(v["calls"] > 0 for v in d.runs[0].twin["per_model"].values())
    rows = summary_rows(d.runs)
    assert len(rows) == 2 and all(ROW_KEYS <= set(r) for r in rows)
    both = summary_rows(d.runs, twins=True)
    assert [r["policy"] for r in both] == ["vllm", "vllm, simulated twin", "chimera (λ=0.03)",
                                           "chimera (λ=0.03), simulated twin"]
    assert "chimera vs vllm:" in versus(d.runs[0].summary, d.runs[1].summary)
    twin = twin_versus(d.runs)
    assert twin is not None and twin.startswith("chimera vs vllm:") and "simulated twin" in twin
    html = d.report.read_text()
    assert d.report == tmp_path / "demo" / "report.html"
    assert html.count("data:image/png;base64,") == 3
    assert LABEL in html and "emulated" in html
    assert html.count("simulated twin</td>") == 2 and "points accuracy (simulated twin" in html


def test_demo_help_states_the_defaults() -> None:
    from chimera.cli import app

    out = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "400"}).output
    text = re.sub(r"\s+", " ", out.replace("│", " "))
    assert f"default: {DEMO_TASKS} live" in text
    assert f"default: {DEMO_LOAD:g} live" in text
    assert f"(default {DEMO_LAM:g})" in text
    assert f"(default {DEMO_TIME_SCALE:g})" in text


def test_live_demo_without_hints_says_so(tmp_path) -> None:
    """`chimera demo --no-hints`: the agents send no workflow hints; both runs complete and the report says so."""
    d = run_live_demo(n=6, time_scale=100.0, out=tmp_path / "demo", hints=False)
    assert d.label.startswith(LABEL) and "no workflow hints" in d.label
    assert all(r.summary["failed"] == 0 and r.summary["tasks"] == 6 for r in d.runs)
    assert "no workflow hints" in d.report.read_text()
    from chimera.cli import app

    out = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "400"}).output
    assert "--no-hints" in out and "chimera demo --no-hints" in out
