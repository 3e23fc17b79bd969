"""`chimera workload list|export`: the public-data sources, and their tasks written as workload JSONL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from chimera.cli.common import LOAD_ERRORS, console, failing_on


def workload_list() -> None:
    """List the public-data sources a workload can be exported from.

    Example: chimera workload list
    """
    from chimera.workload.loaders import SOURCES

    for name, info in SOURCES.items():
        console.print(f"[bold]{name}[/]  {info.description}")


def workload_export(
    source: str = typer.Option(..., "--source", help="Loader name (see `chimera workload list`) or `synthetic`."),
    out: Path = typer.Option(..., "--out", help="Output JSONL file."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Public data directory (default ../shared/data)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many tasks."),
    seed: int = typer.Option(0, "--seed", help="Seed (synthetic only)."),
) -> None:
    """Write a loader's tasks in the workload JSONL format.

    Example: chimera workload export --source mmlu-pro-math --out out/mmlu-math.jsonl
    """
    from chimera.workload.schema import write_tasks
    from chimera.workload.source import load_workload

    spec = source if source.startswith("synthetic") else f"source:{source}"
    t0 = time.perf_counter()
    with failing_on(*LOAD_ERRORS):
        tasks, _ = load_workload(spec, data_dir=data_dir, limit=limit, seed=seed)
    n = write_tasks(tasks, out)
    models = sorted({m for t in tasks for m in t.outcomes})
    console.print(f"wrote {n} tasks ({len(models)} models) to {out} in {time.perf_counter() - t0:.1f} s")
