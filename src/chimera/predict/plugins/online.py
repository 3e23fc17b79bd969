"""`online`: confidence learnt from the gateway's own workflow scores (bandit feedback), with exploration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from chimera.predict.bandit import LinearBandit
from chimera.predict.context import AssemblyContext
from chimera.predict.registry import ConfidenceFactory, PredictorParams, confidence_factory, register_confidence

# The prior the learner corrects: model size (a cold start, no labels), per-kind accuracy fit on the context's
# labelled tasks, or the context's trained router.
WARM_STARTS = {"size": "size-prior", "priors": "kind-accuracy", "router": "router"}


@register_confidence("online")
class Online(ConfidenceFactory):
    """A fresh LinearBandit per build (it learns as scores arrive; the admission core feeds it)."""

    class Params(PredictorParams):
        warm: Literal["size", "priors", "router"] = "size"
        explore_start: float = Field(default=0.2, ge=0.0, le=1.0)  # exploration probability at the start
        explore_decay: float = Field(default=500.0, gt=0.0)  # decisions over which it falls as 1/sqrt(1 + n/decay)
        explore_min: float = Field(default=0.02, ge=0.0, le=1.0)  # floor: every model keeps some chance
        budget: float = Field(default=0.1, ge=0.0, le=1.0)  # at most this share of calls explored (then the floor)
        ridge: float = Field(default=1.0, gt=0.0)
        dim: int = Field(default=48, ge=4, le=1024)  # hashed word buckets
        seed: int = 0
        max_pending: int = Field(default=100_000, ge=1)  # workflows awaiting their score (the oldest are forgotten)
        max_age_s: float = Field(default=86_400.0, gt=0.0)  # a score arriving later than this is refused as late

    def build(self, ctx: AssemblyContext) -> LinearBandit:
        p = self.params
        prior = confidence_factory(WARM_STARTS[p.warm]).build_in(ctx)
        return LinearBandit(ctx.names, prior, explore_start=p.explore_start, explore_decay=p.explore_decay,
                            explore_min=p.explore_min, budget=p.budget, ridge=p.ridge, dim=p.dim, seed=p.seed,
                            max_pending=p.max_pending, max_age_s=p.max_age_s)
