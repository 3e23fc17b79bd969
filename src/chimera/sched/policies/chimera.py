"""Chimera's policy: route by a weighted sum of scorers (confidence share − λ·expected latency), order workflows
shortest-total-job-first with aging."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

import chimera.sched.scorers  # noqa: F401  (registers the built-in scorers)
from chimera.sched.plugin import POLICY_REGISTRY, SCORER_REGISTRY, register_policy
from chimera.sched.policy import Policy, PolicyParams
from chimera.sched.scorers.expected_latency import ExpectedLatency
from chimera.sched.types import Call, Prediction


@register_policy("chimera")
class ChimeraPolicy(Policy):
    """The paper's scheduler (arXiv 2603.22206), with switches for the ablations.

    Value of model m = Σ weight·scorer(m); by default confidence_share (weight 1) and expected_latency (weight −λ),
    i.e. w·confidence(m) − λ·expected latency(m). `scorers` adds or re-weights scorers by name.
    Priority = predicted remaining output tokens of the whole workflow on the chosen model (STJF);
    a call waiting longer than `starve_s` is promoted, and its workflow stays ahead for `quantum_s`.
    """

    needs_predictions = True

    class Params(PolicyParams):
        lam: float = Field(default=0.02, ge=0.0)  # accuracy traded per second of expected latency
        route: bool = True  # False: the fastest model (least expected latency) only
        stjf: bool = True  # False: FCFS queue order
        job: Literal["workflow", "call"] = "workflow"  # shortest job = the workflow's remaining tokens (STJF), or
        # this call's predicted tokens (per-call SJF, for comparison)
        load: bool = True  # False: expected latency without the congestion term
        # The congestion term (scorers/expected_latency.py): "throughput" = in-flight predicted tokens / a fixed
        # busy-batch throughput (the paper's); "batch" = the TPOT of the batch the call joins (the model's speed
        # curve) + queueing beyond the batch a replica can run; `externality`: weight of the slowdown the call's
        # joining costs the calls already running ("batch" only).
        congestion: Literal["throughput", "batch"] = "throughput"
        externality: float = Field(default=0.0, ge=0.0)
        # Workflow affinity (docs/policies.md): the prefill term counts only the prompt a model does not hold
        # (Call.cached_tokens), and a dispatched call goes to the replica holding its context unless that replica's
        # load (running + waiting calls) exceeds the least-loaded one's by more than `affinity_margin` calls.
        affinity: bool = False
        affinity_margin: float = Field(default=4.0, ge=0.0)
        # The share of the time this call's prefill stalls the calls already on a model (its prompt not cached there
        # × the calls on it / its prefill rate) added to the expected latency: the cost a switch puts on the batch.
        prefill_externality: float = Field(default=0.0, ge=0.0)
        # In-flight tokens conditional on each call's run time (scorers/expected_latency.py): a running call owes its
        # prediction less what its time has produced, and past its prediction `overrun` × what it has produced.
        # None: every in-flight call owes its whole prediction until it ends (the paper's).
        overrun: float | None = Field(default=None, ge=0.0)
        starve_s: float | None = 30.0
        quantum_s: float = 10.0
        scorers: dict[str, float] = Field(default_factory=dict)  # name -> weight, over the defaults above

        @field_validator("scorers")
        @classmethod
        def _known(cls, v: dict[str, float]) -> dict[str, float]:
            unknown = [n for n in v if n not in SCORER_REGISTRY]
            if unknown:
                raise ValueError(f"unknown scorer(s) {unknown}; registered: {', '.join(SCORER_REGISTRY.names())}")
            return v

    def weights(self) -> dict[str, float]:
        """The scorer weights in use: the defaults (confidence_share 1, expected_latency −λ) updated by `scorers`."""
        return {"confidence_share": 1.0, "expected_latency": -self.lam, **self.params.scorers}

    def bind(self, models) -> None:
        super().bind(models)
        self._latency = ExpectedLatency()
        self._latency.congestion = self.congestion if self.load else None
        self._latency.externality = self.externality
        self._latency.affinity = self.affinity
        self._latency.prefill_externality = self.prefill_externality
        self._latency.overrun = self.overrun
        self._latency.bind(self)
        self._weighted: list[tuple[str, Any, float]] = []
        for name, w in self.weights().items():
            scorer = self._latency if name == "expected_latency" else SCORER_REGISTRY.get(name).cls()
            if scorer is not self._latency:
                scorer.bind(self)
            self._weighted.append((name, scorer, w))

    def routing_weights(self) -> dict[str, float]:
        return self.weights()

    def speeds_changed(self) -> None:
        """The scorers read speed figures at bind: bind them again to the new ones (the load monitor is kept)."""
        for _, scorer, _ in self._weighted:
            scorer.bind(self)

    def expected_latency(self, call_tok: np.ndarray, prompt_tokens: int = 0) -> np.ndarray:
        return self._latency.seconds(call_tok, prompt_tokens, self.monitor)

    def choose(self, call: Call, now: float, conf, call_tok, rem_tok, allowed) -> int:
        pred = Prediction(conf, call_tok, rem_tok)
        if not self.route:
            lat = self._latency.score(call, now, pred, allowed, self)
            return int(self.only_allowed(lat, allowed, np.inf).argmin())
        value = None
        log_terms = self.explorer() is not None  # off-policy evaluation reads what was weighed
        terms = {}
        for name, scorer, w in self._weighted:
            term = scorer.score(call, now, pred, allowed, self)
            if log_terms:
                terms[name] = {m: float(v) for m, v, ok in zip(self.names, term.tolist(), allowed) if ok}
            if w != 1.0:  # 1·x is x exactly: skip the multiply
                term = w * term
            value = term if value is None else value + term
        if log_terms:
            self.last_terms = terms
        return int(self.only_allowed(value, allowed, -np.inf).argmax())

    def key(self, call: Call, now: float) -> float:
        if not self.stjf:
            return call.arrival_s
        return call.pred_remaining_tokens if self.job == "workflow" else call.pred_call_tokens


# Presets the benchmarks report under their own names (one line each).
POLICY_REGISTRY.preset("chimera-oracle", "chimera", predictions="oracle")
POLICY_REGISTRY.preset("chimera-no-route", "chimera", route=False)
POLICY_REGISTRY.preset("chimera-no-stjf", "chimera", stjf=False)
POLICY_REGISTRY.preset("chimera-no-load", "chimera", load=False)
