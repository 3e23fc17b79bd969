"""`chimera bench gateway|live|soak`: benchmarks that start servers and send live traffic through the gateway."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from chimera.cli.common import (LOAD_ERRORS, WORKLOAD_HELP, console, err, fail, failing_on, names, progress,
                                validation_message)


def float_list(text: str, flag: str) -> list[float]:
    """'50,100' → [50.0, 100.0]; anything else fails naming the flag."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} must be comma-separated numbers, got {text!r}")


def _bench_replicas(replicas: str, duration: float, concurrency: int, policy: str, out: Path) -> None:
    from chimera.bench.gateway_scaling import markdown_table, run_scaling

    counts = float_list(replicas, "--replicas")
    if not counts or any(n < 1 or n != int(n) for n in counts):
        fail(f"--replicas must be comma-separated positive integers, got {replicas!r}")
    if duration <= 0 or concurrency < 1:
        fail("--duration and --concurrency must be positive")

    def show(row: dict) -> None:
        g, p = row["gateway"], row["proxy"]
        console.print(f"{row['replicas']} replica(s): {g['rps']:.0f} answered/s, {g['cpu_ms_per_req']:.2f} ms CPU/req "
                      f"(bare proxy {p['rps']:.0f}/s, {p['cpu_ms_per_req']:.2f} ms)")

    res = run_scaling([int(n) for n in counts], duration=duration, out=out, concurrency=concurrency, policy=policy,
                      progress=show)
    md = markdown_table(res)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}")


def bench_gateway(
    rates: str = typer.Option("50,100,200", "--rates", help="Comma-separated open-loop Poisson rates (req/s)."),
    duration: float = typer.Option(5.0, "--duration", help="Seconds of load per target (direct, via gateway) per rate."),
    out: Path = typer.Option(Path("out/bench-gateway"), "--out", help="Folder for results.md and results.json."),
    policy: str = typer.Option("chimera", "--policy", help="Gateway policy (e.g. chimera, vllm)."),
    profile: bool = typer.Option(False, "--profile", help="Run the gateway under cProfile; writes gateway-profile.txt."),
    baseline: bool = typer.Option(False, "--baseline", help="Also measure a bare httpx forwarding proxy (the stack's floor)."),
    litellm: Optional[Path] = typer.Option(None, "--litellm", help="Also measure LiteLLM's proxy: path to its `litellm` executable (make bench-live installs .venv-litellm)."),
    conversation: Optional[str] = typer.Option(None, "--conversation", help="MESSAGES,TOKENS: each request a chat history of that many messages and about that many tokens (default: one short message)."),
    identity_baseline: bool = typer.Option(False, "--identity-baseline", help="Also measure the same gateway with conversation inference off (identity.conversation: false): the difference is what inferring workflows costs."),
    online: bool = typer.Option(False, "--online", help="Also measure the same gateway with online learning on (learning: {online: true}); both gateways then route model 'chimera' between two models: the difference is what online learning costs."),
    replicas: Optional[str] = typer.Option(None, "--replicas", help="Comma-separated replica counts (e.g. 1,2): instead of the rate sweep, throughput at saturation of that many gateway replicas sharing state on one Redis (load split evenly), beside the bare proxy in the same run; --duration is seconds of each per count."),
    concurrency: int = typer.Option(16, "--concurrency", help="--replicas: closed-loop clients (split evenly across the replicas)."),
) -> None:
    """Latency the gateway adds in front of an instant fake backend (backend and gateway in their own processes).

    Example: chimera bench gateway --rates 50,100,200 --duration 5 --baseline --litellm .venv-litellm/bin/litellm

    Example: chimera bench gateway --rates 50,100 --conversation 50,20000 --identity-baseline

    Example: chimera bench gateway --rates 100,200 --duration 8 --online

    Example: chimera bench gateway --replicas 1,2 --duration 10
    """
    if replicas is not None:
        return _bench_replicas(replicas, duration, concurrency, policy,
                               out if out != Path("out/bench-gateway") else Path("out/bench-gateway-replicas"))
    from chimera.bench.gateway_overhead import markdown_table, run_benchmark
    from chimera.bench.litellm_proxy import LiteLLMMissing, find_litellm

    if litellm is not None:
        with failing_on(LiteLLMMissing, strip=False):
            litellm = find_litellm(litellm)
    rate_list = float_list(rates, "--rates")
    if not rate_list or any(r <= 0 for r in rate_list) or duration <= 0:
        fail("--rates and --duration must be positive")

    def show(row: dict) -> None:
        console.print(f"{row['rate']:g} req/s: added p50 {row['added_p50_ms']:.2f} ms, p99 {row['added_p99_ms']:.2f} ms")

    conv = None
    if conversation is not None:
        parts = float_list(conversation, "--conversation")
        if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0] or parts != [int(x) for x in parts]:
            fail(f"--conversation must be MESSAGES,TOKENS (integers, TOKENS >= MESSAGES >= 1), got {conversation!r}")
        conv = (int(parts[0]), int(parts[1]))
    out.mkdir(parents=True, exist_ok=True)
    res = run_benchmark(rate_list, duration=duration, out=out, policy=policy, profile_gateway=profile, baseline=baseline,
                        progress=show, litellm=litellm, conversation=conv, identity_baseline=identity_baseline,
                        online=online)
    md = markdown_table(res)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}"
                  + (f", {res['profile_top']}" if res.get("profile_top") else ""))


def bench_live(
    contenders: Optional[str] = typer.Option(None, "--contenders", help="Comma-separated litellm:STRATEGY | chimera:POLICY[@LAMBDA][xN][+online] (xN: N gateway replicas sharing state on a Redis, the agents' calls spread over them; +online: the gateway learns routing from the agents' feedback; default: litellm:simple-shuffle,litellm:least-busy,chimera:vllm,chimera:chimera@0.05)."),
    workload: str = typer.Option("synthetic", "--workload", "-w", help=WORKLOAD_HELP + " A real workload's three most-covered models are mapped onto 1.5B/7B/14B by accuracy."),
    tasks: int = typer.Option(200, "--tasks", help="Workflows per contender."),
    load: float = typer.Option(0.6, "--load", help="Arrival rate as a fraction of round-robin's simulated saturated throughput."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Live workflows/s (overrides --load)."),
    time_scale: Optional[float] = typer.Option(None, "--time-scale", help="Emulators and tool sleeps run this many times faster than real time (default 5; --engine vllm: 1, real time)."),
    seed: int = typer.Option(0, "--seed"),
    overhead_rates: str = typer.Option("50,100", "--overhead-rates", help="Req/s for the added-latency probe (empty: skip it)."),
    overhead_duration: float = typer.Option(3.0, "--overhead-duration", help="Seconds per target per rate of the probe."),
    litellm: Optional[Path] = typer.Option(None, "--litellm", help="The `litellm` executable (default: .venv-litellm/bin/litellm, then PATH; `make bench-live` installs it)."),
    out: Path = typer.Option(Path("out/bench-live"), "--out", help="Folder for results.md, results.json, frontier.png and logs."),
    engine: str = typer.Option("emulate", "--engine", help="emulate: `chimera emulate` backends (engine model); vllm: real vLLM CPU servers (tiny + wide, random weights, one core each; needs .venv-vllm and out/models)."),
    real_models: str = typer.Option("tiny,wide", "--real-models", help="--engine vllm: the servers, weakest-mapped first (the workload's weakest model -> the first, strongest -> the last)."),
    length_scale: float = typer.Option(1.0, "--length-scale", help="--engine vllm: × every call's output tokens (the same for every model; exact via ignore_eos)."),
    prompt_scale: Optional[float] = typer.Option(None, "--prompt-scale", help="--engine vllm: × the plan's prompt tokens (default: --length-scale)."),
    tool_scale: float = typer.Option(1.0, "--tool-scale", help="--engine vllm: × the plan's tool sleeps."),
    max_inflight: int = typer.Option(32, "--max-inflight", help="--engine vllm: each server's --max-num-seqs and the gateway's max_inflight per backend."),
    kv_cache_gib: int = typer.Option(2, "--kv-cache-gib", help="--engine vllm: KV cache per server (GiB)."),
    priority: bool = typer.Option(True, "--priority/--no-priority", help="--engine vllm: servers run vLLM's priority policy (all contenders get the same servers)."),
    profiles: Optional[Path] = typer.Option(None, "--profiles", help="--engine vllm: a folder with NAME.yaml per server from `chimera profile` (skips measuring)."),
    profile_mode: str = typer.Option("alone", "--profile-mode", help="--engine vllm: alone (one by one, the other idle: with --contention the simulator adds the slowdown while peers are busy), loaded (both servers measured at once, and a finished server keeps getting the run's kind of calls until the other is done) or together (both at once, nothing more)."),
    contention: bool = typer.Option(True, "--contention/--no-contention", help="--engine vllm: measure each server's slowdown while the others are busy (profiles/contention.json) and simulate it; with --resimulate: use a stored one or not."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching", help="--engine vllm: the simulated servers cache prompt prefixes in 128-token blocks as the real ones do (with --resimulate too); off: full prefill every call."),
    contention_batch: int = typer.Option(4, "--contention-batch", help="--engine vllm: batch of the contention check (calls measured, and kept in flight on each peer)."),
    background_rps: float = typer.Option(1.0, "--background-rps", help="--engine vllm, --profile-mode loaded: calls/s sent to each server whose profile is done."),
    sim_online_lengths: bool = typer.Option(True, "--sim-online-lengths/--sim-plan-lengths", help="--engine vllm: the simulated gateway learns lengths online from a cold start, as the live one (or knows the plans' per-stage means)."),
    profile_rounds: int = typer.Option(2, "--profile-rounds", help="--engine vllm: `chimera profile --rounds`."),
    profile_concurrency: str = typer.Option("1,2,4,8,16,32", "--profile-concurrency", help="--engine vllm: `chimera profile --concurrency`."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="--engine vllm: the random-weight models (default out/models)."),
    vllm_venv: Optional[Path] = typer.Option(None, "--vllm-venv", help="--engine vllm: the vLLM venv (default .venv-vllm)."),
    no_hints: bool = typer.Option(False, "--no-hints", help="Chimera contenders' agents send no workflow hints, only what an OpenAI client sends (the gateway infers each workflow from its conversation); the report says so. The simulated twin is unchanged."),
    append_only: bool = typer.Option(False, "--append-only", help="Every contender's agents send append-only conversations (as without hints) and keep their hints: the like-for-like partner of a --no-hints run."),
    replica_spread: str = typer.Option("call", "--replica-spread", help="Contenders run as replicas (chimera:POLICYxN): 'call' sends each call to the next replica (a round-robin load balancer), 'workflow' each workflow to one replica (sticky sessions; always so with --no-hints)."),
    repeat: int = typer.Option(1, "--repeat", help="Run every contender this many times, round by round on the same tasks and arrivals; the report adds each one's rounds, mean and range (live runs vary between runs)."),
    resim: bool = typer.Option(False, "--resimulate", help="--engine vllm results in --out: run only the simulator again on the stored live runs (with --profiles and --sim-online-lengths/--sim-plan-lengths); writes results-resim.md/.json. Starts nothing."),
) -> None:
    """Live head-to-head: the same agents and workload through LiteLLM's proxy and through Chimera, on fresh
    backends each (emulated, or real vLLM CPU servers with --engine vllm), with the simulator's prediction of each
    run beside it (fidelity). See docs/live.md.

    Example: chimera bench live --litellm .venv-litellm/bin/litellm --tasks 200 --out out/bench-live
    Real vLLM: chimera bench live --engine vllm --tasks 60 --load 0.5 --overhead-rates "" --out out/bench-live-vllm
    Unmodified agents: chimera bench live --no-hints --contenders chimera:vllm,chimera:chimera@0.05 --out out/bench-live-nohints
    Two replicas sharing state: chimera bench live --contenders chimera:chimera@0.05,chimera:chimera@0.05x2 --out out/bench-live-replicas
    Each side's spread: chimera bench live --contenders chimera:chimera@0.05,chimera:chimera@0.05x2 --repeat 5 --out out/bench-live-replicas
    """
    from pydantic import ValidationError

    from chimera.bench.live import DEFAULT_CONTENDERS, LiveBenchConfig

    if resim:
        return resimulate_live(out, profiles, sim_online_lengths, contention, prefix_caching)
    orates = float_list(overhead_rates, "--overhead-rates")
    try:
        cfg = LiveBenchConfig(
            contenders=names(contenders) if contenders else list(DEFAULT_CONTENDERS),
            workload=workload, tasks=tasks, load=load, rate=rate, time_scale=time_scale, seed=seed,
            overhead_rates=orates, overhead_duration_s=overhead_duration, litellm=str(litellm) if litellm else None,
            hints=not no_hints, append_only=append_only, replica_spread=replica_spread, repeat=repeat,
            engine=engine, real_models=names(real_models),
            length_scale=length_scale, prompt_scale=prompt_scale, tool_scale=tool_scale,
            max_inflight=max_inflight, kv_cache_gib=kv_cache_gib, priority=priority,
            profiles=str(profiles) if profiles else None, profile_mode=profile_mode, background_rps=background_rps,
            sim_online_lengths=sim_online_lengths, contention=contention, contention_batch=contention_batch,
            prefix_caching=prefix_caching,
            profile_rounds=profile_rounds, profile_concurrency=profile_concurrency,
            models_dir=str(models_dir) if models_dir else None, venv=str(vllm_venv) if vllm_venv else None)
    except ValidationError as e:
        fail(validation_message(e))
    run_live(cfg, out)


def resimulate_live(out: Path, profiles: Optional[Path], online_lengths: bool, contention: bool,
                    prefix_caching: bool) -> None:
    """`bench live --resimulate`: the simulator again on the live runs stored in `out`; writes results-resim.*."""
    from chimera.bench.live import resim_markdown, resimulate

    with failing_on(*LOAD_ERRORS):
        r = resimulate(out, str(profiles) if profiles else None, online_lengths, contention, prefix_caching)
    md = resim_markdown(r)
    (out / "results-resim.md").write_text(md)
    (out / "results-resim.json").write_text(json.dumps(r, indent=1))
    console.print(md)
    console.print(f"wrote {out / 'results-resim.md'}, {out / 'results-resim.json'}")


def run_live(cfg, out: Path) -> None:
    """Run the live benchmark of `cfg` with a progress bar per stage; print its results.md."""
    from chimera.backends.vllm_cpu import EngineSetupError
    from chimera.bench.litellm_proxy import LiteLLMMissing
    from chimera.bench.live import run_live_bench

    t0 = time.perf_counter()
    with progress() as prog:
        bar: dict = {}

        def on_stage(name: str) -> None:
            if "id" in bar:
                prog.update(bar["id"], visible=False)
            bar["id"] = prog.add_task(name, total=None if name == "gateway added latency" or name.startswith(
                "profiling") else cfg.tasks)

        with failing_on(LiteLLMMissing, EngineSetupError, strip=False), failing_on(*LOAD_ERRORS):
            run_live_bench(cfg, out, on_record=lambda _r: prog.advance(bar["id"]), on_stage=on_stage)
    console.print((out / "results.md").read_text())
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'frontier.png'} "
                  f"({time.perf_counter() - t0:.0f} s wall)")


def bench_soak(
    minutes: float = typer.Option(10.0, "--minutes", help="Steady phase: minutes of mixed traffic (float allowed)."),
    rate: float = typer.Option(30.0, "--rate", help="Steady phase: open-loop Poisson requests/s."),
    reject_minutes: float = typer.Option(5.0, "--reject-minutes", help="Reject phase: minutes of traffic the gateway refuses with 429 (0: skip)."),
    reject_rate: Optional[float] = typer.Option(None, "--reject-rate", help="Reject phase requests/s (default: --rate)."),
    window_s: float = typer.Option(60.0, "--window-s", help="Seconds per measurement window."),
    time_scale: float = typer.Option(20.0, "--time-scale", help="Emulated backends run this many times faster than real time."),
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="Folder from `chimera train -w synthetic` (default: train one into OUT/predictors)."),
    train_tasks: int = typer.Option(600, "--train-tasks", help="Synthetic tasks to train on when --predictors is not given."),
    train_trees: int = typer.Option(100, "--train-trees", help="Trees per quantile forest when training."),
    max_queue: int = typer.Option(32, "--max-queue", help="The gateway's limits.max_queue."),
    lam: float = typer.Option(0.05, "--lam", help="λ of the gateway's chimera policy."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("out/bench-soak"), "--out", help="Folder for results.md, results.json, gateway.yaml, traces and logs."),
) -> None:
    """Soak the gateway (trained predictors, 3 emulated backends, all subprocesses): steady mixed traffic, then a
    phase of 429s; per window the gateway's RSS, latency p50/p99 and answers by status (live, emulated backends).

    Example: chimera bench soak --minutes 30 --rate 30 --reject-minutes 5 --window-s 60 --out out/bench-soak
    """
    from pydantic import ValidationError

    from chimera.bench.soak import WINDOW_COLUMNS, SoakConfig, summary_lines, window_cells

    try:
        cfg = SoakConfig(minutes=minutes, rate=rate, reject_minutes=reject_minutes, reject_rate=reject_rate,
                         window_s=window_s, time_scale=time_scale, predictors=str(predictors) if predictors else None,
                         train_tasks=train_tasks, train_trees=train_trees, max_queue=max_queue, lam=lam, seed=seed)
    except ValidationError as e:
        fail(validation_message(e, as_flags=True))
    res = run_soak_with_progress(cfg, out)
    t = Table(title=f"gateway soak — {res['label']}")
    for col in WINDOW_COLUMNS:
        t.add_column(col, justify="left" if col == "phase" else "right")
    for r in res["windows"]:
        t.add_row(*window_cells(r))
    console.print(res["command"])
    console.print(t)
    for line in summary_lines(res):
        console.print(line)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'} ({res['wall_s']:.0f} s wall)")


def run_soak_with_progress(cfg, out: Path) -> dict:
    """Run the soak of `cfg`, one progress bar over both phases and a line per window; Ctrl-C exits 130."""
    from chimera.bench.soak import fmt_num, run_soak

    with progress() as prog:
        bar = prog.add_task("setting up", total=cfg.steady_s + cfg.reject_s)

        def on_tick(phase: str, t: float) -> None:
            done = min(t, cfg.steady_s) if phase == "steady" else cfg.steady_s + min(t, cfg.reject_s)
            prog.update(bar, description=f"{phase} (s)", completed=round(done))

        def on_window(r: dict) -> None:
            c = r["counts"]
            prog.console.print(f"{r['phase']} window {r['window']}: {r['sent']} sent, 200 {c['200']}, 429 {c['429']}, "
                               f"4xx {c['4xx']}, 5xx {c['5xx']}, conn {c['conn']}; p50 {fmt_num(r['p50_ms'])} ms, "
                               f"p99 {fmt_num(r['p99_ms'])} ms; gateway RSS {fmt_num(r['rss_end_mib'])} MiB")

        try:
            with failing_on(*LOAD_ERRORS, RuntimeError):
                return run_soak(cfg, out, on_stage=lambda m: prog.update(bar, description=m), on_window=on_window,
                                on_tick=on_tick)
        except KeyboardInterrupt:
            err.print("interrupted: the backends and the gateway it started have been stopped; no results written")
            raise typer.Exit(130)
