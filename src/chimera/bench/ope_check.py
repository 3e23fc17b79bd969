"""`chimera bench ope`: off-policy estimates checked against the truth the simulator can give.

Per seed: one logged run (the logging λ, written to a trace store as the gateway writes it), the estimates of each
candidate λ from that store alone (chimera.train.ope) and from replays of the candidate in a world whose quality is
learnt from that store (chimera.train.ope_replay, chimera.bench.ope_replays), then each candidate actually run on the
same workflows, seed and rate: the estimate's error, whether its interval covers the candidate's simulated accuracy,
and (for scale) the error of the naive answer (the logged run's own mean). The check judges the replayed DR. One
seed is one draw of a noisy check; several seeds show how often the estimates land and the intervals cover. All
results simulated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from chimera.bench.ope_replays import fit_reward_tables, replay_candidate, replay_predictors
from chimera.bench.sim_trace import SimTraceWriter
from chimera.bench.sweep import capacity_workflows_per_s
from chimera.perfmodel.profiles import ClusterConfig
from chimera.predict.assembly import PredictorsSpec
from chimera.sim.experiment import Prepared, prepare, run_policy
from chimera.train.ope import Candidate, evaluate
from chimera.train.ope_replay import replayed_dr
from chimera.train.ope_traces import logged_calls_from_traces
from chimera.train.ope_world import world_from_traces
from chimera.workload.schema import Task

TOLERANCE_PTS = 3.0  # the check: |DR − simulated accuracy| within this many points, and the interval covering it
ESTIMATORS = ("dr_replayed", "dr", "dr_additive")  # set against the simulated accuracy
JUDGED = "dr_replayed"  # the estimator the check's verdict is on


@dataclass(frozen=True)
class OPECheckSpec:
    logged_lam: float
    candidates: tuple[float, ...]
    load: float = 0.7
    tasks: int = 3000
    seeds: tuple[int, ...] = (0,)
    predictions: str = "online"
    learner: tuple[tuple[str, Any], ...] = ()  # parameters of the runs' confidence predictor (e.g. explore_min)
    n_boot: int = 2000
    replays: int = 5  # replays of each candidate behind the replayed DR

    def runs_per_seed(self) -> int:
        """Simulated runs per seed: the logged one, and per candidate its replays and its actual run."""
        return 1 + len(self.candidates) * (1 + self.replays)

    def predictors(self) -> PredictorsSpec:
        """The runs' predictors: `predictions` with `learner` over its confidence predictor's parameters."""
        return replay_predictors(self.predictions, dict(self.learner))


def run_ope_check(tasks_for: Callable[[int], Sequence[Task]], cluster: ClusterConfig, spec: OPECheckSpec, out: Path,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Every seed's check (`check_seed`, trace stores out/trace-SEED.sqlite) and the summary over seeds. Each seed
    loads (`tasks_for(seed)`) and prepares as `chimera simulate --seed` does, at load × capacity rounded to
    0.01 wf/s, so `chimera simulate --seed S --rate R` reproduces every run."""
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in spec.seeds:
        prep = prepare(tasks_for(seed), cluster, seed=seed)
        cap = capacity_workflows_per_s(prep)
        runs.append(check_seed(prep, spec, seed, round(spec.load * cap, 2), out / f"trace-{seed}.sqlite", progress))
        runs[-1]["capacity_wps"] = cap
    rows = [r for run in runs for r in run["rows"]]
    summary = []
    for lam in spec.candidates:
        mine = [r for r in rows if r["lam"] == lam]
        k = len(mine)
        entry: dict[str, Any] = {"lam": lam, "runs": k, "mean_ess": sum(r["ess"] for r in mine) / k,
                                 "mean_abs_naive_error_pts": sum(abs(r["naive_error_pts"]) for r in mine) / k}
        for name in ESTIMATORS:
            errs = [r[name]["error_pts"] for r in mine]
            entry[name] = {"mean_error_pts": sum(errs) / k, "mean_abs_error_pts": sum(map(abs, errs)) / k,
                           "covered": sum(r[name]["covered"] for r in mine),
                           "within": sum(r[name]["within"] for r in mine)}
        summary.append(entry)
    for run in runs:  # a logged run passes when every candidate's judged estimate is within and covers
        run["passed"] = all(r[JUDGED]["covered"] and r[JUDGED]["within"] for r in run["rows"])
    return {"simulated": True, "spec": vars(spec), "runs": runs, "summary": summary,
            "passed": all(run["passed"] for run in runs)}


def _judged(est: Any, acc: float) -> dict[str, Any]:
    """An estimate against the simulated accuracy: its value and interval, error in points, covered, within."""
    err = 100 * (est.value - acc)
    return {"value": est.value, "low": est.low, "high": est.high, "error_pts": err, "covered": est.covers(acc),
            "within": abs(err) <= TOLERANCE_PTS}


def check_seed(prep: Prepared, spec: OPECheckSpec, seed: int, rate: float, db: Path,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Logged run → trace store `db` → estimates; then every candidate's actual run on the same workflows."""
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        f.unlink(missing_ok=True)  # the bench's own store of its last run
    wfs = prep.workflows(spec.tasks, seed)
    predictors = spec.predictors()

    def run(lam: float, record=None) -> dict:
        res = run_policy(prep, "chimera", rate=rate, seed=seed, lam=lam, workflows=wfs,
                         predictions=predictors, record=record)
        if progress:
            progress(1)
        return res

    writer = SimTraceWriter(db, "chimera")
    try:
        logged_run = run(spec.logged_lam, writer)
    finally:
        written = writer.close()
    logged, stats = logged_calls_from_traces(db)
    report = evaluate(logged, [Candidate.chimera(x) for x in spec.candidates], n_boot=spec.n_boot, seed=seed)
    keys, tables, seen = fit_reward_tables(prep, predictors, logged)
    traffic = world_from_traces(db, logged, prep.templates, prep.rule)
    rows = []
    for lam, est in zip(spec.candidates, report.candidates):
        probs = replay_candidate(prep, logged, keys, tables, traffic, lam, seed, predictors, spec.replays, progress)
        replayed = replayed_dr(logged, tables, probs, n_boot=spec.n_boot, seed=seed)
        actual = run(lam)
        acc = actual["accuracy"]
        rows.append({"seed": seed, "lam": lam, "accuracy": acc, "latency_mean_s": actual["latency_s"]["mean"],
                     **{name: _judged(getattr(est, name), acc) for name in ("dr", "dr_additive")},
                     "dr_replayed": {**_judged(replayed.estimate, acc), **replayed.as_dict()},
                     "ips": vars(est.ips), "snips": vars(est.snips), "ess": est.ess,
                     "ess_additive": est.ess_additive, "share_positive": est.share_positive,
                     "agreement": est.agreement, "mean_weight": est.mean_weight.value,
                     "naive_error_pts": 100 * (logged_run["accuracy"] - acc)})
    return {"seed": seed, "rate": rate, "trace": written, "trace_stats": stats, "replay": report.replay,
            "reward_model": seen,
            "level": report.level,
            "logged": {"lam": spec.logged_lam, "accuracy": logged_run["accuracy"],
                       "latency_mean_s": logged_run["latency_s"]["mean"],
                       "exploration": [w["exploration"] for w in logged_run["windows"]]},
            "rows": rows}


def to_markdown(res: dict[str, Any], workload: str) -> str:
    """The check as tables: one row per seed and candidate λ, then the summary per λ over seeds (all simulated)."""
    sp = res["spec"]
    pct = int(round(100 * res["runs"][0]["level"]))
    rates = ", ".join(f"{r['rate']:.2f}" for r in res["runs"])

    def est(e: dict) -> str:
        return f"{100 * e['value']:.1f} [{100 * e['low']:.1f}, {100 * e['high']:.1f}] ({e['error_pts']:+.1f})"

    learner = "".join(f" --learner {k}={v}" for k, v in sp.get("learner", ()))
    names = {"dr_replayed": "DR replayed", "dr": "DR", "dr_additive": "DR additive"}
    lines = [f"Logged runs: chimera λ={sp['logged_lam']:g}, `--predictions {sp['predictions']}{learner}`, {workload}, "
             f"{sp['tasks']} workflows at load {sp['load']:g} ({rates} wf/s); simulated. Estimates in points with "
             f"their {pct}% interval and (error against the simulated accuracy); DR replayed from "
             f"{sp.get('replays', 5)} replays per candidate.", "",
             "| seed | logged accuracy | candidate λ | simulated accuracy | DR replayed | DR | DR additive | IPS | SNIPS "
             "| ESS | ESS additive | naive error |", "|" + "---|" * 12]
    for run in res["runs"]:
        for r in run["rows"]:
            lines.append(
                f"| {run['seed']} | {100 * run['logged']['accuracy']:.1f}% | {r['lam']:g} | {100 * r['accuracy']:.1f}% "
                f"| {est(r['dr_replayed'])} | {est(r['dr'])} | {est(r['dr_additive'])} | {100 * r['ips']['value']:.1f} "
                f"| {100 * r['snips']['value']:.1f} | {r['ess']:,.0f} | {r['ess_additive']:,.0f} | "
                f"{r['naive_error_pts']:+.1f} |")
    head = "".join(f" {names[n]}: mean error, mean abs error (pts) | within {TOLERANCE_PTS:g} | covers |"
                   for n in ESTIMATORS)
    lines += ["", f"| candidate λ | seeds |{head} mean abs naive error | mean ESS |",
              "|" + "---|" * (4 + 3 * len(ESTIMATORS))]
    for s in res["summary"]:
        k = s["runs"]
        cells = "".join(f" {s[n]['mean_error_pts']:+.1f}, {s[n]['mean_abs_error_pts']:.1f} | {s[n]['within']}/{k} | "
                        f"{s[n]['covered']}/{k} |" for n in ESTIMATORS)
        lines.append(f"| {s['lam']:g} | {k} |{cells} {s['mean_abs_naive_error_pts']:.1f} | {s['mean_ess']:,.0f} |")
    replay = min(r["replay"] for r in res["runs"])
    verdict = "met" if res["passed"] else "NOT met"
    passing = [str(run["seed"]) for run in res["runs"] if run.get("passed")]
    lines += ["", f"Replay check (the logged weights re-choose the logged model on routed, not explored calls): "
              f"≥ {100 * replay:.1f}% in every run. Logged runs whose every replayed DR is within {TOLERANCE_PTS:g} "
              f"points and covers: {len(passing)} of {len(res['runs'])} (seeds {', '.join(passing) or 'none'}). "
              f"Check (every seed): {verdict}."]
    return "\n".join(lines)


def write_results(res: dict[str, Any], workload: str, out: Path) -> str:
    md = to_markdown(res, workload)
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    return md


def candidate_list(text: str) -> tuple[float, ...]:
    """'0.02,0.1' → (0.02, 0.1); every λ ≥ 0 and at least one."""
    vals = tuple(float(x) for x in text.split(",") if x.strip())
    if not vals or any(v < 0 for v in vals):
        raise ValueError(f"--candidates must be one or more λ ≥ 0, got {text!r}")
    return vals

