"""What a predictor factory may read to build a predictor: the body's models and whatever it has to fit on.

Each body fills what it has: the simulator its training split, its trained artifacts and the ground truth of the
workflows it runs; the gateway its models, its trained folder and the names its models go by in the training data.
A factory asks for what it needs and is refused, by name, where the body has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

from chimera.predict.artifacts import Predictors
from chimera.sched.types import ModelInfo
from chimera.workload.plan import WorkflowPlan
from chimera.workload.schema import Task

T = TypeVar("T")


class MissingInput(ValueError):
    """A predictor needs something this body does not have (trained artifacts, ground truth); the message names both."""


@dataclass
class AssemblyContext:
    """The inputs of the predictor factories, one per body (or per run: `dataclasses.replace` keeps the memo)."""

    models: Sequence[ModelInfo]  # in the policy's order
    # Served model name -> the name(s) the workload and trained predictors may know it by, most specific first (a
    # str is one name); `trained_names` takes the first the trained predictors know, else the last. Absent: its own.
    workload_model: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    trained: Predictors | None = None  # a `chimera train` folder, loaded
    train_tasks: Sequence[Task] = ()  # labelled training tasks (per-kind accuracy)
    train_plans: Sequence[WorkflowPlan] = ()  # workflow plans of training tasks (per-stage mean lengths)
    truth: Mapping[str, WorkflowPlan] | None = None  # workflow id -> its plan: ground truth, only a simulator has it
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # fitted predictors, see `shared`

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def shared(self, key: Any, build: Callable[[], T]) -> T:
        """`build()` once per key for this context and its copies: fitted predictors are shared by the runs of a
        sweep (and their caches with them), as one fit."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def trained_names(self) -> dict[str, str]:
        """Served model name -> the name the trained predictors know it by (see `workload_model`)."""
        known = self.need_trained("trained predictors").models
        out = {}
        for m in self.names:
            given = self.workload_model.get(m, ())
            names = [given] if isinstance(given, str) else [n for n in given if n]
            names = names or [m]
            out[m] = next((n for n in names if n in known), names[-1])
        return out

    def need_trained(self, who: str) -> Predictors:
        if self.trained is None:
            raise MissingInput(f"{who} needs trained predictors (a `chimera train` folder: --predictors)")
        return self.trained

    def need_truth(self, who: str) -> Mapping[str, WorkflowPlan]:
        if self.truth is None:
            raise MissingInput(f"{who} reads ground truth (the workflows' plans), which only the simulator has")
        return self.truth
