"""The one interface every scheduling policy implements; the simulator and the gateway drive it the same way.

Protocol of a body: `bind(models)` once; per call `submit(call, now)` (routes and enqueues), then whenever a
backend of `model` has room, `next_call(model, now)`; report `on_progress`, `on_complete` or `on_fail`, or
`withdraw` a call that leaves before it was dispatched.
Preemptive policies (LTR, MLFQ) also rank running work inside the engine through `engine_key`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chimera.sched.predictors import ConfidencePredictor, LengthPredictor
from chimera.sched.monitor import LoadMonitor
from chimera.sched.queue import WaitQueue
from chimera.sched.types import Call, ModelInfo, Prediction

PROMOTED = -1e18  # priority of calls of a workflow promoted by aging: ahead of everything else


class Policy:
    """Base policy: FCFS order, no routing preference; subclasses override `choose` and `key`."""

    name = "base"
    preemptive = False  # True: the engine re-ranks waiting *and running* sequences by `engine_key`
    needs_predictions = False

    def __init__(
        self,
        confidence: ConfidencePredictor | None = None,
        length: LengthPredictor | None = None,
        starve_s: float | None = None,
        quantum_s: float = 0.0,
    ) -> None:
        self.confidence = confidence
        self.length = length
        self.starve_s = starve_s
        self.quantum_s = quantum_s
        self.models: list[ModelInfo] = []

    # ---- set-up -------------------------------------------------------------------------------------------
    def bind(self, models: Sequence[ModelInfo]) -> None:
        """Attach to a cluster; must be called before the first `submit`."""
        if not models:
            raise ValueError("a policy needs at least one model")
        self.models = list(models)
        self.names = [m.name for m in models]
        self.index = {m.name: i for i, m in enumerate(models)}
        self.queues = {m.name: WaitQueue(self.starve_s) for m in models}
        self.monitor = LoadMonitor(self.names)
        self._promoted_until: dict[str, float] = {}
        self.decisions: dict[str, int] = {m.name: 0 for m in models}
        # Column order of each predictor's output -> this policy's model order (computed once, used per call).
        self._cols = {}
        for pred in (self.confidence, self.length):
            if pred is not None and list(pred.models_) != self.names:
                missing = [n for n in self.names if n not in pred.models_]
                if missing:
                    raise ValueError(f"predictor {type(pred).__name__} has no column for models {missing}")
                self._cols[id(pred)] = [list(pred.models_).index(n) for n in self.names]

    def prepare(self, train_calls: Sequence[Call]) -> None:
        """Calibrate on calls from training tasks (RouteLLM's threshold); default: nothing to do."""

    # ---- predictions ---------------------------------------------------------------------------------------
    def _columns(self, pred, values: np.ndarray) -> np.ndarray:
        idx = self._cols.get(id(pred))
        return values if idx is None else values[:, idx]

    def predict(self, call: Call) -> Prediction:
        """(confidence, call tokens, remaining workflow tokens), each one value per model in `self.names`."""
        n = len(self.names)
        if self.confidence is not None:
            conf = self._columns(self.confidence, self.confidence.predict_confidence([call]))[0]
        else:
            conf = np.full(n, 0.5)
        if self.length is not None:
            c, r = self.length.predict_lengths([call])
            call_tok, rem_tok = self._columns(self.length, c)[0], self._columns(self.length, r)[0]
        else:
            call_tok = rem_tok = np.zeros(n)
        return Prediction(conf, call_tok, rem_tok)

    # ---- decisions (override) -----------------------------------------------------------------------------
    def choose(self, call: Call, now: float, conf: np.ndarray, call_tok: np.ndarray, rem_tok: np.ndarray,
               allowed: np.ndarray) -> int:
        """Index of the model to route to, among those `allowed` (a bool mask: models that can take a call now)."""
        return int(np.argmax(allowed))

    def key(self, call: Call, now: float) -> float:
        """Queue order: lower first. Default FCFS by arrival at the gateway."""
        return call.arrival_s

    def engine_key(self, call: Call, generated: int, waited_steps: int, now: float) -> float:
        """Rank inside a preemptive engine (lower runs first); only used when `preemptive`."""
        return call.priority

    # ---- the body-facing protocol -------------------------------------------------------------------------
    def submit(self, call: Call, now: float, prediction: Prediction | None = None,
               allowed: Sequence[str] | None = None) -> str:
        """Route the call (unless pinned) among the `allowed` models (default all), record the inputs of the
        decision, and enqueue it. `prediction` is used when the body computed it already (else computed here)."""
        conf = call_tok = rem_tok = None
        if self.needs_predictions:
            conf, call_tok, rem_tok = prediction if prediction is not None else self.predict(call)
        if call.pinned_model is not None:
            if call.pinned_model not in self.index:
                raise KeyError(f"unknown model {call.pinned_model!r}; serving {self.names}")
            i = self.index[call.pinned_model]
        else:
            mask = np.ones(len(self.names), dtype=bool)
            if allowed is not None:
                mask[:] = False
                mask[[self.index[m] for m in allowed]] = True
                if not mask.any():
                    raise ValueError("submit: no allowed model")
            i = self.choose(call, now, conf, call_tok, rem_tok, mask)
        name = self.names[i]
        call.model = name
        if conf is not None:
            call.confidences = dict(zip(self.names, conf.tolist()))
            call.pred_call_tokens = float(call_tok[i])
            call.pred_remaining_tokens = float(rem_tok[i])
        until = self._promoted_until.get(call.workflow_id)
        if until is not None and now < until:
            call.priority = PROMOTED + call.arrival_s
        else:
            call.priority = self.key(call, now)
        call.enqueued_s = now
        self.monitor.add(call)
        self.queues[name].push(call, call.priority)
        self.decisions[name] += 1
        return name

    def next_call(self, model: str, now: float) -> Call | None:
        """The call to dispatch next to a backend of `model` that has room, or None."""
        got = self.queues[model].pop(now)
        if got is None:
            return None
        call, promoted = got
        if promoted:
            call.priority = PROMOTED + call.arrival_s
            if self.quantum_s > 0:
                self._promoted_until[call.workflow_id] = now + self.quantum_s
        call.dispatched_s = now
        return call

    def waiting(self, model: str) -> int:
        return len(self.queues[model])

    def on_progress(self, call: Call, new_tokens: int, now: float) -> None:
        call.tokens_seen += new_tokens
        self.monitor.progress(call, new_tokens)

    def on_complete(self, call: Call, now: float) -> None:
        self.monitor.remove(call)

    def on_fail(self, call: Call, now: float) -> None:
        self.monitor.remove(call)

    def withdraw(self, call: Call, now: float) -> bool:
        """Take a call that was never dispatched out of its queue and out of the load monitor; True if it waited."""
        waited = call.model is not None and self.queues[call.model].remove(call)
        self.monitor.remove(call)
        return waited

    def on_workflow_end(self, workflow_id: str) -> None:
        self._promoted_until.pop(workflow_id, None)
