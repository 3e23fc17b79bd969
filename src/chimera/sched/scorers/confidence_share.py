"""Expected score contribution: this call's predicted share of the workflow's output × the model's confidence."""

from __future__ import annotations

import numpy as np

from chimera.sched.plugin import register_scorer
from chimera.sched.scorers.base import Scorer


@register_scorer("confidence_share")
class ConfidenceShare(Scorer):
    """w·confidence(m), w = predicted call tokens / predicted workflow tokens: a tiny final-answer call must not
    claim the large model at the cost of the long reasoning call."""

    def score(self, call, now, prediction, allowed, policy) -> np.ndarray:
        conf, call_tok, rem_tok = prediction
        share = call_tok / np.maximum(call.generated_so_far + rem_tok, 1.0)
        return share * conf
