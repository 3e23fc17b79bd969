"""RouteLLM-style threshold routing between the strongest model and the rest."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from pydantic import Field

from chimera.sched.plugin import register_policy
from chimera.sched.policy import Policy, PolicyParams
from chimera.sched.types import Call


@register_policy("routellm")
class RouteLLMPolicy(Policy):
    """The strongest model when its confidence clears a threshold, else the most confident of the rest; FCFS.

    The threshold is calibrated on training calls (`prepare`) so that `strong_share` of calls go to the strongest
    model, unless given.
    """

    needs_predictions = True

    class Params(PolicyParams):
        strong_share: float = Field(default=0.5, ge=0.0, le=1.0)
        threshold: float | None = None  # fixed threshold (skips calibration)

    def bind(self, models) -> None:
        super().bind(models)
        self.strong = max(range(len(self.models)), key=lambda i: self.models[i].size_rank)

    def prepare(self, train_calls: Sequence[Call]) -> None:
        if self.threshold is not None or not train_calls:
            return
        strong_conf = np.array([self.predict(c)[0][self.strong] for c in train_calls])
        # Ties (e.g. per-kind priors) make an exact share impossible; >= threshold sends the whole tie strong.
        self.threshold = float(np.quantile(strong_conf, 1.0 - self.strong_share)) if self.strong_share < 1 else -math.inf

    def needs_calibration(self) -> str | None:
        return "threshold" if self.threshold is None else None

    def choose(self, call, now, conf, call_tok, rem_tok, allowed) -> int:
        thr = self.threshold if self.threshold is not None else 0.5
        rest = [i for i in range(len(self.models)) if i != self.strong and allowed[i]]
        if allowed[self.strong] and (not rest or conf[self.strong] >= thr):
            return self.strong
        return max(rest, key=lambda i: conf[i])
