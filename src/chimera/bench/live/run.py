"""The whole live benchmark: every contender on the same tasks and arrival times, each beside its simulated twin,
then the gateways' added latency and the report; and `--resimulate`, the twin again on stored runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from chimera.bench.live.config import LiveBenchConfig, parse_contender
from chimera.bench.live.contenders import ContenderRun, LiveBench, run_contender
from chimera.bench.live.profiles import given_profiles
from chimera.bench.live.providers import SETUPS
from chimera.bench.live.report import live_frontier, markdown, plot_frontier, to_json
from chimera.bench.live.twin import capacity_of, fidelity, load_contention, profiled_cluster, simulate_same_run
from chimera.bench.live.workload import real_workflows, to_served_models


def run_live_bench(cfg: LiveBenchConfig, out: Path, on_record: Callable | None = None,
                   on_stage: Callable[[str], None] | None = None) -> LiveBench:
    """Every contender on the same tasks and arrivals, on fresh servers from the engine's provider (for `vllm`
    profiled first), then the gateways' added latency, then the fidelity of the simulated twin."""
    contenders = [parse_contender(s) for s in cfg.contenders]
    uses_litellm = any(c.gateway == "litellm" for c in contenders)
    if uses_litellm:  # fail before anything starts
        from chimera.bench.litellm_proxy import find_litellm

        cfg = cfg.model_copy(update={"litellm": str(find_litellm(cfg.litellm))})
    setup = SETUPS[cfg.engine](cfg, out, on_stage)
    provider = setup.provider
    runs: list[ContenderRun] = []
    rounds: dict[str, list[dict[str, Any]]] = {c.label: [] for c in contenders}
    for k in range(cfg.repeat):  # round by round, so a drift of the machine reaches every contender alike
        for c in contenders:
            if on_stage is not None:
                on_stage(c.label if cfg.repeat == 1 else f"{c.label}, round {k + 1}/{cfg.repeat}")
            folder = c.label.replace(" ", "-") + ("" if k == 0 else f"-round{k + 1}")
            run = run_contender(c, provider, setup.tasks, cfg, setup.rate, out / folder, on_record)
            rounds[c.label].append(run.summary)
            if k > 0:  # the report's main tables show round 1; the twin is the same for every round
                continue
            run.sim = simulate_same_run(c, setup.tasks, cfg, setup.rate, cluster=provider.sim_cluster,
                                        workflows=provider.workflows)
            if run.sim is not None:
                run.fidelity = fidelity(run.sim, run.summary)
            runs.append(run)
    bench = LiveBench(cfg, setup.rate, setup.mapping, runs, engine=setup.engine,
                      rounds=rounds if cfg.repeat > 1 else {})
    _finish(bench, cfg, out, uses_litellm, on_stage)
    return bench


def _finish(bench: LiveBench, cfg: LiveBenchConfig, out: Path, uses_litellm: bool,
            on_stage: Callable[[str], None] | None) -> None:
    """The gateways' added latency (unless skipped), then results.json, results.md and frontier.png."""
    if cfg.overhead_rates:
        from chimera.bench.gateway_overhead import run_benchmark

        if on_stage is not None:
            on_stage("gateway added latency")
        bench.overhead = run_benchmark(cfg.overhead_rates, duration=cfg.overhead_duration_s, out=out / "overhead",
                                       policy="chimera",
                                       litellm=cfg.litellm if uses_litellm else None)
    front = live_frontier(bench)
    (out / "results.json").write_text(json.dumps(to_json(bench, front), indent=1))
    (out / "results.md").write_text(markdown(bench, front))
    plot_frontier(bench, out / "frontier.png")


def resimulate(out: Path, profiles: str | None = None, sim_online_lengths: bool | None = None,
               contention: bool | None = None, prefix_caching: bool | None = None) -> dict[str, Any]:
    """The simulator again on the live runs stored in OUT/results.json (engine vllm): same workflows and arrival
    times, the cluster from `profiles` (default: the run's), online or plan lengths; fidelity against the stored
    live results. Nothing is started. Returns {"profiles", "sim_lengths", "rows": [{contender, sim, fidelity_pct}]}."""
    from chimera.sim.cluster import build_runtimes
    from chimera.workload.source import load_workload

    res = json.loads((Path(out) / "results.json").read_text())
    upd: dict[str, Any] = {}
    if profiles is not None:
        upd["profiles"] = profiles
    if sim_online_lengths is not None:
        upd["sim_online_lengths"] = sim_online_lengths
    if contention is not None:
        upd["contention"] = contention
    if prefix_caching is not None:
        upd["prefix_caching"] = prefix_caching
    cfg = LiveBenchConfig.model_validate({**res["config"], **upd})
    if cfg.engine != "vllm":
        raise ValueError("resimulate: only for --engine vllm results")
    paths = given_profiles(cfg)["paths"] if cfg.profiles else res["engine"]["profiles"]["paths"]
    loaded, _ = load_workload(cfg.workload, seed=cfg.seed)
    tasks, _ = to_served_models(loaded, cfg.real_models, "real")
    workflows, _ = real_workflows(tasks, cfg)
    cluster = profiled_cluster(paths, cfg)
    rows = []
    for run in res["runs"]:
        c = parse_contender(next(x for x in cfg.contenders if parse_contender(x).label == run["contender"]))
        sim = simulate_same_run(c, tasks, cfg, res["rate"], cluster=cluster, workflows=workflows)
        rows.append({"contender": run["contender"], "sim": sim,
                     "fidelity_pct": fidelity(sim, run["live"]) if sim is not None else {}, "live": run["live"],
                     "server_metrics": run.get("server_metrics") or {}})
    return {"profiles": paths, "sim_lengths": "online" if cfg.sim_online_lengths else "plans",
            "prefix_caching": cfg.prefix_caching, "servers": list(cfg.real_models),
            "contention": {n: d["slowdown"] for n, d in load_contention(paths).items()} if cfg.contention else {},
            "capacity_wps": capacity_of(build_runtimes(cluster), workflows), "rows": rows}
