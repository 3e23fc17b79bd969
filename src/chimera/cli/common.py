"""What every command shares: the consoles, the error exit, progress bars, flag parsing and the summary table."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)  # error messages name paths: never wrap them

WORKLOAD_HELP = "JSONL file, `source:NAME` (a loader over the data directory) or `synthetic[:N]`."
CLUSTER_HELP = "Cluster YAML (models: [{name, gpu, …} or {profile: MODEL@GPU}]); default: the built-in 3×Qwen2.5 on A6000."
LENGTH_STAT_HELP = "How the policy reads the trained length forest: 'mean' (its predicted mean) or 'median'."
# what loading a workload, a cluster or a predictor folder raises for bad input (the message names the culprit)
LOAD_ERRORS = (ValueError, KeyError, FileNotFoundError)


def fail(msg: str) -> NoReturn:
    """Print `error: msg` to stderr and exit 2 (bad input, never a traceback)."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(2)


@contextlib.contextmanager
def failing_on(*errors: type[BaseException], strip: bool = True) -> Iterator[None]:
    """Turn `errors` raised in the block into `fail`; `strip` drops the quotes a KeyError's message comes in."""
    try:
        yield
    except errors as e:
        if isinstance(e, typer.Exit):  # click's Exit is a RuntimeError: an exit already decided passes through
            raise
        fail(str(e).strip("'\"") if strip else str(e))


def validation_message(e: Any, as_flags: bool = False) -> str:
    """A pydantic ValidationError as one line, 'field: message; …' (as_flags: '--field-name: message')."""
    def where(loc: tuple) -> str:
        name = ".".join(map(str, loc))
        return f"--{name.replace('_', '-')}" if as_flags else name

    return "; ".join(f"{where(x['loc'])}: {x['msg']}" for x in e.errors())


def progress() -> Progress:
    """A progress bar on stderr, so stdout holds only results."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


def names(csv: str) -> list[str]:
    """'a, b,,c' → ['a', 'b', 'c']."""
    return [m.strip() for m in csv.split(",") if m.strip()]


def cluster_or_default(path: Optional[Path]):
    """The cluster file at `path`, else the built-in cluster."""
    from chimera.perfmodel.profiles import default_cluster, load_cluster

    return load_cluster(path) if path else default_cluster()


def predictors_or_none(path: Optional[Path]):
    """Load a predictor folder, or None; a bad folder is a clear error."""
    if path is None:
        return None
    from chimera.predict.artifacts import load_predictors

    return load_predictors(path)


def write_json(path: Path, doc: Any) -> None:
    """`doc` as indented JSON at `path` (folders made), then say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    console.print(f"wrote {path}")


def summary_table(rows: list[dict], title: str) -> Table:
    """One row per run summary (simulated or live): accuracy, latency percentiles, queueing, calls per model."""
    t = Table(title=title)
    for col in ("policy", "λ", "tasks", "accuracy", "mean lat (s)", "p50", "p90", "p99", "queue mean (s)",
                "tasks/s", "calls per model"):
        t.add_column(col, justify="right" if col not in ("policy", "calls per model") else "left")
    for r in rows:
        lam = "" if r.get("lam") is None else f"{r['lam']:g}"
        per = ", ".join(f"{m}:{v['calls']}" for m, v in r["per_model"].items())
        lat = r["latency_s"]
        t.add_row(r["policy"], lam, str(r["tasks"]), f"{100 * r['accuracy']:.1f}%", f"{lat['mean']:.2f}",
                  f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{r['queue_s']['mean']:.2f}",
                  f"{r['throughput_tasks_per_s']:.3f}", per)
    return t
