"""Expected seconds until this call is done on each model: congestion + prefill + service."""

from __future__ import annotations

import numpy as np

from chimera.sched.plugin import register_scorer
from chimera.sched.scorers.base import Scorer

CONGESTION_MODELS = ("throughput", "batch")


@register_scorer("expected_latency")
class ExpectedLatency(Scorer):
    """Expected latency of the call on each model. A cost: give it a negative weight.

    `congestion` picks the congestion model (`None` / False: none, service only):
    - "throughput" (the paper's): in-flight predicted tokens on m / m's busy-batch throughput + this call's prompt /
      m's prefill rate + its predicted tokens × m's TPOT at a moderate batch.
    - "batch" (calibrated to the engine's state): the call joins a batch of (in-flight calls + 1) / replicas
      sequences per replica, capped at the batch a replica can run (`batch_limit`: max_num_seqs or KV room), and
      decodes at that batch's TPOT (interpolated on the model's `speed_curve`); calls beyond the cap queue until
      running ones finish (queued calls ahead × their mean remaining predicted tokens / the full batch's throughput);
      `externality` > 0 adds that share of the slowdown the call's joining causes the calls already running (each
      of them decodes at the larger batch's TPOT for as long as this call runs). Models without a speed curve
      (no profile) keep the throughput model.

    `affinity` (workflow affinity): the prefill term counts only the prompt tokens model m does not hold already,
    (prompt − Call.cached_tokens[m]) / m's prefill rate, so staying where the workflow's context is cached saves
    prefill and moving costs it. Off (the default): the whole prompt everywhere.
    The load on each model is the monitor's (`LoadMonitor.inflight_tokens`, `inflight_calls`): it counts the calls the engines run beyond this
    scheduler's own as in-flight calls of the model's mean predicted length (this call's, when none of ours is in
    flight), in both congestion models.
    `overrun` (None: off) makes the in-flight tokens conditional on how long each call has run: a running call owes
    its predicted tokens less those its time since dispatch has produced at m's TPOT for its current batch, and once
    past its prediction `overrun` × the tokens it has produced (where lengths are heavy-tailed, a call that has run
    long is likely a runaway with as long again to go: the remaining-life rule of a Pareto tail with α = 1 + 1/overrun).
    `prefill_externality` > 0 adds that share of the time the call's prefill stalls the calls already on m: a replica
    runs a prefill inside its steps, so each of the n/r calls on one of m's r replicas waits prompt left × r / m's
    prefill rate (all replicas): n × prompt left / prefill rate stall-seconds in all. With affinity this is what makes
    a switch expensive on a busy model; the call's own prefill alone is small next to its decode.
    """

    congestion: str | bool | None = "throughput"
    externality: float = 0.0
    affinity: bool = False
    prefill_externality: float = 0.0
    overrun: float | None = None

    def bind(self, policy) -> None:
        if self.congestion is True:
            self.congestion = "throughput"
        if self.congestion and self.congestion not in CONGESTION_MODELS:
            raise ValueError(f"congestion model must be one of {CONGESTION_MODELS}, got {self.congestion!r}")
        models = policy.models
        self._names = list(policy.names)
        self._tps = np.array([m.tokens_per_s for m in models])
        self._tpot = np.array([m.tpot_s for m in models])
        self._prefill = np.array([m.prefill_tokens_per_s for m in models])
        self._curved = np.array([bool(m.speed_curve) and m.batch_limit > 0 for m in models])
        self._replicas = np.array([max(1, m.replicas) for m in models], dtype=float)
        self._limit = np.array([m.batch_limit if c else 1 for m, c in zip(models, self._curved)], dtype=float)
        self._curves = [(np.array([b for b, _ in m.speed_curve], dtype=float),
                         np.array([t for _, t in m.speed_curve], dtype=float)) if c else None
                        for m, c in zip(models, self._curved)]
        self._tpot_full = np.array([self._at(i, self._limit[i]) for i in range(len(models))])

    def _at(self, i: int, batch: float) -> float:
        """TPOT of model i at `batch` sequences per replica (linear between the curve's points, clamped)."""
        curve = self._curves[i]
        if curve is None:
            return float(self._tpot[i])
        return float(np.interp(batch, curve[0], curve[1]))

    def prompt_left(self, call) -> int | np.ndarray:
        """Prompt tokens each model would prefill for `call`: all of them, or (affinity) those not cached there."""
        if not self.affinity or not call.cached_tokens:
            return call.prompt_tokens
        cached = np.array([call.cached_tokens.get(n, 0) for n in self._names], dtype=float)
        return np.maximum(0.0, call.prompt_tokens - cached)

    def owed_tokens(self, monitor, now: float) -> np.ndarray:
        """In-flight tokens per model, each call's conditional on its time since dispatch (`overrun`)."""
        out = np.zeros(len(self._names))
        for i, n in enumerate(self._names):
            owed, elapsed = monitor.owed_and_elapsed(n, now)
            if not len(owed):
                continue
            batch = min(max(1.0, len(owed) / self._replicas[i]), self._limit[i])
            made = elapsed / self._at(i, batch)
            out[i] = float(np.where(made < owed, owed - made, self.overrun * made).sum())
        return out

    def seconds(self, call_tok: np.ndarray, prompt_tokens: int | np.ndarray, monitor,
                now: float | None = None) -> np.ndarray:
        prefill = prompt_tokens / self._prefill
        if not self.congestion:
            return call_tok * self._tpot + prefill
        if self.overrun is not None and now is not None:
            inflight = self.owed_tokens(monitor, now)
        else:
            inflight = np.array([monitor.pred_tokens[n] for n in self._names])
        inflight = monitor.inflight_tokens(self._names, inflight, call_tok)
        if self.congestion == "throughput":
            return inflight / self._tps + call_tok * self._tpot + prefill
        calls = monitor.inflight_calls(self._names)
        out = inflight / self._tps + call_tok * self._tpot + prefill  # models without a curve
        slots = self._replicas * self._limit
        for i in np.flatnonzero(self._curved):
            n = calls[i]
            batch = min((n + 1.0) / self._replicas[i], self._limit[i])
            tpot = self._at(i, batch)
            ahead = max(0.0, n + 1.0 - slots[i])  # calls that would still wait for a slot, this one included
            mean_left = inflight[i] / n if n > 0 else 0.0
            wait = ahead * mean_left * self._tpot_full[i] / slots[i]
            t = wait + call_tok[i] * tpot + prefill[i]
            if self.externality and n > 0:
                running = min(n, slots[i])
                before = self._at(i, max(1.0, min(n / self._replicas[i], self._limit[i])))
                others = (running / self._replicas[i]) * max(0.0, tpot - before) * min(call_tok[i], mean_left)
                t += self.externality * others
            out[i] = t
        return out

    def score(self, call, now, prediction, allowed, policy) -> np.ndarray:
        left = self.prompt_left(call)
        out = self.seconds(prediction[1], left, policy.monitor, now)
        if self.prefill_externality:  # the prefill stalls the calls already on the model's replicas
            calls = np.array([policy.monitor.calls[n] for n in self._names], dtype=float)
            out = out + self.prefill_externality * (left / self._prefill) * calls
        return out
