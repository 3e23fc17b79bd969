"""`chimera bench live`: LiteLLM vs Chimera on emulated backends, the fidelity numbers, and the agent-driver pieces the
head-to-head relies on (served model behind LiteLLM, prompt padding, no client-side cap on open-loop calls)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from chimera.agents.driver import AgentConfig, make_workflows, run_agents_sync, served_model
from chimera.bench.litellm_proxy import LiteLLMMissing, find_litellm, litellm_config
from chimera.bench.live import (
    LABEL,
    Contender,
    LiveBenchConfig,
    parse_contender,
    run_live_bench,
    to_emulated_models,
)
from chimera.bench.live.twin import fidelity
from chimera.cli import app
from chimera.emulate import EmulatorServer
from chimera.util.threaded import serve_in_thread
from chimera.workload.schema import Outcome, Task
from chimera.workload.synthetic import generate
from upstreams import fake_upstream, tiny_server_tokens, vllm_missing


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
    online = parse_contender("chimera:chimera@0.01+online")
    assert online == Contender("chimera", "chimera", 0.01, online=True) and online.label == "chimera chimera λ=0.01 online"
    assert parse_contender("litellm:least-busy").sim_policy == "least-loaded"
    assert parse_contender("litellm:simple-shuffle").sim_policy is None
    two = parse_contender("chimera:chimera@0.05x2")
    assert two == Contender("chimera", "chimera", 0.05, replicas=2) and two.label == "chimera chimera λ=0.05 on 2 replicas"
    assert parse_contender("chimera:vllmx3+online").label == "chimera vllm online on 3 replicas"
    for bad, msg in (("litellm:usage-based", "strategy"), ("chimera:nope", "unknown policy"),
                     ("chimera:vllm@0.1", "takes no λ"), ("chimera:chimera@x", "must be a number"),
                     ("nginx:rr", "expected"), ("chimera:chimera@0.1+offline", "only option after '\\+'"),
                     ("chimera:chimera@0.1x0", "at least 1"), ("chimera:chimera@0.1xx2", "must be a number")):
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
    backend = fake_upstream("qwen2.5-1.5b", delay=0.4, words=1)
    tasks = generate(40)
    with serve_in_thread(backend) as url:
        run = run_agents_sync(tasks, AgentConfig(base_url=url, models=["qwen2.5-1.5b"], rate=10_000,
                                                 time_scale=1000, feedback=False), n=40)
    assert run.summary["tasks"] == 40 and run.summary["failed"] == 0
    assert backend.state.live["max"] >= 35, backend.state.live


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


def test_bench_live_without_hints_runs_chimera_agents_unmodified(tmp_path) -> None:
    """`--no-hints`: the Chimera contenders' agents send no workflow hints; every task still completes, and the
    report says the run had none."""
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["bench", "live", "--no-hints", "--contenders", "chimera:vllm", "--tasks", "8",
                                 "--rate", "4", "--time-scale", "50", "--overhead-rates", "", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["hints"] is False and "no workflow hints" in res["label"]
    live = res["runs"][0]["live"]
    assert live["tasks"] == 8 and live["failed"] == 0 and "no workflow hints" in live["label"]
    assert "no workflow hints" in (out / "results.md").read_text()
    assert LiveBenchConfig().label == LABEL and LiveBenchConfig(hints=False).label.startswith(LABEL + "; no workflow")


def test_bench_live_with_chimera_as_two_replicas(tmp_path) -> None:
    """`chimera:POLICYx2`: two replicas sharing state on a Redis, the agents' calls alternating between them (each
    replica's trace store holds its share); the report sets the replicas beside the one gateway."""
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["bench", "live", "--contenders", "chimera:vllm,chimera:vllmx2", "--tasks", "8",
                                 "--rate", "4", "--time-scale", "50", "--overhead-rates", "", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    one, two = (x["live"] for x in res["runs"])
    assert two["contender"] == "chimera vllm on 2 replicas" and len(two["replica_endpoints"]) == 1
    assert one["failed"] == two["failed"] == 0 and one["tasks"] == two["tasks"] == 8
    folder = out / "chimera-vllm-on-2-replicas"
    counts = []
    for i in range(2):
        with sqlite3.connect(folder / f"r{i}.sqlite") as db:
            counts.append(db.execute("SELECT COUNT(*) FROM calls WHERE status = 'ok'").fetchone()[0])
    total = sum(v["calls"] for v in two["per_model"].values())
    assert sum(counts) == total and abs(counts[0] - counts[1]) <= 8, counts  # alternating calls, per workflow offset
    md = (out / "results.md").read_text()
    assert "on 2 replicas | chimera vllm |" in md and "each agent call sent to the next replica" in md


def test_bench_live_cli_errors_are_clear(tmp_path) -> None:
    r = CliRunner().invoke(app, ["bench", "live", "--contenders", "chimera:vllm,haproxy:rr", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "haproxy:rr" in r.output and "POLICY[@LAMBDA]" in r.output
    r = CliRunner().invoke(app, ["bench", "live", "--litellm", str(tmp_path / "no-such-litellm"), "--out",
                                 str(tmp_path)])
    assert r.exit_code == 2 and "no-such-litellm" in r.output and "make bench-live" in r.output
    r = CliRunner().invoke(app, ["bench", "live", "--tasks", "0", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "tasks" in r.output
    r = CliRunner().invoke(app, ["bench", "live", "--repeat", "0", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "repeat" in r.output


# ---- `--engine vllm`: the pieces without servers ---------------------------------------------------------------------
def _profiles(folder):
    """Two hand-written profiles (coefficients near what `chimera profile` fits on this machine's tiny and wide)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, size, fitted in (
            ("tiny", 0.0022, "{fixed_s: 0.0025, weights_s: 0.0, per_token_s: 0.00002, per_seq_s: 0.0009, "
                             "kv_capacity_tokens: 2000000, max_model_len: 2048}"),
            ("wide", 0.123, "{fixed_s: 0.02, weights_s: 0.005, per_token_s: 0.0015, per_seq_s: 0.002, "
                            "kv_capacity_tokens: 26000, max_model_len: 2048}")):
        (folder / f"{name}.yaml").write_text(f"chimera_profile: 1\nname: {name}\ngpu: test\nparams_b: {size}\n"
                                             f"max_num_seqs: 32\nmax_num_batched_tokens: 2048\nfitted: {fitted}\n")
    return folder


def test_real_engine_config_rules() -> None:
    from pydantic import ValidationError

    from chimera.bench.live import LABELS

    cfg = LiveBenchConfig(engine="vllm")
    assert cfg.time_scale == 1.0 and cfg.label == LABELS["vllm"]
    assert "real vLLM (CPU build), random-weight models" in cfg.label and "outcome table" in cfg.label
    assert LiveBenchConfig().time_scale == 5.0 and LiveBenchConfig(time_scale=None).time_scale == 5.0
    with pytest.raises(ValidationError, match="real time"):
        LiveBenchConfig(engine="vllm", time_scale=5)
    with pytest.raises(ValidationError, match="only with engine 'vllm'"):
        LiveBenchConfig(length_scale=0.5)
    with pytest.raises(ValidationError, match="engine"):
        LiveBenchConfig(engine="sglang")


def test_three_workload_models_map_weakest_and_strongest_onto_two_servers() -> None:
    from chimera.bench.live.workload import to_served_models

    tasks, mapping = to_served_models(generate(30), ["tiny", "wide"], "real")
    assert mapping == {"tiny": "qwen2.5-1.5b", "wide": "qwen2.5-14b"}  # by mean score, not by name
    assert all(set(t.outcomes) == {"tiny", "wide"} for t in tasks)
    src = {t.id: t for t in generate(30)}
    assert all(t.outcomes["wide"] == src[t.id].outcomes["qwen2.5-14b"] for t in tasks)


def test_scaled_plans_are_model_independent_and_fit_the_context() -> None:
    from chimera.bench.live.workload import real_workflows, to_served_models

    tasks, _ = to_served_models(generate(40), ["tiny", "wide"], "real")
    base = make_workflows(tasks, 40)
    wfs, rep = real_workflows(tasks, LiveBenchConfig(engine="vllm", tasks=40, length_scale=0.5, tool_scale=0.0))
    assert [w for w, _, _ in wfs] == [w for w, _, _ in base]
    for (_, p, _), (_, q, _) in zip(wfs, base):
        outs = [p.output_tokens(i, "tiny") for i in range(p.n_stages)]
        assert outs == [p.output_tokens(i, "wide") for i in range(p.n_stages)]  # the client sets max_tokens
        want = [max(1, round(0.5 * (q.output_tokens(i, "tiny") + q.output_tokens(i, "wide")) / 2))
                for i in range(q.n_stages)]
        for i in range(p.n_stages):
            assert p.prompt_tokens(i, outs) + outs[i] <= 2048 - 16
            assert outs[i] == want[i] or outs[i] < want[i]  # cut only to fit the context
        assert p.tool_s == (0.0,) * p.n_stages and p.score(["tiny"] * p.n_stages) == q.score(["tiny"] * q.n_stages)
    assert rep.calls == sum(p.n_stages for _, p, _ in {w[1]: w for w in wfs}.values()) or rep.calls > 0
    # a call that cannot fit is cut to fit
    from chimera.bench.live.workload import scale_plan

    long = scale_plan(base[0][1], ["tiny", "wide"], 40.0, 40.0, 1.0, 2048)
    lo = [long.output_tokens(i, "tiny") for i in range(long.n_stages)]
    assert all(long.prompt_tokens(i, lo) + lo[i] <= 2048 - 16 for i in range(long.n_stages))


def test_profiled_cluster_sets_the_rate_and_simulates_each_contender(tmp_path) -> None:
    from chimera.bench.live.profiles import given_profiles
    from chimera.bench.live.twin import capacity_of, profiled_cluster, simulate_same_run
    from chimera.bench.live.workload import real_workflows, to_served_models
    from chimera.sim.cluster import build_runtimes

    cfg = LiveBenchConfig(engine="vllm", tasks=30, profiles=str(_profiles(tmp_path / "p")))
    tasks, _ = to_served_models(generate(30), cfg.real_models, "real")
    wfs, _ = real_workflows(tasks, cfg)
    cl = profiled_cluster(given_profiles(cfg)["paths"], cfg)
    rts = build_runtimes(cl)
    assert [(r.info.name, r.info.size_rank, r.info.max_inflight) for r in rts] == [("tiny", 0, 32), ("wide", 1, 32)]
    cap = capacity_of(rts, wfs)
    assert 0.05 < cap < 50
    for spec in ("chimera:vllm", "chimera:chimera@0.05", "litellm:least-busy"):
        s = simulate_same_run(parse_contender(spec), tasks, cfg, 0.5 * cap, cluster=cl, workflows=wfs)
        assert s["tasks"] == 30 and set(m for m, v in s["per_model"].items() if v["calls"]) <= {"tiny", "wide"}
    with pytest.raises(FileNotFoundError, match="chimera profile"):
        given_profiles(LiveBenchConfig(engine="vllm", profiles=str(tmp_path / "none")))


def test_real_engine_twin_caches_prefixes_like_the_real_servers(tmp_path) -> None:
    """The real servers cache prompt prefixes (vLLM V1's default, 128-token blocks on the CPU build), so the simulated
    twin does too, and the scaled plans keep what every stage shares (the task prompt, a whole transcript carried
    on); before, scale_plan dropped both and the twin saw no hits at all."""
    from chimera.bench.live.twin import profiled_cluster, simulate_same_run
    from chimera.bench.live.workload import real_workflows, to_served_models
    from chimera.sim.cluster import build_runtimes

    cfg = LiveBenchConfig(engine="vllm", tasks=40, profiles=str(_profiles(tmp_path / "p")))
    tasks, _ = to_served_models(generate(40), cfg.real_models, "real")
    wfs, _ = real_workflows(tasks, cfg)
    full = next(p for _, p, _ in wfs if p.n_stages > 1 and p._pfull and p._pfull[1])
    outs = [full.output_tokens(i, "tiny") for i in range(full.n_stages)]
    first, second = full.token_stream(0, outs, "w", outs[0]), full.token_stream(1, outs, "w", 0)
    assert second[:len(first)] == first  # stage 1's prompt starts with all of stage 0 (prompt and output)
    assert all(p._pbase[1] > 0 for _, p, _ in wfs)  # the task prompt leads every stage
    paths = {m: str(tmp_path / "p" / f"{m}.yaml") for m in cfg.real_models}
    cl = profiled_cluster(paths, cfg)
    assert [(m.prefix_caching, m.kv_block_tokens) for m in cl.models] == [(True, 128)] * 2
    off = profiled_cluster(paths, cfg.model_copy(update={"prefix_caching": False}))
    assert not any(m.prefix_caching for m in off.models)
    cap = 0.5 * sum(r.info.max_inflight for r in build_runtimes(cl))
    s = simulate_same_run(parse_contender("chimera:vllm"), tasks, cfg, 0.02 * cap, cluster=cl, workflows=wfs)
    hits = sum(e["prefix_cache"]["hit_tokens"] for e in s["engines"].values())
    assert hits > 0, s["engines"]


def test_profile_step_is_the_chimera_profile_cli() -> None:
    """The pluggable profiling step is `chimera profile` with flags that command really has."""
    from pathlib import Path
    from types import SimpleNamespace

    from chimera.bench.live.profiles import profile_command

    srv = SimpleNamespace(base_url="http://127.0.0.1:1/v1", served_model_name="wide", core=1)
    cmd = profile_command(srv, Path("out/p/wide.yaml"), LiveBenchConfig(engine="vllm"), 0.123)
    args = cmd[cmd.index("profile") + 1:]
    flags = [a for a in args if a.startswith("--")]
    import typer

    known = {o for prm in typer.main.get_command(app).commands["profile"].params for o in prm.opts}
    assert set(flags) <= known, set(flags) - known
    assert args[args.index("--max-num-seqs") + 1] == "32" and args[args.index("--params-b") + 1] == "0.123"
    assert args[args.index("--max-num-batched-tokens") + 1] == "2048"


def test_server_prompts_are_laid_out_as_the_plans_token_stream(tmp_path) -> None:
    """Real-engine prompts follow the plan's segments in the server's tokens: each stage's prompt is the plan's
    prompt length, ChatML markers included (taken out of the segments); a whole-transcript stage starts with every token of the stage before it
    (so the server's prefix cache can reuse it, as the simulator assumes); a windowed stage shares the system and
    task prompt; two tasks of a kind share the system prompt, not their whole prompts."""
    from chimera.agents.messages import plan_messages

    counter = tiny_server_tokens(tmp_path)

    def ids(msgs):
        return counter.tok.encode(counter.render(msgs), add_special_tokens=False).ids

    firsts: dict[str, list[tuple[list[int], int]]] = {}
    seen = {"full": 0, "windowed": 0}
    totals = [0, 0]
    for wid, plan, task in make_workflows(generate(16)):
        outs, toks, prev = [], [], None
        for st in range(plan.n_stages):
            msgs, have = plan_messages(task, st, outs, toks, plan, wid, counter)
            planned = plan.prompt_tokens(st, toks)
            markers = counter.count([{"role": m["role"], "content": ""} for m in msgs])
            # the markers come out of the segments (all of them, unless a message is shorter than its markers)
            assert planned <= have <= planned + markers and have == len(ids(msgs)), (wid, st)
            totals[0] += have
            totals[1] += planned
            now = ids(msgs)
            if prev is not None and plan._pfull[st] and plan._pfull[st - 1]:
                assert now[:len(prev)] == prev, (wid, st)  # stage st-1's whole prompt, then its output
                seen["full"] += 1
            elif prev is not None:
                base = sum(plan._pbase)
                assert now[:base] == prev[:base], (wid, st)
                seen["windowed"] += 1
            prev = now
            outs.append(" cat dog" * 20)
            toks.append(7)
        firsts.setdefault(plan.kind, []).append((prev, plan._pbase[0]))
    assert seen["full"] and seen["windowed"]
    assert totals[1] <= totals[0] < 1.02 * totals[1], totals  # the plan's prompt lengths, markers included
    for kind, got in firsts.items():
        (a, sys_t), (b, _) = got[0], got[1]
        common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        # the ChatML header and the kind's system prompt are shared; the task texts part (after a common opening)
        assert sys_t + 3 <= common < min(len(a), len(b)), (kind, common, sys_t)


def test_cpu_time_of_a_process_group() -> None:
    import subprocess
    import sys
    import time

    from chimera.bench.proc_cpu import cpu_delta, snapshot

    p = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.2: pass"],
                         start_new_session=True)
    try:
        a = snapshot({"burner": p.pid})
        time.sleep(1.0)
        b = snapshot({"burner": p.pid})
    finally:
        p.wait(10)
    d = cpu_delta(a, b)
    assert 0.5 < d["roles"]["burner"]["cpu_s"] < 1.5, d
    assert d["roles"]["driver"]["cpu_s"] >= 0 and 0 < d["machine_busy_pct"] <= 100


# ---- `--engine vllm` on real vLLM CPU servers (marker `vllm`) -------------------------------------------------------


@pytest.mark.vllm
def test_bench_live_on_real_vllm_servers(tmp_path) -> None:
    """`--engine vllm` end to end, under 2 minutes: one Chimera contender, 5 short workflows, hand-written profiles (the measuring step is `chimera profile`'s,
    tested in tests/test_profile.py; here it is plugged in as files). Needs `.venv-vllm` and `out/models/{tiny,wide}`
    (`make test` builds both); skipped, naming the missing piece, where either is absent."""
    missing = vllm_missing()
    if missing:
        pytest.skip(f"real vLLM tests skipped: {missing}")
    from chimera.bench.live import LABELS, LiveBenchConfig, run_live_bench

    # One contender keeps this under 2 minutes (a server start is ~45-55 s here); that ignore_eos passes through
    # LiteLLM too shows in every `make bench-live-vllm` run (results.md: short calls 0).
    contenders = ["chimera:chimera@0.05"]
    cfg = LiveBenchConfig(engine="vllm", contenders=contenders, tasks=5, rate=0.8, length_scale=0.3,
                          prompt_scale=0.6, tool_scale=0.2,
                          max_inflight=8, kv_cache_gib=1, profiles=str(_profiles(tmp_path / "profiles")),
                          overhead_rates=[])
    b = run_live_bench(cfg, tmp_path / "out")
    assert [r.contender.label for r in b.runs] == [c.replace(":", " ").replace("@", " λ=") for c in contenders]
    for r in b.runs:
        s = r.summary
        assert s["tasks"] == 5 and s["failed"] == 0, s.get("failures")
        assert set(m for m, v in s["per_model"].items() if v["calls"]) <= {"tiny", "wide"}
        lc = s["length_check"]
        assert lc["short_calls"] == 0 and lc["capped_calls"] == 0, lc  # ignore_eos: exactly max_tokens
        assert lc["output_tokens_reported"] == lc["output_tokens_asked"]
        # padded in the server's tokens (only a planned prompt shorter than the chat markers is exceeded) ...
        assert 1.0 <= lc["prompt_tokens_sent"] / lc["prompt_tokens_planned"] < 1.01, lc
        assert lc["prompt_tokens_reported"] == lc["prompt_tokens_sent"], lc  # ... and the server counted the same
        gen = sum(d["generation_tokens"] for d in r.server_metrics.values())
        assert gen == lc["output_tokens_reported"], (gen, lc)
        roles = r.cpu["roles"]
        assert {"server tiny", "server wide", "gateway", "driver"} <= set(roles)
        assert all(roles[k]["cpu_s"] > 0 for k in ("server tiny", "server wide", "gateway")), roles
        assert r.sim is not None and r.sim["tasks"] == 5 and set(r.fidelity) == {
            "latency_mean", "latency_p50", "latency_p99", "throughput", "accuracy"}
        assert all(sv["priority"] for sv in r.servers)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["label"] == LABELS["vllm"] and res["runs"][0]["live"]["label"] == LABELS["vllm"]
    assert {"live", "sim", "fidelity_pct", "cpu"} <= set(res["runs"][0])
    assert res["engine"]["profiles"]["mode"] == "given"
    md = (tmp_path / "out" / "results.md").read_text()
    assert LABELS["vllm"] in md and "CPU seconds" in md and "fidelity" in md


def test_loaded_profiling_keeps_finished_servers_busy(tmp_path) -> None:
    """Profile mode "loaded": `run_commands` reports each profile as it finishes, and `BackgroundLoad` then sends that
    server run-like calls (ignore_eos, the plan's output length) until stopped."""
    import sys
    import time
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from chimera.bench.live.profiles import BackgroundLoad, run_commands
    from chimera.bench.live.workload import real_workflows, to_served_models

    seen = []

    async def chat(request):
        body = await request.json()
        seen.append(body)
        return JSONResponse({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})

    tasks, _ = to_served_models(generate(10), ["tiny", "wide"], "real")
    wfs, _ = real_workflows(tasks, LiveBenchConfig(engine="vllm", tasks=10))
    with serve_in_thread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])) as url:
        bg = BackgroundLoad(wfs, rps=40.0)
        order = []
        cmds = {"fast": [sys.executable, "-c", "pass"], "slow": [sys.executable, "-c", "import time; time.sleep(1.5)"]}

        def done(name: str) -> None:
            order.append(name)
            if name == "fast":
                bg.add(SimpleNamespace(served_model_name="tiny", base_url=url + "/v1"))

        t0 = time.monotonic()
        took = run_commands(cmds, {n: tmp_path / f"{n}.log" for n in cmds}, True, on_done=done)
        stats = bg.stop()
    assert order == ["fast", "slow"] and set(took) == {"fast", "slow"} and time.monotonic() - t0 < 10
    assert stats["sent"] >= 10 and stats["errors"] == 0, stats
    assert all(b["ignore_eos"] is True and b["model"] == "tiny" and b["max_tokens"] >= 1 for b in seen)


def test_closed_loop_background_keeps_a_fixed_number_in_flight() -> None:
    """The contention check keeps exactly `in_flight` calls on each peer: never more, and refilled as they end."""
    import asyncio
    import time
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from chimera.bench.live.profiles import BackgroundLoad
    from chimera.bench.live.workload import real_workflows, to_served_models

    state = {"now": 0, "peak": 0, "done": 0}

    async def chat(request):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        state["done"] += 1
        return JSONResponse({"choices": [], "usage": {"completion_tokens": 1}})

    tasks, _ = to_served_models(generate(10), ["tiny", "wide"], "real")
    wfs, _ = real_workflows(tasks, LiveBenchConfig(engine="vllm", tasks=10))
    with serve_in_thread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])) as url:
        bg = BackgroundLoad(wfs, rps=0.001, in_flight=3)  # rps is ignored in closed loop
        bg.add(SimpleNamespace(served_model_name="tiny", base_url=url + "/v1"))
        time.sleep(1.0)
        stats = bg.stop()
    assert state["peak"] == 3 and state["done"] >= 12 and stats["errors"] == 0, (state, stats)


def test_contention_measured_beside_the_profiles_reaches_the_simulated_cluster(tmp_path) -> None:
    from chimera.bench.live.config import CONTENTION_FILE
    from chimera.bench.live.twin import profiled_cluster

    folder = _profiles(tmp_path / "profiles")
    paths = {n: str(folder / f"{n}.yaml") for n in ("tiny", "wide")}
    cfg = LiveBenchConfig(engine="vllm")
    assert all(m.host is None and m.peer_busy_slowdown == 1.0 for m in profiled_cluster(paths, cfg).models)
    (folder / CONTENTION_FILE).write_text(json.dumps({"tiny": {"slowdown": 1.06}, "wide": {"slowdown": 2.13}}))
    tiny, wide = profiled_cluster(paths, cfg).models
    assert (tiny.host, tiny.peer_busy_slowdown, wide.peer_busy_slowdown) == ("this-machine", 1.06, 2.13)
    off = profiled_cluster(paths, cfg.model_copy(update={"contention": False})).models
    assert all(m.host is None for m in off)


def test_engine_times_over_a_run_from_the_servers_histograms() -> None:
    from chimera.bench.live.servers import metrics_delta

    a = {"tiny": {"vllm:inter_token_latency_seconds_sum": 1.0, "vllm:inter_token_latency_seconds_count": 100.0,
                  "vllm:e2e_request_latency_seconds_sum": 2.0, "vllm:e2e_request_latency_seconds_count": 10.0,
                  "vllm:request_queue_time_seconds_sum": 0.0}}
    b = {"tiny": {"vllm:inter_token_latency_seconds_sum": 1.6, "vllm:inter_token_latency_seconds_count": 300.0,
                  "vllm:e2e_request_latency_seconds_sum": 4.0, "vllm:e2e_request_latency_seconds_count": 20.0,
                  "vllm:request_queue_time_seconds_sum": 0.5}}
    d = metrics_delta(a, b)["tiny"]
    assert d["engine_tpot_ms"] == pytest.approx(3.0) and d["engine_e2e_ms_per_call"] == pytest.approx(200.0)
    assert d["engine_queue_ms_per_call"] == pytest.approx(50.0)


def test_real_tables_show_each_servers_counters_and_engine_times() -> None:
    from types import SimpleNamespace as NS

    from chimera.bench.live.report import real_tables

    runs = [NS(contender=NS(label="c1"), cpu={"wall_s": 1, "roles": {}}, summary={"length_check": {
        "prompt_reported_over_planned": 1.0, "short_calls": 0, "calls": 3}},
        server_metrics={"tiny": {"prompt_tokens": 10, "engine_tpot_ms": 2.5, "engine_e2e_ms_per_call": 80.0},
                        "wide": {"generation_tokens": 7, "prefix_cache_hit_pct": 15.0}},
        sim={"engines": {"wide#0": {"prefix_cache": {"queried_tokens": 200, "hit_tokens": 50}}, "tiny#0": {}}})]
    md = "\n".join(real_tables(NS(config=NS(real_models=["tiny", "wide"]), runs=runs, engine={})))
    assert "| c1 | 10 / 0, 0, 0% | 0 / 7, 0, 15% (twin 25%) | 1.000 | 0 of 3 |" in md
    assert "| c1 | 2.50; 0 / 0 / 0 / 80 | 0.00; 0 / 0 / 0 / 0 |" in md


def test_live_frontier_reads_the_runs_like_a_sweep() -> None:
    """bench live's frontier: chimera's λ values against the `chimera vllm` run, LiteLLM's least-busy standing in
    for least-loaded; in results.json and results.md."""
    from chimera.bench.live import Contender, ContenderRun, LiveBench
    from chimera.bench.live.report import live_frontier, markdown, to_json

    def run(gw: str, strat: str, lam: float | None, lat: float, acc: float) -> ContenderRun:
        summary = {"latency_s": {"mean": lat, "p50": lat, "p99": 2 * lat}, "accuracy": acc, "failed": 0,
                   "throughput_tasks_per_s": 1.0, "per_model": {"qwen2.5-7b": {"calls": 3}}}
        return ContenderRun(Contender(gw, strat, lam), summary)

    b = LiveBench(LiveBenchConfig(tasks=10, load=0.8), 1.0, {}, [
        run("chimera", "vllm", None, 10.0, 0.50), run("litellm", "least-busy", None, 8.0, 0.50),
        run("chimera", "chimera", 0.05, 6.0, 0.55), run("chimera", "chimera", 1.0, 4.0, 0.45)])
    (e,) = live_frontier(b)
    assert e["family"] == "chimera" and e["load"] == 0.8 and e["runs"] == 2
    assert e["best_acc_gain_pts"] == pytest.approx(5.0) and e["best_acc_gain_lam"] == 0.05
    assert e["best_speedup"] == pytest.approx(10 / 6) and e["best_speedup_lam"] == 0.05
    assert e["fastest_lam"] == 1.0 and e["fastest_vs_least_loaded"] == pytest.approx(2.0)
    assert to_json(b)["frontier"] == [e]
    assert "Frontier over the live λ values" in markdown(b) and "1.67×, λ=0.05" in markdown(b)
    no_base = LiveBench(LiveBenchConfig(tasks=10), 1.0, {}, b.runs[1:])
    assert live_frontier(no_base) == [] and "Frontier over" not in markdown(no_base)


def test_resim_markdown_sets_the_twins_prefix_hits_beside_the_servers() -> None:
    """--resimulate shows each server's prefix-cache hit share beside the twin's (from stored counters)."""
    from chimera.bench.live import resim_markdown

    s = {"latency_s": {"mean": 1.0, "p50": 1.0, "p99": 2.0}, "throughput_tasks_per_s": 1.0, "accuracy": 0.5,
         "engines": {"tiny#0": {"prefix_cache": {"queried_tokens": 1000, "hit_tokens": 80}}}}
    row = {"contender": "chimera vllm", "sim": s, "live": s, "fidelity_pct": fidelity(s, s),
           "server_metrics": {"tiny": {"prefix_cache_queries": 400.0, "prefix_cache_hits": 64.0,
                                       "prefix_cache_hit_pct": 16.0}}}
    r = {"profiles": {"tiny": "t.yaml"}, "sim_lengths": "online", "capacity_wps": 1.0, "rows": [row],
         "prefix_caching": True, "servers": ["tiny"]}
    assert "| chimera vllm | 16% (twin 8%) |" in resim_markdown(r)
    assert "Prefix-cache hits" not in resim_markdown({**r, "prefix_caching": False})


def test_an_online_contender_learns_in_its_twin_and_reports_windows() -> None:
    """`chimera:chimera@L+online`: the gateway routes with the online learner; its simulated twin learns from each
    workflow's score the same way (exploring), and the report shows both per window of workflows."""
    from chimera.bench.live import ContenderRun, LiveBench
    from chimera.bench.live.report import markdown
    from chimera.bench.live.twin import fidelity, simulate_same_run

    cfg = LiveBenchConfig(tasks=600, time_scale=5)
    c = parse_contender("chimera:chimera@0.02+online")
    s = simulate_same_run(c, generate(200), cfg, 1.0)
    assert s["tasks"] == 600 and [w["workflows"] for w in s["windows"]] == [600]
    assert 0.0 < s["windows"][0]["exploration"] < 0.25  # the twin explores, as the gateway's learner does
    assert s["windows"][0]["latency_mean_s"] == pytest.approx(s["latency_s"]["mean"])  # in live (scaled) seconds
    plain = simulate_same_run(parse_contender("chimera:chimera@0.02"), generate(200), cfg, 1.0)
    assert plain["windows"][0]["exploration"] == 0.0
    live = {"latency_s": {"mean": 2.0, "p50": 2.0, "p99": 4.0}, "accuracy": 0.6, "failed": 0,
            "throughput_tasks_per_s": 1.0, "per_model": {}, "windows": [
                {"start": 0, "workflows": 500, "accuracy": 0.55, "latency_mean_s": 1.5, "exploration": 0.0},
                {"start": 500, "workflows": 100, "accuracy": 0.65, "latency_mean_s": 2.5, "exploration": 0.0}]}
    md = markdown(LiveBench(cfg, 1.0, {}, [ContenderRun(c, live, sim=s, fidelity=fidelity(s, live))]))
    assert "| chimera chimera λ=0.02 online | 55.0% / 1.50 s (" in md and "| 65.0% / 2.50 s |" in md


def test_repeated_rounds_set_the_replicas_beside_one_gateways_spread() -> None:
    """--repeat: each contender's rounds, their mean and range; the replicas' means are judged against one gateway's
    range of rounds, with a rank test of the rounds, in results.json and results.md."""
    from chimera.bench.live import Contender, ContenderRun, LiveBench
    from chimera.bench.live.report import markdown, round_stats, to_json

    def summary(lat: float, acc: float, big: int) -> dict:
        return {"latency_s": {"mean": lat, "p50": lat, "p99": 2 * lat}, "accuracy": acc, "failed": 0,
                "throughput_tasks_per_s": 1.0, "per_model": {"qwen2.5-7b": {"calls": 10}, "qwen2.5-14b": {"calls": big}}}

    one, two = Contender("chimera", "chimera", 0.05), Contender("chimera", "chimera", 0.05, replicas=2)
    rounds = {one.label: [summary(1.0, 0.60, 4), summary(1.2, 0.50, 6), summary(0.9, 0.55, 5)],
              two.label: [summary(1.1, 0.58, 6), summary(1.0, 0.52, 8), summary(1.15, 0.57, 7)]}
    runs = [ContenderRun(one, rounds[one.label][0]), ContenderRun(two, rounds[two.label][0])]
    b = LiveBench(LiveBenchConfig(tasks=10, repeat=3), 1.0, {}, runs, rounds=rounds)
    x, y = round_stats(b)
    assert x["contender"] == one.label and "vs" not in x and x["calls_mean"] == {"qwen2.5-14b": 5.0, "qwen2.5-7b": 10.0}
    assert [c["qwen2.5-14b"] for c in x["calls"]] == [4, 6, 5]
    assert y["vs"] == one.label and y["latency_mean_s_within"] and y["accuracy_within"]
    assert y["latency_mean_s_mean"] == pytest.approx(3.25 / 3) and 0.0 < y["latency_mean_s_p"] <= 1.0
    md = markdown(b)
    assert "over 3 rounds" in md and "1.00, 1.20, 0.90" in md and "| yes, " in md
    rounds[two.label] = [summary(2.0, 0.58, 20), summary(2.2, 0.52, 22), summary(2.1, 0.57, 21)]
    z = round_stats(b)[1]
    assert not z["latency_mean_s_within"] and z["latency_mean_s_p"] < 0.2 and "**no**" in markdown(b)
    assert to_json(b)["rounds"][1]["latency_mean_s"] == [2.0, 2.2, 2.1]
    no_rounds = LiveBench(LiveBenchConfig(tasks=10), 1.0, {}, runs)
    assert round_stats(no_rounds) == [] and "rounds" not in to_json(no_rounds) and "rounds" not in markdown(no_rounds)
