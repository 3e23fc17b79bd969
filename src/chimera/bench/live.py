"""`chimera bench live`: the same agents and workload through LiteLLM's proxy and through Chimera, live.

Every contender gets a fresh emulated cluster (three `chimera emulate` processes: Qwen2.5 1.5B / 7B / 14B on A6000,
time-scaled) and its own gateway process (`litellm --config` or `chimera serve`); this process runs the agent driver
with the same tasks and the same Poisson arrival times. All servers are subprocesses, so no contender shares the
driver's interpreter. Live run against emulated backends (engine model), not real GPUs.

Fidelity: the simulator replays the same workflows at the same arrival times (scaled back by the time scale) under
the policy the gateway ran, and its latencies, throughput and accuracy are set beside the live ones.

`engine="vllm"` (`--engine vllm`): the backends are real vLLM CPU servers instead (chimera.backends.vllm_cpu: `tiny` and
`wide`, random-weight models, one core each), fresh per contender, in real time (time scale 1). Both servers are
profiled once at the start (`chimera profile`, or PROFILE.yaml files given with `profiles`), and the simulator's
prediction of each run uses the cluster built from those profiles. Lengths are model-independent (the client sets
`max_tokens` before the gateway picks a model; `ignore_eos` makes it exact) and can be scaled to fit the CPU's speed.
The CPU time of every process (servers, gateway, driver) is recorded over each run. See docs/live.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chimera.bench.litellm_proxy import GROUP, STRATEGIES, litellm_config, litellm_proxy
from chimera.util.procs import Spawned, chimera_cmd, spawned, wait_ready
from chimera.util.threaded import free_port
from chimera.workload.arrivals import LIVE_STREAM, poisson_arrivals
from chimera.workload.schema import Task

LABELS = {
    "emulate": "live run against emulated backends (engine model), not real GPUs",
    "vllm": "live, real vLLM (CPU build), random-weight models; task scores from the workload's outcome table",
}
LABEL = LABELS["emulate"]  # the default engine's; LiveBenchConfig.label is the configured engine's
ENGINES = tuple(LABELS)
REAL_MODELS = ("tiny", "wide")  # real vLLM servers, weakest-mapped first: tiny <- weakest, wide <- strongest
REAL_MAX_MODEL_LEN = 2048  # the servers' --max-model-len (../shared/real-engines/README.md)
REAL_MAX_NUM_BATCHED_TOKENS = 2048  # set explicitly on the servers and in their profiles
REAL_KV_BLOCK_TOKENS = 128  # the CPU build's KV block (its prefix cache reuses whole blocks; docs/perfmodel.md)
CONTEXT_MARGIN = 16  # tokens of max_model_len kept free beside each planned call
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
    from chimera.sched.registry import POLICIES, live_refusal, takes_param

    gw, _, rest = spec.strip().partition(":")
    if gw == "litellm":
        if rest not in STRATEGIES:
            raise ValueError(f"contender {spec!r}: LiteLLM strategy must be one of {', '.join(STRATEGIES)}")
        return Contender("litellm", rest)
    if gw == "chimera":
        pol, _, lam = rest.partition("@")
        if pol not in POLICIES:
            raise ValueError(f"contender {spec!r}: unknown policy {pol!r}; choose one of {', '.join(POLICIES)}")
        if lam and not takes_param(pol, "lam"):
            raise ValueError(f"contender {spec!r}: policy {pol!r} takes no λ")
        if live_refusal(pol):
            raise ValueError(f"contender {spec!r}: {live_refusal(pol)}")
        try:
            return Contender("chimera", pol, float(lam) if lam else None)
        except ValueError:
            raise ValueError(f"contender {spec!r}: λ must be a number, got {lam!r}") from None
    raise ValueError(f"contender {spec!r}: expected litellm:STRATEGY or chimera:POLICY[@LAMBDA]")


CONTENTION_FILE = "contention.json"  # beside the profiles: each server's slowdown while the others are busy


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
    # ---- engine "vllm" only (real vLLM CPU servers); see docs/live.md
    engine: Literal["emulate", "vllm"] = "emulate"
    real_models: list[str] = Field(default_factory=lambda: list(REAL_MODELS), min_length=1)  # weakest-mapped first
    length_scale: float = Field(default=1.0, gt=0)  # × the plan's output tokens
    prompt_scale: float | None = Field(default=None, gt=0)  # × the plan's prompt tokens (default: length_scale)
    tool_scale: float = Field(default=1.0, ge=0)  # × the plan's tool sleeps
    max_inflight: int = Field(default=32, ge=1)  # per backend: gateway admission = the server's --max-num-seqs
    kv_cache_gib: int = Field(default=2, ge=1)  # VLLM_CPU_KVCACHE_SPACE per server
    priority: bool = True  # servers run --scheduling-policy priority (every contender: the same servers)
    profiles: str | None = None  # a folder with NAME.yaml from `chimera profile`: skip profiling, use these
    # together: both measured at once; loaded: together, and a server whose profile is done keeps getting the run's
    # kind of calls (background_rps, open loop) until the others' are done; alone: one by one on a quiet machine
    profile_mode: Literal["together", "loaded", "alone"] = "alone"
    background_rps: float = Field(default=1.0, gt=0)  # profile_mode "loaded": calls/s to each finished server
    sim_online_lengths: bool = True  # engine vllm: the simulated gateway learns lengths online from a cold start
    # measure how much each server slows while the others are busy (profiles/contention.json) and simulate it
    contention: bool = True
    contention_batch: int = Field(default=4, ge=1)
    # the simulated servers cache prompt prefixes in blocks of REAL_KV_BLOCK_TOKENS, as the real ones do (vLLM V1's
    # default); False: every prefill is charged whole (the simulator before prefix caching)
    prefix_caching: bool = True
    profile_rounds: int = Field(default=2, ge=1)
    profile_concurrency: str = "1,2,4,8,16,32"
    models_dir: str | None = None  # default: chimera.backends.vllm_cpu.DEFAULT_MODELS (out/models)
    venv: str | None = None  # default: .venv-vllm

    @model_validator(mode="before")
    @classmethod
    def _real_time(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("time_scale") is None:  # not given: 5 emulated, 1 (real time) for vLLM
            v = {k: x for k, x in v.items() if k != "time_scale"}
            if v.get("engine") == "vllm":
                v["time_scale"] = 1.0
        return v

    @model_validator(mode="after")
    def _engine_options(self) -> "LiveBenchConfig":
        if self.engine == "vllm":
            if self.time_scale != 1.0:
                raise ValueError(f"time_scale: real vLLM servers run in real time (1), got {self.time_scale:g}; "
                                 "scale the work with length_scale / tool_scale instead")
            if len(set(self.real_models)) != len(self.real_models):
                raise ValueError(f"real_models must be distinct, got {self.real_models}")
        else:
            given = {k: getattr(self, k) for k in ("length_scale", "tool_scale") if getattr(self, k) != 1.0}
            if self.prompt_scale is not None:
                given["prompt_scale"] = self.prompt_scale
            if self.profiles is not None:
                given["profiles"] = self.profiles
            if given:
                raise ValueError(f"{', '.join(given)}: only with engine 'vllm' (the emulated cluster replays the "
                                 "workload's lengths)")
        return self

    @property
    def label(self) -> str:
        return LABELS[self.engine]

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
def to_served_models(tasks: Sequence[Task], names: Sequence[str], what: str = "emulated"
                     ) -> tuple[list[Task], dict[str, str]]:
    """Tasks whose outcomes name the cluster's models `names` (ordered for the weakest workload model first). A
    workload that already names them is kept; otherwise its max(N, 3) most-covered models are ranked by mean score
    and N of them, evenly spread over that ranking (weakest -> names[0], strongest -> names[-1]), are renamed;
    tasks lacking any of them are dropped. Returns (tasks, {served name: workload model})."""
    names = list(names)
    if all(all(m in t.outcomes for m in names) for t in tasks):
        return list(tasks), {m: m for m in names}
    cover: dict[str, list[float]] = {}
    for t in tasks:
        for m, o in t.outcomes.items():
            cover.setdefault(m, []).append(o.score)
    if len(cover) < len(names):
        raise ValueError(f"the workload names {len(cover)} model(s); the {what} cluster needs {len(names)}")
    top = sorted(cover, key=lambda m: (-len(cover[m]), m))[: max(len(names), 3)]
    ranked = sorted(top, key=lambda m: float(np.mean(cover[m])))
    k, n = len(names), len(ranked)
    picked = [ranked[round(i * (n - 1) / (k - 1))] for i in range(k)] if k > 1 else [ranked[-1]]
    mapping = dict(zip(names, picked))
    out = []
    for t in tasks:
        if all(w in t.outcomes for w in picked):
            stages = {e: t.stages[w] for e, w in mapping.items() if t.stages and w in t.stages} or None
            out.append(t.model_copy(update={"outcomes": {e: t.outcomes[w] for e, w in mapping.items()},
                                            "stages": stages}))
    if not out:
        raise ValueError(f"no task of the workload has outcomes for all of {', '.join(picked)}")
    return out, mapping


def to_emulated_models(tasks: Sequence[Task]) -> tuple[list[Task], dict[str, str]]:
    """Tasks whose outcomes name the three emulated models (weakest -> 1.5B, strongest -> 14B); see
    `to_served_models`."""
    return to_served_models(tasks, list(MODELS), "emulated")


def arrival_rate(tasks: Sequence[Task], load: float, time_scale: float) -> float:
    """Live workflows/s: `load` × the simulated saturated throughput of round-robin on the same cluster, sped up by
    the time scale (emulators and tool sleeps both run `time_scale`× faster than real time)."""
    from chimera.bench.sweep import capacity_workflows_per_s
    from chimera.perfmodel.profiles import default_cluster
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
    from chimera.perfmodel.profiles import profile

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
    cpu: dict[str, Any] | None = None  # real engine: CPU seconds per process over the run (bench.proc_cpu)
    server_metrics: dict[str, Any] | None = None  # real engine: vLLM counters over the run, per server
    servers: list[dict[str, Any]] | None = None  # real engine: the servers (pid, core, start-up time, log)


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
    from chimera.perfmodel.profiles import default_cluster
    from chimera.predict.priors import RunningLength, SizePriorConfidence, StageMeanLength
    from chimera.sched.registry import make_policy
    from chimera.sim.cluster import build_runtimes
    from chimera.sim.simulator import Simulator

    pol_name = c.sim_policy
    if pol_name is None:
        return None
    wfs = list(workflows) if workflows is not None else make_workflows(tasks, cfg.tasks, cfg.seed)
    runtimes = build_runtimes(cluster if cluster is not None else default_cluster())
    names = [r.info.name for r in runtimes]
    conf = SizePriorConfidence([r.info for r in runtimes])
    online = (cfg.engine == "vllm" and cfg.sim_online_lengths) if online_lengths is None else online_lengths
    if online:  # as the live gateway: running means per (kind, stage, model), from a cold start (256 tokens)
        length: Any = RunningLength(names)
    else:
        length = StageMeanLength(names).fit([p for _, p, _ in wfs])
    pol = make_policy(pol_name, confidence=conf, length=length, lam=c.lam)  # the core feeds RunningLength.learn
    arrivals = poisson_arrivals(rate, len(wfs), cfg.seed, LIVE_STREAM, start_at_zero=True) * cfg.time_scale
    sim = Simulator(runtimes, pol, [(w, p, t.prompt) for w, p, t in wfs], arrivals=list(arrivals), seed=cfg.seed)
    s = sim.run()
    ts = cfg.time_scale
    s["latency_s"] = {k: v / ts for k, v in s["latency_s"].items()}
    s["throughput_tasks_per_s"] = s["throughput_tasks_per_s"] * ts
    s["sim_policy"] = pol_name
    s["sim_lengths"] = "online running means (cold start), as the gateway" if online else "per-stage means of the plans"
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


# ---- the workload on real vLLM CPU servers ------------------------------------------------------------------------
@dataclass
class ScaleReport:
    """What scaling the plans for the real engine did (reported in results.json `engine.workload`)."""

    length_scale: float
    prompt_scale: float
    tool_scale: float
    max_model_len: int
    calls: int = 0
    capped_calls: int = 0  # output (or, rarely, the prompt) cut so that prompt + output + margin fit max_model_len
    output_tokens: int = 0
    prompt_tokens: int = 0


def scale_plan(plan, models: Sequence[str], length_scale: float, prompt_scale: float, tool_scale: float,
               max_model_len: int, report: ScaleReport | None = None, margin: int = CONTEXT_MARGIN):
    """The plan as the real engine runs it: per-stage output tokens the same for every model (the client sets
    `max_tokens` before the gateway picks the model; `ignore_eos` makes it exact): the mean over `models` of the
    plan's outputs × `length_scale`; fixed prompt parts × `prompt_scale`; tool sleeps × `tool_scale`; each call's
    prompt + output within `max_model_len` − `margin` (the output is cut, then the prompt). Scores are the plan's."""
    from chimera.workload.plan import WorkflowPlan

    n = plan.n_stages
    common = [max(1, round(length_scale * float(np.mean([plan.output_tokens(i, m) for m in models]))))
              for i in range(n)]
    fixed = [max(1, round(prompt_scale * f)) for f in plan._pfixed]
    lo = plan._plo
    for i in range(n):
        prompt = fixed[i] + (sum(common[lo[i]:i]) if lo[i] != i else 0)
        room = max_model_len - margin - prompt
        if room < common[i]:
            if room >= 1:
                common[i] = room
            else:
                fixed[i] = max(1, fixed[i] - (1 - room))
                common[i] = 1
            if report is not None:
                report.capped_calls += 1
        if report is not None:
            report.calls += 1
            report.output_tokens += common[i]
            report.prompt_tokens += fixed[i] + (sum(common[lo[i]:i]) if lo[i] != i else 0)
    outs = tuple(common)
    return WorkflowPlan(
        task_id=plan.task_id, kind=plan.kind, tool_s=tuple(t * tool_scale for t in plan.tool_s),
        stage_shares=plan.stage_shares, cum_shares=plan._cum, stage_roles=plan.stage_roles,
        observation_tokens=tuple(round(o * prompt_scale) for o in plan.observation_tokens),
        prompt_fixed=tuple(fixed), prompt_lo=lo, scores={m: plan._scores[m] for m in models},
        totals={m: sum(outs) for m in models}, real={m: outs for m in models}, rule=plan.rule,
        prompt_base=tuple(round(prompt_scale * b) for b in plan._pbase), prompt_full=plan._pfull)


def real_workflows(tasks: Sequence[Task], cfg: LiveBenchConfig) -> tuple[list[tuple[str, Any, Task]], ScaleReport]:
    """The driver's workflows (`make_workflows`: same ids, plans and order) with plans scaled for the real engine."""
    from chimera.agents.driver import make_workflows

    ps = cfg.prompt_scale if cfg.prompt_scale is not None else cfg.length_scale
    rep = ScaleReport(cfg.length_scale, ps, cfg.tool_scale, REAL_MAX_MODEL_LEN)
    cache: dict[int, Any] = {}
    out = []
    for wid, plan, task in make_workflows(tasks, cfg.tasks, cfg.seed):
        if id(plan) not in cache:
            cache[id(plan)] = scale_plan(plan, cfg.real_models, cfg.length_scale, ps, cfg.tool_scale,
                                         REAL_MAX_MODEL_LEN, rep)
        out.append((wid, cache[id(plan)], task))
    return out, rep


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


def real_server_specs(cfg: LiveBenchConfig) -> list:
    """The servers every contender (and the profiling) gets: one model and one core each."""
    from chimera.backends.vllm_cpu import ServerSpec

    return [ServerSpec(m, priority=cfg.priority, max_num_seqs=cfg.max_inflight, kv_cache_gib=cfg.kv_cache_gib,
                       max_model_len=REAL_MAX_MODEL_LEN,
                       extra_args=["--max-num-batched-tokens", str(REAL_MAX_NUM_BATCHED_TOKENS)])
            for m in cfg.real_models]


IPC_PATH_MAX = 107  # bytes of a unix socket path (sockaddr_un.sun_path): vLLM's ZMQ sockets live in the state dir


def server_workdir(workdir: Path, names: Sequence[str]) -> Path:
    """Where the servers keep their state (temp dirs, ZMQ sockets, caches, logs): `workdir/srv`, unless a socket
    path there would pass the unix limit (deep or non-ASCII folders, e.g. pytest's): then a short folder under
    chimera.backends.vllm_cpu.DEFAULT_WORKDIR (out/engines/live-HASH), never /tmp."""
    import hashlib

    from chimera.backends.vllm_cpu import DEFAULT_WORKDIR

    wd = (Path(workdir) / "srv").resolve()
    longest = max(len(os.fsencode(f"/servers/{i}-{n}/rpc/")) for i, n in enumerate(names)) + 36  # + a uuid4
    if len(os.fsencode(str(wd))) + longest <= IPC_PATH_MAX:
        return wd
    return Path(DEFAULT_WORKDIR).resolve() / f"live-{hashlib.sha1(os.fsencode(str(wd))).hexdigest()[:10]}"


def _cluster_kwargs(cfg: LiveBenchConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"start_timeout_s": 300.0}
    if cfg.models_dir:
        kw["models_dir"] = Path(cfg.models_dir)
    if cfg.venv:
        kw["venv"] = Path(cfg.venv)
    return kw


def check_real_setup(cfg: LiveBenchConfig) -> dict[str, Path]:
    """Fail before anything starts: the vLLM venv and every model folder exist. Returns {name: model folder}."""
    from chimera.backends.vllm_cpu import DEFAULT_MODELS, DEFAULT_VENV, model_dir, vllm_python

    vllm_python(Path(cfg.venv) if cfg.venv else DEFAULT_VENV)
    return {m: model_dir(m, Path(cfg.models_dir) if cfg.models_dir else DEFAULT_MODELS) for m in cfg.real_models}


def params_b(model_folder: Path) -> float | None:
    """Parameters (billions) of a model built by chimera.backends.random_models (ranks model sizes for the policies)."""
    try:
        return json.loads((model_folder / "chimera-model.json").read_text())["parameters"] / 1e9
    except (OSError, ValueError, KeyError, TypeError):
        return None


EXPORT_TOKENIZER = ("import sys\nfrom transformers import AutoTokenizer\n"
                    "AutoTokenizer.from_pretrained(sys.argv[1]).backend_tokenizer.save(sys.argv[2])\n")


def server_tokenizer(folders: dict[str, Path], out: Path, venv: str | None = None) -> tuple[Path, str]:
    """The tokenizer the servers really use, as a tokenizers JSON the driver pads prompts with: exported by the vLLM
    venv's transformers (which gives a `qwen2` model Qwen2's pre-tokenizer and NFC, not the plain byte-level one
    saved in tokenizer.json: digits and punctuation split differently). Every server must use the same one.
    Falls back to the folder's tokenizer.json (noted) where the export fails. Returns (path, how)."""
    import subprocess

    from chimera.backends.vllm_cpu import DEFAULT_VENV, vllm_python

    py = vllm_python(Path(venv) if venv else DEFAULT_VENV)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out.mkdir(parents=True, exist_ok=True)
    paths, how = [], "exported by the vLLM venv's transformers (what the servers tokenize with)"
    first: Path | None = None

    def same_files(a: Path, b: Path) -> bool:  # the tokenizer files and the model type (it picks the pre-tokenizer)
        def model_type(d: Path) -> Any:
            with contextlib.suppress(OSError, ValueError):
                return json.loads((d / "config.json").read_text()).get("model_type")
            return None

        return model_type(a) == model_type(b) is not None and all(
            (a / f).is_file() and (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes()
            for f in ("tokenizer.json", "tokenizer_config.json"))

    for name, folder in folders.items():
        if first is not None and paths and same_files(first, folder):  # same files: the same export
            paths.append(paths[0])
            continue
        first = first or folder
        dest = out / f"server-tokenizer-{name}.json"
        r = subprocess.run([str(py), "-c", EXPORT_TOKENIZER, str(folder), str(dest)], env=env, capture_output=True,
                           timeout=300)
        if r.returncode != 0 or not dest.is_file():
            dest, how = folder / "tokenizer.json", (f"{folder}/tokenizer.json (export failed: "
                                                    f"{r.stderr.decode(errors='replace').strip()[-200:]})")
            if not dest.is_file():
                raise FileNotFoundError(f"no tokenizer.json in {folder}")
        paths.append(dest)
    for q in paths[1:]:
        if q.read_bytes() != paths[0].read_bytes():
            raise ValueError(f"the servers' tokenizers differ ({paths[0]} vs {q}); prompt padding needs one")
    return paths[0], how


def profile_command(server, out: Path, cfg: LiveBenchConfig, size_b: float | None) -> list[str]:
    """The pluggable profiling step: `chimera profile` against one running server, writing `out` (PROFILE.yaml).

    Replace this (or pass `profiles`) to plug in another way of measuring; what the benchmark needs is a profile
    file per server that a cluster file can load as `profile_file:`."""
    from chimera.util.procs import chimera_cmd

    cmd = chimera_cmd("profile", "--base-url", server.base_url, "--model", server.served_model_name,
                      "--out", str(out), "--json", str(out.with_suffix(".json")),
                      "--max-num-seqs", str(cfg.max_inflight),
                      "--max-num-batched-tokens", str(REAL_MAX_NUM_BATCHED_TOKENS),
                      "--gpu", f"cpu-core-{server.core}-vllm-cpu", "--rounds", str(cfg.profile_rounds),
                      "--concurrency", cfg.profile_concurrency)
    if size_b is not None:
        cmd += ["--params-b", f"{size_b:.6g}"]
    return cmd


def _run_all(cmds: dict[str, list[str]], logs: dict[str, Path], together: bool, timeout_s: float = 900.0,
             on_done: Callable[[str], None] | None = None) -> dict:
    """Run the commands (in parallel if `together`), each in its own process group, logging to its file; every
    one is stopped by its own handle if anything fails; `on_done(name)` as each finishes. Returns {name: s}."""
    import signal
    import subprocess
    import time

    procs: dict[str, subprocess.Popen] = {}
    t0: dict[str, float] = {}
    took: dict[str, float] = {}
    fhs = []

    def start(name: str) -> None:
        fh = open(logs[name], "wb")
        fhs.append(fh)
        t0[name] = time.monotonic()
        procs[name] = subprocess.Popen(cmds[name], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                       stdin=subprocess.DEVNULL)

    def finish(name: str, rc: int) -> None:
        took[name] = time.monotonic() - t0[name]
        if rc != 0:
            tail = "\n".join(logs[name].read_text(errors="replace").splitlines()[-8:])
            raise RuntimeError(f"profiling {name} failed (exit {rc}); see {logs[name]}:\n{tail}")
        if on_done is not None:
            on_done(name)

    def wait(name: str) -> None:
        try:
            rc = procs[name].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmds[name][3:6])}: no result after {timeout_s:.0f} s; see {logs[name]}")
        finish(name, rc)

    try:
        if together:
            for n in cmds:
                start(n)
            left = set(cmds)
            while left:  # in the order they finish (on_done starts background load on a finished server)
                for n in sorted(left):
                    rc = procs[n].poll()
                    if rc is not None:
                        left.discard(n)
                        finish(n, rc)
                    elif time.monotonic() - t0[n] > timeout_s:
                        raise RuntimeError(f"profiling {n}: no result after {timeout_s:.0f} s; see {logs[n]}")
                time.sleep(0.2)
        else:
            for n in cmds:
                start(n)
                wait(n)
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pr.wait(10)
                if pr.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pr.pid, signal.SIGKILL)
                    pr.wait(5)
        for fh in fhs:
            fh.close()
    return took


class BackgroundLoad:
    """Open-loop Poisson calls shaped like the run's (each a stage of the benchmark's workflows: its planned prompt
    of filler, exactly its output with ignore_eos, not streamed), `rps` per server, sent from a thread of this
    process (where the agents run) to every server `add`ed, until `stop`. Profile mode "loaded" uses it so that a
    server is measured while the others are busy, as in a run."""

    def __init__(self, workflows: Sequence[tuple[str, Any, Task]], rps: float, seed: int = 0,
                 in_flight: int | None = None) -> None:
        import threading

        calls = []
        for _, plan, _ in workflows:
            outs = [plan.output_tokens(i, plan.models[0]) for i in range(plan.n_stages)]
            calls += [(plan.prompt_tokens(i, outs), outs[i]) for i in range(plan.n_stages)]
        self.calls = calls or [(256, 32)]
        self.rps, self.seed = rps, seed
        self.in_flight = in_flight  # closed loop: keep this many calls in flight per server (instead of rps)
        self.servers: list = []
        self.sent = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="background-load", daemon=True)
        self._thread.start()

    def add(self, server) -> None:
        self.servers.append(server)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(30)
        return {"sent": self.sent, "errors": self.errors}

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        import httpx

        rng = np.random.default_rng([self.seed, 7])
        pending: set = set()
        nxt: dict[int, float] = {}
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(srv, prompt: int, out: int) -> None:
                body = {"model": srv.served_model_name, "max_tokens": max(1, out), "ignore_eos": True,
                        "messages": [{"role": "user", "content": "the" + " the" * max(0, prompt - 8)}]}
                try:
                    r = await client.post(srv.base_url + "/chat/completions", json=body)
                    self.errors += r.status_code != 200
                except httpx.HTTPError:
                    self.errors += 1

            busy: dict[int, int] = {}

            def done(k: int, t: asyncio.Future) -> None:
                pending.discard(t)
                busy[k] -= 1

            while not self._stop.is_set():
                now = loop.time()
                for k, srv in enumerate(list(self.servers)):
                    if self.in_flight is not None:
                        while busy.get(k, 0) < self.in_flight:
                            prompt, out = self.calls[int(rng.integers(len(self.calls)))]
                            t = asyncio.ensure_future(one(srv, min(prompt, REAL_MAX_MODEL_LEN - out - 64), out))
                            busy[k] = busy.get(k, 0) + 1
                            pending.add(t)
                            t.add_done_callback(lambda t, k=k: done(k, t))
                            self.sent += 1
                        continue
                    if nxt.setdefault(k, now) <= now:
                        prompt, out = self.calls[int(rng.integers(len(self.calls)))]
                        t = asyncio.ensure_future(one(srv, min(prompt, REAL_MAX_MODEL_LEN - out - 64), out))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                        self.sent += 1
                        nxt[k] = now + float(rng.exponential(1.0 / self.rps))
                await asyncio.sleep(0.02)
            for t in list(pending):
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def profile_real_servers(cfg: LiveBenchConfig, folders: dict[str, Path], out: Path,
                         on_stage: Callable[[str], None] | None = None,
                         workflows: Sequence[tuple[str, Any, Task]] | None = None) -> dict[str, Any]:
    """Fresh servers (the contenders' settings), each measured by `chimera profile` — both at once with
    profile_mode "together" (both busy, the clients on the same cores); "loaded": also, a server whose profile is
    done gets the run's kind of calls (`BackgroundLoad`, `background_rps`) until every profile is done, so the
    slow server is not measured beside an idle one; "alone": one by one — then stopped.
    Returns {"paths": {name: PROFILE.yaml}, "seconds": {...}, "startup_s": {...}, "mode": ...}."""
    from chimera.backends.vllm_cpu import vllm_cluster

    out.mkdir(parents=True, exist_ok=True)
    if on_stage is not None:
        on_stage(f"profiling {', '.join(cfg.real_models)} ({cfg.profile_mode})")
    background: dict[str, int] | None = None
    with vllm_cluster(real_server_specs(cfg), workdir=server_workdir(out, cfg.real_models),
                      **_cluster_kwargs(cfg)) as cl:
        paths = {s.served_model_name: out / f"{s.served_model_name}.yaml" for s in cl}
        cmds = {s.served_model_name: profile_command(s, paths[s.served_model_name], cfg,
                                                     params_b(folders[s.served_model_name])) for s in cl}
        bg = BackgroundLoad(workflows or [], cfg.background_rps, cfg.seed) if cfg.profile_mode == "loaded" else None
        try:
            took = _run_all(cmds, {n: out / f"{n}.log" for n in cmds}, cfg.profile_mode != "alone",
                            on_done=(lambda n: bg.add(cl.by_name(n))) if bg is not None else None)
        finally:
            if bg is not None:
                background = bg.stop()
        if cfg.contention and len(cl) > 1:
            if on_stage is not None:
                on_stage("measuring how much each server slows while the others are busy")
            contention = measure_peer_slowdown(list(cl), cfg, workflows or [])
            (out / CONTENTION_FILE).write_text(json.dumps(contention, indent=1))
        startup = {s.served_model_name: s.startup_s for s in cl}
    res = {"paths": {n: str(p) for n, p in paths.items()}, "seconds": took, "startup_s": startup,
           "mode": cfg.profile_mode, "measured": True}
    if background is not None:
        res["background_load"] = {**background, "rps_per_server": cfg.background_rps}
    (out / "profiling.json").write_text(json.dumps(res, indent=1))
    return res


def measure_peer_slowdown(cl, cfg: LiveBenchConfig, workflows: Sequence[tuple[str, Any, Task]]
                          ) -> dict[str, dict[str, Any]]:
    """How much each server slows while the others are busy (they share the machine's cores; docs/perfmodel.md):
    its TPOT at batch `contention_batch` with the others idle, then with the others kept busy by the run's kind of
    calls (closed loop, `contention_batch` in flight each), as the engine itself measures it (vLLM's inter-token
    latency). The ratio is the simulator's `peer_busy_slowdown` for that server."""
    from chimera.profiling.client import ProfileConfig, measure_decode_tpots

    out: dict[str, dict[str, Any]] = {}
    k, waves = cfg.contention_batch, 3
    for srv in cl:
        pcfg = ProfileConfig(base_url=srv.base_url, model=srv.served_model_name, decode_tokens=64, seed=cfg.seed)
        alone = statistics.median(measure_decode_tpots(pcfg, k, waves))
        bg = BackgroundLoad(workflows, cfg.background_rps, cfg.seed, in_flight=k)
        for other in cl:
            if other is not srv:
                bg.add(other)
        try:
            time.sleep(2.0)  # let the peers fill up
            busy = statistics.median(measure_decode_tpots(pcfg, k, waves))
        finally:
            sent = bg.stop()
        out[srv.served_model_name] = {"tpot_alone_ms": 1e3 * alone, "tpot_peers_busy_ms": 1e3 * busy,
                                      "slowdown": min(10.0, max(1.0, busy / alone)), "batch": k, "waves": waves,
                                      "peer_calls": sent}
    return out


def given_profiles(cfg: LiveBenchConfig) -> dict[str, Any]:
    """Profiles from `cfg.profiles` (NAME.yaml per real model), instead of measuring."""
    d = Path(cfg.profiles or "")
    paths = {m: d / f"{m}.yaml" for m in cfg.real_models}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"profiles: no {', '.join(missing)} (write them with `chimera profile --out`, or "
                                "leave --profiles out to measure the servers first)")
    res: dict[str, Any] = {"paths": {n: str(p) for n, p in paths.items()}, "mode": "given", "measured": False}
    with contextlib.suppress(OSError, ValueError):  # how they were measured, when they came from this benchmark
        res["measured_as"] = json.loads((d / "profiling.json").read_text())
    return res


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


def profile_summary(paths: dict[str, str], cfg: LiveBenchConfig) -> dict[str, dict[str, Any]]:
    """Per profile: the fitted coefficients, the fit's RMS error and what the fit predicts at batch 1 and 32."""
    import yaml

    from chimera.perfmodel.perf import StepTimeModel

    cl = profiled_cluster(paths, cfg)
    out = {}
    for spec in cl.models:
        doc = yaml.safe_load(Path(paths[spec.name]).read_text())
        perf = StepTimeModel(spec)
        rep = doc.get("fit_report") or {}
        fitted = {k: v for k, v in doc["fitted"].items() if k != "source"}
        out[spec.name] = {
            "file": paths[spec.name], "fitted": fitted, "rms_relative_error": rep.get("rms_relative_error"),
            "notes": rep.get("notes", []), "source": doc["fitted"].get("source"),
            "tpot_ms_c1": 1e3 * perf.step_time(1, 300, 0), "tok_s_c32": 32 / perf.step_time(32, 32 * 300, 0),
            "prefill_tok_s_1024": 1024 / perf.prefill_time(1024),
        }
    return out


def _scrape_servers(servers) -> dict[str, dict[str, float]]:
    """A few vLLM counters per server (prompt/generation tokens, preemptions, prefix-cache queries and hits)."""
    import httpx

    from chimera.profiling.metrics import parse_prometheus

    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
             "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total",
             # the engine's own times (sum and count of its histograms): how fast it really stepped in the run
             "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count",
             "vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
             "vllm:request_decode_time_seconds_sum", "vllm:e2e_request_latency_seconds_sum",
             "vllm:e2e_request_latency_seconds_count")
    out = {}
    for s in servers:
        vals = {n: 0.0 for n in names}
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(s.url + "/metrics", timeout=10).text
            for n, lab, v in parse_prometheus(text):
                if n in vals and lab.get("model_name") in (None, s.served_model_name):
                    vals[n] += v
        out[s.served_model_name] = vals
    return out


def _metrics_delta(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for m, vals in b.items():
        d = {k.removeprefix("vllm:").removesuffix("_total"): v - a.get(m, {}).get(k, 0.0) for k, v in vals.items()}
        q = d.get("prefix_cache_queries", 0.0)
        d["prefix_cache_hit_pct"] = 100.0 * d.get("prefix_cache_hits", 0.0) / q if q else 0.0
        n_itl, n_req = d.get("inter_token_latency_seconds_count", 0.0), d.get("e2e_request_latency_seconds_count", 0.0)
        d["engine_tpot_ms"] = 1e3 * d.get("inter_token_latency_seconds_sum", 0.0) / n_itl if n_itl else 0.0
        for k in ("queue", "prefill", "decode"):
            d[f"engine_{k}_ms_per_call"] = 1e3 * d.get(f"request_{k}_time_seconds_sum", 0.0) / n_req if n_req else 0.0
        d["engine_e2e_ms_per_call"] = 1e3 * d.get("e2e_request_latency_seconds_sum", 0.0) / n_req if n_req else 0.0
        out[m] = d
    return out


@contextlib.contextmanager
def real_chimera_gateway(c: Contender, servers, profiles: dict[str, str], cfg: LiveBenchConfig, workdir: Path):
    """`chimera serve` in front of real vLLM servers: speeds from their measured profiles, `priority: true` where
    the server runs the priority policy, admission per backend = the server's max_num_seqs."""
    from chimera.util.procs import chimera_cmd, spawned

    port = free_port()
    pol: dict[str, Any] = {"name": c.strategy}
    if c.lam is not None:
        pol["lam"] = c.lam
    trace = workdir / "traces.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(trace) + suffix).unlink(missing_ok=True)
    gw = {
        "listen": {"host": "127.0.0.1", "port": port},
        "policy": pol,
        "trace_store": str(trace),
        "backends": [{"name": f"{s.served_model_name}-0", "model": s.served_model_name, "base_url": s.base_url,
                      "profile": str(Path(profiles[s.served_model_name]).resolve()), "max_inflight": cfg.max_inflight,
                      "priority": bool(s.spec.priority)} for s in servers],
        "limits": {"request_timeout_s": 600, "max_queue": 100000},
    }
    path = workdir / "gateway.yaml"
    path.write_text(json.dumps(gw, indent=1))  # JSON is YAML
    with spawned("chimera gateway", chimera_cmd("serve", "--config", str(path)), port, "/health",
                 workdir / "gateway.log") as sp:
        yield sp


def run_real_contender(c: Contender, tasks: Sequence[Task], workflows: Sequence[tuple[str, Any, Task]],
                       cfg: LiveBenchConfig, rate: float, profiles: dict[str, str], tokenizer: Path, workdir: Path,
                       on_record: Callable | None = None) -> ContenderRun:
    """Fresh vLLM servers and gateway for `c`, then the agents; the live summary plus each process's CPU time and
    the servers' counters over the agents' run."""
    from chimera.agents.driver import AgentConfig, run_agents
    from chimera.bench.proc_cpu import cpu_delta, snapshot
    from chimera.backends.vllm_cpu import vllm_cluster

    workdir.mkdir(parents=True, exist_ok=True)
    with vllm_cluster(real_server_specs(cfg), workdir=server_workdir(workdir, cfg.real_models),
                      **_cluster_kwargs(cfg)) as cl:
        servers = list(cl)
        if c.gateway == "litellm":
            gw_cm = litellm_proxy(litellm_config({s.served_model_name: s.base_url for s in servers}, c.strategy),
                                  workdir, binary=cfg.litellm)
            models: tuple[str, ...] = (GROUP,)
        else:
            gw_cm = real_chimera_gateway(c, servers, profiles, cfg, workdir)
            models = ("chimera",)
        with gw_cm as gw:
            acfg = AgentConfig(base_url=gw.url, models=models, rate=rate, time_scale=1.0, seed=cfg.seed,
                               timeout_s=600, feedback=c.gateway == "chimera", extra_body={"ignore_eos": True},
                               tokenizer=str(tokenizer), max_model_len=REAL_MAX_MODEL_LEN)
            groups = {f"server {s.served_model_name}": s.pgid for s in servers}
            groups["gateway"] = gw.pid
            m0, cpu0 = _scrape_servers(servers), snapshot(groups)
            run = asyncio.run(run_agents(tasks, acfg, cfg.tasks, on_record, workflows=workflows))
            cpu1, m1 = snapshot(groups), _scrape_servers(servers)
        info = {"servers": [s.describe() for s in servers]}
    s = dict(run.summary)
    s.update(policy=c.label, contender=c.label, live=True, label=cfg.label)
    out = ContenderRun(c, s)
    out.cpu = cpu_delta(cpu0, cpu1)
    out.server_metrics = _metrics_delta(m0, m1)
    out.servers = info["servers"]
    return out


def run_real_bench(cfg: LiveBenchConfig, out: Path, on_record: Callable | None = None,
                   on_stage: Callable[[str], None] | None = None) -> "LiveBench":
    """`--engine vllm`: profile the servers (or take the given profiles), build the simulated cluster from them,
    set the rate from its round-robin capacity, then every contender on fresh servers; fidelity against the
    simulator on the profiled cluster."""
    from chimera.workload.source import load_workload

    contenders = [parse_contender(x) for x in cfg.contenders]
    uses_litellm = any(c.gateway == "litellm" for c in contenders)
    if uses_litellm:
        from chimera.bench.litellm_proxy import find_litellm

        cfg = cfg.model_copy(update={"litellm": str(find_litellm(cfg.litellm))})
    folders = check_real_setup(cfg)
    if cfg.profiles is not None:
        given_profiles(cfg)  # fail before anything starts
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_how = server_tokenizer(folders, out, cfg.venv)
    loaded, _ = load_workload(cfg.workload, seed=cfg.seed)
    tasks, mapping = to_served_models(loaded, cfg.real_models, "real")
    workflows, scale = real_workflows(tasks, cfg)
    prof = given_profiles(cfg) if cfg.profiles is not None else profile_real_servers(cfg, folders, out / "profiles",
                                                                                     on_stage, workflows)
    cluster = profiled_cluster(prof["paths"], cfg)
    from chimera.sim.cluster import build_runtimes

    capacity = capacity_of(build_runtimes(cluster), workflows)
    rate = cfg.rate if cfg.rate is not None else cfg.load * capacity
    engine = {"kind": "vllm", "servers": [{"model": sp.model, "priority": sp.priority, "max_num_seqs": sp.max_num_seqs,
                                           "kv_cache_gib": sp.kv_cache_gib, "max_model_len": sp.max_model_len,
                                           "extra_args": sp.extra_args} for sp in real_server_specs(cfg)],
              "profiles": {**prof, "summary": profile_summary(prof["paths"], cfg)},
              "capacity_wps": capacity, "workload": scale.__dict__, "tokenizer": str(tokenizer),
              "tokenizer_source": tokenizer_how}
    (out / "engine.json").write_text(json.dumps(engine, indent=1))
    runs = []
    for c in contenders:
        if on_stage is not None:
            on_stage(c.label)
        run = run_real_contender(c, tasks, workflows, cfg, rate, prof["paths"], tokenizer,
                                 out / c.label.replace(" ", "-"), on_record)
        run.sim = simulate_same_run(c, tasks, cfg, rate, cluster=cluster, workflows=workflows)
        if run.sim is not None:
            run.fidelity = fidelity(run.sim, run.summary)
        runs.append(run)
    bench = LiveBench(cfg, rate, mapping, runs, engine=engine)
    _finish(bench, cfg, out, uses_litellm, on_stage)
    return bench


# ---- the whole benchmark ------------------------------------------------------------------------------------------
@dataclass
class LiveBench:
    config: LiveBenchConfig
    rate: float
    mapping: dict[str, str]
    runs: list[ContenderRun]
    overhead: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None  # real engine: servers, profiles, capacity, workload scaling

    @property
    def label(self) -> str:
        return self.config.label


def run_live_bench(cfg: LiveBenchConfig, out: Path, on_record: Callable | None = None,
                   on_stage: Callable[[str], None] | None = None) -> LiveBench:
    """Every contender on the same tasks and arrivals, then the gateways' added latency, then the fidelity."""
    from chimera.workload.schema import write_tasks
    from chimera.workload.source import load_workload

    if cfg.engine == "vllm":
        return run_real_bench(cfg, out, on_record, on_stage)
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


def resim_markdown(r: dict[str, Any]) -> str:
    lines = [f"Simulator again on the stored live runs: profiles {', '.join(r['profiles'].values())}, lengths "
             f"{r['sim_lengths']}, peer-busy slowdowns "
             f"{', '.join(f'{n} ×{v:.2f}' for n, v in r.get('contention', {}).items()) or 'none'} "
             f"(capacity of that cluster {r['capacity_wps']:.3f} workflows/s).", "",
             "| contender | mean lat sim / live (s) | p50 sim / live | p99 sim / live | tasks/s sim / live | "
             "accuracy sim / live | fidelity mean / p50 / p99 / tasks/s / accuracy |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        if row["sim"] is None:
            continue
        a, b, f = _metrics(row["sim"]), _metrics(row["live"]), row["fidelity_pct"]
        lines.append(f"| {row['contender']} | {a['latency_mean']:.2f} / {b['latency_mean']:.2f} | "
                     f"{a['latency_p50']:.2f} / {b['latency_p50']:.2f} | {a['latency_p99']:.2f} / {b['latency_p99']:.2f} | "
                     f"{a['throughput']:.2f} / {b['throughput']:.2f} | {100 * a['accuracy']:.1f}% / "
                     f"{100 * b['accuracy']:.1f}% | " + " / ".join(f"{f[k]:.0f}%" for k in FIDELITY_METRICS) + " |")
    names = r.get("servers") or []
    if r.get("prefix_caching") and names:
        lines += ["", "Prefix-cache hits, real server (simulated twin), share of prompt tokens:", "",
                  "| contender | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {row['contender']} | " + " | ".join(
            _hits_cell((row.get("server_metrics") or {}).get(n, {}), row["sim"], n) for n in names) + " |"
            for row in r["rows"] if row["sim"] is not None]
    return "\n".join(lines) + "\n"


def live_frontier(b: LiveBench) -> list[dict[str, Any]]:
    """The λ-sweep frontier (bench.frontier) of the live runs: Chimera's contenders as policies, LiteLLM's
    least-busy standing in for least-loaded where Chimera's own least-loaded did not run; empty without `vllm`."""
    from chimera.bench.frontier import LEAST_LOADED, frontier

    rows = []
    for r in b.runs:
        c = r.contender
        policy = c.strategy if c.gateway == "chimera" else f"litellm:{c.strategy}"
        rows.append({"workload": b.config.workload, "load": b.config.load, "policy": policy, "lam": c.lam,
                     "latency_s": r.summary["latency_s"], "accuracy": r.summary["accuracy"]})
    if not any(x["policy"] == LEAST_LOADED for x in rows):
        rows += [{**x, "policy": LEAST_LOADED} for x in rows if x["policy"] == "litellm:least-busy"]
    return frontier(rows)


def to_json(b: LiveBench, front: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """results.json; `front`: the runs' live_frontier when the caller has it already."""
    out = {"config": b.config.model_dump(), "rate": b.rate, "label": b.label, "model_mapping": b.mapping,
           "runs": [{"contender": r.contender.label, "live": r.summary, "sim": r.sim, "fidelity_pct": r.fidelity}
                    for r in b.runs],
           "overhead": b.overhead, "frontier": live_frontier(b) if front is None else front}
    if b.engine is not None:
        out["engine"] = b.engine
        for row, r in zip(out["runs"], b.runs):
            row.update(cpu=r.cpu, server_metrics=r.server_metrics, servers=r.servers)
    return out


def _fmt_models(s: dict[str, Any]) -> str:
    return ", ".join(f"{m}:{v['calls']}" for m, v in s["per_model"].items() if v.get("calls"))


def markdown(b: LiveBench, front: list[dict[str, Any]] | None = None) -> str:
    c = b.config
    if b.engine is not None:
        head = real_header(b)
    else:
        head = (f"Workload `{c.workload}`, {c.tasks} workflows, open-loop Poisson at {b.rate:.2f} workflows/s (live), "
                f"time scale {c.time_scale:g} (1 s here ≈ {c.time_scale:g} s on the emulated A6000s), seed {c.seed}. "
                f"{LABEL}.")
    lines = [head, "",
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
    if front is None:
        front = live_frontier(b)
    if front:
        from chimera.bench.frontier import frontier_markdown

        lines += ["", "Frontier over the live λ values (against the `chimera vllm` run; least-loaded: Chimera's own, "
                  "else LiteLLM's least-busy):", "", frontier_markdown(front).rstrip()]
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
    if b.engine is not None:
        lines += real_tables(b)
    if b.overhead is not None:
        from chimera.bench.gateway_overhead import markdown_table

        lines += ["", "Gateway added latency (instant fake backend, real loopback measurements):", "",
                  markdown_table(b.overhead)]
    if any(m != e for e, m in b.mapping.items()):
        where = "the real vLLM servers" if b.engine is not None else "the emulated cluster"
        lines += ["", f"Workload models on {where}: "
                  + ", ".join(f"{m} → {e}" for e, m in b.mapping.items()) + "."]
    return "\n".join(lines) + "\n"


def real_header(b: LiveBench) -> str:
    c, e = b.config, b.engine or {}
    w = e.get("workload", {})
    srv = ", ".join(f"{x['model']} (core {i})" for i, x in enumerate(e.get("servers", [])))
    prof = e.get("profiles", {})
    how = {"together": "both measured at once by `chimera profile` before the runs",
           "loaded": "both measured at once by `chimera profile` before the runs, a finished one kept busy with the "
                     "run's kind of calls until the other was done",
           "alone": "each measured alone by `chimera profile` before the runs",
           "given": f"given ({c.profiles}"
                    + (f", measured by this benchmark in mode {prof['measured_as'].get('mode')!r})"
                       if isinstance(prof.get("measured_as"), dict) else ")")}.get(prof.get("mode", ""),
                                                                                 prof.get("mode", ""))
    rate_src = (f"{c.load:g} × the simulated round-robin capacity {e.get('capacity_wps', 0):.3f} workflows/s of the "
                "profiled cluster" if c.rate is None else "given")
    return (f"Workload `{c.workload}`, {c.tasks} workflows, open-loop Poisson at {b.rate:.3f} workflows/s ({rate_src}), "
            f"real time, seed {c.seed}. Servers: {srv}; vLLM {'priority' if c.priority else 'fcfs'} scheduling, "
            f"max_num_seqs = gateway max_inflight {c.max_inflight}, max_model_len {REAL_MAX_MODEL_LEN}, "
            f"max_num_batched_tokens {REAL_MAX_NUM_BATCHED_TOKENS}, fresh servers per contender. Lengths: output × "
            f"{w.get('length_scale', 1):g}, prompts × {w.get('prompt_scale', 1):g}, tool time × "
            f"{w.get('tool_scale', 1):g}, the same for every model ({w.get('capped_calls', 0)} of {w.get('calls', 0)} "
            f"calls capped to fit max_model_len). Profiles: {how}. {c.label}.")


def _cpu_cell(cpu: dict[str, Any] | None, role: str) -> str:
    r = (cpu or {}).get("roles", {}).get(role)
    if r is None:
        return "–"
    return f"{r['cpu_s']:.1f} ({100 * (r['cores'] or 0):.0f}%)"


def twin_hit_pct(sim: dict[str, Any] | None, name: str) -> float | None:
    """The simulated twin's prefix-cache hit rate on server `name` (all its replicas), in %; None: not modelled."""
    q = h = 0
    for rep, e in ((sim or {}).get("engines") or {}).items():
        pc = e.get("prefix_cache")
        if rep.split("#")[0] == name and pc:
            q, h = q + pc["queried_tokens"], h + pc["hit_tokens"]
    return 100.0 * h / q if q else None


def _hits_cell(live: dict[str, Any], sim: dict[str, Any] | None, name: str) -> str:
    twin = twin_hit_pct(sim, name)
    return f"{live.get('prefix_cache_hit_pct', 0):.0f}%" + (f" (twin {twin:.0f}%)" if twin is not None else "")


def _server_cells(runs, names: Sequence[str], cell: Callable[[dict[str, Any], dict[str, Any] | None, str], str]):
    """(run, one table cell per server from its vLLM counters over the run, its twin and its name) for each run."""
    for r in runs:
        sm = r.server_metrics or {}
        yield r, [cell(sm.get(n, {}), r.sim, n) for n in names]


def real_tables(b: LiveBench) -> list[str]:
    """Real engine: CPU time per process, what the servers did, and the profiles the simulator ran on."""
    names = list(b.config.real_models)
    lines = ["", "CPU seconds over each run (share of one core in brackets; the servers' engine cores are pinned, "
             "one core each; their API processes, the gateway and the driver float over both cores):", "",
             "| contender | run wall (s) | " + " | ".join(f"server {n}" for n in names)
             + " | gateway | driver | machine busy (% of all cores) |",
             "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|"]
    for r in b.runs:
        cpu = r.cpu or {}
        lines.append(f"| {r.contender.label} | {cpu.get('wall_s', 0):.0f} | "
                     + " | ".join(_cpu_cell(cpu, f"server {n}") for n in names)
                     + f" | {_cpu_cell(cpu, 'gateway')} | {_cpu_cell(cpu, 'driver')} | "
                     f"{cpu.get('machine_busy_pct') or 0:.0f}% |")
    lines += ["", "What the servers did over each run (vLLM counters) and whether lengths were as planned:", "",
              "| contender | " + " | ".join(f"{n}: prompt / output tokens, preemptions, prefix-cache hits (simulated twin)"
                                             for n in names) + " | prompt reported / planned | short calls |",
              "|---|" + "---|" * len(names) + "---:|---:|"]
    for r, cells in _server_cells(b.runs, names, lambda d, sim, n: (
            f"{d.get('prompt_tokens', 0):,.0f} / {d.get('generation_tokens', 0):,.0f}, "
            f"{d.get('num_preemptions', 0):.0f}, {_hits_cell(d, sim, n)}")):
        lc = r.summary.get("length_check") or {}
        ratio = lc.get("prompt_reported_over_planned")
        lines.append(f"| {r.contender.label} | " + " | ".join(cells)
                     + f" | {ratio:.3f} | {lc.get('short_calls', 0)} of {lc.get('calls', 0)} |" if ratio is not None
                     else f"| {r.contender.label} | " + " | ".join(cells) + " | – | – |")
    lines += ["", "The engines' own times over each run (vLLM histograms: mean inter-token time; per call: waiting in "
              "the server, prefill, decode, end to end):", "",
              "| contender | " + " | ".join(f"{n}: TPOT ms; queue / prefill / decode / e2e ms per call" for n in names)
              + " |", "|---|" + "---|" * len(names)]
    for r, cells in _server_cells(b.runs, names, lambda d, _sim, _n: (
            f"{d.get('engine_tpot_ms', 0):.2f}; {d.get('engine_queue_ms_per_call', 0):.0f} / "
            f"{d.get('engine_prefill_ms_per_call', 0):.0f} / {d.get('engine_decode_ms_per_call', 0):.0f}"
            f" / {d.get('engine_e2e_ms_per_call', 0):.0f}")):
        lines.append(f"| {r.contender.label} | " + " | ".join(cells) + " |")
    summ = (b.engine or {}).get("profiles", {}).get("summary", {})
    if summ:
        lines += ["", "Profiles the simulator ran on (fitted by `chimera profile`):", "",
                  "| server | TPOT batch 1 (ms) | decode tok/s at batch 32 | prefill tok/s (1,024 tokens) | "
                  "per-seq cost (ms) | fit RMS error |", "|---|---:|---:|---:|---:|---:|"]
        for n, d in summ.items():
            rms = d.get("rms_relative_error")
            lines.append(f"| {n} | {d['tpot_ms_c1']:.2f} | {d['tok_s_c32']:.0f} | {d['prefill_tok_s_1024']:.0f} | "
                         f"{1e3 * d['fitted'].get('per_seq_s', 0):.3f} | "
                         f"{'–' if rms is None else f'{100 * rms:.1f}%'} |")
    return lines


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
    ax.set_xlabel("mean workflow latency (s, live, real time)" if b.engine is not None
                  else "mean workflow latency (s, live, time-scaled)")
    ax.set_ylabel("accuracy (%)")
    title = b.label if b.engine is None else b.label.replace("; ", ";\n")
    ax.set_title(f"LiteLLM vs Chimera — {title}\n(hollow: the simulator's prediction of the same run)", fontsize=9)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
