"""Each backend's decode speed and prefill rate, measured on the calls it serves (and vLLM's own inter-token latency
counters where it exports them), and the speed figures the policy gets from them: the catalogue's or profile's
prior, moved towards what is measured as samples come in.

Samples (per backend, the last `window` of each kind; a median over them, so a stray slow call moves nothing):
- decode: seconds per output token after the first, (end − first token) / (tokens − 1) of a streamed call; a whole
  (not streamed) answer gives (end − dispatch − its prompt at the prefill estimate) / tokens. Answers shorter than
  `min_decode_tokens` are skipped. Each sample is also kept as a ratio to the prior's TPOT at the batch the call ran
  in (the backend's calls at its end, this one and other clients' included), so a busy hour is not taken for a
  slow backend.
- engine: the same ratio from vLLM's inter-token latency histogram (sum and count between two scrapes, at the
  scraped running batch): the engine's own clock, free of network and relay. Where a backend has these, its decode
  estimate uses them instead of the call samples.
- prefill: seconds per prompt token, (first token − dispatch) / prompt tokens, of streamed first-stage calls with at
  least `min_prompt_tokens` (later stages' prompts are mostly the conversation the engine's prefix cache holds), and
  only when the backend reported no waiting requests at its last scrape. From dispatch, so the gateway's own queue
  is not counted; what the engine queues unseen is, and the median keeps it from mattering unless it is common.

The policy's figures for a model (`model_infos`), with w = 0 below `min_samples` samples, then min(1, n /
`blend_calls`): decode figures (TPOT, busy-batch throughput, the speed curve) scaled by 1 + w·(r − 1), r the median
ratio over the model's backends; prefill at (1 − w)·prior + w·measured seconds per prompt token per replica.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

import numpy as np

from chimera.sched.types import ModelInfo
from chimera.serve.live_config import SpeedsConfig


@dataclass(frozen=True, slots=True)
class CallTiming:
    """What one finished call says of its backend's speed; times in the gateway clock's seconds."""

    backend: str
    prompt_tokens: int
    completion_tokens: int
    dispatched_s: float
    first_token_s: float | None  # None: the answer was not streamed
    ended_s: float
    batch: float  # sequences on the backend at the call's end, this one included
    first_stage: bool  # the workflow's first call: a prompt the engine has not cached
    engine_waiting: bool  # the backend reported waiting requests at its last scrape


@dataclass(frozen=True)
class BackendSpeed:
    """A backend's current estimates (None: not enough samples) and how many samples of each kind it has seen."""

    decode_tokens_per_s: float | None  # per sequence, at the batches it ran
    prefill_tokens_per_s: float | None  # per replica
    samples: Mapping[str, int]  # decode, engine, prefill


def _median(values: Iterable[float]) -> float | None:
    v = list(values)
    return float(np.median(v)) if v else None


@dataclass
class _Backend:
    model: str
    window: int
    calls: deque = field(init=False)  # (seconds per output token, ratio to the prior at its batch)
    engine: deque = field(init=False)  # the same, from the engine's inter-token latency counters
    prefill: deque = field(init=False)  # seconds per prompt token
    seen: dict[str, int] = field(default_factory=lambda: {"decode": 0, "engine": 0, "prefill": 0})
    last_counters: tuple[float, float] | None = None  # (ITL sum, count) at the last scrape

    def __post_init__(self) -> None:
        self.calls, self.engine, self.prefill = (deque(maxlen=self.window) for _ in range(3))

    def decode_samples(self) -> deque:
        """The engine's own samples where it exports them, else the calls'."""
        return self.engine if self.engine else self.calls


class SpeedLearner:
    """Per-backend speed samples and the policy's figures blended from them; fed from the event loop only."""

    def __init__(self, cfg: SpeedsConfig, priors: Sequence[ModelInfo], backend_models: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.priors = list(priors)
        self._prior = {m.name: m for m in priors}
        self.backends = {name: _Backend(model, cfg.window) for name, model in backend_models.items()}
        self._curves = {m.name: ([float(b) for b, _ in m.speed_curve], [t for _, t in m.speed_curve])
                        for m in priors if m.speed_curve}
        self._of_model: dict[str, list[_Backend]] = {m.name: [] for m in priors}
        for b in self.backends.values():
            self._of_model[b.model].append(b)

    # ---- samples -------------------------------------------------------------------------------------------
    def prior_tpot(self, model: str, batch: float) -> float:
        """The prior's seconds per output token of one sequence at `batch` (its speed curve, else its TPOT)."""
        curve = self._curves.get(model)
        if curve is None:
            return self._prior[model].tpot_s
        bs, ts = curve  # linear between the points, clamped at the ends (as np.interp, a few times faster here)
        i = bisect.bisect_left(bs, batch)
        if i == 0:
            return ts[0]
        if i == len(bs):
            return ts[-1]
        return ts[i - 1] + (ts[i] - ts[i - 1]) * (batch - bs[i - 1]) / (bs[i] - bs[i - 1])

    def _prefill_spt(self, b: _Backend) -> float:
        """Seconds per prompt token on one replica: measured, else the prior's (0 where it has none)."""
        measured = _median(b.prefill)
        if measured is not None:
            return measured
        info = self._prior[b.model]
        return len(self._of_model[b.model]) / info.prefill_tokens_per_s

    def observe(self, t: CallTiming) -> None:
        """One successful call; what it cannot say (too short, no first-token time) is skipped."""
        b = self.backends.get(t.backend)
        if b is None:
            return
        cfg = self.cfg
        if t.first_token_s is not None and t.prompt_tokens >= cfg.min_prompt_tokens and t.first_stage \
                and not t.engine_waiting and t.first_token_s > t.dispatched_s:
            b.prefill.append((t.first_token_s - t.dispatched_s) / t.prompt_tokens)
            b.seen["prefill"] += 1
        n = t.completion_tokens
        if n < cfg.min_decode_tokens:
            return
        if t.first_token_s is not None:
            tpot = (t.ended_s - t.first_token_s) / (n - 1)
        else:
            tpot = (t.ended_s - t.dispatched_s - t.prompt_tokens * self._prefill_spt(b)) / n
        if tpot > 0 and math.isfinite(tpot):
            b.calls.append((tpot, tpot / self.prior_tpot(b.model, max(1.0, t.batch))))
            b.seen["decode"] += 1

    def observe_engine(self, backend: str, itl_sum_s: float, itl_count: float, running: float | None) -> None:
        """A scrape of the backend's cumulative inter-token latency counters; a sample per interval with enough
        tokens (a counter that went back, i.e. a restarted engine, starts over)."""
        b = self.backends.get(backend)
        if b is None:
            return
        last, b.last_counters = b.last_counters, (itl_sum_s, itl_count)
        if last is None:
            return
        d_sum, d_count = itl_sum_s - last[0], itl_count - last[1]
        if d_count < 0 or d_sum < 0:
            return  # the engine restarted: its new counters are the baseline
        if d_count < self.cfg.min_decode_tokens:
            b.last_counters = last  # too few tokens yet: keep counting from the old baseline
            return
        tpot = d_sum / d_count
        if not (tpot > 0 and math.isfinite(tpot)):
            return
        b.engine.append((tpot, tpot / self.prior_tpot(b.model, max(1.0, running or 1.0))))
        b.seen["engine"] += 1

    # ---- estimates -----------------------------------------------------------------------------------------
    def backend_speeds(self) -> dict[str, BackendSpeed]:
        out = {}
        for name, b in self.backends.items():
            tpot = _median(s[0] for s in b.decode_samples())
            spt = _median(b.prefill)
            out[name] = BackendSpeed(1.0 / tpot if tpot else None, 1.0 / spt if spt else None, dict(b.seen))
        return out

    def weight(self, n: int) -> float:
        """The measured figures' share after `n` samples."""
        return 0.0 if n < self.cfg.min_samples else min(1.0, n / self.cfg.blend_calls)

    def model_weights(self, model: str) -> tuple[float, float]:
        """(decode, prefill) share of the measured figures in the model's figures now."""
        bes = self._of_model[model]
        return (self.weight(sum(b.seen["engine"] if b.engine else b.seen["decode"] for b in bes)),
                self.weight(sum(b.seen["prefill"] for b in bes)))

    def model_infos(self) -> list[ModelInfo]:
        """The priors with their speed figures moved towards the measured ones, in the priors' order."""
        return [self._blend(m) for m in self.priors]

    def _blend(self, prior: ModelInfo) -> ModelInfo:
        bes = self._of_model[prior.name]
        w_decode, w_prefill = self.model_weights(prior.name)
        out = prior
        ratio = _median(s[1] for b in bes for s in b.decode_samples())
        if w_decode > 0 and ratio is not None:
            f = 1.0 + w_decode * (ratio - 1.0)
            out = replace(out, tpot_s=prior.tpot_s * f, tokens_per_s=prior.tokens_per_s / f,
                          speed_curve=tuple((n, t * f) for n, t in prior.speed_curve))
        spt = _median(s for b in bes for s in b.prefill)
        if w_prefill > 0 and spt is not None:
            replicas = max(1, len(bes))
            blended = (1.0 - w_prefill) * replicas / prior.prefill_tokens_per_s + w_prefill * spt
            out = replace(out, prefill_tokens_per_s=replicas / blended if blended > 0 else math.inf)
        return out


def figures_moved(old: Sequence[ModelInfo], new: Sequence[ModelInfo], tolerance: float = 0.01) -> bool:
    """Whether any model's speed figures differ by more than `tolerance` (relative): worth re-binding the policy."""
    def far(a: float, b: float) -> bool:
        if a == b:
            return False
        if not (math.isfinite(a) and math.isfinite(b)):
            return True
        return abs(a - b) > tolerance * max(abs(a), abs(b))

    return any(far(a.tpot_s, b.tpot_s) or far(a.tokens_per_s, b.tokens_per_s)
               or far(a.prefill_tokens_per_s, b.prefill_tokens_per_s) for a, b in zip(old, new))
