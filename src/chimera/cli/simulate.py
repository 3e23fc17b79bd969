"""`chimera simulate`, `chimera policies`, `chimera cluster`: one simulated run, and what it can be run with."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from chimera.cli.common import (CLUSTER_HELP, LENGTH_STAT_HELP, LOAD_ERRORS, WORKLOAD_HELP, cluster_or_default,
                                console, fail, failing_on, predictors_or_none, progress, summary_table, write_json)


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
    length_stat: str = typer.Option("mean", "--length-stat", help=LENGTH_STAT_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary JSON here."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Write the run's calls, routing decisions and "
                                         "workflow scores to this new trace store (the gateway's format; read by "
                                         "`chimera eval traces` and `chimera train --traces`)."),
) -> None:
    """Simulate a workload on a cluster under one policy and print a summary (all results are simulated).

    Example: chimera simulate --workload synthetic:500 --policy chimera --rate 2 --json out/chimera.json
    Logged run: chimera simulate -w synthetic:500 --predictions online --rate 2 --trace out/sim-trace.sqlite
    """
    from chimera.bench.sim_trace import SimTraceWriter
    from chimera.predict.length import stat_quantile
    from chimera.sched.registry import make_policy
    from chimera.sim.experiment import prepare, run_policy
    from chimera.util.keyvalue import parse_pairs
    from chimera.workload.source import load_workload

    if rate is None and agents is None:
        rate = 1.0
    if rate is not None and agents is not None:
        fail("give --rate or --agents, not both")
    with failing_on(*LOAD_ERRORS):
        params = parse_pairs(param)
        make_policy(policy, lam=lam, **params)  # refuse unknown parameters before any work
        ts, report = load_workload(workload, data_dir=data_dir, seed=seed)
        stat_quantile(length_stat)
        prep = prepare(ts, cluster_or_default(cluster), seed=seed, train_frac=train_frac, rule=rule,
                       predictors=predictors_or_none(predictors), length_stat=length_stat)
        n = tasks if tasks is not None else len(prep.test)
        writer = SimTraceWriter(trace, policy) if trace is not None else None
        with progress() as prog:
            bar = prog.add_task(f"simulating {policy}", total=n)
            try:
                res = run_policy(prep, policy, rate=rate, agents=agents, n_tasks=n, seed=seed, lam=lam,
                                 progress=lambda k: prog.advance(bar, k), predictions=predictions, record=writer,
                                 **params)
            finally:
                written = writer.close() if writer is not None else None
    res["workload"] = workload
    res["train_tasks"], res["test_tasks"] = len(prep.train), len(prep.test)
    console.print(summary_table([res], f"{workload} — simulated"))
    console.print(f"{res['calls']} calls in {res['wall_s']:.2f} s wall ({res['calls_per_wall_s']:,.0f} calls/s); "
                  f"skipped tasks: {res['skipped_tasks']}; train/test tasks: {len(prep.train)}/{len(prep.test)}")
    if written is not None:
        console.print(f"trace store {written['path']}: {written['written']} rows written, {written['dropped']} "
                      "dropped (simulated times: virtual seconds from 0)")
    if json_out:
        write_json(json_out, res)


def policies() -> None:
    """List the scheduling policies with their parameters (defaults) and capabilities.

    Example: chimera policies
    """
    from chimera.sched.registry import POLICIES, policy_entry
    from chimera.serve.refusals import live_refusal

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


def cluster_show(cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP)) -> None:
    """Show a cluster's models with KV capacity and the speed figures policies use.

    Example: chimera cluster --cluster examples/cluster-llama-h100.yaml
    """
    from chimera.sim.cluster import build_runtimes

    with failing_on(ValueError, FileNotFoundError, strip=False):
        runtimes = build_runtimes(cluster_or_default(cluster))
    t = Table(title="cluster")
    for col in ("model", "serves", "gpu", "tp×replicas", "KV tokens/replica", "decode tok/s (busy)", "TPOT (ms)",
                "prefill tok/s", "max in-flight"):
        t.add_column(col)
    for r in runtimes:
        t.add_row(r.info.name, r.spec.workload_model or r.info.name, r.spec.gpu, f"{r.spec.tp}×{r.spec.replicas}",
                  f"{r.perf.kv_capacity_tokens:,}", f"{r.info.tokens_per_s:,.0f}", f"{1000 * r.info.tpot_s:.1f}",
                  f"{r.info.prefill_tokens_per_s:,.0f}", str(r.info.max_inflight))
    console.print(t)
