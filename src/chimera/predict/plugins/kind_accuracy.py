"""`kind-accuracy`: each model's mean score on labelled training tasks of the call's kind (the simulator's priors)."""

from __future__ import annotations

from pydantic import Field

from chimera.predict.context import AssemblyContext
from chimera.predict.priors import KindAccuracyRouter
from chimera.predict.registry import ConfidenceFactory, PredictorParams, register_confidence


@register_confidence("kind-accuracy")
class KindAccuracy(ConfidenceFactory):
    """KindAccuracyRouter fit on the context's training tasks (none: every model at 0.5)."""

    shared = True

    class Params(PredictorParams):
        smoothing: float = Field(default=1.0, ge=0.0)  # Laplace smoothing of the per-kind means

    def build(self, ctx: AssemblyContext) -> KindAccuracyRouter:
        return KindAccuracyRouter(ctx.names, self.params.smoothing).fit(ctx.train_tasks)
