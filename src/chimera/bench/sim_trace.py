"""A simulated run written as a gateway trace store: the same rows `chimera serve` writes (serve/trace.py), from the
admission core's record of events, so `chimera eval traces` and `chimera train --traces` read a simulated run exactly
as they read a live one. Times are the simulator's virtual seconds (from 0), not wall-clock epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chimera.sched.admission import (Completed, Dispatched, Event, Failed, Progressed, Scored, Submitted,
                                     Withdrawn)
from chimera.serve.records import routing_columns
from chimera.serve.trace import TraceStore

_CHECK_EVERY = 1000  # rows between looks at the writer's backlog
_MAX_BACKLOG = 50_000  # beyond this many unwritten rows the run waits for the writer (the store never drops a row)


class TraceExists(ValueError):
    """The trace file exists already: one store holds one run (workflow ids repeat between runs)."""


class SimTraceWriter:
    """The simulator's `record` hook: one trace row per call when its life ends (completed, failed or withdrawn),
    one feedback row per workflow score. Call `close` when the run is over."""

    def __init__(self, path: str | Path, policy: str, run_id: str = "sim") -> None:
        path = Path(path)
        if path.exists():
            raise TraceExists(f"{path}: the trace file exists; give a new file (a store holds one run)")
        self.path, self.policy, self.run_id = path, policy, run_id
        self.store = TraceStore(path, max_backlog=2 * _MAX_BACKLOG)
        self._open: dict[int, dict[str, Any]] = {}  # call_id -> its row, from submit until its life ends
        self._rows = 0

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, Submitted):
            self._submitted(ev)
        elif isinstance(ev, Dispatched):
            row = self._open.get(ev.call_id)
            if row is not None:
                row["dispatched_at"] = ev.now
        elif isinstance(ev, Progressed):
            row = self._open.get(ev.call_id)
            if row is not None:
                row["completion_tokens"] += ev.tokens
        elif isinstance(ev, Completed):
            self._ended(ev.call_id, ev.now, "ok", ev.tokens)
        elif isinstance(ev, Failed):
            self._ended(ev.call_id, ev.now, "error", 0)
        elif isinstance(ev, Withdrawn):
            self._ended(ev.call_id, ev.now, "cancelled", 0)
        elif isinstance(ev, Scored):
            self.store.log_feedback(ev.workflow_id, ev.score, at=ev.now)
            self._count()

    def _submitted(self, ev: Submitted) -> None:
        call, d = ev.call, ev.decision
        self._open[call["call_id"]] = {
            "workflow_id": call["workflow_id"], "stage": call["stage"], "call_id": f"{self.run_id}-{call['call_id']}",
            "model": d.model, "prompt_tokens": call["prompt_tokens"], "completion_tokens": 0,
            "queued_at": ev.now, "confidences": None if d.confidences is None else dict(d.confidences),
            "pred_call_tokens": d.pred_call_tokens, "pred_remaining_tokens": d.pred_remaining_tokens,
            "policy": self.policy, "kind": call["kind"], "prompt": call["prompt"], **routing_columns(d),
        }

    def _ended(self, call_id: int, now: float, status: str, tokens: int) -> None:
        row = self._open.pop(call_id, None)
        if row is None:
            return
        row.update(ended_at=now, status=status)
        row["completion_tokens"] += tokens
        self.store.log_call(row)
        self._count()

    def _count(self) -> None:
        self._rows += 1
        if self._rows % _CHECK_EVERY == 0 and self.store.stats()["backlog"] > _MAX_BACKLOG:
            self.store.flush(timeout=60.0)

    def close(self) -> dict[str, Any]:
        """Write what is queued and close the store; its counts (`dropped` > 0 would mean rows were lost)."""
        self.store.flush(timeout=60.0)
        stats = self.store.stats()
        self.store.close()
        return {"path": str(self.path), "calls_open": len(self._open), **stats}
