"""What `chimera bench live` runs: the contenders (a gateway and its routing), the engines, the constants both
clusters share, and the validated configuration."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chimera.bench.litellm_proxy import STRATEGIES

LABELS = {
    "emulate": "live run against emulated backends (engine model), not real GPUs",
    "vllm": "live, real vLLM (CPU build), random-weight models; task scores from the workload's outcome table",
}
LABEL = LABELS["emulate"]  # the default engine's; LiveBenchConfig.label is the configured engine's
APPEND_ONLY = "append-only conversations, with workflow hints"
NO_HINTS = "no workflow hints (the agents in front of Chimera send only what an OpenAI client sends)"
ENGINES = tuple(LABELS)
REAL_MODELS = ("tiny", "wide")  # real vLLM servers, weakest-mapped first: tiny <- weakest, wide <- strongest
REAL_MAX_MODEL_LEN = 2048  # the servers' --max-model-len (../shared/real-engines/README.md)
REAL_MAX_NUM_BATCHED_TOKENS = 2048  # set explicitly on the servers and in their profiles
REAL_KV_BLOCK_TOKENS = 128  # the CPU build's KV block (its prefix cache reuses whole blocks; docs/perfmodel.md)
CONTEXT_MARGIN = 16  # tokens of max_model_len kept free beside each planned call
# The emulated cluster, described once: served name -> engine profile, smallest first. The emulators, the gateway's
# backends and the simulated twin's cluster (emulated_cluster_config) are all built from it.
MODELS = {"qwen2.5-1.5b": "qwen2.5-1.5b@a6000", "qwen2.5-7b": "qwen2.5-7b@a6000",
          "qwen2.5-14b": "qwen2.5-14b@a6000"}
DEFAULT_LAM = 0.05
DEFAULT_CONTENDERS = ("litellm:simple-shuffle", "litellm:least-busy", "chimera:vllm", f"chimera:chimera@{DEFAULT_LAM}")
SIM_TWIN = {"least-busy": "least-loaded"}  # LiteLLM strategy -> the simulator's nearest policy
FIDELITY_METRICS = ("latency_mean", "latency_p50", "latency_p99", "throughput", "accuracy")


@dataclass(frozen=True)
class Contender:
    """One gateway set-up: `litellm:STRATEGY` or `chimera:POLICY[@LAMBDA][xN][+online]` (`xN`: N gateway replicas
    sharing state on a Redis, the agents' calls spread over them round robin; `+online`: the gateway routes with the
    online learner, `learning: {online: true}`, taught by the agents' feedback)."""

    gateway: str
    strategy: str
    lam: float | None = None
    online: bool = False
    replicas: int = 1

    @property
    def label(self) -> str:
        base = f"{self.gateway} {self.strategy}"
        base = base if self.lam is None else f"{base} λ={self.lam:g}"
        base = f"{base} online" if self.online else base
        return base if self.replicas == 1 else f"{base} on {self.replicas} replicas"

    @property
    def sim_policy(self) -> str | None:
        """The simulator policy that models this contender (None: no faithful twin, e.g. random shuffle)."""
        return self.strategy if self.gateway == "chimera" else SIM_TWIN.get(self.strategy)


def parse_contender(spec: str) -> Contender:
    from chimera.sched.registry import POLICIES, takes_param
    from chimera.serve.refusals import live_refusal

    gw, _, rest = spec.strip().partition(":")
    if gw == "litellm":
        if rest not in STRATEGIES:
            raise ValueError(f"contender {spec!r}: LiteLLM strategy must be one of {', '.join(STRATEGIES)}")
        return Contender("litellm", rest)
    if gw == "chimera":
        rest, plus, extra = rest.partition("+")
        if plus and extra != "online":
            raise ValueError(f"contender {spec!r}: the only option after '+' is 'online', got {extra!r}")
        n, many = 1, re.fullmatch(r"(.+)x(\d+)", rest)
        if many:
            rest, n = many.group(1), int(many.group(2))
            if n < 1:
                raise ValueError(f"contender {spec!r}: replicas (after 'x') must be at least 1, got {n}")
        pol, _, lam = rest.partition("@")
        if pol not in POLICIES:
            raise ValueError(f"contender {spec!r}: unknown policy {pol!r}; choose one of {', '.join(POLICIES)}")
        if lam and not takes_param(pol, "lam"):
            raise ValueError(f"contender {spec!r}: policy {pol!r} takes no λ")
        if live_refusal(pol):
            raise ValueError(f"contender {spec!r}: {live_refusal(pol)}")
        try:
            lam_value = float(lam) if lam else None
        except ValueError:
            raise ValueError(f"contender {spec!r}: λ must be a number, got {lam!r}") from None
        return Contender("chimera", pol, lam_value, online=bool(plus), replicas=n)
    raise ValueError(f"contender {spec!r}: expected litellm:STRATEGY or chimera:POLICY[@LAMBDA][xN][+online]")


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
    hints: bool = True  # False: Chimera contenders' agents send no workflow hints (the gateway infers workflows)
    append_only: bool = False  # every contender's agents send append-only conversations (implied without hints)
    # contenders run as several replicas (chimera:POLICYxN): each call to the next replica ("call", a round-robin load
    # balancer) or each workflow to one replica ("workflow", sticky sessions; always so without hints)
    replica_spread: Literal["call", "workflow"] = "call"
    # every contender this many times, round by round on the same tasks and arrivals: live runs vary between runs
    # (a feedback loop of routing and congestion), so a comparison needs each side's spread
    repeat: int = Field(default=1, ge=1, le=20)
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
        if not self.hints:
            return f"{LABELS[self.engine]}; {NO_HINTS}"
        return f"{LABELS[self.engine]}; {APPEND_ONLY}" if self.append_only else LABELS[self.engine]

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


def emulated_cluster_config():
    """The emulated cluster (MODELS) as a cluster description, for the simulator (the twin, the load's capacity)."""
    from chimera.perfmodel.profiles import cluster_from_dict

    return cluster_from_dict({"models": [{"profile": p, "name": n} for n, p in MODELS.items()]},
                             source="the emulated cluster")
