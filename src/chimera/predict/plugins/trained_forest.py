"""`forest`: the trained workflow length forest of a `chimera train` folder, read at its mean or its median."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from chimera.predict.context import AssemblyContext
from chimera.predict.registry import LengthFactory, PredictorParams, register_length


@register_length("forest")
class TrainedForest(LengthFactory):
    """ForestLengths over the context's trained forest (served name -> trained name: `trained_names`)."""

    shared = True

    class Params(PredictorParams):
        stat: Literal["mean", "median"] = "mean"  # the forest's predicted mean, or its median (stat_quantile)

        @field_validator("stat", mode="before")
        @classmethod
        def _known(cls, v: Any) -> Any:
            from chimera.predict.length import stat_quantile

            stat_quantile(v)  # the one check of a length statistic, with its message
            return v

    def build(self, ctx: AssemblyContext) -> Any:
        from chimera.predict.length import ForestLengths, stat_quantile  # quantile-forest: imported only when used

        forest = ctx.need_trained("length predictor 'forest'").length
        return ForestLengths(forest, ctx.trained_names(), quantile=stat_quantile(self.params.stat))
