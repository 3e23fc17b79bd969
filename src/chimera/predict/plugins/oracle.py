"""`oracle`: true scores and true lengths, read from the simulator's ground truth (an upper bound, not deployable)."""

from __future__ import annotations

from chimera.predict.context import AssemblyContext
from chimera.predict.oracle import OracleConfidence, OracleLength
from chimera.predict.registry import ConfidenceFactory, LengthFactory, register_confidence, register_length


@register_confidence("oracle")
class OracleScores(ConfidenceFactory):
    """Each model's true score on the call's workflow."""

    needs_truth = True

    def build(self, ctx: AssemblyContext) -> OracleConfidence:
        return OracleConfidence(ctx.names, ctx.need_truth("confidence predictor 'oracle'"))


@register_length("oracle")
class OracleLengths(LengthFactory):
    """Each model's true tokens for this call and the rest of its workflow."""

    needs_truth = True

    def build(self, ctx: AssemblyContext) -> OracleLength:
        return OracleLength(ctx.names, ctx.need_truth("length predictor 'oracle'"))
