"""`chimera bench sim|speed|predict` and `chimera tune`: benchmarks that run in this process (simulator, predictors)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from chimera.cli.common import (CLUSTER_HELP, LENGTH_STAT_HELP, LOAD_ERRORS, WORKLOAD_HELP, cluster_or_default,
                                console, fail, failing_on, names, predictors_or_none, progress, validation_message)


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
    length_stat: str = typer.Option("mean", "--length-stat", help=LENGTH_STAT_HELP),
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
    from chimera.bench.sweep import build_spec, count_runs, run_sweep, write_results
    from chimera.workload.source import load_workload

    loads_, lams_ = [float(x) for x in loads.split(",")], [float(x) for x in lams.split(",")]
    with failing_on(ValueError, strip=False):
        spec = build_spec(
            [p.strip() for p in policies_.split(",")] if policies_ else None, param, loads=loads_, lams=lams_,
            tasks=tasks, seed=seed, ablation_lam=ablation_lam, length_stat=length_stat, engine_order=engine_order,
            predictions=[p.strip() for p in predictions_.split(",")] if predictions_ else (), hold=hold,
            free_context=free_context)
    rows: list[dict] = []
    with failing_on(*LOAD_ERRORS):
        cl, trained = cluster_or_default(cluster), predictors_or_none(predictors)
        with progress() as prog:
            for w in workload:
                ts, _ = load_workload(w, data_dir=data_dir, seed=seed)
                bar = prog.add_task(f"{w}", total=count_runs(spec))
                rows += run_sweep(w, ts, cl, spec, progress=lambda k, b=bar: prog.advance(b, k), predictors=trained)
    md, png = write_results(rows, out, free_context)
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {png} (all results simulated)")


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
    from chimera.bench.sim_speed import simulator_speed

    s = simulator_speed(tasks, policy, load, cluster_or_default(cluster), seed=seed)
    res = s.result
    console.print(f"{policy}: {tasks} workflows, {res['calls']} calls; planning {s.plan_s:.2f} s + simulation "
                  f"{res['wall_s']:.2f} s = {s.total_s:.2f} s wall; {s.calls_per_s:,.0f} calls/s; "
                  f"scheduler share of simulated latency {100 * res['scheduler_share_of_latency']:.3f}%")


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

    with failing_on(*LOAD_ERRORS):
        stat_quantile(length_stat)
        pred = predictors_or_none(predictors)
        ts, _ = load_workload(workload, data_dir=data_dir)
    names = [m.strip() for m in models.split(",")] if models else pred.models[:3]
    res = measure(pred, ts, names, batch=batch, length_stat=length_stat)
    console.print(f"{predictors} ({pred.spec.get('router', {}).get('encoder', '?')} router, length {length_stat}), "
                  f"batch {batch}, "
                  f"{len(names)} models: router {res['router_ms']:.3f} ms + length {res['length_ms']:.3f} ms = "
                  f"{res['total_ms']:.3f} ms per request (p90 {res['total_p90_ms']:.3f} ms)")


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
    length_stat: str = typer.Option("mean", "--length-stat", help=LENGTH_STAT_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    out: Path = typer.Option(Path("out/tune"), "--out", help="Folder for results.md, results.json, policy.yaml."),
) -> None:
    """Pick chimera's parameters for a workload on a cluster in the simulator: candidates run on half the held-out
    tasks, the pick is checked on the other half; writes the pick as a gateway `policy:` block (policy.yaml).

    Example: chimera tune -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --predictors out/predictors/mmlu --set congestion=batch --grid externality=0,1,2
    """
    from pydantic import ValidationError

    from chimera.bench.tune import build_spec, count_runs, run_tune, write_results
    from chimera.workload.source import load_workload

    try:
        spec = build_spec(grid, fixed, target=target, load=load, lams=[float(x) for x in lams.split(",")],
                          tasks=tasks, seed=seed, length_stat=length_stat)
    except ValidationError as e:
        fail(validation_message(e))
    except ValueError as e:
        fail(str(e))
    with failing_on(*LOAD_ERRORS):
        cl, trained = cluster_or_default(cluster), predictors_or_none(predictors)
        ts, _ = load_workload(workload, data_dir=data_dir, seed=seed)
        with progress() as prog:
            bar = prog.add_task(f"tune {workload}", total=count_runs(spec))
            res = run_tune(workload, ts, cl, spec, predictors=trained, progress=lambda k: prog.advance(bar, k))
    md, block = write_results(res, out)
    console.print(md)
    console.print(block)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'policy.yaml'} (all results simulated)")


def bench_ope(
    workload: str = typer.Option("source:mmlu-pro-math", "--workload", "-w", help=WORKLOAD_HELP),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP),
    lam: float = typer.Option(0.05, "--lam", help="λ of the logged run."),
    candidates: str = typer.Option("0.02,0.1,0.2", "--candidates", help="Candidate λ values, comma-separated."),
    load: float = typer.Option(0.7, "--load", help="Arrival rate as a fraction of the throughput round-robin (vllm) "
                               "sustains when saturated (measured)."),
    tasks: int = typer.Option(3000, "--tasks", help="Workflows per run (held-out tasks, drawn again as needed)."),
    predictions: str = typer.Option("online", "--predictions", help="Predictors of every run (the logged one "
                                    "explores only with an exploring confidence predictor: online)."),
    seeds: str = typer.Option("0", "--seeds", help="Seeds, comma-separated: each one a logged run and its "
                              "candidates' runs (workflows, arrivals)."),
    learner: list[str] = typer.Option([], "--learner", help="KEY=VALUE: a parameter of every run's confidence "
                                      "predictor (repeatable), e.g. explore_min=0.1 (see docs/predictors.md)."),
    replays: int = typer.Option(5, "--replays", min=1, help="Replays of each candidate in a world learnt from the "
                                "logs (the replayed DR the check judges)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    out: Path = typer.Option(Path("out/bench-ope"), "--out", help="Folder for trace-SEED.sqlite, results.md, "
                             "results.json."),
) -> None:
    """Off-policy evaluation checked in the simulator: a logged run's trace store estimates each candidate λ
    (`chimera eval traces`, and the replayed DR: the candidate replayed in a world learnt from the store), then each
    candidate runs for real on the same workflows (all results simulated).

    Example: chimera bench ope -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --lam 0.05 --candidates 0.02,0.1,0.2
    """
    from chimera.bench.ope_check import OPECheckSpec, candidate_list, run_ope_check, write_results
    from chimera.util.keyvalue import parse_pairs
    from chimera.workload.source import load_workload

    with failing_on(*LOAD_ERRORS):
        spec = OPECheckSpec(logged_lam=lam, candidates=candidate_list(candidates), load=load, tasks=tasks,
                            seeds=tuple(int(x) for x in names(seeds)), predictions=predictions,
                            learner=tuple(parse_pairs(learner, "--learner").items()), replays=replays)
        spec.predictors()  # a bad predictor choice or parameter fails here, naming it
        cl = cluster_or_default(cluster)
        load_workload(workload, data_dir=data_dir)  # a bad spec fails before any run
        with progress() as prog:
            bar = prog.add_task(f"ope {workload}", total=len(spec.seeds) * spec.runs_per_seed())
            res = run_ope_check(lambda s: load_workload(workload, data_dir=data_dir, seed=s)[0], cl, spec, out,
                                progress=lambda k: prog.advance(bar, k))
    console.print(write_results(res, workload, out))
    console.print(f"wrote {out}/trace-SEED.sqlite, {out / 'results.md'}, {out / 'results.json'} (all results "
                  "simulated)")
