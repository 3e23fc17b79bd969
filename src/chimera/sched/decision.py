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
