"""What a policy decided for one call, and the inputs it used, as one value the bodies can read or log."""

from __future__ import annotations

from typing import Mapping, NamedTuple


class Decision(NamedTuple):
    """Model, queue priority and the predictions behind them (None where the policy used no predictions)."""

    model: str
    priority: float
    confidences: Mapping[str, float] | None = None
    pred_call_tokens: float | None = None  # on the chosen model
    pred_remaining_tokens: float | None = None  # the rest of the workflow, this call included, on the chosen model
    promoted: bool = False  # the workflow was within its aging quantum: served ahead of everything else
    # Exploration (a confidence predictor that explores, chimera.sched.predictors.Explorer): the probability this
    # choice had, whether the exploration coin said explore, and the exploration probability in force. Off-policy
    # evaluation reweights logged outcomes by these.
    propensity: float = 1.0
    explored: bool = False
    epsilon: float = 0.0
    # What the routing weighed: per scorer, per allowed model, the unweighted value, and the weights used; a candidate
    # policy with other weights (another λ) recomputes its choice from these.
    terms: Mapping[str, Mapping[str, float]] | None = None
    weights: Mapping[str, float] | None = None
