"""The `chimera` command: one entry point, one subcommand per job."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Chimera: predictive scheduling of multi-agent LLM workflows on heterogeneous clusters.")
workload_app = typer.Typer(no_args_is_help=True, help="Workloads: export public benchmark data, generate synthetic tasks.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: policy sweeps and speed.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate predictors on held-out tasks.")
app.add_typer(workload_app, name="workload")
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
agents_app = typer.Typer(no_args_is_help=True, help="Live agents: run a workload's workflows against an OpenAI-compatible endpoint.")
app.add_typer(agents_app, name="agents")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)  # error messages name paths: never wrap them

WORKLOAD_HELP = "JSONL file, `source:NAME` (a loader over the data directory) or `synthetic[:N]`."
CLUSTER_HELP = "Cluster YAML (models: [{name, gpu, …} or {profile: MODEL@GPU}]); default: the built-in 3×Qwen2.5 on A6000."


def _fail(msg: str) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(2)


def _cluster(path: Optional[Path]):
    from chimera.perfmodel.profiles import default_cluster, load_cluster

    return load_cluster(path) if path else default_cluster()


def _param_pairs(pairs: list[str]) -> dict:
    """KEY=VALUE strings → a dict, values read as YAML scalars (0.5, true, null, {a: 1}); the policy checks keys."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _predictors(path: Optional[Path]):
    """Load a predictor folder, or None; a bad folder is a clear error."""
    if path is None:
        return None
    from chimera.predict.artifacts import load_predictors

    return load_predictors(path)


def _workloads(specs: list[str], data_dir: Optional[Path], seed: int) -> list[tuple[str, list]]:
    from chimera.workload.source import load_workload

    return [(w, load_workload(w, data_dir=data_dir, seed=seed)[0]) for w in specs]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


def _summary_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("policy", "λ", "tasks", "accuracy", "mean lat (s)", "p50", "p90", "p99", "queue mean (s)",
                "tasks/s", "calls per model"):
        t.add_column(col, justify="right" if col not in ("policy", "calls per model") else "left")
    for r in rows:
        lam = "" if r.get("lam") is None else f"{r['lam']:g}"
        per = ", ".join(f"{m}:{v['calls']}" for m, v in r["per_model"].items())
        lat = r["latency_s"]
        t.add_row(r["policy"], lam, str(r["tasks"]), f"{100 * r['accuracy']:.1f}%", f"{lat['mean']:.2f}",
                  f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{r['queue_s']['mean']:.2f}",
                  f"{r['throughput_tasks_per_s']:.3f}", per)
    return t


@app.command()
def simulate(
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP),
    policy: str = typer.Option("chimera", "--policy", "-p", help="Policy name (see `chimera policies`)."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Poisson arrivals, workflows per second."),
    agents: Optional[int] = typer.Option(None, "--agents", help="Closed loop: N agents, each starts a new task when one ends."),
    tasks: Optional[int] = typer.Option(None, "--tasks", help="Workflows to run (more than the file: tasks drawn again)."),
    seed: int = typer.Option(0, "--seed"),
    lam: Optional[float] = typer.Option(None, "--lam", help="λ: accuracy traded per second of expected latency (policies that take λ)."),
    param: list[str] = typer.Option([], "--param", help="Policy parameter KEY=VALUE (repeatable; see `chimera policies`)."),
    predictions: Optional[str] = typer.Option(None, "--predictions", help="priors | trained | oracle | oracle-scores | "
                                              "oracle-lengths (default: the policy preset's, else trained if "
                                              "--predictors, else priors)."),
    train_frac: float = typer.Option(0.3, "--train-frac", help="Share of tasks (by id) used to fit predictors; the rest are simulated."),
    rule: str = typer.Option("weighted", "--quality-rule", help="Task score with mixed models: weighted | last | min."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Public data directory (default ../shared/data)."),
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="Folder from `chimera train`: trained router "
                                              "and length forest (default: honest per-kind/per-stage priors)."),
    length_stat: str = typer.Option("mean", "--length-stat", help="How the policy reads the trained length "
                                    "forest: 'mean' (its predicted mean) or 'median'."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary JSON here."),
) -> None:
    """Simulate a workload on a cluster under one policy and print a summary (all results are simulated).

    Example: chimera simulate --workload synthetic:500 --policy chimera --rate 2 --json out/chimera.json
    """
    from chimera.predict.length import stat_quantile
    from chimera.sim.experiment import prepare, run_policy
    from chimera.workload.source import load_workload

    if rate is None and agents is None:
        rate = 1.0
    if rate is not None and agents is not None:
        _fail("give --rate or --agents, not both")
    try:
        from chimera.sched.registry import make_policy

        params = _param_pairs(param)
        make_policy(policy, lam=lam, **params)  # refuse unknown parameters before any work
        ts, report = load_workload(workload, data_dir=data_dir, seed=seed)
        stat_quantile(length_stat)
        prep = prepare(ts, _cluster(cluster), seed=seed, train_frac=train_frac, rule=rule,
                       predictors=_predictors(predictors), length_stat=length_stat)
        n = tasks if tasks is not None else len(prep.test)
        with _progress() as prog:
            bar = prog.add_task(f"simulating {policy}", total=n)
            res = run_policy(prep, policy, rate=rate, agents=agents, n_tasks=n, seed=seed, lam=lam,
                             progress=lambda k: prog.advance(bar, k), predictions=predictions, **params)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    res["workload"] = workload
    res["train_tasks"], res["test_tasks"] = len(prep.train), len(prep.test)
    console.print(_summary_table([res], f"{workload} — simulated"))
    console.print(f"{res['calls']} calls in {res['wall_s']:.2f} s wall ({res['calls_per_wall_s']:,.0f} calls/s); "
                  f"skipped tasks: {res['skipped_tasks']}; train/test tasks: {len(prep.train)}/{len(prep.test)}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2))
        console.print(f"wrote {json_out}")


@app.command()
def policies() -> None:
    """List the scheduling policies with their parameters (defaults) and capabilities.

    Example: chimera policies
    """
    from chimera.sched.registry import POLICIES, live_refusal, policy_entry

    for p in POLICIES:
        e = policy_entry(p)
        fields = e.cls.Params.model_fields
        params = ", ".join(f"{k}={e.params.get(k, f.get_default(call_default_factory=True))!r}"
                           for k, f in fields.items())
        caps = [c for c in ("preemptive", "needs_predictions") if getattr(e.cls, c)]
        extra = f"  predictions={e.predictions}" if e.predictions else ""
        live = live_refusal(p) or "runs as configured"
        console.print(f"[bold]{p}[/bold]  ({', '.join(caps) or 'no predictions'}){extra}\n    {params}\n"
                      f"    gateway: {live}", soft_wrap=True)


@app.command("cluster")
def cluster_show(cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP)) -> None:
    """Show a cluster's models with KV capacity and the speed figures policies use.

    Example: chimera cluster --cluster examples/cluster-llama-h100.yaml
    """
    from chimera.sim.cluster import build_runtimes

    try:
        runtimes = build_runtimes(_cluster(cluster))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    t = Table(title="cluster")
    for col in ("model", "serves", "gpu", "tp×replicas", "KV tokens/replica", "decode tok/s (busy)", "TPOT (ms)",
                "prefill tok/s", "max in-flight"):
        t.add_column(col)
    for r in runtimes:
        t.add_row(r.info.name, r.spec.workload_model or r.info.name, r.spec.gpu, f"{r.spec.tp}×{r.spec.replicas}",
                  f"{r.perf.kv_capacity_tokens:,}", f"{r.info.tokens_per_s:,.0f}", f"{1000 * r.info.tpot_s:.1f}",
                  f"{r.info.prefill_tokens_per_s:,.0f}", str(r.info.max_inflight))
    console.print(t)


@workload_app.command("list")
def workload_list() -> None:
    """List the public-data sources a workload can be exported from.

    Example: chimera workload list
    """
    from chimera.workload.loaders import SOURCES

    for name, info in SOURCES.items():
        console.print(f"[bold]{name}[/]  {info.description}")


@workload_app.command("export")
def workload_export(
    source: str = typer.Option(..., "--source", help="Loader name (see `chimera workload list`) or `synthetic`."),
    out: Path = typer.Option(..., "--out", help="Output JSONL file."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Public data directory (default ../shared/data)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many tasks."),
    seed: int = typer.Option(0, "--seed", help="Seed (synthetic only)."),
) -> None:
    """Write a loader's tasks in the workload JSONL format.

    Example: chimera workload export --source mmlu-pro-math --out out/mmlu-math.jsonl
    """
    from chimera.workload.schema import write_tasks
    from chimera.workload.source import load_workload

    spec = source if source.startswith("synthetic") else f"source:{source}"
    t0 = time.perf_counter()
    try:
        tasks, _ = load_workload(spec, data_dir=data_dir, limit=limit, seed=seed)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    n = write_tasks(tasks, out)
    models = sorted({m for t in tasks for m in t.outcomes})
    console.print(f"wrote {n} tasks ({len(models)} models) to {out} in {time.perf_counter() - t0:.1f} s")


@bench_app.command("sim")
def bench_sim(
    workload: list[str] = typer.Option(["synthetic"], "--workload", "-w", help=WORKLOAD_HELP + " Repeatable."),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP),
    policies_: Optional[str] = typer.Option(None, "--policies", help="Comma-separated policies (default: all)."),
    loads: str = typer.Option("0.5,0.8,1.1", "--loads",
                              help="Arrival rates as fractions of the throughput round-robin (vllm) sustains when saturated (measured)."),
    lams: str = typer.Option("0.005,0.01,0.02,0.05,0.1", "--lams", help="λ values for chimera and chimera-oracle."),
    ablation_lam: float = typer.Option(0.02, "--ablation-lam", help="λ for the chimera-no-* ablations."),
    predictions_: Optional[str] = typer.Option(None, "--predictions", help="Extra predictor choices for chimera, comma-"
                                               "separated (oracle, oracle-scores, oracle-lengths, …); rows 'chimera+CHOICE'."),
    tasks: int = typer.Option(3000, "--tasks", help="Workflows per run (held-out tasks, drawn again as needed)."),
    seed: int = typer.Option(0, "--seed"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    out: Path = typer.Option(Path("out/bench-sim"), "--out", help="Folder for results.md, results.json, frontier.png."),
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="Folder from `chimera train` (default: priors)."),
    param: list[str] = typer.Option([], "--param", help="POLICY.KEY=VALUE for one policy of the sweep (repeatable), "
                                    "e.g. chimera.congestion=batch."),
    length_stat: str = typer.Option("mean", "--length-stat", help="How the policy reads the trained length "
                                    "forest: 'mean' (its predicted mean) or 'median'."),
    engine_order: str = typer.Option("priority", "--engine-order", help="Engines' waiting order: 'priority' (the "
                                     "call's, as vLLM's priority policy) or 'fcfs' (vLLM's default)."),
    hold: Optional[float] = typer.Option(None, "--hold", help="Gateway admission cap per model: HOLD × the batch a "
                                         "replica runs at a typical context (KV-limited) × replicas; calls beyond "
                                         "it wait at the gateway in the policy's order (default: max_num_seqs)."),
    free_context: bool = typer.Option(False, "--free-context", help="What-if bound: a stage prefills only its "
                                      "newest text, its workflow's earlier context taken as cached on every replica "
                                      "of every model (no placement can save more prefill)."),
) -> None:
    """Sweep policies × load levels × λ; write a markdown table and a latency–accuracy frontier plot.

    Example: chimera bench sim -w source:mmlu-pro-math -c examples/cluster-llama-h100.yaml --out out/mmlu
    """
    from chimera.bench.frontier import frontier, frontier_markdown
    from chimera.bench.report import frontier_plot, markdown_table
    from chimera.bench.sweep import SweepSpec, check_spec, count_runs, run_sweep
    from chimera.sched.registry import POLICIES
    from chimera.workload.source import load_workload

    spec = SweepSpec(
        policies=[p.strip() for p in policies_.split(",")] if policies_ else list(POLICIES),
        loads=[float(x) for x in loads.split(",")],
        lams=[float(x) for x in lams.split(",")],
        tasks=tasks,
        seed=seed,
        ablation_lam=ablation_lam,
        predictions=[p.strip() for p in predictions_.split(",")] if predictions_ else (),
        length_stat=length_stat,
        engine_order=engine_order,
        hold=hold,
        free_context=free_context,
    )
    for pair in param:
        head, _, rest = pair.partition(".")
        if not rest or "=" not in rest:
            _fail(f"--param {pair!r}: expected POLICY.KEY=VALUE")
        try:
            spec.params.setdefault(head, {}).update(_param_pairs([rest]))
        except ValueError as e:
            _fail(str(e))
    unknown = [p for p in spec.policies if p not in POLICIES]
    if unknown:
        _fail(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    try:
        check_spec(spec)
    except ValueError as e:
        _fail(str(e))
    rows: list[dict] = []
    try:
        cl = _cluster(cluster)
        trained = _predictors(predictors)
        with _progress() as prog:
            for w in workload:
                ts, _ = load_workload(w, data_dir=data_dir, seed=seed)
                bar = prog.add_task(f"{w}", total=count_runs(spec))
                rows += run_sweep(w, ts, cl, spec, progress=lambda k, b=bar: prog.advance(b, k), predictors=trained)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    out.mkdir(parents=True, exist_ok=True)
    front = frontier(rows)
    md = markdown_table(rows) + "\n## Frontier over the λ sweep\n\n" + frontier_markdown(front)
    if free_context:
        md = ("**What-if bound (`--free-context`):** every stage after a workflow's first prefills only its newest "
              "text, as if its workflow's earlier context were cached on every replica.\n\n" + md)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"runs": rows, "frontier": front}, indent=1))
    png = frontier_plot(rows, out / "frontier.png")
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {png} (all results simulated)")


@bench_app.command("speed")
def bench_speed(
    tasks: int = typer.Option(10_000, "--tasks", help="Workflows to simulate."),
    policy: str = typer.Option("chimera", "--policy"),
    load: float = typer.Option(0.7, "--load", help="Arrival rate as a fraction of estimated capacity."),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Time the simulator on many workflows of the built-in synthetic workload and print calls/s.

    Example: chimera bench speed --tasks 10000
    """
    from chimera.bench.sweep import capacity_workflows_per_s
    from chimera.sim.experiment import prepare, run_policy
    from chimera.workload.synthetic import generate

    prep = prepare(generate(2000, seed=seed), _cluster(cluster), seed=seed)
    rate = load * capacity_workflows_per_s(prep)
    t0 = time.perf_counter()
    wfs = prep.workflows(tasks, seed)
    plan_s = time.perf_counter() - t0
    res = run_policy(prep, policy, rate=rate, seed=seed, workflows=wfs)
    total = plan_s + res["wall_s"]
    console.print(f"{policy}: {tasks} workflows, {res['calls']} calls; planning {plan_s:.2f} s + simulation "
                  f"{res['wall_s']:.2f} s = {total:.2f} s wall; {res['calls'] / total:,.0f} calls/s; "
                  f"scheduler share of simulated latency {100 * res['scheduler_share_of_latency']:.3f}%")


@bench_app.command("predict")
def bench_predict(
    predictors: Path = typer.Option(..., "--predictors", help="Folder from `chimera train`."),
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP + " Request texts to predict for."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated models (default: the first 3 trained)."),
    batch: int = typer.Option(32, "--batch"),
    length_stat: str = typer.Option("mean", "--length-stat", help="Read the length forest as the gateway would: "
                                    "'mean' or 'median'."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
) -> None:
    """Router + length prediction cost per request, batched (caches off), on this machine.

    Example: chimera bench predict --predictors out/predictors/mmlu -w source:mmlu-pro-math --batch 32
    """
    from chimera.bench.predict_speed import measure
    from chimera.predict.length import stat_quantile
    from chimera.workload.source import load_workload

    try:
        stat_quantile(length_stat)
        pred = _predictors(predictors)
        ts, _ = load_workload(workload, data_dir=data_dir)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    names = [m.strip() for m in models.split(",")] if models else pred.models[:3]
    res = measure(pred, ts, names, batch=batch, length_stat=length_stat)
    console.print(f"{predictors} ({pred.spec.get('router', {}).get('encoder', '?')} router, length {length_stat}), "
                  f"batch {batch}, "
                  f"{len(names)} models: router {res['router_ms']:.3f} ms + length {res['length_ms']:.3f} ms = "
                  f"{res['total_ms']:.3f} ms per request (p90 {res['total_p90_ms']:.3f} ms)")


@bench_app.command("gateway")
def bench_gateway(
    rates: str = typer.Option("50,100,200", "--rates", help="Comma-separated open-loop Poisson rates (req/s)."),
    duration: float = typer.Option(5.0, "--duration", help="Seconds of load per target (direct, via gateway) per rate."),
    out: Path = typer.Option(Path("out/bench-gateway"), "--out", help="Folder for results.md and results.json."),
    policy: str = typer.Option("chimera", "--policy", help="Gateway policy (e.g. chimera, vllm)."),
    profile: bool = typer.Option(False, "--profile", help="Run the gateway under cProfile; writes gateway-profile.txt."),
    baseline: bool = typer.Option(False, "--baseline", help="Also measure a bare httpx forwarding proxy (the stack's floor)."),
    litellm: Optional[Path] = typer.Option(None, "--litellm", help="Also measure LiteLLM's proxy: path to its `litellm` executable (make bench-live installs .venv-litellm)."),
) -> None:
    """Latency the gateway adds in front of an instant fake backend (backend and gateway in their own processes).

    Example: chimera bench gateway --rates 50,100,200 --duration 5 --baseline --litellm .venv-litellm/bin/litellm
    """
    from chimera.bench.gateway_overhead import markdown_table, run_benchmark
    from chimera.bench.litellm_proxy import LiteLLMMissing, find_litellm

    if litellm is not None:
        try:
            litellm = find_litellm(litellm)
        except LiteLLMMissing as e:
            _fail(str(e))

    try:
        rate_list = [float(x) for x in rates.split(",") if x.strip()]
    except ValueError:
        _fail(f"--rates must be comma-separated numbers, got {rates!r}")
    if not rate_list or any(r <= 0 for r in rate_list) or duration <= 0:
        _fail("--rates and --duration must be positive")

    def show(row: dict) -> None:
        console.print(f"{row['rate']:g} req/s: added p50 {row['added_p50_ms']:.2f} ms, p99 {row['added_p99_ms']:.2f} ms")

    out.mkdir(parents=True, exist_ok=True)
    res = run_benchmark(rate_list, duration=duration, out=out, policy=policy, profile_gateway=profile, baseline=baseline,
                        progress=show, litellm=litellm)
    md = markdown_table(res)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}"
                  + (f", {res['profile_top']}" if res.get("profile_top") else ""))


@bench_app.command("live")
def bench_live(
    contenders: Optional[str] = typer.Option(None, "--contenders", help="Comma-separated litellm:STRATEGY | chimera:POLICY[@LAMBDA] (default: litellm:simple-shuffle,litellm:least-busy,chimera:vllm,chimera:chimera@0.05)."),
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
    resim: bool = typer.Option(False, "--resimulate", help="--engine vllm results in --out: run only the simulator again on the stored live runs (with --profiles and --sim-online-lengths/--sim-plan-lengths); writes results-resim.md/.json. Starts nothing."),
) -> None:
    """Live head-to-head: the same agents and workload through LiteLLM's proxy and through Chimera, on fresh
    backends each (emulated, or real vLLM CPU servers with --engine vllm), with the simulator's prediction of each
    run beside it (fidelity). See docs/live.md.

    Example: chimera bench live --litellm .venv-litellm/bin/litellm --tasks 200 --out out/bench-live
    Real vLLM: chimera bench live --engine vllm --tasks 60 --load 0.5 --overhead-rates "" --out out/bench-live-vllm
    """
    from pydantic import ValidationError

    from chimera.bench.litellm_proxy import LiteLLMMissing
    from chimera.bench.live import DEFAULT_CONTENDERS, LiveBenchConfig, run_live_bench
    from chimera.backends.vllm_cpu import EngineSetupError

    if resim:
        from chimera.bench.live import resim_markdown, resimulate

        try:
            r = resimulate(out, str(profiles) if profiles else None, sim_online_lengths, contention, prefix_caching)
        except (ValueError, KeyError, FileNotFoundError) as e:
            _fail(str(e).strip("'\""))
        md = resim_markdown(r)
        (out / "results-resim.md").write_text(md)
        (out / "results-resim.json").write_text(json.dumps(r, indent=1))
        console.print(md)
        console.print(f"wrote {out / 'results-resim.md'}, {out / 'results-resim.json'}")
        return

    try:
        orates = [float(x) for x in overhead_rates.split(",") if x.strip()]
    except ValueError:
        _fail(f"--overhead-rates must be comma-separated numbers, got {overhead_rates!r}")
    try:
        cfg = LiveBenchConfig(
            contenders=[x.strip() for x in contenders.split(",") if x.strip()] if contenders else list(DEFAULT_CONTENDERS),
            workload=workload, tasks=tasks, load=load, rate=rate, time_scale=time_scale, seed=seed,
            overhead_rates=orates, overhead_duration_s=overhead_duration, litellm=str(litellm) if litellm else None,
            engine=engine, real_models=[m.strip() for m in real_models.split(",") if m.strip()],
            length_scale=length_scale, prompt_scale=prompt_scale, tool_scale=tool_scale,
            max_inflight=max_inflight, kv_cache_gib=kv_cache_gib, priority=priority,
            profiles=str(profiles) if profiles else None, profile_mode=profile_mode, background_rps=background_rps,
            sim_online_lengths=sim_online_lengths, contention=contention, contention_batch=contention_batch,
            prefix_caching=prefix_caching,
            profile_rounds=profile_rounds, profile_concurrency=profile_concurrency,
            models_dir=str(models_dir) if models_dir else None, venv=str(vllm_venv) if vllm_venv else None)
    except ValidationError as e:
        _fail("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    t0 = time.perf_counter()
    with _progress() as prog:
        bar: dict = {}

        def on_stage(name: str) -> None:
            if "id" in bar:
                prog.update(bar["id"], visible=False)
            bar["id"] = prog.add_task(name, total=None if name == "gateway added latency" or name.startswith(
                "profiling") else tasks)

        try:
            b = run_live_bench(cfg, out, on_record=lambda _r: prog.advance(bar["id"]), on_stage=on_stage)
        except (LiteLLMMissing, EngineSetupError) as e:
            _fail(str(e))
        except (ValueError, KeyError, FileNotFoundError) as e:
            _fail(str(e).strip("'\""))
    console.print((out / "results.md").read_text())
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'frontier.png'} "
                  f"({time.perf_counter() - t0:.0f} s wall)")


@bench_app.command("soak")
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

    from chimera.bench.soak import WINDOW_COLUMNS, SoakConfig, fmt_num, run_soak, summary_lines, window_cells

    try:
        cfg = SoakConfig(minutes=minutes, rate=rate, reject_minutes=reject_minutes, reject_rate=reject_rate,
                         window_s=window_s, time_scale=time_scale, predictors=str(predictors) if predictors else None,
                         train_tasks=train_tasks, train_trees=train_trees, max_queue=max_queue, lam=lam, seed=seed)
    except ValidationError as e:
        _fail("; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors()))
    with _progress() as prog:
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
            res = run_soak(cfg, out, on_stage=lambda m: prog.update(bar, description=m), on_window=on_window,
                           on_tick=on_tick)
        except KeyboardInterrupt:
            err.print("interrupted: the backends and the gateway it started have been stopped; no results written")
            raise typer.Exit(130)
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
            _fail(str(e).strip("'\""))
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


@app.command()
def tune(
    workload: str = typer.Option("synthetic", "--workload", "-w", help=WORKLOAD_HELP),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP),
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="Folder from `chimera train` (default: priors)."),
    target: str = typer.Option("latency", "--target", help="latency: fastest at accuracy ≥ vllm's; accuracy: most "
                               "accurate at mean latency ≤ vllm's; fastest: the latency end, accuracy unconstrained."),
    load: float = typer.Option(0.8, "--load", help="Arrival rate as a fraction of the throughput round-robin (vllm) "
                               "sustains when saturated (measured)."),
    lams: str = typer.Option("0.5,2,10,20", "--lams", help="λ values every candidate is tried at."),
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,… chimera parameter values to try (repeatable), "
                                   "e.g. externality=0,1,2."),
    fixed: list[str] = typer.Option([], "--set", help="KEY=VALUE chimera parameter every candidate has (repeatable), "
                                    "e.g. affinity=true."),
    tasks: int = typer.Option(1500, "--tasks", help="Workflows per run, on each half of the held-out tasks."),
    seed: int = typer.Option(0, "--seed"),
    length_stat: str = typer.Option("mean", "--length-stat", help="How the policy reads the trained length "
                                    "forest: 'mean' (its predicted mean) or 'median'."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    out: Path = typer.Option(Path("out/tune"), "--out", help="Folder for results.md, results.json, policy.yaml."),
) -> None:
    """Pick chimera's parameters for a workload on a cluster in the simulator: candidates run on half the held-out
    tasks, the pick is checked on the other half; writes the pick as a gateway `policy:` block (policy.yaml).

    Example: chimera tune -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --predictors out/predictors/mmlu --set congestion=batch --grid externality=0,1,2
    """
    import yaml
    from pydantic import ValidationError

    from chimera.bench.tune import TuneSpec, check_spec, count_runs, markdown, policy_yaml, run_tune
    from chimera.workload.source import load_workload

    try:
        grid_values = {}
        for pair in grid:
            key, sep, values = pair.partition("=")
            if not sep or not key.strip() or not values.strip():
                raise ValueError(f"--grid expects KEY=V1,V2,…, got {pair!r}")
            grid_values[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]  # as --set reads values
        spec = TuneSpec(target=target, load=load, lams=[float(x) for x in lams.split(",")], grid=grid_values,
                        fixed=_param_pairs(fixed), tasks=tasks, seed=seed, length_stat=length_stat)
        check_spec(spec)
    except ValidationError as e:
        _fail("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
    except ValueError as e:
        _fail(str(e).replace("--param", "--set"))
    try:
        cl = _cluster(cluster)
        trained = _predictors(predictors)
        ts, _ = load_workload(workload, data_dir=data_dir, seed=seed)
        with _progress() as prog:
            bar = prog.add_task(f"tune {workload}", total=count_runs(spec))
            res = run_tune(workload, ts, cl, spec, predictors=trained, progress=lambda k: prog.advance(bar, k))
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    block = policy_yaml(res["policy"], res["length_stat"])
    (out / "policy.yaml").write_text(block)
    console.print(md)
    console.print(block)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'policy.yaml'} (all results simulated)")


@app.command()
def train(
    workload: Optional[list[str]] = typer.Option(None, "--workload", "-w", help=WORKLOAD_HELP + " Repeatable."),
    traces: Optional[list[Path]] = typer.Option(
        None, "--traces", help="A gateway trace store (its trace_store file): workflows with feedback become "
        "training tasks. Repeatable; combines with --workload."),
    out: Path = typer.Option(..., "--out", help="Folder for the artifacts (manifest.json, router.joblib, length.joblib)."),
    encoder: str = typer.Option("hashing", "--encoder", help="Router text encoder: hashing (no model) | minilm."),
    train_frac: float = typer.Option(0.7, "--train-frac", help="Share of tasks (split by id) to train on."),
    trees: int = typer.Option(100, "--trees", help="Trees per quantile forest."),
    length_target: str = typer.Option("log", "--length-target", help="What the length forest splits on: log "
                                      "(log1p tokens: better ordering) | raw (tokens: an unbiased mean where lengths "
                                      "are heavy-tailed; docs/predictors.md)."),
    seed: int = typer.Option(0, "--seed"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
) -> None:
    """Fit the semantic router and the workflow-length forest; print held-out metrics; save versioned artifacts.

    Example: chimera train -w source:mmlu-pro-math --out out/predictors/mmlu --encoder minilm
    Learning loop: chimera train --traces out/gateway/trace.sqlite --out out/predictors/live
    """
    from chimera.train.predictors import gather, train_predictors

    if encoder not in ("hashing", "minilm"):
        _fail(f"--encoder must be hashing or minilm, got {encoder!r}")
    if length_target not in ("log", "raw"):
        _fail(f"--length-target must be log or raw, got {length_target!r}")
    if not workload and not traces:
        _fail("give at least one --workload or --traces")
    t0 = time.perf_counter()
    try:
        sets = _workloads(list(workload or []), data_dir, seed)
        if traces:
            from chimera.train.from_traces import tasks_from_traces

            for tp in traces:
                tasks, st = tasks_from_traces(tp)
                console.print(f"{tp}: {st['tasks']} tasks from {st['workflows']} traced workflows "
                              f"(skipped: {st['skipped_no_feedback']} without feedback, {st['skipped_no_ok_calls']} "
                              f"without a successful call, {st['skipped_bad_score']} with a bad score; "
                              f"{st['mixed_models']} mixed-model, {st['missing_prompt']} without prompt text)")
                sets.append(("traces:" + str(tp), tasks))
        data = gather(sets, train_frac)
        with _progress() as prog:
            bar = prog.add_task("training", total=None)
            pred = train_predictors(data, encoder=encoder, train_frac=train_frac, seed=seed, n_estimators=trees,
                                    log_target=length_target == "log",
                                    progress=lambda m: prog.update(bar, description=m))
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    pred.save(out)
    m = pred.metrics
    console.print(f"trained on {m['train_tasks']} tasks, evaluated on {m['test_tasks']} held-out tasks "
                  f"({len(pred.models)} models) in {time.perf_counter() - t0:.1f} s")
    if "router" in m:
        from chimera.train.router_eval import to_markdown

        console.print(to_markdown(m["router"]))
    if "length" in m:
        from chimera.train.length_eval import format_table

        console.print(format_table(m["length"]))
    console.print(f"wrote {out}")


@eval_app.command("predictors")
def eval_predictors(
    workload: list[str] = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP + " Repeatable."),
    strong: Optional[str] = typer.Option(None, "--strong", help="Strong model of the routing curve (default: most accurate)."),
    weak: Optional[str] = typer.Option(None, "--weak", help="Weak model of the routing curve (default: least accurate)."),
    encoders: str = typer.Option("hashing,minilm", "--encoders", help="Router encoders to compare."),
    train_frac: float = typer.Option(0.7, "--train-frac"),
    seed: int = typer.Option(0, "--seed"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    out: Path = typer.Option(Path("out/eval-predictors"), "--out", help="Folder for results.md, results.json, routing.png."),
) -> None:
    """Router vs kNN / matrix factorisation / prior / random, and the length forest vs per-stage means and an
    LTR-style ranker, on held-out tasks.

    Example: chimera eval predictors -w source:fireact-hotpotqa --out out/eval-fireact
    """
    from chimera.train.evaluate import evaluate_predictors, routing_curve_plot
    from chimera.train.length_eval import format_table
    from chimera.train.router_eval import to_markdown
    from chimera.train.predictors import gather

    t0 = time.perf_counter()
    try:
        data = gather(_workloads(workload, data_dir, seed), train_frac)
        with _progress() as prog:
            bar = prog.add_task("evaluating", total=None)
            res = evaluate_predictors(data, encoders=[e.strip() for e in encoders.split(",")], strong=strong,
                                      weak=weak, seed=seed, progress=lambda m: prog.update(bar, description=m))
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    out.mkdir(parents=True, exist_ok=True)
    from chimera.train.predictors import _jsonable

    md = (f"{', '.join(data.workloads)}: {res['train_tasks']} training / {res['test_tasks']} held-out tasks\n\n"
          f"### Router\n\n{to_markdown(res['router'])}\n\n### Remaining workflow tokens\n\n"
          f"{format_table(res['length'])}\n")
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(_jsonable(res), indent=1))
    png = routing_curve_plot(res, out / "routing.png")
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {png} in {time.perf_counter() - t0:.1f} s")


@app.command()
def serve(
    config: Path = typer.Option(..., "--config", "-c", help="Gateway YAML (listen, auth, policy, predictors, "
                                "trace_store, backends); see docs/gateway.md."),
) -> None:
    """Run the OpenAI-compatible scheduling gateway in front of your model servers.

    Example: chimera serve --config examples/gateway.yaml
    """
    from chimera.serve import load_gateway_config, run_gateway

    try:
        cfg = load_gateway_config(config)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    run_gateway(cfg)


@app.command()
def emulate(
    profile: str = typer.Option(..., "--profile", help="Engine profile MODEL@GPU (see src/chimera/perfmodel/catalogue.yaml)."),
    served_model_name: str = typer.Option(..., "--served-model-name", help="Model name clients send."),
    port: int = typer.Option(8001, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
    time_scale: float = typer.Option(1.0, "--time-scale", help="Run the engine model this many times faster than real time."),
    scheduling_policy: str = typer.Option("fcfs", "--scheduling-policy", help="fcfs | priority (as vLLM)."),
    workload: Optional[str] = typer.Option(None, "--workload", "-w", help=WORKLOAD_HELP + " Replays its lengths/texts."),
    workload_model: Optional[str] = typer.Option(None, "--workload-model", help="Model of the workload to replay."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """An emulated vLLM-like backend in real time, driven by the engine model (simulated, not a real model).

    Example: chimera emulate --profile qwen2.5-7b@a6000 --served-model-name qwen2.5-7b --port 8001 --time-scale 10
    """
    from chimera.emulate.runner import serve_emulator
    from chimera.workload.source import load_workload

    try:
        tasks = load_workload(workload)[0] if workload else None
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    serve_emulator(host=host, port=port, profile=profile, served_model_name=served_model_name,
                   time_scale=time_scale, scheduling_policy=scheduling_policy, workload=tasks,
                   workload_model=workload_model, seed=seed)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        _fail(f"{flag} must be comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        _fail(f"{flag} must list integers ≥ 1, got {text!r}")
    return vals


def _profile_table(rows: list, decode: list, title: str, fitted_col: str = "fitted (ms)") -> Table:
    t = Table(title=title)
    for col in ("point", "batch", "KV tokens", "measured (ms)", "min–max (ms)", fitted_col, "error", "tok/s"):
        t.add_column(col, justify="left" if col == "point" else "right")
    tok_s = {(p.label, p.concurrency): p.tok_s for p in decode}
    for r in rows:
        if r.kind == "prefill":
            label, batch, kv, rate = f"TTFT, {r.x}-token prompt", "", "", ""
        else:
            label = f"TPOT c={r.x}" + (", long prompts" if r.kind == "decode-long" else "") + (
                "" if r.steady else " (bursty: makespan)")
            batch = f"{r.n:.0f}" if abs(r.n - round(r.n)) < 0.05 else f"{r.n:.1f}"
            kv, rate = f"{r.ctx_tokens:,.0f}", f"{tok_s.get((r.kind, r.x), float('nan')):,.0f}"
        e = f"{100 * r.error:+.1f}%"
        t.add_row(label, batch, kv, f"{1e3 * r.measured_s:.2f}", f"{1e3 * r.spread[0]:.2f}–{1e3 * r.spread[1]:.2f}",
                  f"{1e3 * r.fitted_s:.2f}", f"[bold red]{e}[/]" if r.kind != "prefill" and abs(r.error) > 0.15 else e,
                  rate)
    return t


@app.command("profile")
def profile_cmd(
    base_url: Optional[str] = typer.Option(None, "--base-url", help="The server's OpenAI base URL (/v1 is appended if missing)."),
    model: Optional[str] = typer.Option(None, "--model", help="Served model name to measure (as /v1/models lists it)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Profile YAML to write (use it as `profile_file:` in a cluster file)."),
    refit: Optional[Path] = typer.Option(None, "--refit", help="Fit again from the measurements stored in this profile (no server needed); write --out."),
    check: Optional[str] = typer.Option(None, "--check", help="Instead of (or besides) fitting: compare fresh measurements with a profile's predictions (a profile YAML, or a catalogue MODEL@GPU)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the profile (default: --model)."),
    gpu: str = typer.Option("measured", "--gpu", help="A label for the machine (free text, not a catalogue GPU)."),
    api: str = typer.Option("completions", "--api", help="completions | chat: the endpoint the requests use."),
    concurrency: str = typer.Option("1,2,4,8,16,32", "--concurrency", help="Decode waves: concurrent requests per wave."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="max_tokens of each decode request (ignore_eos)."),
    rounds: int = typer.Option(2, "--rounds", help="Repeats of every point (medians are fitted)."),
    extra_waves: int = typer.Option(2, "--extra-waves", help="More waves for a concurrency whose waves disagree by over 35%."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", help="Prompt length of the decode waves."),
    prefill_lengths: Optional[str] = typer.Option(None, "--prefill-lengths", help="Prompt lengths of the TTFT points (default 16,64,256,512,1024,1536 within max_model_len)."),
    long_prompt_tokens: Optional[int] = typer.Option(None, "--long-prompt-tokens", help="Prompt of the long-context decode waves (default min(1024, room in max_model_len); 0: none)."),
    long_concurrency: str = typer.Option("1,8", "--long-concurrency", help="Concurrency of the long-context decode waves."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", help="The server's batch limit, if known (else measured when requests queue, or 256)."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens", help="The server's token budget per step (default 8192; vLLM CPU: 2048)."),
    kv_capacity_tokens: Optional[int] = typer.Option(None, "--kv-capacity-tokens", help="KV cache size in tokens, if known (else from vLLM metrics)."),
    params_b: Optional[float] = typer.Option(None, "--params-b", help="Parameters (billions), if known: ranks model sizes."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CHIMERA_API_KEY", help="Bearer key for the server."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds per request."),
    metrics: bool = typer.Option(True, "--metrics/--no-metrics", help="Scrape vLLM /metrics during the waves."),
    tpot_source: str = typer.Option("auto", "--tpot-source", help="auto | engine | client: decode TPOT from the server's own inter-token latency metric (vLLM; auto uses it when exported) or from the streams' timing."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompts."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measurements and the fit as JSON."),
) -> None:
    """Measure a running OpenAI-compatible server, fit the engine model to it, print the fit's error per point and
    write a profile a cluster file can use (`profile_file: PROFILE.yaml`). Exits 2 if the server cannot be
    measured; a poor fit only warns. See docs/profile.md.

    Example: chimera profile --base-url http://127.0.0.1:8000 --model my-model --out out/my-model.yaml
    Check it later: chimera profile --base-url http://127.0.0.1:8000 --model my-model --check out/my-model.yaml
    """
    import yaml
    from chimera.profiling.fit import poorly_fitted
    from chimera.perfmodel.profiles import ClusterError
    from chimera.perfmodel.profiles import profile as load_profile
    from chimera.profiling import MeasureError, ProfileConfig, measure
    from chimera.profiling.document import check_rows

    if out is None and check is None:
        _fail("give --out PROFILE.yaml (fit and write) and/or --check PROFILE.yaml (compare with an existing one)")
    if refit is not None:
        from chimera.profiling.client import measurements_from_dict

        if out is None:
            _fail("--refit needs --out")
        try:
            raw = yaml.safe_load(refit.read_text(encoding="utf-8"))
            meas = measurements_from_dict(raw["measurements"])
        except (OSError, yaml.YAMLError, KeyError, TypeError, MeasureError) as e:
            _fail(f"{refit}: no measurements to refit ({e})")
        name = name or raw.get("name")
        gpu = gpu if gpu != "measured" else raw.get("gpu", gpu)
        max_num_seqs = max_num_seqs or raw.get("max_num_seqs")
        max_num_batched_tokens = max_num_batched_tokens or raw.get("max_num_batched_tokens")
        params_b = params_b or raw.get("params_b")
        return _profile_write(meas, out, json_out, name, gpu, max_num_seqs, max_num_batched_tokens,
                              kv_capacity_tokens, params_b, f"{meas.model} at {meas.base_url} (refit of {refit})")
    if base_url is None or model is None:
        _fail("give --base-url and --model (or --refit PROFILE.yaml)")
    try:
        old = load_profile(check) if check is not None else None
        cfg = ProfileConfig(base_url=base_url, model=model, api=api, api_key=api_key,
                            concurrency=_int_list(concurrency, "--concurrency"), decode_tokens=decode_tokens,
                            rounds=rounds, prompt_tokens=prompt_tokens,
                            prefill_lengths=_int_list(prefill_lengths, "--prefill-lengths") if prefill_lengths else None,
                            long_prompt_tokens=long_prompt_tokens,
                            long_concurrency=_int_list(long_concurrency, "--long-concurrency"), metrics=metrics,
                            timeout_s=timeout, seed=seed, extra_waves=extra_waves, tpot_source=tpot_source)
        if tpot_source == "engine" and not metrics:
            _fail("--tpot-source engine reads the server's /metrics: drop --no-metrics")
    except (ValueError, ClusterError) as e:
        _fail(str(e))
    with _progress() as prog:
        bar = prog.add_task(f"profiling {model}", total=None)

        def on_progress(what: str, done: int, total: int) -> None:
            prog.update(bar, description=what, completed=done, total=total)

        try:
            meas = measure(cfg, on_progress)
        except MeasureError as e:
            _fail(f"measurement failed: {e}")
    if old is not None:
        rows = check_rows(old, meas)
        console.print(_profile_table(rows, meas.decode, f"{model} at {cfg.v1}: measured now vs {check}",
                                     "profile (ms)"))
        for r in poorly_fitted(rows):
            err.print(f"[yellow]warning:[/] decode c={r.x}{' (long prompts)' if r.kind == 'decode-long' else ''}: "
                      f"{check} predicts {100 * r.error:+.1f}% (more than 15% off)")
        if out is None:
            console.print(f"{meas.wall_s:.0f} s of measuring")
            return
    _profile_write(meas, out, json_out, name, gpu, max_num_seqs, max_num_batched_tokens, kv_capacity_tokens,
                   params_b, f"{model} at {cfg.v1}")


def _profile_write(meas, out, json_out, name, gpu, max_num_seqs, max_num_batched_tokens, kv_capacity_tokens,
                   params_b, title: str) -> None:
    """Fit, print the table, write the profile (and JSON)."""
    from pydantic import ValidationError as PydanticValidationError

    from chimera.perfmodel.profiles import ClusterError
    from chimera.profiling import build_profile, write_profile

    try:
        res = build_profile(meas, name=name, gpu=gpu, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, kv_capacity_tokens=kv_capacity_tokens,
                            params_b=params_b)
    except (ValueError, ClusterError, PydanticValidationError) as e:
        _fail(f"could not build a profile from the measurements: {e}")
    console.print(_profile_table(res.rows, meas.decode, f"{title}: measured vs fitted"))
    f = res.fit
    console.print(f"fit: t = {1e3 * f.fixed_s:.4g} ms + hypot({1e3 * f.weights_s:.4g} ms, {1e6 * f.per_token_s:.4g} µs × "
                  f"tokens) + {1e6 * f.per_seq_s:.4g} µs × decoding seqs^{f.per_seq_exponent:.2f} + {1e9 * f.per_context_token_s:.4g} ns × KV "
                  f"tokens; request overhead {1e3 * f.request_overhead_s:.3g} ms; RMS error {100 * f.rms_rel_error:.1f}%")
    for note in res.notes:
        console.print(f"  {note}")
    for r in res.poor:
        err.print(f"[yellow]warning:[/] decode c={r.x}{' (long prompts)' if r.kind == 'decode-long' else ''} "
                  f"fitted {100 * r.error:+.1f}% off (more than 15%)")
    path = write_profile(res, out)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"measurements": res.document["measurements"],
                                        "fit": res.document["fit_report"], "fitted": res.document["fitted"]}, indent=1))
    console.print(f"wrote {path} ({meas.wall_s:.0f} s of measuring). Use it: models: [{{profile_file: {path}, "
                  f"name: {res.spec.name}}}] in a cluster file, or chimera emulate --profile {path}")


def _versus(base: dict, other: dict) -> str:
    """'2.10× lower mean latency, +3.2 points' (or 'higher') of `other` against `base`."""
    b, o = base["latency_s"]["mean"], other["latency_s"]["mean"]
    speed = f"{b / o:.2f}× lower" if o <= b else f"{o / b:.2f}× higher"
    return f"{speed} mean latency, {100 * (other['accuracy'] - base['accuracy']):+.1f} points accuracy"


@app.command()
def demo(
    simulated: bool = typer.Option(False, "--simulated", help="The simulated comparison (7 policies, discrete-event simulator) instead of the live run."),
    tasks: Optional[int] = typer.Option(None, "--tasks", help="Workflows per policy (default: 300 live, 1500 simulated)."),
    time_scale: Optional[float] = typer.Option(None, "--time-scale", help="Live: emulators and tool sleeps run this many times faster than real time (default 2)."),
    lam: Optional[float] = typer.Option(None, "--lam", help="Live: λ of the chimera run (default 0.03)."),
    load: Optional[float] = typer.Option(None, "--load", help="Arrival rate as a fraction of vllm's saturated throughput (simulated engine model; default: 0.9 live, 0.8 simulated)."),
    workload: str = typer.Option("synthetic", "--workload", "-w", help=WORKLOAD_HELP),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP + " (--simulated only)"),
    out: Path = typer.Option(Path("out/demo"), "--out", help="Live: directory for report.html and the trace stores."),
) -> None:
    """The main job: vLLM-style serving vs Chimera, live through the gateway against an emulated 3-model cluster.

    Example: chimera demo --tasks 300 --time-scale 2   (or: chimera demo --simulated --tasks 1500 --load 0.9)
    """
    if simulated:
        return _demo_simulated(tasks if tasks is not None else 1500, load if load is not None else 0.8, workload,
                               cluster)
    from chimera.bench.html_report import summary_rows
    from chimera.bench.live_demo import (DEMO_LAM, DEMO_LOAD, DEMO_TASKS, DEMO_TIME_SCALE, LABEL, MODELS,
                                         run_live_demo, twin_versus, versus)

    n = tasks if tasks is not None else DEMO_TASKS
    time_scale = time_scale if time_scale is not None else DEMO_TIME_SCALE
    load = load if load is not None else DEMO_LOAD
    lam = lam if lam is not None else DEMO_LAM
    t0 = time.perf_counter()
    with _progress() as prog:
        bar = {}

        def on_run(policy: str) -> None:
            bar["id"] = prog.add_task(f"{policy} (live)", total=n)

        try:
            d = run_live_demo(n=n, time_scale=time_scale, workload=workload, load=load, lam=lam, out=out,
                              on_run=on_run, on_record=lambda _r: prog.advance(bar["id"]))
        except (ValueError, KeyError, FileNotFoundError) as e:
            _fail(str(e).strip("'\""))
    t = Table(title=f"{workload}: {n} workflows at {d.rate:.2f}/s (load {load:g}) on {', '.join(MODELS)} (A6000, "
                    f"time scale {time_scale:g}) — {LABEL}")
    for col in ("policy", "tasks", "accuracy", "mean lat (s)", "p50", "p99", "tasks/s", "calls per model", "failed"):
        t.add_column(col, justify="left" if col in ("policy", "calls per model") else "right")
    for r in summary_rows(d.runs, twins=True):
        t.add_row(r["policy"], str(r["tasks"]), f"{100 * r['accuracy']:.1f}%", f"{r['latency_mean_s']:.2f}",
                  f"{r['latency_p50_s']:.2f}", f"{r['latency_p99_s']:.2f}", f"{r['throughput_tasks_per_s']:.3f}",
                  ", ".join(f"{m}:{c}" for m, c in r["calls_per_model"].items()), str(r["failed"]))
    console.print(t)
    console.print(versus(d.runs[0].summary, d.runs[1].summary))
    twin = twin_versus(d.runs)
    if twin is not None:
        console.print(twin)
    console.print(f"report: {d.report}")
    console.print(f"All numbers: {LABEL}, except the simulated twin's (the simulator on the same workflows and "
                  f"arrival times); {time.perf_counter() - t0:.0f} s wall. "
                  "The simulated comparison of 7 policies: `chimera demo --simulated`.")


def _demo_simulated(tasks: int, load: float, workload: str, cluster: Optional[Path]) -> None:
    """vLLM-style serving vs Chimera on a simulated 3-model cluster (the former `chimera demo`)."""
    from chimera.bench.sweep import capacity_workflows_per_s
    from chimera.sim.experiment import prepare, run_policy
    from chimera.workload.source import load_workload

    try:
        ts, _ = load_workload(workload)
        prep = prepare(ts, _cluster(cluster))
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    rate = load * capacity_workflows_per_s(prep)
    wfs = prep.workflows(tasks, 0)
    runs = [("vllm", None), ("least-loaded", None), ("routellm", None), ("sjf", None), ("chimera", 0.02),
            ("chimera", 0.05), ("chimera-oracle", 0.02)]
    rows = []
    with _progress() as prog:
        bar = prog.add_task("policies", total=len(runs))
        for p, lam in runs:
            rows.append(run_policy(prep, p, rate=rate, workflows=wfs, lam=lam))
            prog.advance(bar)
    console.print(_summary_table(rows, f"{workload} on {', '.join(prep.names)} at {rate:.2f} workflows/s "
                                       f"(load {load:g}; simulated)"))
    for r in rows[1:]:
        lam = f" (λ={r['lam']:g})" if r.get("lam") is not None else ""
        console.print(f"{r['policy']}{lam} vs vllm: {_versus(rows[0], r)}")
    console.print("All results are simulated (discrete-event simulator, calibrated engine model). "
                  "Sweeps: `chimera bench sim`; see BENCHMARKS.md.")


@agents_app.command("run")
def agents_run(
    gateway: str = typer.Option(..., "--gateway", help="OpenAI-compatible base URL (Chimera gateway, LiteLLM, one backend); /v1 is appended if missing."),
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Closed loop: this many agents at once (default 4)."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Open loop: Poisson arrivals, workflows per second."),
    tasks: Optional[int] = typer.Option(None, "--tasks", help="Workflows to run (default: one per task)."),
    models: str = typer.Option("chimera", "--models", help="Comma-separated model names, round-robin per workflow."),
    api_key: str = typer.Option("EMPTY", "--api-key", envvar="CHIMERA_API_KEY", help="Bearer key for the endpoint."),
    time_scale: float = typer.Option(1.0, "--time-scale", help="Divide the plan's tool times by this (match emulators)."),
    seed: int = typer.Option(0, "--seed"),
    pad_prompts: bool = typer.Option(True, "--pad-prompts/--no-pad-prompts", help="Pad each request with filler tokens up to the plan's prompt length (the context the task text lacks)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary JSON here."),
) -> None:
    """ReAct-style agents execute each task's workflow stage by stage through the openai client (live, not simulated).

    Example: chimera agents run --gateway http://127.0.0.1:8000 --workload synthetic:50 --concurrency 8 --json out/live.json
    """
    from chimera.agents.driver import AgentConfig, run_agents_sync
    from chimera.workload.source import load_workload

    if concurrency is not None and rate is not None:
        _fail("give either --concurrency or --rate, not both")
    try:
        task_list = load_workload(workload, seed=seed)[0]
        cfg = AgentConfig(base_url=gateway, models=[m.strip() for m in models.split(",") if m.strip()],
                          api_key=api_key, concurrency=concurrency, rate=rate, time_scale=time_scale, seed=seed,
                          pad_prompts=pad_prompts)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    n = tasks if tasks is not None else len(task_list)
    with _progress() as prog:
        bar = prog.add_task("workflows", total=n)
        run = run_agents_sync(task_list, cfg, n, on_record=lambda r: prog.advance(bar))
    res = run.summary
    console.print(_summary_table([res], f"{workload} via {cfg.base_url} — live"))
    console.print(f"failed: {res['failed']}; queue_s: {res['queue_s_note']}")
    for f in res["failures"][:10]:
        console.print(f"  {f['workflow_id']}: {f['reason']}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2))
        console.print(f"wrote {json_out}")


engines_app = typer.Typer(no_args_is_help=True, help="Real engines: vLLM CPU servers on random-weight models "
                          "(real serving, noise text); see docs/real-engines.md.")
app.add_typer(engines_app, name="engines")
MODELS_HELP = "Comma-separated models: recipe names under --models-dir (tiny, wide) or model folders; one server each."
VENV_HELP = "The vLLM venv (default: .venv-vllm in the checkout, or $CHIMERA_VLLM_VENV)."
MODELS_DIR_HELP = "Default: out/models in the checkout, or $CHIMERA_VLLM_MODELS."


def _names(csv: str) -> list[str]:
    return [m.strip() for m in csv.split(",") if m.strip()]


@engines_app.command("build-models")
def engines_build_models(
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for one sub-folder per model. " + MODELS_DIR_HELP),
    models: str = typer.Option("tiny,wide", "--models", help="Comma-separated recipes (tiny, wide)."),
    force: bool = typer.Option(False, "--force", help="Rebuild folders that are already up to date."),
    venv: Optional[Path] = typer.Option(None, "--venv", help=VENV_HELP),
) -> None:
    """Build the random-weight models (Qwen2, BPE tokenizer on local text) with the vLLM venv's python.

    Example: chimera engines build-models --out out/models
    """
    from chimera.backends.vllm_cpu import EngineSetupError, build_models

    try:
        rc = build_models(out, _names(models), force=force, venv=venv)
    except EngineSetupError as e:
        _fail(str(e))
    if rc:
        _fail(f"model builder exited with {rc}")


@engines_app.command("up")
def engines_up(
    models: str = typer.Option("tiny,wide", "--models", help=MODELS_HELP),
    priority: bool = typer.Option(False, "--priority", help="Run every server with --scheduling-policy priority "
                                  "(the gateway YAML then sets priority: true)."),
    out: Path = typer.Option(Path("out/engines"), "--out", help="Work folder: logs, temp/cache dirs, gateway.yaml."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
    venv: Optional[Path] = typer.Option(None, "--venv", help=VENV_HELP),
    gateway_port: int = typer.Option(8000, "--gateway-port", help="The port written into gateway.yaml."),
    max_inflight: int = typer.Option(32, "--max-inflight", help="max_inflight per backend in gateway.yaml."),
) -> None:
    """Start real vLLM CPU servers until Ctrl-C: prints their URLs and the gateway YAML to serve in front.

    One model and one core per server; Ctrl-C (or SIGTERM) stops them all, whole process groups.

    Example: chimera engines up --models tiny,wide --priority   (then: chimera serve --config out/engines/gateway.yaml)
    """
    from chimera.backends.vllm_cpu import EngineSetupError, ServerSpec, vllm_cluster, wait_until_signalled

    specs = [ServerSpec(m, priority=priority) for m in _names(models)]
    err.print(f"starting {len(specs)} vLLM server(s) ({', '.join(s.name for s in specs)}); ~40-120 s ...")
    try:
        with vllm_cluster(specs, workdir=out, models_dir=models_dir, venv=venv, gateway_port=gateway_port,
                          max_inflight=max_inflight) as cluster:
            t = Table(title="vLLM CPU servers (random weights: output text is noise)")
            for col in ("model", "base_url", "dtype", "core", "priority", "pid", "start-up (s)", "log"):
                t.add_column(col)
            for s in cluster:
                d = s.describe()
                t.add_row(d["name"], d["base_url"], d["dtype"], str(d["core"]), "yes" if d["priority"] else "no",
                          str(d["pid"]), f"{d['startup_s']:.0f}", d["log"])
            console.print(t)
            console.print(f"gateway config: {cluster.gateway_yaml}")
            console.print(f"  chimera serve --config {cluster.gateway_yaml}")
            console.print("Ctrl-C stops the servers.")
            why = wait_until_signalled(cluster)
    except (EngineSetupError, RuntimeError) as e:
        _fail(str(e))
    if why != "signal":
        _fail(f"{why}; the other servers were stopped")
    console.print("stopped")


@engines_app.command("speed")
def engines_speed(
    models: str = typer.Option("tiny,wide", "--models", help=MODELS_HELP + " The ratio is first over last."),
    levels: str = typer.Option("1,8,32", "--levels", help="Concurrency levels."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Output tokens per request (exact: ignore_eos)."),
    rounds: int = typer.Option(3, "--rounds", help="Repeat every (model, level) this many times, interleaved; "
                               "the table shows medians."),
    min_s: float = typer.Option(8.0, "--min-s", help="Each measurement runs at least this long."),
    together: bool = typer.Option(False, "--together", help="Load all servers at once per level (else in turn)."),
    out: Path = typer.Option(Path("out/engines-speed"), "--out", help="Work folder; results.json and results.md."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
    venv: Optional[Path] = typer.Option(None, "--venv", help=VENV_HELP),
) -> None:
    """Measure real vLLM servers' aggregate output tok/s per model and concurrency, and their speed ratio.

    Starts the servers, runs streaming chat requests of exactly --max-tokens (ignore_eos), prints medians, stops them.

    Example: chimera engines speed --models tiny,wide --levels 1,8,32 --rounds 3
    """
    from chimera.backends import speed
    from chimera.backends.vllm_cpu import EngineSetupError, ServerSpec, vllm_cluster

    try:
        with vllm_cluster([ServerSpec(m) for m in _names(models)], workdir=out, models_dir=models_dir,
                          venv=venv) as cl:
            err.print(f"servers up (start-up s: {[(s.served_model_name, round(s.startup_s or 0)) for s in cl]}); "
                      "measuring ...")
            res = speed.measure([(s.base_url, s.served_model_name) for s in cl],
                                levels=tuple(int(c) for c in _names(levels)), max_tokens=max_tokens,
                                together=together, rounds=rounds, min_s=min_s)
            servers = [s.describe() for s in cl]
    except (EngineSetupError, RuntimeError) as e:
        _fail(str(e))
    md = speed.markdown_table(res, servers[0]["name"], servers[-1]["name"])
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"servers": servers, "max_tokens": max_tokens, "rounds": rounds,
                                                  "together": together, "results": speed.to_json(res)}, indent=1))
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'} (aggregate output tok/s, medians of "
                  f"{rounds} rounds; client on the same cores)")


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so benchmarks stop the servers they started (each runs in its own session);
    # `chimera serve` / `emulate` replace this with uvicorn's graceful handler.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app()


if __name__ == "__main__":
    sys.exit(main())
