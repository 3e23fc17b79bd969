"""`stage-mean`: mean output tokens by (kind, stage, model) over training workflow plans."""

from __future__ import annotations

from chimera.predict.context import AssemblyContext
from chimera.predict.priors import StageMeanLength
from chimera.predict.registry import LengthFactory, register_length


@register_length("stage-mean")
class StageMean(LengthFactory):
    """StageMeanLength fit on the context's training plans (at least one is needed)."""

    shared = True

    def build(self, ctx: AssemblyContext) -> StageMeanLength:
        if not ctx.train_plans:
            raise ValueError("length predictor 'stage-mean' needs training workflow plans to fit on")
        return StageMeanLength(ctx.names).fit(ctx.train_plans)
