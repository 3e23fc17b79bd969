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

The modules by job: config (what runs: contenders, engines, LiveBenchConfig), providers (where a contender's servers
come from: emulated or real vLLM, one protocol), servers and profiles (the real servers' settings, tokenizer,
counters and profiles), workload (the workload on the served models, plans scaled for the real engine),
contenders (one contender's run, written once for every provider), twin (the simulated twin and its fidelity),
run (the whole benchmark, --resimulate) and report (results.json, results.md, frontier.png).
"""

from chimera.bench.live.config import (DEFAULT_CONTENDERS, DEFAULT_LAM, LABEL, LABELS, MODELS, Contender,
                                       LiveBenchConfig, parse_contender)
from chimera.bench.live.contenders import ContenderRun, LiveBench, run_contender
from chimera.bench.live.providers import EmulatedProvider, VLLMProvider
from chimera.bench.live.report import resim_markdown
from chimera.bench.live.run import resimulate, run_live_bench
from chimera.bench.live.twin import arrival_rate
from chimera.bench.live.workload import to_emulated_models

__all__ = ["DEFAULT_CONTENDERS", "DEFAULT_LAM", "LABEL", "LABELS", "MODELS", "Contender", "ContenderRun",
           "EmulatedProvider", "LiveBench", "LiveBenchConfig", "VLLMProvider", "arrival_rate", "parse_contender",
           "resim_markdown", "resimulate", "run_contender", "run_live_bench", "to_emulated_models"]
