"""Turn a cluster file into what the brain sees (ModelInfo) and what the simulator runs (engine replicas)."""

from __future__ import annotations

from dataclasses import dataclass

from chimera.engine.perf import StepTimeModel
from chimera.engine.profiles import ClusterConfig, ModelSpec
from chimera.sched.types import ModelInfo

TYPICAL_CONTEXT = 1500  # tokens of KV per running sequence when estimating a busy batch's speed


@dataclass
class ModelRuntime:
    """One served model: its spec, its step-time model and the speed summary given to policies."""

    spec: ModelSpec
    perf: StepTimeModel
    info: ModelInfo


def speed_summary(spec: ModelSpec, perf: StepTimeModel, size_rank: int, max_inflight: int | None = None) -> ModelInfo:
    """Decode throughput at a busy batch (bounded by max_num_seqs and KV room), TPOT at a moderate batch, prefill rate."""
    busy = max(1, min(perf.max_num_seqs, perf.kv_capacity_tokens // TYPICAL_CONTEXT))
    tps = busy / perf.step_time(busy, busy * TYPICAL_CONTEXT, 0) * spec.replicas
    moderate = max(1, min(16, busy))
    tpot = perf.step_time(moderate, moderate * TYPICAL_CONTEXT, 0)
    inflight = max_inflight if max_inflight is not None else perf.max_num_seqs * spec.replicas
    chunk = perf.max_num_batched_tokens
    prefill_tps = chunk / perf.prefill_time(chunk) * spec.replicas
    return ModelInfo(name=spec.name, tokens_per_s=tps, tpot_s=tpot, max_inflight=inflight, size_rank=size_rank,
                     prefill_tokens_per_s=prefill_tps)


def build_runtimes(cluster: ClusterConfig) -> list[ModelRuntime]:
    """One runtime per model; size rank by active parameters (0 = smallest).

    A fitted profile (`chimera profile`) may not know its parameter count: then every model is ranked by its
    batch-1 decode step time instead (slower = larger)."""
    specs = list(cluster.models)
    perfs = [StepTimeModel(spec) for spec in specs]
    if all(s.size_b is not None for s in specs):
        key = lambda i: specs[i].size_b  # noqa: E731
    else:
        key = lambda i: perfs[i].decode_tpot(1, 1024)  # noqa: E731
    order = sorted(range(len(specs)), key=key)
    rank = {i: r for r, i in enumerate(order)}
    return [ModelRuntime(spec=spec, perf=perf, info=speed_summary(spec, perf, rank[i]))
            for i, (spec, perf) in enumerate(zip(specs, perfs))]
