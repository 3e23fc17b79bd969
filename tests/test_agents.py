"""`chimera agents run`: live agents drive workflows through the openai client against emulated backends and the
Chimera gateway, all on 127.0.0.1 (time_scale 100 for emulators and the agents' tool sleeps)."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from typer.testing import CliRunner

from chimera.agents.driver import AgentConfig, make_workflows, run_agents_sync
from chimera.cli import app
from chimera.emulate import EmulatorServer
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from chimera.util.threaded import serve_in_thread
from chimera.workload.schema import load_tasks, write_tasks
from chimera.workload.synthetic import generate

SCALE = 100.0
MODELS = {"qwen2.5-1.5b": "qwen2.5-1.5b@a6000", "qwen2.5-7b": "qwen2.5-7b@a6000"}
CONTRACT = {"policy", "tasks", "accuracy", "latency_s", "queue_s", "throughput_tasks_per_s", "per_model", "failed",
            "wall_s", "simulated", "failures", "queue_s_note"}


def _workload(tmp_path, n: int = 8):
    path = tmp_path / "wl.jsonl"
    write_tasks(generate(n), path)
    return path, load_tasks(path)[0]


def test_single_backend_every_stage_has_the_planned_length(tmp_path) -> None:
    path, tasks = _workload(tmp_path)
    model = "qwen2.5-7b"
    # the emulator replays the workload's per-stage lengths; max_tokens (the plan's length) caps every stage
    with EmulatorServer(profile=MODELS[model], served_model_name=model, time_scale=SCALE, workload=tasks) as emu:
        out = tmp_path / "live.json"
        res = CliRunner().invoke(app, ["agents", "run", "--gateway", emu.base_url, "--workload", str(path),
                                       "--concurrency", "4", "--models", model, "--time-scale", str(SCALE),
                                       "--json", str(out)])
        assert res.exit_code == 0, res.output
        summary = json.loads(out.read_text())
        run = run_agents_sync(tasks, AgentConfig(base_url=emu.base_url, models=[model], concurrency=4,
                                                 time_scale=SCALE))
    wfs = make_workflows(tasks)
    total_stages = sum(p.n_stages for _, p, _ in wfs)
    for s in (summary, run.summary):
        assert CONTRACT <= set(s)
        assert s["simulated"] is False and s["tasks"] == len(tasks) and s["failed"] == 0 and s["failures"] == []
        assert s["per_model"][model]["calls"] == total_stages
        assert s["queue_s"] == {"mean": 0.0, "p99": 0.0}
        assert 0.0 <= s["accuracy"] <= 1.0 and s["latency_s"]["p50"] > 0
    assert all(r.failed is None and r.models == [model] * r.calls for r in run.records)
    for wid, plan, _ in wfs:
        got = [st.completion_tokens for st in run.stages[wid]]
        assert got == [plan.output_tokens(i, model) for i in range(plan.n_stages)], wid
        rec = next(r for r in run.records if r.workflow_id == wid)
        assert rec.score == plan.score([model] * plan.n_stages)
    assert summary["per_model"][model]["tokens"] == sum(
        p.output_tokens(i, model) for _, p, _ in wfs for i in range(p.n_stages))


def test_backend_error_mid_workflow_fails_that_task_only(tmp_path) -> None:
    _, tasks = _workload(tmp_path)
    model = "qwen2.5-7b"
    wfs = make_workflows(tasks)
    victim = next(k for k in range(1, len(wfs)) if wfs[k][1].n_stages >= 2)
    before = sum(p.n_stages for _, p, _ in wfs[:victim])
    with EmulatorServer(profile=MODELS[model], served_model_name=model, time_scale=SCALE,
                        fail_after=before + 1) as emu:
        def revive(rec) -> None:  # the backend comes back once the failure has been recorded
            if rec.failed:
                emu.state.fail_after = None
                emu.state.recover()

        run = run_agents_sync(tasks, AgentConfig(base_url=emu.base_url, models=[model], concurrency=1,
                                                 time_scale=SCALE), on_record=revive)
    s = run.summary
    assert s["tasks"] == len(tasks) and s["failed"] == 1
    bad = [r for r in run.records if r.failed]
    assert [r.workflow_id for r in bad] == [wfs[victim][0]]
    assert bad[0].score == 0.0 and "stage 1" in bad[0].failed and "Error" in bad[0].failed
    assert s["failures"] == [{"workflow_id": wfs[victim][0], "task_id": wfs[victim][2].id, "reason": bad[0].failed}]
    assert all(r.calls == p.n_stages for r, (_, p, _) in zip(run.records, wfs) if not r.failed)
    assert len(run.stages[wfs[victim][0]]) == 1  # stage 0 answered, stage 1 died
    # a plain backend (no workload to replay) still never writes more than the plan's length: max_tokens caps it
    for wid, plan, _ in wfs:
        for st in run.stages[wid]:
            assert 1 <= st.completion_tokens <= plan.output_tokens(st.stage, model)


def test_via_gateway_feedback_reaches_the_trace_store(tmp_path) -> None:
    path, tasks = _workload(tmp_path, 6)
    key = "agents-key"
    with contextlib.ExitStack() as stack:
        emus = {m: stack.enter_context(EmulatorServer(profile=p, served_model_name=m, time_scale=SCALE,
                                                      workload=tasks))
                for m, p in MODELS.items()}
        cfg = gateway_config_from_dict({
            "auth": {"api_keys": [key]},
            "policy": {"name": "chimera", "lam": 0.02},
            "trace_store": str(tmp_path / "traces.sqlite"),
            "backends": [{"name": f"{m}-0", "model": m, "base_url": e.base_url, "max_inflight": 8,
                          "profile": MODELS[m]} for m, e in emus.items()],
            "limits": {"request_timeout_s": 30},
        })
        gw_app = build_gateway(cfg)
        url = stack.enter_context(serve_in_thread(gw_app))
        out = tmp_path / "gw.json"
        res = CliRunner().invoke(app, ["agents", "run", "--gateway", url, "--workload", str(path), "--rate", "20",
                                       "--api-key", key, "--time-scale", str(SCALE), "--json", str(out)])
        assert res.exit_code == 0, res.output
        s = json.loads(out.read_text())
        assert CONTRACT <= set(s) and s["simulated"] is False and s["failed"] == 0 and s["tasks"] == len(tasks)
        assert set(s["per_model"]) <= set(MODELS)
        assert sum(v["calls"] for v in s["per_model"].values()) == sum(p.n_stages for _, p, _ in make_workflows(tasks))
        assert s["feedback_sent"] == len(tasks)
        trace = gw_app.state.gateway.trace
        deadline = time.time() + 5
        rows = []
        while time.time() < deadline:
            rows = trace.query("SELECT workflow_id, score FROM feedback")
            if len(rows) >= len(tasks):
                break
            time.sleep(0.05)
        assert {r["workflow_id"] for r in rows} == {t.id for t in tasks}
        calls = trace.query("SELECT DISTINCT workflow_id FROM calls")
        assert {r["workflow_id"] for r in calls} == {t.id for t in tasks}


def test_calls_spread_over_replicas_per_call_or_per_workflow() -> None:
    cfg = AgentConfig(base_url="http://a:1", replica_urls=["http://b:2/v1/"])
    assert cfg.endpoints == ("http://a:1/v1", "http://b:2/v1")
    assert [cfg.endpoint(0, k) for k in range(4)] == [0, 1, 0, 1] and cfg.endpoint(1, 0) == 1
    sticky = AgentConfig(base_url="http://a:1", replica_urls=["http://b:2"], spread="workflow")
    assert [sticky.endpoint(1, k) for k in range(3)] == [1, 1, 1]
    assert AgentConfig(base_url="http://a:1").endpoint(5, 3) == 0
    with pytest.raises(ValueError, match="spread"):
        AgentConfig(base_url="http://a:1", spread="stage")
