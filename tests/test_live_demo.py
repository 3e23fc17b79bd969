"""`chimera demo` (live): two runs (vllm, chimera) through the gateway against 3 emulated backends, tiny settings."""

from __future__ import annotations

from chimera.bench.html_report import summary_rows
from chimera.bench.live_demo import LABEL, MODELS, run_live_demo, versus

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
    # vllm round-robins over all three models
    assert set(d.runs[0].summary["per_model"]) == set(MODELS)
    rows = summary_rows(d.runs)
    assert len(rows) == 2 and all(ROW_KEYS <= set(r) for r in rows)
    assert "chimera vs vllm:" in versus(d.runs[0].summary, d.runs[1].summary)
    html = d.report.read_text()
    assert d.report == tmp_path / "demo" / "report.html"
    assert html.count("data:image/png;base64,") == 3
    assert LABEL in html and "emulated" in html
