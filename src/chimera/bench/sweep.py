"""`chimera bench sim`: policies × load levels × λ on one or more workloads, side by side in one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from chimera.perfmodel.profiles import ClusterConfig
from chimera.sched.registry import POLICIES, policy_entry
from chimera.sim.experiment import Prepared, prepare, run_policy
from chimera.workload.schema import Task


@dataclass
class SweepSpec:
    """What to run; loads are fractions of the cluster's estimated capacity in workflows/s."""

    policies: Sequence[str] = POLICIES
    loads: Sequence[float] = (0.5, 0.8, 1.1)
    lams: Sequence[float] = (0.005, 0.01, 0.02, 0.05, 0.1)
    ablation_lam: float = 0.02  # the ablations run at one λ so the table stays readable
    tasks: int | None = 3000
    seed: int = 0
    train_frac: float = 0.3
    predictions: Sequence[str] = ()  # extra predictor choices (e.g. oracle-scores) for every λ-taking policy, not presets
    params: dict[str, dict] = field(default_factory=dict)  # policy name -> its parameters (checked before any run)
    length_stat: str = "mean"  # the trained length forest read at its mean or its median
    engine_order: str = "priority"  # the engines' waiting order: the call's priority, or "fcfs" (vLLM's default)
    hold: float | None = None  # gateway admission cap: hold × a replica's KV-limited batch × replicas (None: max_num_seqs)
    free_context: bool = False  # what-if bound: a workflow's earlier context is free (cached) on every replica


def policy_params(pairs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """POLICY.KEY=VALUE strings (`--param`) → {policy: {key: value}}, values read as YAML scalars."""
    from chimera.util.keyvalue import parse_pairs

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        head, _, rest = pair.partition(".")
        if not rest or "=" not in rest:
            raise ValueError(f"--param {pair!r}: expected POLICY.KEY=VALUE")
        out.setdefault(head, {}).update(parse_pairs([rest]))
    return out


def build_spec(policies: Sequence[str] | None = None, params: Iterable[str] = (), **fields: Any) -> SweepSpec:
    """A checked spec from command-line values: every policy when none are named, `params` as POLICY.KEY=VALUE
    strings; a bad pair, policy, parameter or predictor choice fails here, naming it, before anything runs."""
    spec = SweepSpec(policies=list(policies) if policies else list(POLICIES), params=policy_params(params), **fields)
    check_spec(spec)
    return spec


def capacity_workflows_per_s(prep: Prepared) -> float:
    """Load 1.0: the throughput round-robin (the `vllm` baseline) sustains when saturated.

    Measured, not estimated: a closed loop with twice as many agents as the cluster has batch slots keeps every
    engine full with a queue behind it; capacity = workflows completed per second over the middle half of the
    run (ramp-up and drain excluded).
    """
    from chimera.sched.registry import make_policy
    from chimera.sim.simulator import Simulator

    agents = min(3000, 2 * sum(r.info.max_inflight for r in prep.runtimes))
    sim = Simulator(prep.runtimes, make_policy("vllm"), prep.workflows(3 * agents, 12345), agents=agents)
    sim.run()
    ends = sorted(r.end_s for r in sim.records)
    lo, hi = len(ends) // 4, (3 * len(ends)) // 4
    return (hi - lo) / max(ends[hi] - ends[lo], 1e-9)


def run_sweep(
    workload_name: str,
    tasks: Sequence[Task],
    cluster: ClusterConfig,
    spec: SweepSpec,
    progress: Callable[[int], None] | None = None,
    predictors=None,
) -> list[dict]:
    """Every policy at every load (and every λ for policies that take one, see `lams_for`); one row per run."""
    check_spec(spec)
    prep = prepare(tasks, cluster, seed=spec.seed, train_frac=spec.train_frac, predictors=predictors,
                   length_stat=spec.length_stat)
    cap = capacity_workflows_per_s(prep)
    rows = []
    wfs = prep.workflows(spec.tasks, spec.seed)
    for load in spec.loads:
        rate = load * cap
        for policy in spec.policies:
            for choice in (None, *extra_predictions(policy, spec)):
                for lam in lams_for(policy, spec):
                    res = run_policy(prep, policy, rate=rate, seed=spec.seed, lam=lam, workflows=wfs,
                                     predictions=choice, engine_order=spec.engine_order, hold=spec.hold,
                                     free_context=spec.free_context,
                                     **spec.params.get(policy, {}))
                    res.update(workload=workload_name, load=load, capacity_wps=cap)
                    if choice is not None:  # its own row label: the policy under that predictor choice
                        res["policy"] = f"{policy}+{choice}"
                    rows.append(res)
                    if progress:
                        progress(1)
    return rows


def check_spec(spec: SweepSpec) -> None:
    """Refuse unknown policies, parameters and predictor choices before anything runs (errors name the key)."""
    from chimera.predict.assembly import PREDICTION_CHOICES, check_predictions
    from chimera.predict.length import stat_quantile
    from chimera.sched.registry import make_policy

    unknown = [p for p in spec.policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    stray = [p for p in spec.params if p not in spec.policies]
    if stray:
        raise ValueError(f"sweep params for policies not in the sweep: {stray}")
    for policy in spec.policies:
        params = spec.params.get(policy, {})
        make_policy(policy, **params)  # unknown keys (lam included, for a policy without it) fail here
        if "lam" in params:
            raise ValueError(f"sweep params of {policy!r}: set λ with lams / ablation_lam, not params")
        for lam in lams_for(policy, spec):
            make_policy(policy, lam=lam, **params)
    stat_quantile(spec.length_stat)  # 'mean' or 'median'
    bad = []
    for choice in spec.predictions:
        try:
            check_predictions(choice)
        except ValueError:
            bad.append(choice)
    if bad:
        raise ValueError(f"unknown predictions {bad}; choose from {', '.join(PREDICTION_CHOICES)}, or CONFIDENCE/LENGTH "
                         "of registered predictors")


def extra_predictions(policy: str, spec: SweepSpec) -> Sequence[str]:
    """The spec's extra predictor choices apply to policies that take λ and are not presets (chimera)."""
    entry = policy_entry(policy)
    return tuple(spec.predictions) if entry.takes("lam") and not entry.is_preset and entry.predictions is None else ()


def lams_for(policy: str, spec: SweepSpec) -> Sequence[float | None]:
    """λ values to run: every λ for a policy that takes one, one λ for its presets with fixed parameters
    (the ablations), none otherwise; decided by the policy's parameters, never its name."""
    entry = policy_entry(policy)
    if not entry.takes("lam"):
        return (None,)
    return (spec.ablation_lam,) if entry.is_preset else tuple(spec.lams)


def count_runs(spec: SweepSpec) -> int:
    per_load = sum(len(lams_for(p, spec)) * (1 + len(extra_predictions(p, spec))) for p in spec.policies)
    return per_load * len(spec.loads)


def write_results(rows: list[dict], out: Path, free_context: bool = False) -> tuple[str, Path]:
    """results.md (the runs, the frontier over the λ sweep, learning curves of runs that learn online), results.json,
    frontier.png and (when a run learns) learning.png in `out`;
    returns the markdown and the plot's path."""
    import json

    from chimera.bench.frontier import frontier, frontier_markdown
    from chimera.bench.learning import learning_markdown, learning_plot, learning_rows
    from chimera.bench.report import frontier_plot, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    front = frontier(rows)
    md = markdown_table(rows) + "\n## Frontier over the λ sweep\n\n" + frontier_markdown(front)
    if free_context:
        md = ("**What-if bound (`--free-context`):** every stage after a workflow's first prefills only its newest "
              "text, as if its workflow's earlier context were cached on every replica.\n\n" + md)
    if learning_rows(rows):  # runs that learn online: their learning curves beside the fixed predictors
        md += "\n## Learning online (per window of workflows)\n\n" + learning_markdown(rows)
        learning_plot(rows, out / "learning.png")
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"runs": rows, "frontier": front}, indent=1))
    return md, frontier_plot(rows, out / "frontier.png")
