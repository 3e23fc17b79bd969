"""The live main job (`chimera demo`): agents drive the built-in workload through the Chimera gateway in front of an
emulated 3-model cluster, once under the `vllm` policy and once under `chimera`, each with fresh emulators and a
fresh gateway. Live run against emulated backends (engine model), not real GPUs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from chimera.serve.threaded import serve_in_thread

LABEL = "live run against emulated backends (engine model), not real GPUs"
MODELS = {"qwen2.5-1.5b": "qwen2.5-1.5b@a6000", "qwen2.5-7b": "qwen2.5-7b@a6000",
          "qwen2.5-14b": "qwen2.5-14b@a6000"}
DEFAULT_LAM = 0.05


@dataclass
class LiveRun:
    policy: str
    lam: float | None
    summary: dict[str, Any]
    calls: list[dict[str, Any]] = field(default_factory=list)  # trace-store rows: model, queued/dispatched/end


@dataclass
class LiveDemo:
    runs: list[LiveRun]
    rate: float
    tasks: int
    time_scale: float
    workload: str
    report: Path | None = None


def arrival_rate(tasks, load: float, time_scale: float) -> float:
    """Live workflows/s: `load` × the simulated saturated throughput of `vllm` on the same cluster, sped up by
    the time scale (emulators and tool sleeps both run `time_scale`× faster than real time)."""
    from chimera.bench.sweep import capacity_workflows_per_s
    from chimera.engine.profiles import default_cluster
    from chimera.sim.experiment import prepare

    return load * capacity_workflows_per_s(prepare(tasks, default_cluster())) * time_scale


def run_one(tasks: Sequence, policy: str, lam: float | None, n: int, rate: float, time_scale: float,
            trace_path: Path, seed: int = 0, max_inflight: int = 64,
            on_record: Callable | None = None) -> LiveRun:
    from chimera.agents.driver import AgentConfig, run_agents
    from chimera.emulate import EmulatorServer
    from chimera.serve import build_gateway
    from chimera.serve.config import gateway_config_from_dict

    import asyncio

    if trace_path.exists():
        trace_path.unlink()
    with contextlib.ExitStack() as stack:
        emus = {m: stack.enter_context(EmulatorServer(profile=p, served_model_name=m, time_scale=time_scale,
                                                      workload=list(tasks)))
                for m, p in MODELS.items()}
        pol: dict[str, Any] = {"name": policy}
        if lam is not None:
            pol["lam"] = lam
        cfg = gateway_config_from_dict({
            "policy": pol,
            "trace_store": str(trace_path),
            "backends": [{"name": f"{m}-0", "model": m, "base_url": e.base_url, "max_inflight": max_inflight,
                          "profile": MODELS[m]} for m, e in emus.items()],
            "limits": {"request_timeout_s": 300, "max_queue": 100000},
        })
        gw = build_gateway(cfg)
        url = stack.enter_context(serve_in_thread(gw))
        acfg = AgentConfig(base_url=url, rate=rate, time_scale=time_scale, seed=seed, timeout_s=300)
        run = asyncio.run(run_agents(tasks, acfg, n, on_record))
        calls = gw.state.gateway.trace.query(
            "SELECT workflow_id, model, queued_at, dispatched_at, ended_at, status FROM calls")
    s = dict(run.summary)
    s["policy"] = policy
    s["lam"] = lam
    s["live"] = True
    s["label"] = LABEL
    return LiveRun(policy, lam, s, calls)


def run_live_demo(n: int = 150, time_scale: float = 20.0, workload: str = "synthetic", load: float = 0.9,
                  lam: float = DEFAULT_LAM, out: Path | str = "out/demo", seed: int = 0,
                  on_record: Callable | None = None, on_run: Callable[[str], None] | None = None) -> LiveDemo:
    """Both runs (vllm, then chimera λ=`lam`) on the same tasks and arrival seed; writes out/report.html."""
    from chimera.bench.html_report import write_report
    from chimera.workload.source import load_workload

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, _ = load_workload(workload, seed=seed)
    rate = arrival_rate(tasks, load, time_scale)
    runs = []
    for policy, lm in (("vllm", None), ("chimera", lam)):
        if on_run is not None:
            on_run(policy)
        runs.append(run_one(tasks, policy, lm, n, rate, time_scale, out / f"traces-{policy}.sqlite", seed=seed,
                            on_record=on_record))
    demo = LiveDemo(runs, rate, n, time_scale, workload)
    demo.report = write_report(demo, out / "report.html")
    return demo


def versus(base: dict, other: dict) -> str:
    b, o = base["latency_s"]["mean"], other["latency_s"]["mean"]
    speed = f"{b / o:.2f}× lower" if o <= b else f"{o / b:.2f}× higher"
    return (f"{other['policy']} vs {base['policy']}: {speed} mean latency, "
            f"{100 * (other['accuracy'] - base['accuracy']):+.1f} points accuracy (live, emulated backends)")
