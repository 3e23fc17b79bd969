"""What a routing scorer is: one value per model for a call; Chimera routes to the best weighted sum."""

from __future__ import annotations

from typing import Any

import numpy as np

from chimera.sched.types import Call, Prediction


class Scorer:
    """Scores every model for a call (higher = better before weighting; a cost takes a negative weight).

    `bind` runs once per policy with the policy itself (models, speeds, load monitor), `score` per call.
    """

    name = "scorer"

    def bind(self, policy: Any) -> None:
        """Read what the scorer needs from the bound policy (model order, speed figures)."""

    def score(self, call: Call, now: float, prediction: Prediction, allowed: np.ndarray, policy: Any) -> np.ndarray:
        raise NotImplementedError
