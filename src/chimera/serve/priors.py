"""What the gateway knows before training: model speeds from profiles, and predictors that learn online.

A fresh deployment has no trained predictors; these priors keep the policy usable and are replaced by
`predictors: DIR` (a `chimera train` folder) once traces exist.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from chimera.engine.perf import StepTimeModel
from chimera.engine.profiles import profile
from chimera.engine.speeds import size_ranks, speed_summary
from chimera.sched.types import Call, ModelInfo
from chimera.serve.config import GatewayConfig

DEFAULT_TPS = 2000.0  # aggregate decode tokens/s per replica when a backend names no profile
DEFAULT_TPOT = 0.02
DEFAULT_CALL_TOKENS = 256.0
TRACKED_STAGES = 64  # stages at or past the last share one running mean: a prediction costs O(stages × models), fixed
TRACKED_KINDS = 1024  # kinds past this many pool under OTHER_KIND: memory stays bounded whatever clients send
OTHER_KIND = "\x00other"


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
    return [ModelInfo(name=m.name, tokens_per_s=m.tokens_per_s, tpot_s=m.tpot_s, max_inflight=m.max_inflight,
                      size_rank=rank[i], prefill_tokens_per_s=m.prefill_tokens_per_s) for i, m in enumerate(infos)]


class SizePriorConfidence:
    """Confidence rises with model size (0.5 smallest → 0.9 largest): bigger models are usually more accurate."""

    def __init__(self, models: Sequence[ModelInfo]) -> None:
        self.models_ = [m.name for m in models]
        n = max(len(models) - 1, 1)
        self._row = np.array([0.5 + 0.4 * m.size_rank / n for m in models])

    def predict_confidence(self, calls: Sequence[Call]) -> np.ndarray:
        return np.tile(self._row, (len(calls), 1))


class RunningLength:
    """Per-(kind, stage, model) running mean of completion tokens; remaining = this stage's and later stages' means.
    Unseen (kind, stage, model) falls back to the stage's mean over all models, then to DEFAULT_CALL_TOKENS.
    Stages from TRACKED_STAGES − 1 on share one bucket, so a client's stage number never sets the work done."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models_ = list(models)
        self._sum: dict[tuple[str, int, str], float] = defaultdict(float)
        self._n: dict[tuple[str, int, str], int] = defaultdict(int)
        self._max_stage: dict[str, int] = {}

    def _key(self, kind: str, stage: int) -> tuple[str, int]:
        if kind not in self._max_stage and len(self._max_stage) >= TRACKED_KINDS:
            kind = OTHER_KIND
        return kind, min(max(stage, 0), TRACKED_STAGES - 1)

    def observe(self, kind: str, stage: int, model: str, tokens: int) -> None:
        kind, stage = self._key(kind, stage)
        self._sum[(kind, stage, model)] += tokens
        self._n[(kind, stage, model)] += 1
        self._max_stage[kind] = max(self._max_stage.get(kind, 0), stage)

    def _mean(self, kind: str, stage: int, model: str) -> float:
        """This model's mean; for a model not yet served at this stage, the other models' pooled mean, so an
        unexplored model is not judged by the blind default (which would keep it unexplored)."""
        n = self._n.get((kind, stage, model), 0)
        if n:
            return self._sum[(kind, stage, model)] / n
        pooled_n = sum(self._n.get((kind, stage, m), 0) for m in self.models_)
        if pooled_n:
            return sum(self._sum.get((kind, stage, m), 0.0) for m in self.models_) / pooled_n
        return DEFAULT_CALL_TOKENS

    def predict_lengths(self, calls: Sequence[Call]) -> tuple[np.ndarray, np.ndarray]:
        call = np.zeros((len(calls), len(self.models_)))
        rem = np.zeros_like(call)
        for i, c in enumerate(calls):
            kind, stage = self._key(c.kind, c.stage)
            last = max(self._max_stage.get(kind, 0), stage)
            for j, m in enumerate(self.models_):
                call[i, j] = self._mean(kind, stage, m)
                rem[i, j] = sum(self._mean(kind, s, m) for s in range(stage, last + 1))
        return call, rem
