"""`running-mean`: per-stage mean lengths learnt online from completions, from a cold start (the gateway's default)."""

from __future__ import annotations

from chimera.predict.context import AssemblyContext
from chimera.predict.priors import RunningLength
from chimera.predict.registry import LengthFactory, register_length


@register_length("running-mean")
class RunningMean(LengthFactory):
    """A fresh RunningLength per build: it learns as calls complete (the admission core feeds its `learn`)."""

    def build(self, ctx: AssemblyContext) -> RunningLength:
        return RunningLength(ctx.names)
