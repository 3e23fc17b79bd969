"""Reloading the gateway's trained predictors without a restart (POST /v1/chimera/admin/reload, or SIGHUP).

The `predictors` folder is read again and the new predictors are built and tried on a probe call off the event loop
(a thread); only then are they swapped in, on the event loop, between two calls, under a new version. Calls already
queued or running keep what they were decided with; each call carries the version it was decided with
(`CallContext.predictor_version`, a trace column). A folder that cannot be loaded, does not fit the served models or
fails on the probe is refused: the old predictors stay, and the reason is logged, counted and returned.

The online learner (`learning: {online: true}`) is not replaced: it keeps what it learnt from scores (its ridge
statistics, its pending workflows and counters) and only its warm-start prior becomes the newly loaded router.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from chimera.predict.assembly import build_predictors, gateway_context, gateway_predictors
from chimera.sched.types import Call, ModelInfo
from chimera.serve.config import GatewayConfig
from chimera.serve.metrics import GatewayMetrics
from chimera.serve.pool import BackendPool

log = logging.getLogger("chimera.serve")


def version_name(n: int, digest: str | None) -> str:
    """`n` (the gateway's n-th set of predictors: 1 at start) and the content digest of the folder they came from
    (chimera.predict.artifacts.manifest_digest), e.g. `3:4ac0058e9232`; `n` alone without a folder."""
    return f"{n}:{digest}" if digest else str(n)


def _probe() -> Call:
    return Call(call_id=-1, workflow_id="chimera-reload-probe", kind="default", prompt="What is 2 + 2?", stage=0,
                prompt_tokens=8, arrival_s=0.0, workflow_arrival_s=0.0)


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: `ok` (swapped) or refused with `reason`; the version in force afterwards."""

    ok: bool
    version: str
    previous: str
    seconds: float
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "version": self.version, "previous": self.previous, "seconds": round(self.seconds, 3),
                **({"reason": self.reason} if self.reason else {})}


class ReloadRefused(ValueError):
    """New predictors that cannot be used; the message says why (the old ones stay)."""


def check_predictors(confidence: Any, length: Any, names: Sequence[str]) -> None:
    """Try the new predictors on a probe call: one finite confidence in [0, 1] per served model, finite lengths."""
    conf = np.asarray(confidence.predict_confidence([_probe()]), dtype=float)
    call_tok, rem_tok = (np.asarray(x, dtype=float) for x in length.predict_lengths([_probe()]))
    for what, arr in (("confidence", conf), ("call lengths", call_tok), ("remaining lengths", rem_tok)):
        if arr.shape != (1, len(names)):
            raise ReloadRefused(f"the new {what} predictor answers shape {arr.shape} for one call, expected "
                                f"(1, {len(names)}) (models {list(names)})")
        if not np.isfinite(arr).all():
            raise ReloadRefused(f"the new {what} predictor answers non-finite values on a probe call")
    if ((conf < 0) | (conf > 1)).any():
        raise ReloadRefused("the new confidence predictor answers values outside [0, 1] on a probe call")


class PredictorReloader:
    """Loads the configured `predictors` folder again and swaps the policy's predictors; one reload at a time."""

    def __init__(self, cfg: GatewayConfig, infos: Sequence[ModelInfo], workload_model: Mapping[str, Any],
                 pool: BackendPool, metrics: GatewayMetrics, digest: str | None = None) -> None:
        self.cfg, self.infos, self.workload_model = cfg, list(infos), dict(workload_model)
        self.pool, self.metrics = pool, metrics
        self.loaded = 1  # sets of predictors this gateway has run with (the version's counter)
        self._lock = asyncio.Lock()
        if pool.predictor_version is None:
            pool.predictor_version = version_name(1, digest)
        self._name_learner(pool.policy.confidence)

    @property
    def version(self) -> str:
        """The version of the predictors new calls are decided with."""
        return self.pool.predictor_version or version_name(1, None)

    def _name_learner(self, confidence: Any) -> None:
        if hasattr(confidence, "version_"):  # the online learner records which prior it corrects
            confidence.version_ = self.version

    def _build(self) -> tuple[Any, Any, Any, str]:
        """(confidence, length, the online learner's new prior or None, digest) from the folder, built and tried on
        a probe call: runs in a worker thread, never on the event loop."""
        cfg = self.cfg
        ctx = gateway_context(self.infos, cfg.predictors, self.workload_model)
        online = cfg.learning.params if cfg.learning.online else None
        confidence, length = build_predictors(gateway_predictors(True, cfg.length_stat, online), ctx)
        digest = ctx.trained.digest if ctx.trained is not None else ""
        learner = self.pool.policy.confidence
        if online is not None and hasattr(learner, "use_prior"):  # keep what the learner learnt; only its prior
            check_predictors(confidence.prior, length, ctx.names)
            return learner, length, confidence.prior, digest
        check_predictors(confidence, length, ctx.names)
        return confidence, length, None, digest

    async def reload(self, source: str) -> ReloadResult:
        """Load, check and swap in the predictors of the configured folder (`source` says who asked, for the log);
        refused, the old predictors stay and the result says why. Reloads that overlap run one after another."""
        async with self._lock:
            t0, previous = time.perf_counter(), self.version
            try:
                if not self.cfg.predictors:
                    raise ReloadRefused("nothing to reload: the gateway's config sets no `predictors` folder")
                confidence, length, prior, digest = await asyncio.to_thread(self._build)
                version = version_name(self.loaded + 1, digest)
                self.pool.use_predictors(confidence, length, version)  # on the loop, between two calls
                if prior is not None:
                    confidence.use_prior(prior)
            except Exception as e:  # a bad folder, a bad pickle, a predictor that fails its probe: refused
                known = isinstance(e, ValueError)  # ArtifactError, PredictorConfigError, ReloadRefused, ...
                return self._done(False, previous, t0, source, str(e) if known else f"{type(e).__name__}: {e}",
                                  exc=not known)
            self.loaded += 1
            self._name_learner(confidence)
            return self._done(True, previous, t0, source)

    def _done(self, ok: bool, previous: str, t0: float, source: str, reason: str | None = None,
              exc: bool = False) -> ReloadResult:
        result = ReloadResult(ok, self.version, previous, time.perf_counter() - t0, reason)
        self.metrics.reloads.labels("ok" if ok else "refused").inc()
        line = json.dumps({"event": "reload", "source": source, **result.as_dict()})
        if ok:
            log.info(line)
        else:
            log.warning(line, exc_info=exc)
        return result
