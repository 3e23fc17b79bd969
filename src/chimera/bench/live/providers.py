"""Cluster providers: where a contender's servers come from. Every contender gets fresh servers from its provider;
the contender code (contenders.py) is written once against `ClusterProvider` and never asks which one it has.

* `EmulatedProvider`: three `chimera emulate` processes (Qwen2.5 1.5B / 7B / 14B on A6000), time-scaled;
* `VLLMProvider`: real vLLM CPU servers (chimera.backends.vllm_cpu), one model and one core each, in real time,
  their CPU time and their vLLM counters read over each run.

`SETUPS[engine](cfg, out, on_stage)` prepares a benchmark for one engine: the workload on its models, its provider
and the arrival rate (for vLLM also the servers' profiles, which the simulated twin runs on).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

from chimera.bench.live.config import LABEL, MODELS, REAL_MAX_MODEL_LEN, LiveBenchConfig
from chimera.util.procs import Spawned, chimera_cmd, spawned, wait_ready
from chimera.util.threaded import free_port
from chimera.workload.schema import Task

Workflows = Sequence[tuple[str, Any, Task]]


@dataclass(frozen=True)
class Served:
    """One running server as a gateway sees it."""

    model: str  # the served model name
    base_url: str  # OpenAI base URL, ending in /v1
    max_inflight: int  # the gateway's admission per backend: the server's batch slots
    profile: str | None = None  # MODEL@GPU from the catalogue or a PROFILE.yaml: speed figures for the policy
    priority: bool | None = None  # the server runs vLLM's priority scheduling (None: not said, i.e. no)

    def backend(self) -> dict[str, Any]:
        """The fields of its gateway Backend (chimera.serve.config.backends_for_cluster); what is not said is left
        to the Backend's defaults."""
        fields = {"model": self.model, "base_url": self.base_url, "profile": self.profile,
                  "max_inflight": self.max_inflight, "priority": self.priority}
        return {k: v for k, v in fields.items() if v is not None}


@dataclass
class RunningCluster:
    """A provider's fresh servers for one contender, and what a run reads from them."""

    served: list[Served]
    cpu_groups: dict[str, int] = field(default_factory=dict)  # role -> process group whose CPU a run counts
    # read the servers' counters now; the function returned gives what they counted since (None: nothing to read)
    meter: Callable[[], Callable[[], dict[str, dict[str, float]]]] | None = None
    describe: Callable[[], list[dict[str, Any]]] | None = None  # the servers (pid, core, start-up time, log)


class ClusterProvider(Protocol):
    """Fresh servers for each contender, the agent settings they need and what the simulated twin runs on."""

    label: str  # what the runs are, written beside every result
    workflows: Workflows | None  # the plans the agents run (None: built from the tasks)
    sim_cluster: Any  # the simulated twin's cluster (None: the emulated default cluster)

    def fresh(self, workdir: Path) -> ContextManager[RunningCluster]:
        """Start the servers (logs under `workdir`), yield them running, stop them all."""

    def agent_options(self) -> dict[str, Any]:
        """AgentConfig fields the servers need (time scale, request extras, tokenizer, context length)."""


@dataclass
class Setup:
    """A benchmark ready to run: the workload on the provider's models and the arrival rate."""

    provider: ClusterProvider
    tasks: list[Task]
    mapping: dict[str, str]  # served model -> workload model
    rate: float  # live workflows/s
    engine: dict[str, Any] | None = None  # real engine: servers, profiles, capacity, workload scaling


# ---- emulated backends --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def emulated_cluster(workload_file: Path, time_scale: float, seed: int, workdir: Path) -> Iterator[dict[str, Spawned]]:
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


@dataclass
class EmulatedProvider:
    """The emulated A6000 cluster (MODELS), `time_scale`× faster than real time, replaying `workload_file`."""

    workload_file: Path
    time_scale: float
    seed: int
    label: str = LABEL
    workflows: Workflows | None = None
    sim_cluster: Any = None

    @contextlib.contextmanager
    def fresh(self, workdir: Path) -> Iterator[RunningCluster]:
        from chimera.perfmodel.profiles import profile

        with emulated_cluster(self.workload_file, self.time_scale, self.seed, workdir) as emus:
            yield RunningCluster([Served(m, e.url + "/v1", profile(MODELS[m]).max_num_seqs, MODELS[m])
                                  for m, e in emus.items()])

    def agent_options(self) -> dict[str, Any]:
        return {"time_scale": self.time_scale}


def emulated_setup(cfg: LiveBenchConfig, out: Path, on_stage: Callable[[str], None] | None = None) -> Setup:
    """The workload on the three emulated models, written for the emulators; the rate from `load` (or `rate`)."""
    from chimera.bench.live.twin import arrival_rate
    from chimera.bench.live.workload import to_emulated_models
    from chimera.workload.schema import write_tasks
    from chimera.workload.source import load_workload

    out.mkdir(parents=True, exist_ok=True)
    tasks, _ = load_workload(cfg.workload, seed=cfg.seed)
    tasks, mapping = to_emulated_models(tasks)
    workload_file = out / "workload.jsonl"
    write_tasks(tasks, workload_file)
    rate = cfg.rate if cfg.rate is not None else arrival_rate(tasks, cfg.load, cfg.time_scale)
    return Setup(EmulatedProvider(workload_file, cfg.time_scale, cfg.seed, cfg.label), tasks, mapping, rate)


# ---- real vLLM CPU servers ----------------------------------------------------------------------------------------
@dataclass
class VLLMProvider:
    """Real vLLM CPU servers (`cfg.real_models`), in real time: speeds from their measured `profiles`, prompts
    padded in the servers' `tokenizer`, the length-scaled `workflows`; the simulated twin runs on `sim_cluster`."""

    cfg: LiveBenchConfig
    profiles: dict[str, str]  # served model -> PROFILE.yaml
    tokenizer: Path
    workflows: Workflows
    sim_cluster: Any

    @property
    def label(self) -> str:
        return self.cfg.label

    @contextlib.contextmanager
    def fresh(self, workdir: Path) -> Iterator[RunningCluster]:
        from chimera.backends.vllm_cpu import vllm_cluster
        from chimera.bench.live.servers import cluster_kwargs, counters_meter, real_server_specs, server_workdir

        cfg = self.cfg
        with vllm_cluster(real_server_specs(cfg), workdir=server_workdir(workdir, cfg.real_models),
                          **cluster_kwargs(cfg)) as cl:
            servers = list(cl)
            served = [Served(s["model"], s["base_url"], cfg.max_inflight,
                             str(Path(self.profiles[s["model"]]).resolve()), s["priority"]) for s in cl.served()]
            yield RunningCluster(served, cpu_groups={f"server {s.served_model_name}": s.pgid for s in servers},
                                 meter=lambda: counters_meter(servers),
                                 describe=lambda: [s.describe() for s in servers])

    def agent_options(self) -> dict[str, Any]:
        return {"time_scale": 1.0, "extra_body": {"ignore_eos": True}, "tokenizer": str(self.tokenizer),
                "max_model_len": REAL_MAX_MODEL_LEN}


def vllm_setup(cfg: LiveBenchConfig, out: Path, on_stage: Callable[[str], None] | None = None) -> Setup:
    """`--engine vllm`: check the venv and models, export the servers' tokenizer, scale the workload, profile the
    servers (or take the given profiles), build the simulated cluster from them and set the rate from its
    round-robin capacity; writes OUT/engine.json."""
    from chimera.bench.live.profiles import given_profiles, profile_real_servers, profile_summary
    from chimera.bench.live.servers import check_real_setup, real_server_specs, server_tokenizer
    from chimera.bench.live.twin import capacity_of, profiled_cluster
    from chimera.bench.live.workload import real_workflows, to_served_models
    from chimera.sim.cluster import build_runtimes
    from chimera.workload.source import load_workload

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
    capacity = capacity_of(build_runtimes(cluster), workflows)
    rate = cfg.rate if cfg.rate is not None else cfg.load * capacity
    engine = {"kind": "vllm", "servers": [{"model": sp.model, "priority": sp.priority, "max_num_seqs": sp.max_num_seqs,
                                           "kv_cache_gib": sp.kv_cache_gib, "max_model_len": sp.max_model_len,
                                           "extra_args": sp.extra_args} for sp in real_server_specs(cfg)],
              "profiles": {**prof, "summary": profile_summary(prof["paths"], cfg)},
              "capacity_wps": capacity, "workload": scale.__dict__, "tokenizer": str(tokenizer),
              "tokenizer_source": tokenizer_how}
    (out / "engine.json").write_text(json.dumps(engine, indent=1))
    return Setup(VLLMProvider(cfg, prof["paths"], tokenizer, workflows, cluster), tasks, mapping, rate, engine)


SETUPS: dict[str, Callable[[LiveBenchConfig, Path, Callable[[str], None] | None], Setup]] = {
    "emulate": emulated_setup, "vllm": vllm_setup}
