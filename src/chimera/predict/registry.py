"""Predictor factories by name, registered like policies: one file each (chimera/predict/plugins/), typed parameters,
one registration line (`@register_confidence("name")` or `@register_length("name")`).

A factory builds a confidence or a length predictor from an AssemblyContext (what the body has: its models, training
data, trained artifacts, ground truth); chimera.predict.assembly picks the factories for a run or a gateway.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from chimera.predict.context import AssemblyContext
from chimera.sched.plugin import Registry, parse_params
from chimera.sched.predictors import ConfidencePredictor, LengthPredictor


class PredictorParamsError(ValueError):
    """Parameters a predictor factory does not take or cannot use; the message names the predictor and the key."""


class PredictorParams(BaseModel):
    """A factory's `Params` subclasses this: unknown keys are refused by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictorFactory:
    """Builds one predictor from a context; its parameters are validated by `Params` (`self.params`).

    `needs_truth`: the predictor reads ground truth, so only a simulator can build it (the gateway refuses presets
    that choose it). `shared`: the built predictor is fitted once and never changes, so the runs of one context may
    share it (an online learner, which changes as calls complete, is built afresh for each run)."""

    name: ClassVar[str] = "base"
    role: ClassVar[str] = "predictor"
    Params: ClassVar[type[PredictorParams]] = PredictorParams
    needs_truth: ClassVar[bool] = False
    shared: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params: Any = parse_params(self.Params, params, self.name, kind=self.role, error=PredictorParamsError)

    def build(self, ctx: AssemblyContext) -> Any:
        raise NotImplementedError

    def build_in(self, ctx: AssemblyContext) -> Any:
        """`build`, once per context for a `shared` factory (keyed by name and parameters)."""
        if not self.shared:
            return self.build(ctx)
        return ctx.shared((self.role, self.name, self.params.model_dump_json()), lambda: self.build(ctx))


class ConfidenceFactory(PredictorFactory):
    role = "confidence predictor"

    def build(self, ctx: AssemblyContext) -> ConfidencePredictor:
        raise NotImplementedError


class LengthFactory(PredictorFactory):
    role = "length predictor"

    def build(self, ctx: AssemblyContext) -> LengthPredictor:
        raise NotImplementedError


CONFIDENCE_REGISTRY = Registry("confidence predictor")
LENGTH_REGISTRY = Registry("length predictor")
register_confidence = CONFIDENCE_REGISTRY.register
register_length = LENGTH_REGISTRY.register


def confidence_factory(name: str, **params: Any) -> ConfidenceFactory:
    """The registered confidence factory `name` with `params` (ValueError naming the choices or the key)."""
    return CONFIDENCE_REGISTRY.get(name).cls(**params)


def length_factory(name: str, **params: Any) -> LengthFactory:
    """The registered length factory `name` with `params` (ValueError naming the choices or the key)."""
    return LENGTH_REGISTRY.get(name).cls(**params)
