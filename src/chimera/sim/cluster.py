"""Turn a cluster file into what the brain sees (ModelInfo) and what the simulator runs (engine replicas)."""

from __future__ import annotations

from dataclasses import dataclass

from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import ClusterConfig, ModelSpec
from chimera.perfmodel.speeds import size_ranks, speed_summary
from chimera.sched.types import ModelInfo


@dataclass
class ModelRuntime:
    """One served model: its spec, its step-time model and the speed summary given to policies."""

    spec: ModelSpec
    perf: StepTimeModel
    info: ModelInfo

    @property
    def request_overhead_s(self) -> float:
        """What a client waits per call beyond the engine's steps (HTTP, tokenising, the API server), as
        `chimera profile` measured it; 0 for catalogue engines, whose figures are engine-only."""
        fitted = getattr(self.spec, "fitted", None)
        return float(fitted.request_overhead_s) if fitted is not None else 0.0


def build_runtimes(cluster: ClusterConfig) -> list[ModelRuntime]:
    """One runtime per model; size rank by active parameters (0 = smallest).

    A fitted profile (`chimera profile`) may not know its parameter count: then every model is ranked by its
    batch-1 decode step time instead (slower = larger)."""
    specs = list(cluster.models)
    perfs = [StepTimeModel(spec) for spec in specs]
    rank = size_ranks([s.size_b for s in specs], [p.decode_tpot(1, 1024) for p in perfs])
    return [ModelRuntime(spec=spec, perf=perf, info=speed_summary(spec, perf, rank[i]))
            for i, (spec, perf) in enumerate(zip(specs, perfs))]
