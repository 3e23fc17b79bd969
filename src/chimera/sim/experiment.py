"""One simulated experiment: split tasks, fit honest predictors on the training split, run a policy on the rest."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from chimera.perfmodel.profiles import ClusterConfig
from chimera.predict.artifacts import Predictors
from chimera.predict.assembly import PolicySpec, PredictorsSpec, build_policy, build_predictors, resolve_predictions
from chimera.predict.context import AssemblyContext
from chimera.predict.priors import KindAccuracyRouter, StageMeanLength
from chimera.sched.admission import Event
from chimera.sched.registry import make_policy, policy_entry
from chimera.sched.types import Call
from chimera.sim.cluster import ModelRuntime, build_runtimes
from chimera.sim.simulator import Simulator
from chimera.workload.plan import WorkflowPlan, plan_workflow
from chimera.workload.schema import Task
from chimera.workload.templates import WorkflowTemplate, load_templates, template_for
from chimera.workload.workflows import make_plans, repeat_ids, split_tasks


class ClusterWorkloadMismatch(ValueError):
    """The cluster asks for models the workload has no outcomes for."""


def workload_names(cluster: ClusterConfig) -> dict[str, str]:
    """Cluster model name -> the name the workload (and trained predictors) know it by (`workload_model`)."""
    return {m.name: (m.workload_model or m.name) for m in cluster.models}


def to_cluster_namespace(tasks: Sequence[Task], cluster: ClusterConfig) -> tuple[list[Task], int]:
    """Re-key each task's outcomes by the cluster's model names (via `workload_model`); count tasks skipped."""
    mapping = workload_names(cluster)
    out: list[Task] = []
    skipped = 0
    for t in tasks:
        if not all(src in t.outcomes for src in mapping.values()):
            skipped += 1
            continue
        outcomes = {dst: t.outcomes[src] for dst, src in mapping.items()}
        stages = None
        if t.stages:
            stages = {dst: t.stages[src] for dst, src in mapping.items() if src in t.stages} or None
        out.append(t.model_copy(update={"outcomes": outcomes, "stages": stages}))
    if not out:
        have = sorted({m for t in tasks for m in t.outcomes})
        raise ClusterWorkloadMismatch(
            f"no task has outcomes for all cluster models {sorted(mapping.values())}; the workload has {have[:12]}"
            f"{' …' if len(have) > 12 else ''}. Set `workload_model:` on each cluster entry to a model of the workload."
        )
    return out, skipped


@dataclass
class Prepared:
    """Everything that does not depend on the policy, built once and shared by a sweep: the split, the cluster, and
    the assembly context the predictors are built from (fitted ones once, shared by every run)."""

    runtimes: list[ModelRuntime]
    names: list[str]
    train: list[Task]
    test: list[Task]
    skipped: int
    train_plans: list[WorkflowPlan]
    templates: dict[str, WorkflowTemplate]
    rule: str
    context: AssemblyContext
    length_stat: str = "mean"  # how the trained length forest is read
    # Ground truth: workflow id -> plan, of the training tasks and of every workflow `workflows` built (the oracle
    # predictors read it; a run reads its own workflows', see `run_policy`).
    truth: dict[str, WorkflowPlan] = field(default_factory=dict)

    @property
    def router(self) -> KindAccuracyRouter:
        """The per-kind accuracy prior fit on the training split (the `priors` confidence)."""
        return self.predictors_for("priors")[0]  # type: ignore[return-value]

    @property
    def lengths(self) -> StageMeanLength:
        """The per-stage mean lengths fit on the training plans (the `priors` lengths)."""
        return self.predictors_for("priors")[1]  # type: ignore[return-value]

    @property
    def trained(self) -> tuple[Any, Any] | None:
        """(confidence, length) of the trained predictors seen through the cluster's model names, when given."""
        return None if self.context.trained is None else self.predictors_for("trained")

    def predictors_for(self, predictions: str | PredictorsSpec | None = None) -> tuple[Any, Any]:
        """(confidence, length) of a predictor choice (see `choose_predictors`), built for this preparation."""
        return choose_predictors(self, predictions)[:2]

    def train_truth(self) -> dict[str, WorkflowPlan]:
        return {t.id: p for t, p in zip(self.train, self.train_plans)}

    def workflows(self, n: int | None, seed: int) -> list[tuple[str, WorkflowPlan, str]]:
        """n workflows from the test tasks; beyond one pass, tasks are drawn again under new workflow ids."""
        out = []
        pairs = repeat_ids(self.test, [t.id for t in self.test], n, shuffle=np.random.default_rng([seed, 1]))
        for k, (wid, t) in enumerate(pairs):
            plan = plan_workflow(t, template_for(t.kind, self.templates), np.random.default_rng([seed, k]), self.rule)
            self.truth[wid] = plan
            out.append((wid, plan, t.prompt))
        return out


def prepare(
    tasks: Sequence[Task],
    cluster: ClusterConfig,
    seed: int = 0,
    train_frac: float = 0.3,
    rule: str = "weighted",
    templates: dict[str, WorkflowTemplate] | None = None,
    predictors: Predictors | None = None,
    length_stat: str = "mean",
) -> Prepared:
    """Split, map to the cluster's model names and fit the honest priors; with trained `predictors`, use their
    split and drop any task they were trained on from the simulated set."""
    templates = templates if templates is not None else load_templates()
    mapped, skipped = to_cluster_namespace(tasks, cluster)
    if predictors is not None:
        train_frac = predictors.train_frac
    train, test = split_tasks(mapped, train_frac)
    if predictors is not None:
        seen = set(predictors.train_ids)
        leaked = [t for t in test if t.id in seen]
        test = [t for t in test if t.id not in seen]
        train += leaked
        if not test:
            raise ValueError("every task of this workload was used to train the predictors; nothing left to test on")
    runtimes = build_runtimes(cluster)
    names = [r.info.name for r in runtimes]
    fit_on = train if train else test[:0]
    plans = make_plans(fit_on, templates, seed + 10_000, rule) if fit_on else []
    context = AssemblyContext(models=[r.info for r in runtimes], workload_model=workload_names(cluster),
                              trained=predictors, train_tasks=fit_on,
                              train_plans=plans or make_plans(test[:1], templates, seed, rule))
    prep = Prepared(runtimes, names, train, test, skipped, plans, templates, rule, context, length_stat)
    prep.truth.update(prep.train_truth())
    context.truth = prep.truth
    prep.predictors_for("priors")  # fit now, once for every run
    if predictors is not None:
        prep.predictors_for("trained")  # and a folder trained on other models fails here
    return prep


def train_calls(prep: Prepared, limit: int = 2000) -> list[Call]:
    """Calls as a policy would see them for training tasks (stage 0), for calibrating thresholds."""
    calls = []
    for i, (t, p) in enumerate(zip(prep.train[:limit], prep.train_plans[:limit])):
        calls.append(Call(call_id=-1 - i, workflow_id=t.id, kind=t.kind, prompt=t.prompt, stage=0,
                          prompt_tokens=p.prompt_tokens(0, []), arrival_s=0.0, workflow_arrival_s=0.0))
    return calls


def choose_predictors(prep: Prepared, predictions: str | PredictorsSpec | None = None, truth=None):
    """(confidence, length, label) for a run's predictor choice: a named set (priors, trained, oracle: true scores
    and lengths, oracle-scores, oracle-lengths; chimera.predict.assembly.PREDICTOR_SETS), CONFIDENCE/LENGTH of
    registered predictors, or a PredictorsSpec. None: trained if given, else priors. Oracles read `truth`
    (workflow id -> plan; default: every workflow `prep.workflows` has built)."""
    spec, label = resolve_predictions(predictions, prep.context.trained is not None, prep.length_stat)
    ctx = prep.context if truth is None else replace(prep.context, truth=truth)
    conf, length = build_predictors(spec, ctx)
    return conf, length, label


def run_policy(
    prep: Prepared,
    policy: str,
    rate: float | None = None,
    agents: int | None = None,
    n_tasks: int | None = None,
    seed: int = 0,
    lam: float | None = None,
    progress: Callable[[int], None] | None = None,
    workflows: list | None = None,
    confidence=None,
    length=None,
    predictions: str | PredictorsSpec | None = None,
    engine_order: str = "priority",
    hold: float | None = None,
    free_context: bool = False,
    record: Callable[[Event], None] | None = None,
    arrivals: Sequence[float] | None = None,
    **policy_params,
) -> dict:
    """Simulate one policy on the prepared held-out tasks; returns the summary dict.

    `predictions` picks the predictors (see `choose_predictors`; default: the preset's choice, e.g. chimera-oracle's
    oracle, else trained if given, else priors); explicit `confidence`/`length` replace the honest ones.
    `engine_order`, `hold` and `free_context` are the Simulator's (the engines' queue order; the gateway's
    admission cap; the what-if where a workflow's earlier context is free on every replica); `record` hears every
    event of the admission core (a trace writer); `arrivals` gives each workflow's arrival time instead of `rate`
    (a replay of logged traffic)."""
    spec, label = resolve_predictions(predictions or policy_entry(policy).predictions,
                                      prep.context.trained is not None, prep.length_stat)
    wfs = workflows if workflows is not None else prep.workflows(n_tasks, seed)
    ctx = prep.context
    if spec.needs_truth:  # the oracle reads exactly the workflows it runs (and the training tasks)
        ctx = replace(ctx, truth={**prep.train_truth(), **{wid: plan for wid, plan, _ in wfs}})
    if label in ("priors", "trained") and (confidence is not None or length is not None):
        conf, lens = build_predictors(spec, ctx)
        pol = make_policy(policy, confidence=confidence or conf, length=length or lens, lam=lam, **policy_params)
    else:
        pol = build_policy(PolicySpec(name=policy, lam=lam, params=policy_params, predictors=spec), ctx)
    sim = Simulator(prep.runtimes, pol, wfs, rate=rate, agents=agents, arrivals=arrivals, seed=seed,
                    engine_order=engine_order, hold=hold, free_context=free_context, record=record)
    sim.admission.prepare(train_calls(prep))
    result = sim.run(progress=progress)
    result["lam"] = getattr(pol, "lam", None)
    result["rate"] = rate
    result["agents"] = agents
    result["skipped_tasks"] = prep.skipped
    result["predictors"] = label
    result["engine_order"], result["hold"], result["free_context"] = engine_order, hold, free_context
    return result
