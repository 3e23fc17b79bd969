"""`chimera demo`: the main job, vLLM-style serving against Chimera, live (emulated cluster) or simulated."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from chimera.cli.common import (CLUSTER_HELP, LOAD_ERRORS, WORKLOAD_HELP, cluster_or_default, console, failing_on,
                                progress, summary_table)


def demo(
    simulated: bool = typer.Option(False, "--simulated", help="The simulated comparison (7 policies, discrete-event simulator) instead of the live run."),
    tasks: Optional[int] = typer.Option(None, "--tasks", help="Workflows per policy (default: 300 live, 1500 simulated)."),
    time_scale: Optional[float] = typer.Option(None, "--time-scale", help="Live: emulators and tool sleeps run this many times faster than real time (default 2)."),
    lam: Optional[float] = typer.Option(None, "--lam", help="Live: λ of the chimera run (default 0.03)."),
    load: Optional[float] = typer.Option(None, "--load", help="Arrival rate as a fraction of vllm's saturated throughput (simulated engine model; default: 0.9 live, 0.8 simulated)."),
    workload: str = typer.Option("synthetic", "--workload", "-w", help=WORKLOAD_HELP),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP + " (--simulated only)"),
    out: Path = typer.Option(Path("out/demo"), "--out", help="Live: directory for report.html and the trace stores."),
    no_hints: bool = typer.Option(False, "--no-hints", help="Live: the agents send no workflow hints, only what an OpenAI client sends (the gateway infers each workflow from its conversation)."),
    append_only: bool = typer.Option(False, "--append-only", help="Live: the agents send append-only conversations (as without hints) but keep their hints: the like-for-like partner of a --no-hints run."),
) -> None:
    """The main job: vLLM-style serving vs Chimera, live through the gateway against an emulated 3-model cluster.

    Example: chimera demo --tasks 300 --time-scale 2   (or: chimera demo --simulated --tasks 1500 --load 0.9)
    Unmodified agents (no workflow hints): chimera demo --no-hints   (the same messages with hints: --append-only)
    """
    if simulated:
        return demo_simulated(tasks if tasks is not None else 1500, load if load is not None else 0.8, workload,
                              cluster)
    from chimera.bench.html_report import summary_rows
    from chimera.bench.live_demo import (DEMO_LAM, DEMO_LOAD, DEMO_TASKS, DEMO_TIME_SCALE, MODELS, run_live_demo,
                                         twin_versus, versus)

    n = tasks if tasks is not None else DEMO_TASKS
    time_scale = time_scale if time_scale is not None else DEMO_TIME_SCALE
    load = load if load is not None else DEMO_LOAD
    lam = lam if lam is not None else DEMO_LAM
    t0 = time.perf_counter()
    with progress() as prog:
        bar = {}

        def on_run(policy: str) -> None:
            bar["id"] = prog.add_task(f"{policy} (live)", total=n)

        with failing_on(*LOAD_ERRORS):
            d = run_live_demo(n=n, time_scale=time_scale, workload=workload, load=load, lam=lam, out=out,
                              on_run=on_run, on_record=lambda _r: prog.advance(bar["id"]), hints=not no_hints,
                              append_only=append_only)
    t = Table(title=f"{workload}: {n} workflows at {d.rate:.2f}/s (load {load:g}) on {', '.join(MODELS)} (A6000, "
                    f"time scale {time_scale:g}) — {d.label}")
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
    console.print(f"All numbers: {d.label}, except the simulated twin's (the simulator on the same workflows and "
                  f"arrival times); {time.perf_counter() - t0:.0f} s wall. "
                  "The simulated comparison of 7 policies: `chimera demo --simulated`.")


def demo_simulated(tasks: int, load: float, workload: str, cluster: Optional[Path]) -> None:
    """vLLM-style serving vs Chimera on a simulated 3-model cluster (the former `chimera demo`)."""
    from chimera.bench.sim_demo import RUNS, run_simulated_demo, versus
    from chimera.sim.experiment import prepare
    from chimera.workload.source import load_workload

    with failing_on(*LOAD_ERRORS):
        ts, _ = load_workload(workload)
        prep = prepare(ts, cluster_or_default(cluster))
    with progress() as prog:
        bar = prog.add_task("policies", total=len(RUNS))
        d = run_simulated_demo(prep, tasks, load, progress=lambda k: prog.advance(bar, k))
    console.print(summary_table(d.rows, f"{workload} on {', '.join(prep.names)} at {d.rate:.2f} workflows/s "
                                        f"(load {load:g}; simulated)"))
    for r in d.rows[1:]:
        lam = f" (λ={r['lam']:g})" if r.get("lam") is not None else ""
        console.print(f"{r['policy']}{lam} vs vllm: {versus(d.rows[0], r)}")
    console.print("All results are simulated (discrete-event simulator, calibrated engine model). "
                  "Sweeps: `chimera bench sim`; see BENCHMARKS.md.")
