"""One assembly: a policy with its predictors, built from a typed spec and a context, for every body.

The simulator, the benchmarks and the gateway all build their policies here (`build_policy`; the gateway through
`gateway_policy`). A run's predictor choice is a registered confidence factory and a registered length factory
(chimera.predict.registry), or one of the named sets below (`priors`, `trained`, `oracle`, …), resolved here and
nowhere else.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

import chimera.predict.plugins  # noqa: F401  (registers the built-in predictor factories)
from chimera.predict.artifacts import load_predictors
from chimera.predict.context import AssemblyContext
from chimera.predict.registry import CONFIDENCE_REGISTRY, LENGTH_REGISTRY, confidence_factory, length_factory
from chimera.sched.policy import Policy
from chimera.sched.predictors import ConfidencePredictor, LengthPredictor
from chimera.sched.registry import make_policy, policy_entry
from chimera.sched.types import ModelInfo

HONEST = "honest"  # in a set: the run's honest choice (trained predictors when it has them, else the priors)
# Named predictor sets: (confidence factory, length factory). `trained` reads the forest at the run's length_stat.
PREDICTOR_SETS: dict[str, tuple[str, str]] = {
    "priors": ("kind-accuracy", "stage-mean"),  # fit on the labelled training split
    "trained": ("router", "forest"),  # a `chimera train` folder
    "oracle": ("oracle", "oracle"),  # true scores and lengths
    "oracle-scores": ("oracle", HONEST),  # true scores, predicted lengths
    "oracle-lengths": (HONEST, "oracle"),  # predicted scores, true lengths
    "online": ("online", "running-mean"),  # no labels: confidence from workflow scores, lengths from completions
}
PREDICTION_CHOICES = tuple(PREDICTOR_SETS)


class PredictorConfigError(ValueError):
    """Predictors a body was configured with that it cannot use; the message names the key and the reason."""


class PredictorChoice(BaseModel):
    """A registered predictor factory by name, with its parameters (a bare name is accepted for no parameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class PredictorsSpec(BaseModel):
    """A confidence and a length predictor, each a registered factory; checked when parsed (names, parameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    confidence: PredictorChoice
    length: PredictorChoice

    @model_validator(mode="after")
    def _registered(self) -> "PredictorsSpec":
        self.factories()
        return self

    def factories(self) -> tuple[Any, Any]:
        return (confidence_factory(self.confidence.name, **self.confidence.params),
                length_factory(self.length.name, **self.length.params))

    @property
    def needs_truth(self) -> bool:
        return any(f.needs_truth for f in self.factories())

    @property
    def label(self) -> str:
        return f"{self.confidence.name}/{self.length.name}"


class PolicySpec(BaseModel):
    """A registered policy (or preset) with its λ and parameters, and the predictors it reads."""

    model_config = ConfigDict(extra="forbid")
    name: str = "chimera"
    lam: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    predictors: PredictorsSpec


def _set_pair(label: str) -> tuple[str, str]:
    if label in PREDICTOR_SETS:
        return PREDICTOR_SETS[label]
    conf, sep, length = label.partition("/")
    if not sep or not conf or not length:
        raise ValueError(f"predictions must be one of {', '.join(PREDICTOR_SETS)}, or CONFIDENCE/LENGTH "
                         f"(registered predictors: {', '.join(CONFIDENCE_REGISTRY.names())} / "
                         f"{', '.join(LENGTH_REGISTRY.names())}), got {label!r}")
    return conf, length


def check_predictions(label: str) -> None:
    """Refuse a predictor choice that names no set and no registered pair (before anything runs)."""
    conf, length = _set_pair(label)
    for role, name, registry in (("confidence", conf, CONFIDENCE_REGISTRY), ("length", length, LENGTH_REGISTRY)):
        if name != HONEST and name not in registry:
            raise ValueError(f"predictions {label!r}: unknown {role} predictor {name!r}; registered: "
                             f"{', '.join(registry.names())}")


def predictions_need_truth(label: str) -> bool:
    """Whether a predictor choice reads ground truth (only a simulator can run it)."""
    check_predictions(label)
    conf, length = _set_pair(label)
    return ((conf != HONEST and CONFIDENCE_REGISTRY.get(conf).cls.needs_truth)
            or (length != HONEST and LENGTH_REGISTRY.get(length).cls.needs_truth))


def resolve_predictions(label: str | PredictorsSpec | None, trained: bool = False,
                        length_stat: str = "mean") -> tuple[PredictorsSpec, str]:
    """(spec, label) for a run's predictor choice: a named set, CONFIDENCE/LENGTH, or a spec. None: the honest set,
    `trained` when the run has trained predictors, else `priors`; the trained forest is read at `length_stat`."""
    if isinstance(label, PredictorsSpec):
        return label, label.label
    honest = "trained" if trained else "priors"
    label = label or honest
    check_predictions(label)
    if label == "trained" and not trained:
        raise ValueError("predictions 'trained' needs trained predictors (--predictors)")
    conf, length = _set_pair(label)
    conf = PREDICTOR_SETS[honest][0] if conf == HONEST else conf
    length = PREDICTOR_SETS[honest][1] if length == HONEST else length
    if length == "forest":  # read at the run's statistic (a bad one is refused here, plainly)
        length_factory("forest", stat=length_stat)
        return PredictorsSpec(confidence=conf, length={"name": "forest", "params": {"stat": length_stat}}), label
    return PredictorsSpec(confidence=conf, length=length), label


def build_predictors(spec: PredictorsSpec, ctx: AssemblyContext) -> tuple[ConfidencePredictor, LengthPredictor]:
    """The spec's (confidence, length) predictors for the context (fitted ones shared by its runs)."""
    conf, length = spec.factories()
    return conf.build_in(ctx), length.build_in(ctx)


def build_policy(spec: PolicySpec, ctx: AssemblyContext) -> Policy:
    """The one way a body gets its policy: the registered policy with the spec's predictors built for `ctx`."""
    conf, length = build_predictors(spec.predictors, ctx)
    return make_policy(spec.name, confidence=conf, length=length, lam=spec.lam, **spec.params)


def gateway_predictors(trained: bool, length_stat: str = "mean",
                       online: Mapping[str, Any] | None = None) -> PredictorsSpec:
    """The gateway's predictors: the trained router and forest when it has a folder, else a cold start (confidence
    by model size, lengths learnt online). With `online` (the `online` learner's parameters), confidence is learnt
    from workflow scores, warm-started from the trained router when there is one, else from model size."""
    length: Any = {"name": "forest", "params": {"stat": length_stat}} if trained else "running-mean"
    if online is not None:
        conf: Any = {"name": "online", "params": {"warm": "router" if trained else "size", **online}}
    else:
        conf = "router" if trained else "size-prior"
    return PredictorsSpec(confidence=conf, length=length)


def gateway_context(models: Sequence[ModelInfo], predictors_dir: str | None = None,
                    workload_model: Mapping[str, str | Sequence[str]] | None = None) -> AssemblyContext:
    """What the gateway's predictor factories read: its models and, from `predictors_dir` (a `chimera train` folder,
    loaded and checked now), its trained predictors under `workload_model` (served name -> the name(s) its backends
    give, explicit `workload_model` alone, else the profile's then the served name; see AssemblyContext). A folder
    that cannot be loaded, or that was trained on none of a served model's names, raises PredictorConfigError
    naming the key and the reason."""
    ctx = AssemblyContext(models=list(models), workload_model=dict(workload_model or {}))
    if predictors_dir:
        try:
            ctx.trained = load_predictors(predictors_dir)
        except ValueError as e:
            raise PredictorConfigError(f"key 'predictors': {e}") from None
        unknown = sorted(m for m, w in ctx.trained_names().items() if w not in ctx.trained.models)
        if unknown:
            raise PredictorConfigError(
                f"key 'predictors': {predictors_dir} was trained on {ctx.trained.models}; served model(s) {unknown} "
                "are not among them: set `workload_model` on their backends to one of those names")
    return ctx


def gateway_policy(name: str, lam: float | None, params: Mapping[str, Any], models: Sequence[ModelInfo],
                   predictors_dir: str | None = None, workload_model: Mapping[str, str | Sequence[str]] | None = None,
                   length_stat: str = "mean", online: Mapping[str, Any] | None = None) -> Policy:
    """The gateway's policy with its predictors (`gateway_predictors`) built in its context (`gateway_context`:
    trained ones from `predictors_dir`, else the cold-start ones); PredictorConfigError names the key at fault."""
    ctx = gateway_context(models, predictors_dir, workload_model)
    spec = PolicySpec(name=name, lam=lam, params=dict(params),
                      predictors=gateway_predictors(bool(predictors_dir), length_stat, online))
    return build_policy(spec, ctx)
