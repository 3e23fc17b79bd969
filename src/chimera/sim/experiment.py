"""One simulated experiment: split tasks, fit honest predictors on the training split, run a policy on the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from chimera.perfmodel.profiles import ClusterConfig
from chimera.predict.artifacts import Predictors
from chimera.predict.priors import KindAccuracyRouter, OracleConfidence, OracleLength, StageMeanLength
from chimera.sched.registry import PREDICTIONS, make_policy, policy_entry
from chimera.sched.types import Call
from chimera.sim.cluster import ModelRuntime, build_runtimes
from chimera.sim.simulator import Simulator
from chimera.workload.plan import WorkflowPlan, plan_workflow
from chimera.workload.schema import Task
from chimera.workload.templates import WorkflowTemplate, load_templates, template_for
from chimera.workload.workflows import make_plans, repeat_ids, split_tasks


class ClusterWorkloadMismatch(ValueError):
    """The cluster asks for models the workload has no outcomes for."""


def to_cluster_namespace(tasks: Sequence[Task], cluster: ClusterConfig) -> tuple[list[Task], int]:
    """Re-key each task's outcomes by the cluster's model names (via `workload_model`); count tasks skipped."""
    mapping = {m.name: (m.workload_model or m.name) for m in cluster.models}
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
    """Everything that does not depend on the policy, built once and shared by a sweep."""

    runtimes: list[ModelRuntime]
    names: list[str]
    train: list[Task]
    test: list[Task]
    skipped: int
    train_plans: list[WorkflowPlan]
    router: KindAccuracyRouter
    lengths: StageMeanLength
    templates: dict[str, WorkflowTemplate]
    rule: str
    trained: tuple | None = None  # (confidence, length) adapters of trained predictors, when given

    def workflows(self, n: int | None, seed: int) -> list[tuple[str, WorkflowPlan, str]]:
        """n workflows from the test tasks; beyond one pass, tasks are drawn again under new workflow ids."""
        out = []
        pairs = repeat_ids(self.test, [t.id for t in self.test], n, shuffle=np.random.default_rng([seed, 1]))
        for k, (wid, t) in enumerate(pairs):
            plan = plan_workflow(t, template_for(t.kind, self.templates), np.random.default_rng([seed, k]), self.rule)
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
    router = KindAccuracyRouter(names).fit(fit_on)
    lengths = StageMeanLength(names).fit(plans) if plans else StageMeanLength(names).fit(
        make_plans(test[:1], templates, seed, rule))
    prep = Prepared(runtimes, names, train, test, skipped, plans, router, lengths, templates, rule)
    if predictors is not None:
        prep.trained = trained_adapters(predictors, cluster, length_stat)
    return prep


def trained_adapters(predictors: Predictors, cluster: ClusterConfig, length_stat: str = "mean"):
    """The trained router and forest seen through the cluster's model names (`workload_model` mapping);
    `length_stat` "mean" reads the forest's predicted mean length, "median" its median (ForestLengths)."""
    from chimera.predict.length import ForestLengths, stat_quantile
    from chimera.predict.router import RouterConfidence

    mapping = {m.name: (m.workload_model or m.name) for m in cluster.models}
    return RouterConfidence(predictors.router, mapping), ForestLengths(predictors.length, mapping,
                                                                    quantile=stat_quantile(length_stat))


def train_calls(prep: Prepared, limit: int = 2000) -> list[Call]:
    """Calls as a policy would see them for training tasks (stage 0), for calibrating thresholds."""
    calls = []
    for i, (t, p) in enumerate(zip(prep.train[:limit], prep.train_plans[:limit])):
        calls.append(Call(call_id=-1 - i, workflow_id=t.id, kind=t.kind, prompt=t.prompt, stage=0,
                          prompt_tokens=p.prompt_tokens(0, []), arrival_s=0.0, workflow_arrival_s=0.0, truth=p))
    return calls


def choose_predictors(prep: Prepared, predictions: str | None = None):
    """(confidence, length, label) for a run's predictor choice: priors, trained, oracle (true scores and lengths),
    oracle-scores (true scores, predicted lengths) or oracle-lengths (predicted scores, true lengths); "predicted"
    means trained when the run has trained predictors, else priors. None: trained if given, else priors."""
    honest = "trained" if prep.trained is not None else "priors"
    predictions = predictions or honest
    if predictions not in PREDICTIONS:
        raise ValueError(f"predictions must be one of {', '.join(PREDICTIONS)}, got {predictions!r}")
    if predictions == "trained" and prep.trained is None:
        raise ValueError("predictions 'trained' needs trained predictors (--predictors)")
    conf, length = prep.trained if predictions == "trained" or (predictions != "priors" and prep.trained) else (
        prep.router, prep.lengths)
    if predictions in ("oracle", "oracle-scores"):
        conf = OracleConfidence(prep.names)
    if predictions in ("oracle", "oracle-lengths"):
        length = OracleLength(prep.names)
    return conf, length, predictions


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
    predictions: str | None = None,
    engine_order: str = "priority",
    hold: float | None = None,
    free_context: bool = False,
    **policy_params,
) -> dict:
    """Simulate one policy on the prepared held-out tasks; returns the summary dict.

    `predictions` picks the predictors (see `choose_predictors`; default: the preset's choice, e.g. chimera-oracle's
    oracle, else trained if given, else priors); explicit `confidence`/`length` replace the honest ones.
    `engine_order`, `hold` and `free_context` are the Simulator's (the engines' queue order; the gateway's
    admission cap; the what-if where a workflow's earlier context is free on every replica)."""
    predictions = predictions or policy_entry(policy).predictions
    conf, lens, label = choose_predictors(prep, predictions)
    if label in ("priors", "trained"):
        conf, lens = confidence or conf, length or lens
    pol = make_policy(policy, confidence=conf, length=lens, lam=lam, **policy_params)
    wfs = workflows if workflows is not None else prep.workflows(n_tasks, seed)
    sim = Simulator(prep.runtimes, pol, wfs, rate=rate, agents=agents, seed=seed, engine_order=engine_order, hold=hold,
                    free_context=free_context)
    sim.admission.prepare(train_calls(prep))
    result = sim.run(progress=progress)
    result["lam"] = getattr(pol, "lam", None)
    result["rate"] = rate
    result["agents"] = agents
    result["skipped_tasks"] = prep.skipped
    result["predictors"] = label
    result["engine_order"], result["hold"], result["free_context"] = engine_order, hold, free_context
    return result
