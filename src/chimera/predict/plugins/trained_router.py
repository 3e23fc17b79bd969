"""`router`: the trained semantic router of a `chimera train` folder, read under the served models' names."""

from __future__ import annotations

from typing import Any

from chimera.predict.context import AssemblyContext
from chimera.predict.registry import ConfidenceFactory, register_confidence


@register_confidence("router")
class TrainedRouter(ConfidenceFactory):
    """RouterConfidence over the context's trained router (served name -> trained name: `trained_names`)."""

    shared = True

    def build(self, ctx: AssemblyContext) -> Any:
        from chimera.predict.router import RouterConfidence  # scikit-learn: imported only when used

        return RouterConfidence(ctx.need_trained("confidence predictor 'router'").router, ctx.trained_names())
