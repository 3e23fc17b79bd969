"""Resolve a `--workload` argument: a JSONL file, `source:NAME` (a loader over the data directory) or `synthetic[:N]`."""

from __future__ import annotations

from pathlib import Path

from chimera.workload.schema import LoadReport, Task, load_tasks

SYNTHETIC_DEFAULT_N = 600


def load_workload(spec: str, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0
                  ) -> tuple[list[Task], LoadReport]:
    """Tasks named by `spec`, with a report of what was accepted."""
    if spec.startswith("synthetic"):
        from chimera.workload.synthetic import generate

        _, _, n = spec.partition(":")
        count = int(n) if n else (limit or SYNTHETIC_DEFAULT_N)
        tasks = generate(count, seed=seed)
        return tasks, LoadReport(path=spec, accepted=len(tasks))
    if spec.startswith("source:"):
        from chimera.workload.loaders import load_source

        tasks = load_source(spec.split(":", 1)[1], data_dir=data_dir, limit=limit)
        return tasks, LoadReport(path=spec, accepted=len(tasks))
    tasks, report = load_tasks(spec)
    if limit is not None:
        tasks = tasks[:limit]
    return tasks, report
