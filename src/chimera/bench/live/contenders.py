"""One contender's run: fresh servers from the cluster provider, its gateway (LiteLLM's proxy or `chimera serve`) in
front of them, then the agents with the benchmark's tasks and arrival times. Written once for every provider."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from chimera.bench.live.config import Contender, LiveBenchConfig
from chimera.bench.live.providers import ClusterProvider, Served
from chimera.util.procs import Spawned
from chimera.workload.schema import Task

CHIMERA_LIMITS = {"request_timeout_s": 600, "max_queue": 100000}  # the gateway queues, never refuses, a run's calls


@dataclass
class ContenderRun:
    contender: Contender
    summary: dict[str, Any]
    sim: dict[str, Any] | None = None  # the simulator's prediction of the same run
    fidelity: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, Any] | None = None  # real engine: CPU seconds per process over the run (bench.proc_cpu)
    server_metrics: dict[str, Any] | None = None  # real engine: vLLM counters over the run, per server
    servers: list[dict[str, Any]] | None = None  # real engine: the servers (pid, core, start-up time, log)


@dataclass
class LiveBench:
    config: LiveBenchConfig
    rate: float
    mapping: dict[str, str]
    runs: list[ContenderRun]
    overhead: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None  # real engine: servers, profiles, capacity, workload scaling
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # --repeat: label -> each round's summary

    @property
    def label(self) -> str:
        return self.config.label


@contextlib.contextmanager
def contender_gateway(c: Contender, served: Sequence[Served], workdir: Path,
                      litellm: str | None = None) -> Iterator[list[Spawned]]:
    """The contender's gateway processes in front of `served`: LiteLLM's proxy (every server a deployment of one
    group, routed by the strategy) or `chimera serve` (one backend per server: its profile, priority and batch
    slots), one process, or with `c.replicas` > 1 that many replicas sharing state on a Redis of their own."""
    if c.gateway == "litellm":
        from chimera.bench.litellm_proxy import litellm_config, litellm_proxy

        with litellm_proxy(litellm_config({s.model: s.base_url for s in served}, c.strategy), workdir,
                           binary=litellm) as proxy:
            yield [proxy]
        return
    from chimera.bench.gateway_process import gateway_process
    from chimera.bench.replica_set import replica_set
    from chimera.serve.config import backends_for_cluster, build_gateway_config
    from chimera.util.threaded import free_port

    cfg = build_gateway_config(backends_for_cluster(s.backend() for s in served), policy=c.strategy, lam=c.lam,
                               port=free_port(), trace_store=workdir / "traces.sqlite", limits=CHIMERA_LIMITS,
                               learning={"online": True} if c.online else None)
    if c.replicas == 1:
        with gateway_process(cfg, workdir) as gw:
            yield [gw]
        return
    with replica_set(cfg, c.replicas, workdir) as rs:
        yield [r.process for r in rs.replicas]


def _gateway_roles(gws: Sequence[Spawned]) -> dict[str, int]:
    """CPU roles of the gateway processes: `gateway`, or for replicas `gateway rI` each."""
    return {"gateway": gws[0].pid} if len(gws) == 1 else {f"gateway r{i}": g.pid for i, g in enumerate(gws)}


def _sum_gateway_roles(cpu: dict[str, Any]) -> dict[str, Any]:
    """Replicas: a `gateway` role summing the `gateway rI` ones (the report's gateway column is all of them)."""
    roles = cpu.get("roles", {})
    parts = [v for k, v in roles.items() if k.startswith("gateway r")]
    if parts and "gateway" not in roles:
        roles["gateway"] = {"cpu_s": round(sum(p["cpu_s"] for p in parts), 2),
                            "procs": {k: v for p in parts for k, v in p["procs"].items()},
                            "cores": round(sum(p["cores"] or 0 for p in parts), 3)}
    return cpu


def run_contender(c: Contender, provider: ClusterProvider, tasks: Sequence[Task], cfg: LiveBenchConfig, rate: float,
                  workdir: Path, on_record: Callable | None = None) -> ContenderRun:
    """Fresh servers and gateway for `c`, then the agents; the live summary, and where the provider offers them,
    each process's CPU time and the servers' counters over the agents' run."""
    from chimera.agents.driver import AgentConfig, run_agents
    from chimera.bench.litellm_proxy import GROUP
    from chimera.bench.proc_cpu import cpu_delta, snapshot

    workdir.mkdir(parents=True, exist_ok=True)
    out = ContenderRun(c, {})
    with provider.fresh(workdir) as cl:
        with contender_gateway(c, cl.served, workdir, cfg.litellm) as gws:
            hints = cfg.hints or c.gateway != "chimera"  # --no-hints: Chimera infers workflows
            acfg = AgentConfig(base_url=gws[0].url, models=(GROUP,) if c.gateway == "litellm" else ("chimera",),
                               rate=rate, seed=cfg.seed, timeout_s=600,
                               feedback=c.gateway == "chimera",  # LiteLLM has no feedback endpoint: no 404 load
                               hints=hints, append_only=True if cfg.append_only or not cfg.hints else None,
                               # replicas: whole workflows to one replica when the gateway infers them (its
                               # conversation table is each replica's own)
                               replica_urls=[g.url for g in gws[1:]],
                               spread=cfg.replica_spread if cfg.hints else "workflow",
                               **provider.agent_options())
            groups = {**cl.cpu_groups, **_gateway_roles(gws)} if cl.cpu_groups else {}
            counted = cl.meter() if cl.meter is not None else None
            cpu0 = snapshot(groups) if groups else None
            run = asyncio.run(run_agents(tasks, acfg, cfg.tasks, on_record, workflows=provider.workflows))
            if cpu0 is not None:
                out.cpu = _sum_gateway_roles(cpu_delta(cpu0, snapshot(groups)))
            if counted is not None:
                out.server_metrics = counted()
        if cl.describe is not None:
            out.servers = cl.describe()
    out.summary = dict(run.summary)
    out.summary.update(policy=c.label, contender=c.label, live=True, label=provider.label)
    return out
