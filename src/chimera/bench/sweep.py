"""`chimera bench sim`: policies × load levels × λ on one or more workloads, side by side in one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from chimera.engine.profiles import ClusterConfig
from chimera.sched.registry import LAMBDA_POLICIES, POLICIES
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
    extra: dict = field(default_factory=dict)


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
    """Every policy at every load (and every λ for the chimera family); one row per run."""
    prep = prepare(tasks, cluster, seed=spec.seed, train_frac=spec.train_frac, predictors=predictors)
    cap = capacity_workflows_per_s(prep)
    rows = []
    wfs = prep.workflows(spec.tasks, spec.seed)
    for load in spec.loads:
        rate = load * cap
        for policy in spec.policies:
            if policy in ("chimera", "chimera-oracle"):
                lams = spec.lams
            elif policy in LAMBDA_POLICIES:
                lams = (spec.ablation_lam,)
            else:
                lams = (None,)
            for lam in lams:
                res = run_policy(prep, policy, rate=rate, seed=spec.seed, lam=lam, workflows=wfs)
                res.update(workload=workload_name, load=load, capacity_wps=cap)
                rows.append(res)
                if progress:
                    progress(1)
    return rows


def count_runs(spec: SweepSpec) -> int:
    per_load = sum(len(spec.lams) if p in ("chimera", "chimera-oracle") else 1 for p in spec.policies)
    return per_load * len(spec.loads)
