"""`chimera bench live`: the same agents and workload through LiteLLM's proxy and through Chimera, live.

Every contender gets a fresh emulated cluster (three `chimera emulate` processes: Qwen2.5 1.5B / 7B / 14B on A6000,
time-scaled) and its own gateway process (`litellm --config` or `chimera serve`); this process runs the agent driver
with the same tasks and the same Poisson arrival times. All servers are subprocesses, so no contender shares the
driver's interpreter. Live run against emulated backends (engine model), not real GPUs.

Fidelity: the simulator replays the same workflows at the same arrival times (scaled back by the time scale) under
the policy the gateway ran, and its latencies, throughput and accuracy are set beside the live ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from chimera.bench.litellm_proxy import GROUP, STRATEGIES, litellm_config, litellm_proxy
from chimera.bench.procs import Spawned, chimera_cmd, spawned, wait_ready
from chimera.serve.threaded import free_port
from chimera.workload.schema import Task

LABEL = "live run against emulated backends (engine model), not real GPUs"
MODELS = {"qwen2.5-1.5b": "qwen2.5-1.5b@a6000", "qwen2.5-7b": "qwen2.5-7b@a6000",
          "qwen2.5-14b": "qwen2.5-14b@a6000"}  # served name -> engine profile, smallest first
DEFAULT_LAM = 0.05
DEFAULT_CONTENDERS = ("litellm:simple-shuffle", "litellm:least-busy", "chimera:vllm", f"chimera:chimera@{DEFAULT_LAM}")
SIM_TWIN = {"least-busy": "least-loaded"}  # LiteLLM strategy -> the simulator's nearest policy
FIDELITY_METRICS = ("latency_mean", "latency_p50", "latency_p99", "throughput", "accuracy")


@dataclass(frozen=True)
class Contender:
    """One gateway set-up: `litellm:STRATEGY` or `chimera:POLICY[@LAMBDA]`."""

    gateway: str
    strategy: str
    lam: float | None = None

    @property
    def label(self) -> str:
        base = f"{self.gateway} {self.strategy}"
        return base if self.lam is None else f"{base} λ={self.lam:g}"

    @property
    def sim_policy(self) -> str | None:
        """The simulator policy that models this contender (None: no faithful twin, e.g. random shuffle)."""
        return self.strategy if self.gateway == "chimera" else SIM_TWIN.get(self.strategy)


def parse_contender(spec: str) -> Contender:
    from chimera.sched.registry import LAMBDA_POLICIES, POLICIES

    gw, _, rest = spec.strip().partition(":")
    if gw == "litellm":
        if rest not in STRATEGIES:
            raise ValueError(f"contender {spec!r}: LiteLLM strategy must be one of {', '.join(STRATEGIES)}")
        return Contender("litellm", rest)
    if gw == "chimera":
        pol, _, lam = rest.partition("@")
        if pol not in POLICIES:
            raise ValueError(f"contender {spec!r}: unknown policy {pol!r}; choose one of {', '.join(POLICIES)}")
        if lam and pol not in LAMBDA_POLICIES:
            raise ValueError(f"contender {spec!r}: policy {pol!r} takes no λ")
        try:
            return Contender("chimera", pol, float(lam) if lam else None)
        except ValueError:
            raise ValueError(f"contender {spec!r}: λ must be a number, got {lam!r}") from None
    raise ValueError(f"contender {spec!r}: expected litellm:STRATEGY or chimera:POLICY[@LAMBDA]")


class LiveBenchConfig(BaseModel):
    """What `chimera bench live` runs; validated before anything starts."""

    model_config = ConfigDict(extra="forbid")

    contenders: list[str] = Field(default_factory=lambda: list(DEFAULT_CONTENDERS), min_length=1)
    workload: str = "synthetic"
    tasks: int = Field(default=200, ge=1)
    load: float = Field(default=0.6, gt=0)
    rate: float | None = Field(default=None, gt=0)  # live workflows/s; overrides load
    time_scale: float = Field(default=5.0, gt=0)
    seed: int = 0
    overhead_rates: list[float] = Field(default_factory=lambda: [50.0, 100.0])
    overhead_duration_s: float = Field(default=3.0, gt=0)
    litellm: str | None = None  # path to the litellm executable

    @field_validator("contenders")
    @classmethod
    def _parse(cls, v: list[str]) -> list[str]:
        for s in v:
            parse_contender(s)
        return v

    @field_validator("overhead_rates")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(r <= 0 for r in v):
            raise ValueError("overhead rates must be > 0 req/s")
        return v


# ---- the workload on the emulated cluster -------------------------------------------------------------------------
def to_emulated_models(tasks: Sequence[Task]) -> tuple[list[Task], dict[str, str]]:
    """Tasks whose outcomes name the three emulated models. A workload that already does is kept; otherwise its
    three most-covered models, ranked by mean score (weakest -> 1.5B, strongest -> 14B), are renamed, and tasks
    lacking any of them are dropped. Returns (tasks, {emulated name: workload model})."""
    names = list(MODELS)
    if all(all(m in t.outcomes for m in names) for t in tasks):
        return list(tasks), {m: m for m in names}
    cover: dict[str, list[float]] = {}
    for t in tasks:
        for m, o in t.outcomes.items():
            cover.setdefault(m, []).append(o.score)
    if len(cover) < len(names):
        raise ValueError(f"the workload names {len(cover)} model(s); the emulated cluster needs {len(names)}")
    top = sorted(cover, key=lambda m: (-len(cover[m]), m))[: len(names)]
    ranked = sorted(top, key=lambda m: float(np.mean(cover[m])))
    mapping = dict(zip(names, ranked))
    out = []
    for t in tasks:
        if all(w in t.outcomes for w in ranked):
            stages = {e: t.stages[w] for e, w in mapping.items() if t.stages and w in t.stages} or None
            out.append(t.model_copy(update={"outcomes": {e: t.outcomes[w] for e, w in mapping.items()},
                                            "stages": stages}))
    if not out:
        raise ValueError(f"no task of the workload has outcomes for all of {', '.join(ranked)}")
    return out, mapping


def arrival_rate(tasks: Sequence[Task], load: float, time_scale: float) -> float:
    """Live workflows/s: `load` × the simulated saturated throughput of round-robin on the same cluster, sped up by
    the time scale (emulators and tool sleeps both run `time_scale`× faster than real time)."""
    from chimera.bench.sweep import capacity_workflows_per_s
    from chimera.engine.profiles import default_cluster
    from chimera.sim.experiment import prepare

    return load * capacity_workflows_per_s(prepare(tasks, default_cluster())) * time_scale


@contextlib.contextmanager
def emulated_cluster(workload_file: Path, time_scale: float, seed: int, workdir: Path):
    """Three `chimera emulate` processes replaying `workload_file`; yields {served name: Spawned}."""
    with contextlib.ExitStack() as stack:
        emus = {}
        for name, prof in MODELS.items():
            port = free_port()
            emus[name] = stack.enter_context(spawned(
                f"emulator {name}", chimera_cmd("emulate", "--profile", prof, "--served-model-name", name,
                                                "--port", str(port), "--time-scale", f"{time_scale:g}",
                                                "--workload", str(workload_file), "--seed", str(seed)),
                port, "/health", workdir / f"emulator-{name}.log", wait=False))
        for e in emus.values():
            wait_ready(e)
        yield emus


@contextlib.contextmanager
def chimera_gateway(c: Contender, emus: dict[str, Spawned], workdir: Path):
    """`chimera serve` in front of the emulators (admission per backend = the engine's batch slots)."""
    from chimera.engine.profiles import profile

    port = free_port()
    pol: dict[str, Any] = {"name": c.strategy}
    if c.lam is not None:
        pol["lam"] = c.lam
    trace = workdir / "traces.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(trace) + suffix).unlink(missing_ok=True)
    cfg = {
        "listen": {"host": "127.0.0.1", "port": port},
        "policy": pol,
        "trace_store": str(trace),
        "backends": [{"name": f"{m}-0", "model": m, "base_url": e.url + "/v1", "profile": MODELS[m],
                      "max_inflight": profile(MODELS[m]).max_num_seqs} for m, e in emus.items()],
        "limits": {"request_timeout_s": 600, "max_queue": 100000},
    }
    path = workdir / "gateway.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    with spawned("chimera gateway", chimera_cmd("serve", "--config", str(path)), port, "/health",
                 workdir / "gateway.log") as sp:
        yield sp


@dataclass
class ContenderRun:
    contender: Contender
    summary: dict[str, Any]
    sim: dict[str, Any] | None = None  # the simulator's prediction of the same run
    fidelity: dict[str, float] = field(default_factory=dict)


def run_contender(c: Contender, tasks: Sequence[Task], workload_file: Path, cfg: LiveBenchConfig, rate: float,
                  workdir: Path, on_record: Callable | None = None) -> ContenderRun:
    """Fresh emulators and gateway for `c`, then the agents; returns the live summary."""
    from chimera.agents.driver import AgentConfig, run_agents

    workdir.mkdir(parents=True, exist_ok=True)
    with emulated_cluster(workload_file, cfg.time_scale, cfg.seed, workdir) as emus:
        if c.gateway == "litellm":
            gw_cm = litellm_proxy(litellm_config({m: e.url + "/v1" for m, e in emus.items()}, c.strategy),
                                  workdir, binary=cfg.litellm)
            models: tuple[str, ...] = (GROUP,)
        else:
            gw_cm = chimera_gateway(c, emus, workdir)
            models = ("chimera",)
        with gw_cm as gw:
            acfg = AgentConfig(base_url=gw.url, models=models, rate=rate, time_scale=cfg.time_scale,
                               seed=cfg.seed, timeout_s=600,
                               feedback=c.gateway == "chimera")  # LiteLLM has no feedback endpoint: no 404 load
            run = asyncio.run(run_agents(tasks, acfg, cfg.tasks, on_record))
    s = dict(run.summary)
    s.update(policy=c.label, contender=c.label, live=True, label=LABEL)
    return ContenderRun(c, s)


# ---- the simulator's prediction of the same run -------------------------------------------------------------------
def simulate_same_run(c: Contender, tasks: Sequence[Task], cfg: LiveBenchConfig, rate: float) -> dict[str, Any] | None:
    """The simulator on the driver's workflows and arrival times (× time scale), under the contender's policy with
    the gateway's untrained priors (size-ranked confidence; per-stage mean lengths, which the gateway's running
    means converge to). Latencies and throughput are returned in live (time-scaled) units."""
    from chimera.agents.driver import make_workflows
    from chimera.engine.profiles import default_cluster
    from chimera.predict.priors import StageMeanLength
    from chimera.sched.registry import make_policy
    from chimera.serve.priors import SizePriorConfidence
    from chimera.sim.cluster import build_runtimes
    from chimera.sim.simulator import Simulator

    pol_name = c.sim_policy
    if pol_name is None:
        return None
    wfs = make_workflows(tasks, cfg.tasks, cfg.seed)
    runtimes = build_runtimes(default_cluster())
    names = [r.info.name for r in runtimes]
    conf = SizePriorConfidence([r.info for r in runtimes])
    length = StageMeanLength(names).fit([p for _, p, _ in wfs])
    pol = make_policy(pol_name, confidence=conf, length=length, lam=c.lam)
    gaps = np.random.default_rng([cfg.seed, 2]).exponential(1.0 / rate, len(wfs))  # as the agent driver draws them
    arrivals = (np.cumsum(gaps) - gaps[0]) * cfg.time_scale
    sim = Simulator(runtimes, pol, [(w, p, t.prompt) for w, p, t in wfs], arrivals=list(arrivals), seed=cfg.seed)
    if hasattr(pol, "prepare"):
        pol.prepare([])
    s = sim.run()
    ts = cfg.time_scale
    s["latency_s"] = {k: v / ts for k, v in s["latency_s"].items()}
    s["throughput_tasks_per_s"] = s["throughput_tasks_per_s"] * ts
    s["sim_policy"] = pol_name
    return s


def _metrics(s: dict[str, Any]) -> dict[str, float]:
    lat = s["latency_s"]
    return {"latency_mean": lat["mean"], "latency_p50": lat["p50"], "latency_p99": lat["p99"],
            "throughput": s["throughput_tasks_per_s"], "accuracy": s["accuracy"]}


def fidelity(sim: dict[str, Any], live: dict[str, Any]) -> dict[str, float]:
    """Per metric 100·(1 − |sim − live| / live), floored at 0: 100% means the simulator predicted the live value."""
    a, b = _metrics(sim), _metrics(live)
    out = {}
    for k in FIDELITY_METRICS:
        lv, sv = b[k], a[k]
        out[k] = max(0.0, 100.0 * (1.0 - abs(sv - lv) / abs(lv))) if lv else (100.0 if sv == lv else 0.0)
    return out


# ---- the whole benchmark ------------------------------------------------------------------------------------------
@dataclass
class LiveBench:
    config: LiveBenchConfig
    rate: float
    mapping: dict[str, str]
    runs: list[ContenderRun]
    overhead: dict[str, Any] | None = None


def run_live_bench(cfg: LiveBenchConfig, out: Path, on_record: Callable | None = None,
                   on_stage: Callable[[str], None] | None = None) -> LiveBench:
    """Every contender on the same tasks and arrivals, then the gateways' added latency, then the fidelity."""
    from chimera.workload.schema import write_tasks
    from chimera.workload.source import load_workload

    contenders = [parse_contender(s) for s in cfg.contenders]
    uses_litellm = any(c.gateway == "litellm" for c in contenders)
    if uses_litellm:  # fail before anything starts
        from chimera.bench.litellm_proxy import find_litellm

        cfg = cfg.model_copy(update={"litellm": str(find_litellm(cfg.litellm))})
    out.mkdir(parents=True, exist_ok=True)
    tasks, _ = load_workload(cfg.workload, seed=cfg.seed)
    tasks, mapping = to_emulated_models(tasks)
    workload_file = out / "workload.jsonl"
    write_tasks(tasks, workload_file)
    rate = cfg.rate if cfg.rate is not None else arrival_rate(tasks, cfg.load, cfg.time_scale)
    runs = []
    for c in contenders:
        if on_stage is not None:
            on_stage(c.label)
        run = run_contender(c, tasks, workload_file, cfg, rate, out / c.label.replace(" ", "-"), on_record)
        run.sim = simulate_same_run(c, tasks, cfg, rate)
        if run.sim is not None:
            run.fidelity = fidelity(run.sim, run.summary)
        runs.append(run)
    bench = LiveBench(cfg, rate, mapping, runs)
    if cfg.overhead_rates:
        from chimera.bench.gateway_overhead import run_benchmark

        if on_stage is not None:
            on_stage("gateway added latency")
        bench.overhead = run_benchmark(cfg.overhead_rates, duration=cfg.overhead_duration_s, out=out / "overhead",
                                       policy="chimera",
                                       litellm=cfg.litellm if uses_litellm else None)
    (out / "results.json").write_text(json.dumps(to_json(bench), indent=1))
    (out / "results.md").write_text(markdown(bench))
    plot_frontier(bench, out / "frontier.png")
    return bench


def to_json(b: LiveBench) -> dict[str, Any]:
    return {"config": b.config.model_dump(), "rate": b.rate, "label": LABEL, "model_mapping": b.mapping,
            "runs": [{"contender": r.contender.label, "live": r.summary, "sim": r.sim, "fidelity_pct": r.fidelity}
                     for r in b.runs],
            "overhead": b.overhead}


def _fmt_models(s: dict[str, Any]) -> str:
    return ", ".join(f"{m}:{v['calls']}" for m, v in s["per_model"].items() if v.get("calls"))


def markdown(b: LiveBench) -> str:
    c = b.config
    lines = [f"Workload `{c.workload}`, {c.tasks} workflows, open-loop Poisson at {b.rate:.2f} workflows/s (live), "
             f"time scale {c.time_scale:g} (1 s here ≈ {c.time_scale:g} s on the emulated A6000s), seed {c.seed}. "
             f"{LABEL}.", "",
             "| contender | accuracy | mean lat (s) | p50 | p99 | tasks/s | failed | calls per model |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in b.runs:
        s = r.summary
        lat = s["latency_s"]
        lines.append(f"| {r.contender.label} | {100 * s['accuracy']:.1f}% | {lat['mean']:.2f} | {lat['p50']:.2f} | "
                     f"{lat['p99']:.2f} | {s['throughput_tasks_per_s']:.2f} | {s['failed']} | {_fmt_models(s)} |")
    lit = [r for r in b.runs if r.contender.gateway == "litellm"]
    chi = [r for r in b.runs if r.contender.gateway == "chimera"]
    if lit and chi:
        lines += ["", "Chimera against each LiteLLM strategy (mean latency ratio > 1: Chimera faster):", "",
                  "| Chimera | vs LiteLLM | mean latency ratio | p99 ratio | accuracy (points) |",
                  "|---|---|---:|---:|---:|"]
        for x in chi:
            for y in lit:
                xs, ys = x.summary, y.summary
                lines.append(f"| {x.contender.label} | {y.contender.label} | "
                             f"{ys['latency_s']['mean'] / xs['latency_s']['mean']:.2f}× | "
                             f"{ys['latency_s']['p99'] / xs['latency_s']['p99']:.2f}× | "
                             f"{100 * (xs['accuracy'] - ys['accuracy']):+.1f} |")
    fid = [r for r in b.runs if r.sim is not None]
    if fid:
        lines += ["", "Simulator vs live, same workflows and arrival times (fidelity = 100·(1 − |sim − live| / live)):",
                  "", "| contender | simulated as | mean lat sim / live (s) | p50 sim / live | p99 sim / live | "
                  "tasks/s sim / live | accuracy sim / live | fidelity mean / p50 / p99 / tasks/s / accuracy |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in fid:
            a, l, f = _metrics(r.sim), _metrics(r.summary), r.fidelity
            lines.append(
                f"| {r.contender.label} | {r.sim['sim_policy']} | {a['latency_mean']:.2f} / {l['latency_mean']:.2f} | "
                f"{a['latency_p50']:.2f} / {l['latency_p50']:.2f} | {a['latency_p99']:.2f} / {l['latency_p99']:.2f} | "
                f"{a['throughput']:.2f} / {l['throughput']:.2f} | {100 * a['accuracy']:.1f}% / "
                f"{100 * l['accuracy']:.1f}% | " + " / ".join(f"{f[k]:.0f}%" for k in FIDELITY_METRICS) + " |")
    if b.overhead is not None:
        from chimera.bench.gateway_overhead import markdown_table

        lines += ["", "Gateway added latency (instant fake backend, real loopback measurements):", "",
                  markdown_table(b.overhead)]
    if any(m != e for e, m in b.mapping.items()):
        lines += ["", "Workload models on the emulated cluster: "
                  + ", ".join(f"{m} → {e}" for e, m in b.mapping.items()) + "."]
    return "\n".join(lines) + "\n"


def plot_frontier(b: LiveBench, path: Path) -> Path:
    """Mean workflow latency against accuracy, one point per contender (live), hollow markers for the simulator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in b.runs:
        col = "tab:blue" if r.contender.gateway == "chimera" else "tab:orange"
        mk = "o" if r.contender.gateway == "chimera" else "s"
        s = r.summary
        ax.scatter(s["latency_s"]["mean"], 100 * s["accuracy"], color=col, marker=mk, s=60)
        ax.annotate(r.contender.label, (s["latency_s"]["mean"], 100 * s["accuracy"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
        if r.sim is not None:
            ax.scatter(r.sim["latency_s"]["mean"], 100 * r.sim["accuracy"], facecolors="none", edgecolors=col,
                       marker=mk, s=60)
    ax.set_xlabel("mean workflow latency (s, live, time-scaled)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"LiteLLM vs Chimera — {LABEL}\n(hollow: the simulator's prediction of the same run)", fontsize=9)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
