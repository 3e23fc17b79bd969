"""From tasks to workflows, shared by training, the simulator and the live driver: a deterministic train/test split,
one plan per task, and repeating tasks under new workflow ids once a run asks for more workflows than tasks."""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence, TypeVar

import numpy as np

from chimera.workload.plan import WorkflowPlan, plan_workflow
from chimera.workload.schema import Task
from chimera.workload.templates import WorkflowTemplate, template_for

T = TypeVar("T")


def split_tasks(tasks: Sequence[Task], train_frac: float) -> tuple[list[Task], list[Task]]:
    """Deterministic split by task id (never test on a training task)."""
    if not 0.0 <= train_frac < 1.0:
        raise ValueError(f"train_frac must be in [0, 1), got {train_frac}")
    train, test = [], []
    for t in tasks:
        (train if zlib.crc32(t.id.encode()) % 10_000 < train_frac * 10_000 else test).append(t)
    if not test:
        raise ValueError("the split left no test tasks; lower train_frac or give more tasks")
    return train, test


def make_plans(tasks: Sequence[Task], templates: dict[str, WorkflowTemplate], seed: int, rule: str) -> list[WorkflowPlan]:
    """One plan per task, task i drawn from rng [seed, i]."""
    return [plan_workflow(t, template_for(t.kind, templates), np.random.default_rng([seed, i]), rule)
            for i, t in enumerate(tasks)]


def repeat_ids(items: Sequence[T], ids: Sequence[str], n: int | None,
               shuffle: np.random.Generator | None = None) -> Iterator[tuple[str, T]]:
    """n (workflow id, item) pairs: one pass in order, then passes again as `id~k` (k = the pass), each later pass in
    `shuffle`'s order when given (one permutation drawn per pass), else in order."""
    if not items:
        raise ValueError("the workload has no tasks")
    n = len(items) if n is None else n
    if n < 1:
        raise ValueError(f"tasks must be >= 1, got {n}")
    done, cycle = 0, 0
    while done < n:
        order = shuffle.permutation(len(items)) if cycle and shuffle is not None else np.arange(len(items))
        for j in order[: n - done]:
            yield (ids[int(j)] if cycle == 0 else f"{ids[int(j)]}~{cycle}"), items[int(j)]
            done += 1
        cycle += 1
