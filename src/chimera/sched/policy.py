"""The one interface every scheduling policy implements; the simulator and the gateway drive it the same way.

Protocol (driven by chimera.sched.admission.Admission in both bodies): `bind(models)` once; per call `admit(call,
now, prediction)` (routes, enqueues, returns the Decision), then whenever a backend of `model` has room,
`next_call(model, now)`; report `on_progress`, `on_complete` or `on_fail`, or `withdraw` a call that leaves before it
was dispatched.
Preemptive policies (LTR, MLFQ) also rank running work inside the engine through `engine_key`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from chimera.sched.affinity import pick_replica
from chimera.sched.predictors import ConfidencePredictor, Explorer, LengthPredictor
from chimera.sched.decision import Decision
from chimera.sched.monitor import LoadMonitor
from chimera.sched.plugin import parse_params
from chimera.sched.queue import WaitQueue
from chimera.sched.types import Call, ModelInfo, Prediction

PROMOTED = -1e18  # priority of calls of a workflow promoted by aging: ahead of everything else


class PolicyParams(BaseModel):
    """Parameters every policy takes (aging); a policy's `Params` subclasses this. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    starve_s: float | None = None  # a call waiting longer is promoted (None: never)
    quantum_s: float = 0.0  # a promoted workflow stays ahead this long


class Policy:
    """Base policy: FCFS order, no routing preference; subclasses override `choose` and `key`.

    Parameters are validated by the class's `Params` and become attributes of the same names.
    """

    name = "base"
    Params: ClassVar[type[PolicyParams]] = PolicyParams
    # Capabilities the bodies read.
    preemptive: ClassVar[bool] = False  # True: the engine re-ranks waiting *and running* sequences by `engine_key`
    needs_predictions: ClassVar[bool] = False  # True: `submit` uses a Prediction (computed here if not passed in)
    # Workflow affinity (a policy's params may set these): True makes the bodies fill `Call.cached_tokens` and ask
    # `pick_replica` where a dispatched call runs; off, they place on the least-loaded replica as before.
    affinity: bool = False
    affinity_margin: float = 0.0

    def __init__(
        self,
        confidence: ConfidencePredictor | None = None,
        length: LengthPredictor | None = None,
        **params: Any,
    ) -> None:
        self.confidence = confidence
        self.length = length
        self.params = parse_params(self.Params, params, self.name)
        for key in type(self.params).model_fields:
            setattr(self, key, getattr(self.params, key))
        self.models: list[ModelInfo] = []
        self.last_decision: Decision | None = None
        # What `choose` weighed for the call being admitted (per scorer, per allowed model; set by policies that
        # score, only while an Explorer is in use: off-policy evaluation needs it, nothing else does).
        self.last_terms: dict[str, dict[str, float]] | None = None
        self._explorer_of: Any = None  # the confidence predictor `_explorer` was read from (a reload may swap it)
        self._explorer: Explorer | None = None

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
        # The `allowed` mask when a body narrows nothing (the simulator, always): built once, read-only, and known by
        # identity so a policy can skip masking (`only_allowed`).
        self.every_model = np.ones(len(models), dtype=bool)
        self.every_model.flags.writeable = False
        # Column order of each predictor's output -> this policy's model order (computed once, used per call).
        self._cols: dict[int, list[int]] = {}
        for pred in (self.confidence, self.length):
            if pred is not None:
                self._map_columns(pred)

    def _map_columns(self, pred: ConfidencePredictor | LengthPredictor) -> None:
        """Where each of this policy's models is in the predictor's output (nothing kept when the orders agree)."""
        if list(pred.models_) == self.names:
            self._cols.pop(id(pred), None)  # a stale entry of a dead predictor that had this id
            return
        missing = [n for n in self.names if n not in pred.models_]
        if missing:
            raise ValueError(f"predictor {type(pred).__name__} has no column for models {missing}")
        self._cols[id(pred)] = [list(pred.models_).index(n) for n in self.names]

    def update_speeds(self, models: Sequence[ModelInfo]) -> None:
        """New speed figures for the bound models, in their order (a body that measures its backends pushes them
        in): only tokens_per_s, tpot_s, prefill_tokens_per_s and speed_curve are taken; names, capacity and size
        stay as bound, and queues and load are kept."""
        if [m.name for m in models] != self.names:
            raise ValueError(f"update_speeds: models {[m.name for m in models]} are not the bound {self.names}")
        self.models = [replace(old, tokens_per_s=m.tokens_per_s, tpot_s=m.tpot_s,
                               prefill_tokens_per_s=m.prefill_tokens_per_s, speed_curve=m.speed_curve)
                       for old, m in zip(self.models, models)]
        self.speeds_changed()

    def speeds_changed(self) -> None:
        """Re-read the speed figures of `self.models` wherever `bind` cached them; default: nothing cached."""

    def use_length(self, length: LengthPredictor) -> None:
        """Replace the length predictor (a body wrapping or reloading it). Its column order is set before it is
        installed, so a prediction running on another thread reads either the old predictor or the new one whole."""
        self._map_columns(length)
        self.length = length

    def use_predictors(self, confidence: ConfidencePredictor | None, length: LengthPredictor | None) -> None:
        """Route with other predictors from the next call on (a gateway's reload): queues, load and decisions stay.
        Their column orders are set before they are installed; a predictor that lacks a column for a bound model is
        refused (ValueError) and nothing is installed."""
        for pred in (confidence, length):
            if pred is not None:
                self._map_columns(pred)
        self.confidence, self.length = confidence, length

    def prepare(self, train_calls: Sequence[Call]) -> None:
        """Calibrate on calls from training tasks (RouteLLM's threshold); default: nothing to do."""

    def needs_calibration(self) -> str | None:
        """The parameter `prepare` would still have to calibrate (a body without training calls must be given
        it), or None when the policy is ready as configured."""
        return None

    # ---- predictions ---------------------------------------------------------------------------------------
    def _row(self, pred, values: np.ndarray) -> np.ndarray:
        """The one call's row of a predictor's output, in this policy's model order."""
        idx = self._cols.get(id(pred))
        return values[0] if idx is None else values[0, idx]

    def predict(self, call: Call) -> Prediction:
        """(confidence, call tokens, remaining workflow tokens), each one value per model in `self.names`."""
        n = len(self.names)
        if self.confidence is not None:
            conf = self._row(self.confidence, self.confidence.predict_confidence([call]))
        else:
            conf = np.full(n, 0.5)
        if self.length is not None:
            c, r = self.length.predict_lengths([call])
            call_tok, rem_tok = self._row(self.length, c), self._row(self.length, r)
        else:
            call_tok = rem_tok = np.zeros(n)
        return Prediction(conf, call_tok, rem_tok)

    def explorer(self) -> Explorer | None:
        """The confidence predictor when it explores (chimera.sched.predictors.Explorer), else None; re-read when
        the predictor was swapped (a reload)."""
        if self.confidence is not self._explorer_of:
            self._explorer_of = self.confidence
            self._explorer = self.confidence if isinstance(self.confidence, Explorer) else None
        return self._explorer

    def routing_weights(self) -> dict[str, float] | None:
        """Weight of each scorer in the routing value (policies that score; None for the others)."""
        return None

    # ---- decisions (override) -----------------------------------------------------------------------------
    def choose(self, call: Call, now: float, conf: np.ndarray, call_tok: np.ndarray, rem_tok: np.ndarray,
               allowed: np.ndarray) -> int:
        """Index of the model to route to, among those `allowed` (a bool mask: models that can take a call now)."""
        return int(np.argmax(allowed))

    def only_allowed(self, values: np.ndarray, allowed: np.ndarray, fill: float) -> np.ndarray:
        """`values` with the models not `allowed` set to `fill` (what `choose` must never pick); as is when every model
        is allowed, which saves the masking on every call of a simulation."""
        return values if allowed is self.every_model else np.where(allowed, values, fill)

    def key(self, call: Call, now: float) -> float:
        """Queue order: lower first. Default FCFS by arrival at the gateway."""
        return call.arrival_s

    def engine_key(self, call: Call, generated: int, waited_steps: int, now: float) -> float:
        """Rank inside a preemptive engine (lower runs first); only used when `preemptive`."""
        return call.priority

    # ---- the body-facing protocol -------------------------------------------------------------------------
    def submit(self, call: Call, now: float, prediction: Prediction | None = None,
               allowed: Sequence[str] | None = None) -> str:
        """`admit`, returning only the model name (the bodies run `Admission`, which keeps the whole Decision)."""
        return self.admit(call, now, prediction, allowed).model

    def admit(self, call: Call, now: float, prediction: Prediction | None = None,
              allowed: Sequence[str] | None = None) -> Decision:
        """Route the call (unless pinned) among the `allowed` models (default all), enqueue it, and return the
        Decision with the inputs it used. `prediction` is used when the body obtained it (else computed here)."""
        conf = call_tok = rem_tok = None
        if self.needs_predictions:
            conf, call_tok, rem_tok = prediction if prediction is not None else self.predict(call)
        explored: list = [1.0, False, 0.0]  # (propensity, explored, epsilon)
        self.last_terms = None
        if call.pinned_model is not None:
            if call.pinned_model not in self.index:
                raise KeyError(f"unknown model {call.pinned_model!r}; serving {self.names}")
            i = self.index[call.pinned_model]
        else:
            mask = self.every_model
            if allowed is not None:
                mask = np.zeros(len(self.names), dtype=bool)
                mask[[self.index[m] for m in allowed]] = True
                if not mask.any():
                    raise ValueError("submit: no allowed model")
            i = self.choose(call, now, conf, call_tok, rem_tok, mask)
            explorer = self.explorer()
            if explorer is not None:
                i, *explored = explorer.explore(call, i, mask)
        decision = self.decide(call, now, i, conf, call_tok, rem_tok)
        if explored[0] != 1.0 or explored[1] or self.last_terms is not None:
            decision = decision._replace(propensity=explored[0], explored=explored[1], epsilon=explored[2],
                                         terms=self.last_terms, weights=self.routing_weights())
        call.priority = decision.priority
        call.enqueued_s = now
        self.last_decision = decision
        self.monitor.add(call)
        self.queues[decision.model].push(call, call.priority)
        self.decisions[decision.model] += 1
        return decision

    def decide(self, call: Call, now: float, i: int, conf: np.ndarray | None, call_tok: np.ndarray | None,
               rem_tok: np.ndarray | None) -> Decision:
        """The Decision for routing `call` to model `i`. Its inputs are written on the call before the priority is
        computed, since the queue order (`key`) reads them; the body reads the rest from the Decision or the call."""
        name = self.names[i]
        call.model = name
        confidences = pc = pr = None
        if conf is not None:
            confidences = call.confidences = dict(zip(self.names, conf.tolist()))
            pc = call.pred_call_tokens = float(call_tok[i])
            pr = call.pred_remaining_tokens = float(rem_tok[i])
        until = self._promoted_until.get(call.workflow_id)
        promoted = until is not None and now < until
        priority = PROMOTED + call.arrival_s if promoted else self.key(call, now)
        return Decision(name, priority, confidences, pc, pr, promoted)

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

    def requeue(self, call: Call) -> None:
        """Put a call taken by `next_call` back in its model's queue with its priority (the body could not place it)."""
        assert call.model is not None
        call.dispatched_s = None
        self.queues[call.model].push(call, call.priority)

    def pick_replica(self, loads: Sequence[float], cached: Sequence[int] | None = None) -> int:
        """Which replica of the call's model runs it, from each replica's load and the prompt tokens it holds for the
        call (chimera.sched.affinity): with affinity, the holder unless its load exceeds the least-loaded's by more
        than `affinity_margin`; without, the least-loaded."""
        return pick_replica(loads, cached if self.affinity else None, self.affinity_margin)

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


class RoundRobinMixin:
    """Spread calls over models in turn, as a plain load balancer in front of vLLM does."""

    _rr = 0

    def choose(self, call, now, conf, call_tok, rem_tok, allowed) -> int:  # type: ignore[override]
        n = len(allowed)
        for k in range(n):  # the next allowed model in turn
            i = (self._rr + k) % n
            if allowed[i]:
                self._rr += k + 1
                return i
        raise ValueError("no allowed model")
