"""`chimera eval traces`: estimate from a trace store what a candidate policy would have scored (off-policy)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rich.markup import escape

from chimera.cli.common import console, err, fail, failing_on, write_json

POLICIES_FROM_TRACES = ("chimera",)  # policies whose choice is recomputable from the logged scorer terms
FEW_WORKFLOWS = 100  # an ESS below this is warned about


def ope_table(report, title: str, replayed: list | None = None) -> Table:
    """The logged policy's own mean, then each candidate: IPS, SNIPS, DR with their intervals, and the support;
    with `replayed` (one per candidate), the replayed DR first."""
    pct = int(round(100 * report.level))
    t = Table(title=title)
    cols = ("policy", *(("DR replayed",) if replayed else ()), "IPS", "SNIPS", f"DR [{pct}% interval]", "DR additive",
            "ESS", "ESS additive", "W>0", "agrees", "mean W")
    for col in cols:
        t.add_column(col, justify="left" if col == "policy" else "right")

    def est(e) -> str:
        return f"{100 * e.value:.1f} [{100 * e.low:.1f}, {100 * e.high:.1f}]"

    lg = report.logged
    pad = ("",) if replayed else ()
    t.add_row("logged (on-policy mean)", *pad, "", "", est(lg), "", f"{report.n_workflows:,}", "", "100%", "100%", "1")
    for i, c in enumerate(report.candidates):
        first = (est(replayed[i].estimate),) if replayed else ()
        t.add_row(c.label, *first, est(c.ips), est(c.snips), est(c.dr), est(c.dr_additive), f"{c.ess:,.0f}",
                  f"{c.ess_additive:,.0f}", f"{100 * c.share_positive:.0f}%", f"{100 * c.agreement:.0f}%",
                  f"{c.mean_weight.value:.2f}")
    return t


def eval_traces(
    db: Path = typer.Argument(..., help="A trace store (the gateway's trace_store file, or `chimera simulate "
                              "--trace`)."),
    policy: str = typer.Option("chimera", "--policy", help="Candidate policy: chimera (its choice is recomputed "
                               "from the logged scorer terms)."),
    lam: Optional[list[float]] = typer.Option(None, "--lam", help="Candidate λ (repeatable); none: the logged "
                                              "weights themselves (a check: the estimates should match the logged "
                                              "mean)."),
    n_boot: int = typer.Option(2000, "--boot", help="Bootstrap resamples of the workflows for the intervals."),
    level: float = typer.Option(0.95, "--level", help="Interval coverage."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="Replay each candidate on this cluster (a "
                                           "cluster file naming every logged model as the store does): adds the "
                                           "replayed DR, which sees the candidate's own load and learning."),
    replays: int = typer.Option(5, "--replays", min=1, help="Replays per candidate (with --cluster)."),
    predictions: str = typer.Option("online", "--predictions", help="Predictors of the replays (with --cluster): "
                                    "the gateway's, `online` for a gateway that learns from a cold start."),
    learner: list[str] = typer.Option([], "--learner", help="KEY=VALUE: a parameter of the replays' confidence "
                                      "predictor (repeatable), as the gateway's `learning:` sets it."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the estimates and counts as JSON here."),
) -> None:
    """Off-policy estimates of a candidate policy's mean workflow score on logged traffic: inverse propensity (IPS),
    self-normalised (SNIPS), doubly robust (DR) and DR additive (assumes the score adds up over a workflow's calls),
    with bootstrap intervals; scores in points (0-100).

    With --cluster, each candidate is also replayed in the simulator on the logged traffic, its quality learnt from
    the logged scores: the replayed DR (docs/gateway.md, "Evaluating another policy on logged traffic").

    Example: chimera eval traces out/gateway/trace.sqlite --policy chimera --lam 0.02 --lam 0.05 --json out/ope.json
    """
    from chimera.cli.common import cluster_or_default, progress
    from chimera.train.ope import Candidate, evaluate
    from chimera.train.ope_traces import describe_logged, logged_calls_from_traces
    from chimera.util.keyvalue import parse_pairs

    if policy not in POLICIES_FROM_TRACES:
        fail(f"--policy {policy!r} cannot be evaluated from traces; only {', '.join(POLICIES_FROM_TRACES)} "
             "(a scorer-weighted policy whose terms the trace store logs)")
    if any(x < 0 for x in lam or []):
        fail(f"--lam must be >= 0, got {[x for x in lam or [] if x < 0]}")
    if cluster is not None and not lam:
        fail("--cluster replays candidates: give at least one --lam")
    candidates = [Candidate.chimera(x) for x in lam] if lam else [Candidate("chimera (logged weights)")]
    replayed, seen = None, None
    with failing_on(ValueError, FileNotFoundError, strip=False):
        cl = None if cluster is None else cluster_or_default(cluster)  # a bad file fails before any work
        logged, stats = logged_calls_from_traces(db)
        console.print(describe_logged(stats))
        report = evaluate(logged, candidates, n_boot=n_boot, seed=seed, level=level)
        if cluster is not None:
            from chimera.bench.ope_replays import replay_predictors, replayed_estimates

            spec = replay_predictors(predictions, parse_pairs(learner, "--learner"))
            with progress() as prog:
                bar = prog.add_task("replays", total=len(lam) * replays)
                replayed, seen = replayed_estimates(db, logged, cl, lam, spec,
                                                    replays, n_boot, seed, level, lambda k: prog.advance(bar, k))
    console.print(ope_table(report, f"{db} — off-policy estimates (mean workflow score, points)", replayed))
    console.print(f"replay check: the logged weights re-choose the logged model on {100 * report.replay:.1f}% of "
                  "the routed, not explored calls (should be ≈100%)")
    for c in report.candidates:
        if c.ess < FEW_WORKFLOWS:
            err.print(f"[yellow]warning:[/] {escape(c.label)}: only ≈{c.ess:.0f} workflows' worth of logs support it "
                      "(ESS): its estimates are noisy and their intervals may undercover; log with more "
                      "exploration, or evaluate nearer the logged policy")
    if seen is not None:
        console.print(f"replayed DR: the reward model saw {seen['pairs_seen']:,} of {seen['pairs']:,} (prompt, model) "
                      f"pairs over {seen['prompts']:,} prompts; where a prompt never ran a model it falls back to the "
                      "learner refit on the logs")
    if json_out:
        extra = {} if replayed is None else {"replayed": [r.as_dict() for r in replayed], "reward_model": seen}
        write_json(json_out, {"stats": stats, **report.as_dict(), **extra})
