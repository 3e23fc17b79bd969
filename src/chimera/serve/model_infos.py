"""What the brain is told of each served model (ModelInfo): its speed from its backends' `profile` (or defaults), its
capacity (the sum of its backends' max_inflight) and its size rank."""

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
