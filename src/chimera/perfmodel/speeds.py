"""What the brain is told of a model's speed (ModelInfo), from its spec and step-time model: one summary for the
simulator's cluster and the gateway's profiled backends alike."""

from __future__ import annotations

from typing import Sequence

from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import ModelSpec
from chimera.sched.types import ModelInfo

TYPICAL_CONTEXT = 1500  # tokens of KV per running sequence when estimating a busy batch's speed


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
                     prefill_tokens_per_s=prefill_tps, replicas=spec.replicas, batch_limit=busy,
                     speed_curve=speed_curve(perf, busy))


def speed_curve(perf: StepTimeModel, limit: int) -> tuple[tuple[int, float], ...]:
    """(batch, TPOT s) at a typical context for batch 1, 2, 4, … up to `limit` (always included): the batch-dependent
    decode rate a congestion estimate interpolates (step time is smooth in the batch, so powers of two suffice)."""
    sizes, b = [], 1
    while b < limit:
        sizes.append(b)
        b *= 2
    sizes.append(max(1, limit))
    return tuple((n, perf.decode_tpot(n, TYPICAL_CONTEXT)) for n in sizes)


def size_ranks(sizes: Sequence[float | None], fallback: Sequence[float]) -> list[int]:
    """Rank of each model, 0 = smallest: by parameter count where every model has one, else (a measured profile may
    not know it) by `fallback`, e.g. batch-1 decode step time (the slower model is taken for the larger one)."""
    key = sizes if all(x is not None for x in sizes) else fallback
    order = sorted(range(len(key)), key=lambda i: key[i])  # type: ignore[arg-type, return-value]
    rank = {i: r for r, i in enumerate(order)}
    return [rank[i] for i in range(len(key))]
