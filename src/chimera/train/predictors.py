"""`chimera train`: fit the semantic router and the workflow-length forest on a task split, report held-out metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from chimera.predict.artifacts import Predictors
from chimera.util.jsonable import jsonable
from chimera.workload.schema import Task
from chimera.workload.templates import load_templates
from chimera.workload.workflows import make_plans, split_tasks

Progress = Callable[[str], None]


class TrainingSet(NamedTuple):
    """One workload's or trace store's tasks, and the models it served beyond those its tasks have outcomes for
    (a trace store's models no workflow credits: columns without labels, reported rather than dropped)."""

    name: str
    tasks: list[Task]
    served: tuple[str, ...] = ()


@dataclass
class TrainingData:
    """Tasks of one or more workloads, split by task id, with the union of their models."""

    train: list[Task]
    test: list[Task]
    models: list[str]
    workloads: list[str]


def load_training_sets(
    workloads: Sequence[str],
    traces: Sequence[str | Path] = (),
    data_dir: str | Path | None = None,
    seed: int = 0,
    on_traces: Callable[[Path, dict[str, Any]], None] | None = None,
) -> list[TrainingSet]:
    """The tasks of every workload spec, then of every gateway trace store ('traces:PATH', with the models it
    served); `on_traces` hears each store's counts (`tasks_from_traces`) as it is read."""
    from chimera.train.from_traces import tasks_from_traces
    from chimera.workload.source import load_workload

    sets = [TrainingSet(w, load_workload(w, data_dir=data_dir, seed=seed)[0]) for w in workloads]
    for tp in traces:
        tasks, stats = tasks_from_traces(tp)
        if on_traces is not None:
            on_traces(Path(tp), stats)
        sets.append(TrainingSet("traces:" + str(tp), tasks, tuple(stats["served_models"])))
    return sets


def gather(workloads: Sequence[TrainingSet | tuple[str, Sequence[Task]]], train_frac: float) -> TrainingData:
    """Merge workloads (ids must not collide) and split by id; never test on a training task. The models are those
    with outcomes and those a trace store served (unlabelled ones get no head: the router reports them)."""
    seen: dict[str, str] = {}
    tasks: list[Task] = []
    served: set[str] = set()
    for name, ts, *more in workloads:
        served.update(*more)
        for t in ts:
            if t.id in seen:
                raise ValueError(f"task id {t.id!r} appears in both {seen[t.id]} and {name}; ids must be unique")
            seen[t.id] = name
            tasks.append(t)
    if not tasks:
        raise ValueError("no tasks to train on")
    models = sorted({m for t in tasks for m in t.outcomes} | served)
    train, test = split_tasks(tasks, train_frac)
    if len(train) < 10:
        raise ValueError(f"only {len(train)} training tasks after the split; give more tasks or raise --train-frac")
    return TrainingData(train, test, models, [w[0] for w in workloads])


def score_matrix(tasks: Sequence[Task], models: Sequence[str]) -> np.ndarray:
    """(n, M) scores with NaN where a task has no outcome for a model."""
    out = np.full((len(tasks), len(models)), np.nan)
    col = {m: j for j, m in enumerate(models)}
    for i, t in enumerate(tasks):
        for m, o in t.outcomes.items():
            out[i, col[m]] = o.score
    return out


def strong_weak(scores: np.ndarray, models: Sequence[str]) -> tuple[str, str]:
    """The most and least accurate models among those labelled on at least half the tasks."""
    cover = np.isfinite(scores).mean(axis=0)
    mean = np.full(len(models), np.nan)
    labelled = cover > 0  # a model without a label (served, never chosen) has no mean
    mean[labelled] = np.nanmean(np.where(np.isfinite(scores), scores, np.nan)[:, labelled], axis=0)
    ok = [j for j in range(len(models)) if cover[j] >= 0.5] or list(range(len(models)))
    return models[max(ok, key=lambda j: mean[j])], models[min(ok, key=lambda j: mean[j])]


def length_rows(tasks: Sequence[Task], seed: int):
    """Training rows for the length forest: every (task, stage, model) as if the task ran wholly on that model."""
    from chimera.predict.length_features import examples_from_plans

    plans = make_plans(tasks, load_templates(), seed, "weighted")
    rows, call_t, rem_t = [], [], []
    for t, p in zip(tasks, plans):
        r, c, rem, _ = examples_from_plans([p], [t.prompt], list(t.outcomes))
        rows += list(r)
        call_t += list(c)
        rem_t += list(rem)
    return rows, np.asarray(call_t, dtype=float), np.asarray(rem_t, dtype=float)


def train_predictors(
    data: TrainingData,
    encoder: str = "hashing",
    train_frac: float = 0.7,
    seed: int = 0,
    n_estimators: int = 100,
    progress: Progress | None = None,
    log_target: bool = True,
) -> Predictors:
    """Fit both predictors on the training split and measure them on the held-out split."""
    from chimera.predict.length import WorkflowLengthForest
    from chimera.train.length_eval import evaluate_length_models
    from chimera.predict.router import SemanticRouter
    from chimera.train.router_eval import evaluate_routers

    say = progress or (lambda _msg: None)
    say(f"router: encoding {len(data.train)} training tasks with the {encoder} encoder")
    router = SemanticRouter(encoder=encoder, random_state=seed)
    weighted = any(t.weight is not None for t in data.train)  # traced workflows: inverse propensities
    router.fit([t.prompt for t in data.train], score_matrix(data.train, data.models), data.models,
               [t.kind for t in data.train],
               sample_weight=[t.weight or 1.0 for t in data.train] if weighted else None)
    say("length forest: building per-stage training rows")
    rows, call_t, rem_t = length_rows(data.train, seed)
    forest = WorkflowLengthForest(n_estimators=n_estimators, random_state=seed, log_target=log_target)
    forest.fit(rows, call_t, rem_t)
    metrics: dict = {"train_tasks": len(data.train), "test_tasks": len(data.test)}
    if weighted or router.skipped_:
        metrics["router_weighted"] = weighted
        metrics["router_skipped"] = dict(router.skipped_)  # models without a head or calibrator, and why
    if data.test:
        say(f"evaluating on {len(data.test)} held-out tasks")
        test_scores = score_matrix(data.test, data.models)
        strong, weak = strong_weak(score_matrix(data.train, data.models), data.models)
        metrics["router"] = evaluate_routers(
            {"router": router}, [t.prompt for t in data.test], [t.kind for t in data.test],
            test_scores, data.models, strong=strong, weak=weak)
        metrics["router"]["routers"]["router"].pop("routing_curve", None)
        trows, _, trem = length_rows(data.test, seed + 1)
        metrics["length"] = evaluate_length_models({"forest": forest}, trows, trem)
    return Predictors(
        router=router, length=forest, models=data.models, train_frac=train_frac,
        train_ids=[t.id for t in data.train], workloads=data.workloads, metrics=jsonable(metrics),
        spec={"router": {"encoder": encoder, **_params(router)}, "length": _params(forest)},
    )


def _params(est) -> dict:
    return {k: v for k, v in est.get_params(deep=False).items() if isinstance(v, (int, float, str, bool, type(None)))}

