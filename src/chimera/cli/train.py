"""`chimera train` and `chimera eval predictors`: fit the predictors, and measure them against baselines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from rich.markup import escape

from chimera.cli.common import LOAD_ERRORS, WORKLOAD_HELP, console, err, fail, failing_on, progress


def train(
    workload: Optional[list[str]] = typer.Option(None, "--workload", "-w", help=WORKLOAD_HELP + " Repeatable."),
    traces: Optional[list[Path]] = typer.Option(
        None, "--traces", help="A gateway trace store (its trace_store file): workflows with feedback become "
        "training tasks. Repeatable; combines with --workload."),
    out: Path = typer.Option(..., "--out", help="Folder for the artifacts (manifest.json, router.joblib, length.joblib)."),
    encoder: str = typer.Option("hashing", "--encoder", help="Router text encoder: hashing (no model) | minilm."),
    train_frac: float = typer.Option(0.7, "--train-frac", help="Share of tasks (split by id) to train on."),
    trees: int = typer.Option(100, "--trees", help="Trees per quantile forest."),
    length_target: str = typer.Option("log", "--length-target", help="What the length forest splits on: log "
                                      "(log1p tokens: better ordering) | raw (tokens: an unbiased mean where lengths "
                                      "are heavy-tailed; docs/predictors.md)."),
    seed: int = typer.Option(0, "--seed"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
) -> None:
    """Fit the semantic router and the workflow-length forest; print held-out metrics; save versioned artifacts.

    Example: chimera train -w source:mmlu-pro-math --out out/predictors/mmlu --encoder minilm
    Learning loop: chimera train --traces out/gateway/trace.sqlite --out out/predictors/live (each traced workflow
    weighted by its inverse propensity where the store logs them; a served model without labels is reported)
    """
    from chimera.train.from_traces import describe_stats, unlabelled_warnings
    from chimera.train.length_eval import format_table
    from chimera.train.predictors import gather, load_training_sets, train_predictors
    from chimera.train.router_eval import to_markdown

    if encoder not in ("hashing", "minilm"):
        fail(f"--encoder must be hashing or minilm, got {encoder!r}")
    if length_target not in ("log", "raw"):
        fail(f"--length-target must be log or raw, got {length_target!r}")
    if not workload and not traces:
        fail("give at least one --workload or --traces")
    t0 = time.perf_counter()
    with failing_on(*LOAD_ERRORS):
        def said(path: Path, st: dict) -> None:
            console.print(describe_stats(path, st))
            for line in unlabelled_warnings(st):
                err.print(f"[yellow]warning:[/] {escape(line)}")

        sets = load_training_sets(list(workload or []), traces or [], data_dir, seed, on_traces=said)
        data = gather(sets, train_frac)
        with progress() as prog:
            bar = prog.add_task("training", total=None)
            pred = train_predictors(data, encoder=encoder, train_frac=train_frac, seed=seed, n_estimators=trees,
                                    log_target=length_target == "log",
                                    progress=lambda m: prog.update(bar, description=m))
    pred.save(out)
    m = pred.metrics
    console.print(f"trained on {m['train_tasks']} tasks, evaluated on {m['test_tasks']} held-out tasks "
                  f"({len(pred.models)} models) in {time.perf_counter() - t0:.1f} s")
    if "router" in m:
        console.print(to_markdown(m["router"]))
    if "length" in m:
        console.print(format_table(m["length"]))
    console.print(f"wrote {out}")


def eval_predictors(
    workload: list[str] = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP + " Repeatable."),
    strong: Optional[str] = typer.Option(None, "--strong", help="Strong model of the routing curve (default: most accurate)."),
    weak: Optional[str] = typer.Option(None, "--weak", help="Weak model of the routing curve (default: least accurate)."),
    encoders: str = typer.Option("hashing,minilm", "--encoders", help="Router encoders to compare."),
    train_frac: float = typer.Option(0.7, "--train-frac"),
    seed: int = typer.Option(0, "--seed"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    out: Path = typer.Option(Path("out/eval-predictors"), "--out", help="Folder for results.md, results.json, routing.png."),
) -> None:
    """Router vs kNN / matrix factorisation / prior / random, and the length forest vs per-stage means and an
    LTR-style ranker, on held-out tasks.

    Example: chimera eval predictors -w source:fireact-hotpotqa --out out/eval-fireact
    """
    from chimera.train.evaluate import evaluate_predictors, write_evaluation
    from chimera.train.predictors import gather, load_training_sets

    t0 = time.perf_counter()
    with failing_on(*LOAD_ERRORS):
        data = gather(load_training_sets(workload, data_dir=data_dir, seed=seed), train_frac)
        with progress() as prog:
            bar = prog.add_task("evaluating", total=None)
            res = evaluate_predictors(data, encoders=[e.strip() for e in encoders.split(",")], strong=strong,
                                      weak=weak, seed=seed, progress=lambda m: prog.update(bar, description=m))
    md, png = write_evaluation(res, out)
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {png} in {time.perf_counter() - t0:.1f} s")
