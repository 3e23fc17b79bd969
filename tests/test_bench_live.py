"""`chimera bench live`: LiteLLM vs Chimera on emulated backends, the fidelity numbers, and the agent-driver pieces the
head-to-head relies on (served model behind LiteLLM, prompt padding, no client-side cap on open-loop calls)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from typer.testing import CliRunner

from chimera.agents.driver import AgentConfig, make_workflows, run_agents_sync, served_model
from chimera.bench.litellm_proxy import LiteLLMMissing, find_litellm, litellm_config
from chimera.bench.live import (
    Contender,
    LiveBenchConfig,
    fidelity,
    parse_contender,
    run_live_bench,
    to_emulated_models,
)
from chimera.cli import app
from chimera.emulate import EmulatorServer
from chimera.serve.threaded import serve_in_thread
from chimera.workload.schema import Outcome, Task
from chimera.workload.synthetic import generate


def _litellm_or_skip():
    try:
        return find_litellm()
    except LiteLLMMissing as e:
        pytest.skip(f"LiteLLM not installed (make test installs .venv-litellm): {e}")


# ---- pure pieces --------------------------------------------------------------------------------------------------
def test_served_model_reads_litellm_header_else_body() -> None:
    assert served_model("pool", {"x-litellm-model-name": "openai/qwen2.5-7b"}, "pool") == "qwen2.5-7b"
    assert served_model("pool", {"x-litellm-model-name": "openai/Qwen/Qwen2.5-7B"}, "pool") == "Qwen/Qwen2.5-7B"
    assert served_model("qwen2.5-14b", {}, "chimera") == "qwen2.5-14b"
    assert served_model(None, {}, "m") == "m"


def test_parse_contender_and_its_errors() -> None:
    assert parse_contender("litellm:least-busy") == Contender("litellm", "least-busy")
    assert parse_contender("chimera:chimera@0.05") == Contender("chimera", "chimera", 0.05)
    assert parse_contender("chimera:vllm").sim_policy == "vllm"
    assert parse_contender("litellm:least-busy").sim_policy == "least-loaded"
    assert parse_contender("litellm:simple-shuffle").sim_policy is None
    for bad, msg in (("litellm:usage-based", "strategy"), ("chimera:nope", "unknown policy"),
                     ("chimera:vllm@0.1", "takes no λ"), ("chimera:chimera@x", "must be a number"),
                     ("nginx:rr", "expected")):
        with pytest.raises(ValueError, match=msg):
            parse_contender(bad)
    with pytest.raises(ValueError, match="contender"):
        LiveBenchConfig(contenders=["chimera:vllm", "bogus"])


def test_litellm_config_one_group_forwarding_headers() -> None:
    cfg = litellm_config({"a": "http://127.0.0.1:1/v1", "b": "http://127.0.0.1:2/v1"}, "least-busy")
    assert [d["model_name"] for d in cfg["model_list"]] == ["pool", "pool"]
    assert [d["litellm_params"]["model"] for d in cfg["model_list"]] == ["openai/a", "openai/b"]
    assert cfg["router_settings"]["routing_strategy"] == "least-busy"
    assert cfg["general_settings"]["forward_client_headers_to_llm_api"] is True
    with pytest.raises(ValueError, match="strategy"):
        litellm_config({"a": "u"}, "latency-based")
    with pytest.raises(ValueError, match="at least one"):
        litellm_config({}, "simple-shuffle")


def test_find_litellm_names_the_missing_path(tmp_path) -> None:
    with pytest.raises(LiteLLMMissing, match="nope/litellm"):
        find_litellm(tmp_path / "nope" / "litellm")


def test_fidelity_is_relative_error_floored_at_zero() -> None:
    live = {"latency_s": {"mean": 2.0, "p50": 1.0, "p99": 4.0}, "throughput_tasks_per_s": 10.0, "accuracy": 0.5}
    sim = {"latency_s": {"mean": 1.5, "p50": 1.0, "p99": 12.0}, "throughput_tasks_per_s": 11.0, "accuracy": 0.5}
    f = fidelity(sim, live)
    assert f["latency_mean"] == pytest.approx(75.0)
    assert f["latency_p50"] == pytest.approx(100.0)
    assert f["latency_p99"] == 0.0  # 200% off: floored
    assert f["throughput"] == pytest.approx(90.0)
    assert f["accuracy"] == pytest.approx(100.0)


def test_real_workload_models_are_mapped_by_accuracy_rank() -> None:
    def task(i: int, scores: dict[str, float]) -> Task:
        return Task(id=f"t{i}", kind="qa", prompt="q",
                    outcomes={m: Outcome(score=s, output_tokens=10 + i) for m, s in scores.items()})

    tasks = [task(i, {"big": 0.9, "small": 0.2, "mid": 0.5, "rare": 1.0}) for i in range(4)]
    tasks.append(task(9, {"big": 0.9, "small": 0.2}))  # lacks `mid`: dropped
    out, mapping = to_emulated_models(tasks)
    assert mapping == {"qwen2.5-1.5b": "small", "qwen2.5-7b": "mid", "qwen2.5-14b": "big"}
    assert [t.id for t in out] == ["t0", "t1", "t2", "t3"]
    assert out[0].outcomes["qwen2.5-14b"].score == 0.9 and set(out[0].outcomes) == set(mapping)
    same, ident = to_emulated_models(generate(5))
    assert ident == {m: m for m in ident} and len(same) == 5
    with pytest.raises(ValueError, match="needs 3"):
        to_emulated_models([task(0, {"a": 0.1, "b": 0.2})])


# ---- agent driver details the head-to-head needs ------------------------------------------------------------------
def test_prompts_are_padded_to_the_planned_length() -> None:
    tasks = generate(4)
    model = "qwen2.5-7b"
    with EmulatorServer(profile=f"{model}@a6000", served_model_name=model, time_scale=200, workload=tasks) as emu:
        padded = run_agents_sync(tasks, AgentConfig(base_url=emu.base_url, models=[model], concurrency=4,
                                                    time_scale=200))
        bare = run_agents_sync(tasks, AgentConfig(base_url=emu.base_url, models=[model], concurrency=4,
                                                  time_scale=200, pad_prompts=False))
    shorter = 0
    for wid, plan, _ in make_workflows(tasks):
        outs = [st.completion_tokens for st in padded.stages[wid]]
        for st in padded.stages[wid]:
            want = plan.prompt_tokens(st.stage, outs)
            assert want - 2 <= st.prompt_tokens <= want + 40, (wid, st.stage, st.prompt_tokens, want)
        # without padding the short synthetic text stays below the plan's prompt length
        assert bare.stages[wid][0].prompt_tokens <= padded.stages[wid][0].prompt_tokens
        shorter += bare.stages[wid][0].prompt_tokens < plan.prompt_tokens(0, []) - 2
    assert shorter >= 3


def test_open_loop_calls_are_not_queued_by_the_client_pool() -> None:
    """40 workflows arriving at once must all be in flight together (an httpx pool cap of 16 once hid this)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    async def chat(request):
        body = await request.json()
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.4)
        with lock:
            state["now"] -= 1
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "ok"}}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    backend = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    tasks = generate(40)
    with serve_in_thread(backend) as url:
        run = run_agents_sync(tasks, AgentConfig(base_url=url, models=["qwen2.5-1.5b"], rate=10_000,
                                                 time_scale=1000, feedback=False), n=40)
    assert run.summary["tasks"] == 40 and run.summary["failed"] == 0
    assert state["peak"] >= 35, state


# ---- the whole benchmark, tiny, with real LiteLLM ----------------------------------------------------------------
def test_bench_live_litellm_vs_chimera_end_to_end(tmp_path) -> None:
    exe = _litellm_or_skip()
    cfg = LiveBenchConfig(contenders=["litellm:least-busy", "chimera:vllm"], tasks=12, rate=6.0, time_scale=20,
                          overhead_rates=[30.0], overhead_duration_s=0.5, litellm=str(exe))
    b = run_live_bench(cfg, tmp_path / "out")
    assert [r.contender.label for r in b.runs] == ["litellm least-busy", "chimera vllm"]
    for r in b.runs:
        s = r.summary
        assert s["tasks"] == 12 and s["failed"] == 0, s.get("failures")
        assert set(m for m, v in s["per_model"].items() if v["calls"]) <= {"qwen2.5-1.5b", "qwen2.5-7b",
                                                                          "qwen2.5-14b"}
        assert r.sim is not None and r.sim["tasks"] == 12
        assert set(r.fidelity) == {"latency_mean", "latency_p50", "latency_p99", "throughput", "accuracy"}
        assert all(0.0 <= v <= 100.0 for v in r.fidelity.values())
    rr = b.runs[1].summary["per_model"]
    calls = [rr[m]["calls"] for m in ("qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b")]
    assert max(calls) - min(calls) <= 1  # the gateway's vllm policy is round-robin
    ov = b.overhead["rows"][0]
    assert ov["litellm_n"] > 0 and ov["gateway_n"] > 0 and ov["litellm_errors"] == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["runs"][0]["live"]["simulated"] is False
    md = (tmp_path / "out" / "results.md").read_text()
    assert "litellm least-busy" in md and "fidelity" in md and "LiteLLM p50" in md
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 1000


def test_bench_live_cli_errors_are_clear(tmp_path) -> None:
    r = CliRunner().invoke(app, ["bench", "live", "--contenders", "chimera:vllm,haproxy:rr", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "haproxy:rr" in r.output and "POLICY[@LAMBDA]" in r.output
    r = CliRunner().invoke(app, ["bench", "live", "--litellm", str(tmp_path / "no-such-litellm"), "--out",
                                 str(tmp_path)])
    assert r.exit_code == 2 and "no-such-litellm" in r.output and "make bench-live" in r.output
    r = CliRunner().invoke(app, ["bench", "live", "--tasks", "0", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "tasks" in r.output
