"""What the brain and the predictors are told of each served model: its speed from its backends' `profile` (or
defaults), its capacity (the sum of its backends' max_inflight), its size rank, and the names trained predictors may
know it by."""

from __future__ import annotations

from dataclasses import replace

from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import profile
from chimera.perfmodel.speeds import size_ranks, speed_summary
from chimera.sched.types import ModelInfo
from chimera.serve.config import GatewayConfig

DEFAULT_TPS = 2000.0  # aggregate decode tokens/s per replica when a backend names no profile
DEFAULT_TPOT = 0.02


def model_infos(cfg: GatewayConfig) -> list[ModelInfo]:
    """One ModelInfo per served model: speeds from the first backend's `profile` × replicas, else defaults."""
    infos, sizes, tpots = [], [], []
    for name in cfg.models:
        bes = [b for b in cfg.backends if b.model == name]
        inflight = sum(b.max_inflight for b in bes)
        prof = next((b.profile for b in bes if b.profile), None)
        if prof is not None:
            spec = profile(prof).model_copy(update={"name": name, "replicas": len(bes)})
            perf = StepTimeModel(spec)
            info = speed_summary(spec, perf, 0, max_inflight=inflight)
            sizes.append(spec.size_b)
            tpots.append(perf.decode_tpot(1, 1024))
        else:
            info = ModelInfo(name=name, tokens_per_s=DEFAULT_TPS * len(bes), tpot_s=DEFAULT_TPOT,
                             max_inflight=inflight)
            sizes.append(None)
            tpots.append(float(len(tpots)))  # unknown size: config order
        infos.append(info)
    rank = size_ranks(sizes, tpots)  # unknown sizes: by decode time, as sim/cluster.py ranks them
    return [replace(m, size_rank=rank[i]) for i, m in enumerate(infos)]


def workload_names(cfg: GatewayConfig) -> dict[str, tuple[str | None, ...]]:
    """The names trained predictors may know each served model by, in order: a backend's explicit `workload_model`
    alone, else its profile's workload model, then the served name itself."""
    out: dict[str, tuple[str | None, ...]] = {}
    for m in cfg.models:
        bes = [b for b in cfg.backends if b.model == m]
        explicit = next((b.workload_model for b in bes if b.workload_model), None)
        prof = next((b.profile for b in bes if b.profile), None)
        out[m] = (explicit,) if explicit else (profile(prof).workload_model if prof else None, m)
    return out

