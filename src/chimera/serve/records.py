"""The trace writer: one trace row, metrics and a JSON log line for every call whose life ended."""

from __future__ import annotations

import json
import logging
from typing import Callable

from chimera.sched.types import Call
from chimera.serve.metrics import GatewayMetrics
from chimera.serve.trace import TraceStore

log = logging.getLogger("chimera.serve")


class CallRecorder:
    """Writes what a call did (model, backend, times, tokens, the predictions behind its routing) where it is read:
    the trace store (rows that `chimera train --traces` learns from), Prometheus metrics and the log."""

    def __init__(self, trace: TraceStore, metrics: GatewayMetrics, run_id: str, policy_name: str,
                 wall: Callable[[float | None], float | None]) -> None:
        self.trace, self.metrics, self.run_id, self.policy_name, self.wall = trace, metrics, run_id, policy_name, wall

    def record(self, call: Call, backend: str | None, status: str, err: str | None, now: float,
                completion_tokens: int | None, first_token_at: float | None) -> None:
        """Trace row, metrics and a log line; never raises (a lost row is counted by the trace store)."""
        try:
            row = {
                "workflow_id": call.workflow_id, "stage": call.stage, "call_id": f"{self.run_id}-{call.call_id}",
                "model": call.model, "backend": backend, "prompt_tokens": call.prompt_tokens,
                "completion_tokens": completion_tokens, "queued_at": self.wall(call.arrival_s),
                "dispatched_at": self.wall(call.dispatched_s), "first_token_at": self.wall(first_token_at),
                "ended_at": self.wall(now), "status": status, "error": err, "confidences": call.confidences,
                "pred_call_tokens": call.pred_call_tokens, "pred_remaining_tokens": call.pred_remaining_tokens,
                "policy": self.policy_name, "kind": call.kind,
            }
            self.trace.log_call({**row, "prompt": call.prompt})  # the router's prompt text: trace only, not the log
            self.metrics.requests.labels(call.model or "", status).inc()
            if status == "ok":
                self.metrics.latency.labels(call.model).observe(now - call.arrival_s)
            if log.isEnabledFor(logging.INFO):
                log.info(json.dumps({"event": "call", **row, "latency_s": round(now - call.arrival_s, 4),
                                     "priority": call.priority}, ensure_ascii=True, allow_nan=True))
        except Exception:
            log.exception("could not record call %s", call.call_id)
