"""The trace writer: one trace row, metrics and a JSON log line for every attempt whose life ended."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Callable

from chimera.sched.decision import Decision
from chimera.serve.clock import GatewayClock
from chimera.serve.metrics import GatewayMetrics
from chimera.serve.trace import TraceStore

if TYPE_CHECKING:
    from chimera.serve.call import CallContext

log = logging.getLogger("chimera.serve")


def routing_columns(decision: Decision | None) -> dict[str, Any]:
    """The trace columns off-policy evaluation reads from a routing Decision: its propensity, whether it explored,
    the exploration probability in force, and the scorer terms and weights it used (all None without a Decision)."""
    if decision is None:
        return {"propensity": None, "explored": None, "epsilon": None, "terms": None, "weights": None}
    terms, weights = decision.terms, decision.weights
    return {"propensity": decision.propensity, "explored": decision.explored, "epsilon": decision.epsilon,
            "terms": None if terms is None else {k: dict(v) for k, v in terms.items()},
            "weights": None if weights is None else dict(weights)}


class CallRecorder:
    """Writes what a call did (model, backend, times, tokens, the predictions behind its routing) where it is read:
    the trace store (rows that `chimera train --traces` learns from), Prometheus metrics and the log."""

    def __init__(self, trace: TraceStore, metrics: GatewayMetrics, run_id: str, policy_name: str,
                 clock: GatewayClock) -> None:
        self.trace, self.metrics, self.run_id, self.policy_name = trace, metrics, run_id, policy_name
        self.wall = clock.wall
        self.observers: list[Callable[["CallContext", float], None]] = []  # told of every settled attempt

    def record(self, ctx: "CallContext", now: float) -> None:
        """Trace row, metrics and a log line for the attempt `ctx` holds; never raises (a lost row is counted by the
        trace store)."""
        call = ctx.call
        status = ctx.outcome.value if ctx.outcome is not None else "error"
        try:
            row = {
                "workflow_id": call.workflow_id, "stage": call.stage, "call_id": f"{self.run_id}-{call.call_id}",
                "model": call.model, "backend": ctx.backend.name if ctx.backend else None,
                "prompt_tokens": call.prompt_tokens, "completion_tokens": ctx.completion_tokens,
                "queued_at": self.wall(call.arrival_s), "dispatched_at": self.wall(call.dispatched_s),
                "first_token_at": self.wall(ctx.first_token_at), "ended_at": self.wall(now), "status": status,
                "error": ctx.error, "confidences": call.confidences, "pred_call_tokens": call.pred_call_tokens,
                "pred_remaining_tokens": call.pred_remaining_tokens, "policy": self.policy_name, "kind": call.kind,
                "identity": ctx.identity.source.value if ctx.identity is not None else None,
                **routing_columns(ctx.decision), "predictor_version": getattr(ctx, "predictor_version", None),
            }
            self.trace.log_call({**row, "prompt": call.prompt})  # the router's prompt text: trace only, not the log
            self.metrics.requests_of(call.model or "", status).inc()
            if status == "ok":
                self.metrics.latency_of(call.model).observe(now - call.arrival_s)
            for observe in self.observers:
                observe(ctx, now)
            if log.isEnabledFor(logging.INFO):
                log.info(json.dumps({"event": "call", **row, "latency_s": round(now - call.arrival_s, 4),
                                     "priority": call.priority}, ensure_ascii=True, allow_nan=True))
        except Exception:
            log.exception("could not record call %s", call.call_id)
