"""`size-prior`: confidence by model size, for a cold start with no training data (the gateway's default)."""

from __future__ import annotations

from chimera.predict.context import AssemblyContext
from chimera.predict.priors import SizePriorConfidence
from chimera.predict.registry import ConfidenceFactory, register_confidence


@register_confidence("size-prior")
class SizePrior(ConfidenceFactory):
    """0.5 for the smallest model to 0.9 for the largest (ModelInfo.size_rank): bigger models are usually right more."""

    def build(self, ctx: AssemblyContext) -> SizePriorConfidence:
        return SizePriorConfidence(ctx.models)
