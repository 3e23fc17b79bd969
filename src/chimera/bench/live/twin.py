"""The simulated twin of a live run: the simulator on the same workflows and arrival times, under the policy the
gateway ran, on the cluster the run had (the emulated A6000s, or the one built from the real servers' profiles);
the load's rate from its capacity, and the fidelity of its prediction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from chimera.bench.live.config import (CONTENTION_FILE, FIDELITY_METRICS, REAL_KV_BLOCK_TOKENS,
                                       REAL_MAX_NUM_BATCHED_TOKENS, Contender, LiveBenchConfig,
                                       emulated_cluster_config)
from chimera.workload.arrivals import LIVE_STREAM, poisson_arrivals
from chimera.workload.schema import Task


def arrival_rate(tasks: Sequence[Task], load: float, time_scale: float) -> float:
    """Live workflows/s: `load` × the simulated saturated throughput of round-robin on the same cluster, sped up by
    the time scale (emulators and tool sleeps both run `time_scale`× faster than real time)."""
    from chimera.bench.sweep import capacity_workflows_per_s
    from chimera.sim.experiment import prepare

    return load * capacity_workflows_per_s(prepare(tasks, emulated_cluster_config())) * time_scale


def capacity_of(runtimes, workflows: Sequence[tuple[str, Any, Task]]) -> float:
    """Load 1.0 on a given cluster and set of workflows: the throughput round-robin sustains when saturated, in
    the simulator (as `bench.sweep.capacity_workflows_per_s`: a closed loop with twice as many agents as batch
    slots, workflows per second over the middle half of the run)."""
    from chimera.sched.registry import make_policy
    from chimera.sim.simulator import Simulator

    agents = min(3000, 2 * sum(r.info.max_inflight for r in runtimes))
    wfs = [(f"{w}~cap{k}", p, t.prompt) for k in range(-(-3 * agents // len(workflows)))
           for w, p, t in workflows][: 3 * agents]
    sim = Simulator(runtimes, make_policy("vllm"), wfs, agents=agents)
    sim.run()
    ends = sorted(r.end_s for r in sim.records)
    lo, hi = len(ends) // 4, (3 * len(ends)) // 4
    return (hi - lo) / max(ends[hi] - ends[lo], 1e-9)


def simulate_same_run(c: Contender, tasks: Sequence[Task], cfg: LiveBenchConfig, rate: float,
                      cluster=None, workflows: Sequence[tuple[str, Any, Task]] | None = None,
                      online_lengths: bool | None = None) -> dict[str, Any] | None:
    """The simulator on the driver's workflows and arrival times (× time scale), under the contender's policy with
    the gateway's untrained priors (size-ranked confidence; per-stage mean lengths, which the gateway's running
    means converge to). Latencies and throughput are returned in live (time-scaled) units. `cluster` (default: the
    emulated A6000 cluster) and `workflows` (default: the plans built from `tasks`) are what the real engine uses:
    the cluster built from the measured profiles and the length-scaled plans. `online_lengths` True: the lengths are
    learnt online from a cold start, as the gateway learns them (None: so for engine vllm with sim_online_lengths)."""
    from chimera.agents.driver import make_workflows
    from chimera.predict.assembly import PolicySpec, PredictorsSpec, build_policy
    from chimera.predict.context import AssemblyContext
    from chimera.sim.cluster import build_runtimes
    from chimera.sim.simulator import Simulator

    pol_name = c.sim_policy
    if pol_name is None:
        return None
    wfs = list(workflows) if workflows is not None else make_workflows(tasks, cfg.tasks, cfg.seed)
    runtimes = build_runtimes(cluster if cluster is not None else emulated_cluster_config())
    online = (cfg.engine == "vllm" and cfg.sim_online_lengths) if online_lengths is None else online_lengths
    # As the live gateway: running means per (kind, stage, model) from a cold start (the core feeds their `learn`);
    # else per-stage means of the run's own plans (what those running means converge to).
    ctx = AssemblyContext(models=[r.info for r in runtimes], train_plans=[p for _, p, _ in wfs])
    # An online contender's twin learns confidence from each workflow's score as the gateway does from feedback.
    preds = PredictorsSpec(confidence="online" if c.online else "size-prior",
                           length="running-mean" if online or c.online else "stage-mean")
    pol = build_policy(PolicySpec(name=pol_name, lam=c.lam, predictors=preds), ctx)
    arrivals = poisson_arrivals(rate, len(wfs), cfg.seed, LIVE_STREAM, start_at_zero=True) * cfg.time_scale
    sim = Simulator(runtimes, pol, [(w, p, t.prompt) for w, p, t in wfs], arrivals=list(arrivals), seed=cfg.seed)
    s = sim.run()
    ts = cfg.time_scale
    s["latency_s"] = {k: v / ts for k, v in s["latency_s"].items()}
    for w in s["windows"]:
        w["latency_mean_s"] /= ts
    s["throughput_tasks_per_s"] = s["throughput_tasks_per_s"] * ts
    s["sim_policy"] = pol_name
    s["sim_lengths"] = "online running means (cold start), as the gateway" if online else "per-stage means of the plans"
    return s


def compared_metrics(s: dict[str, Any]) -> dict[str, float]:
    lat = s["latency_s"]
    return {"latency_mean": lat["mean"], "latency_p50": lat["p50"], "latency_p99": lat["p99"],
            "throughput": s["throughput_tasks_per_s"], "accuracy": s["accuracy"]}


def fidelity(sim: dict[str, Any], live: dict[str, Any]) -> dict[str, float]:
    """Per metric 100·(1 − |sim − live| / live), floored at 0: 100% means the simulator predicted the live value."""
    a, b = compared_metrics(sim), compared_metrics(live)
    out = {}
    for k in FIDELITY_METRICS:
        lv, sv = b[k], a[k]
        out[k] = max(0.0, 100.0 * (1.0 - abs(sv - lv) / abs(lv))) if lv else (100.0 if sv == lv else 0.0)
    return out


def profiled_cluster(paths: dict[str, str], cfg: LiveBenchConfig):
    """The simulated cluster: one model per profile file, batch limit and token budget as the servers run them."""
    from chimera.perfmodel.profiles import cluster_from_dict

    contention = load_contention(paths) if cfg.contention else {}
    return cluster_from_dict({"models": [
        {"profile_file": str(Path(p).resolve()), "name": n, "max_num_seqs": cfg.max_inflight,
         "max_num_batched_tokens": REAL_MAX_NUM_BATCHED_TOKENS,
         "prefix_caching": cfg.prefix_caching, "kv_block_tokens": REAL_KV_BLOCK_TOKENS,
         **({"host": "this-machine", "peer_busy_slowdown": contention[n]["slowdown"],
             "peer_busy_batch": int(contention[n].get("batch", 1))} if n in contention else {})}
        for n, p in paths.items()]}, source="profiled cluster")


def load_contention(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The peer-busy slowdowns measured beside the profiles (CONTENTION_FILE in their folder), or {}."""
    folders = {Path(p).resolve().parent for p in paths.values()}
    if len(folders) != 1:
        return {}
    f = folders.pop() / CONTENTION_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
