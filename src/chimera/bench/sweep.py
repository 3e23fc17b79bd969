"""`chimera bench sim`: policies × load levels × λ on one or more workloads, side by side in one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from chimera.engine.profiles import ClusterConfig
from chimera.sched.registry import LAMBDA_POLICIES, POLICIES
from chimera.sim.experiment import Prepared, prepare, run_policy
from chimera.workload.schema import Task


@dataclass
class SweepSpec:
    """What to run; loads are fractions of the cluster's estimated capacity in workflows/s."""

    policies: Sequence[str] = POLICIES
    loads: Sequence[float] = (0.5, 1.0, 1.5)
    lams: Sequence[float] = (0.01, 0.05, 0.2)
    tasks: int | None = 3000
    seed: int = 0
    train_frac: float = 0.3
    extra: dict = field(default_factory=dict)


def capacity_workflows_per_s(prep: Prepared) -> float:
    """Load 1.0: the rate at which round-robin (the `vllm` baseline) saturates its slowest model.

    Round-robin sends 1/n of the calls to each model, so model m saturates at n · tokens_per_s(m) / mean workflow
    output tokens on m; the cluster's capacity under that baseline is the smallest of these.
    """
    plans = [p for _, p, _ in prep.workflows(min(len(prep.test), 300), 0)]
    n = len(prep.runtimes)
    rates = []
    for r in prep.runtimes:
        mean_tokens = float(np.mean([p.remaining_tokens(0, r.info.name) for p in plans]))
        rates.append(n * r.info.tokens_per_s / max(mean_tokens, 1.0))
    return min(rates)


def run_sweep(
    workload_name: str,
    tasks: Sequence[Task],
    cluster: ClusterConfig,
    spec: SweepSpec,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Every policy at every load (and every λ for the chimera family); one row per run."""
    prep = prepare(tasks, cluster, seed=spec.seed, train_frac=spec.train_frac)
    cap = capacity_workflows_per_s(prep)
    rows = []
    wfs = prep.workflows(spec.tasks, spec.seed)
    for load in spec.loads:
        rate = load * cap
        for policy in spec.policies:
            lams = spec.lams if policy in LAMBDA_POLICIES else (None,)
            for lam in lams:
                res = run_policy(prep, policy, rate=rate, seed=spec.seed, lam=lam, workflows=wfs)
                res.update(workload=workload_name, load=load, capacity_wps=cap)
                rows.append(res)
                if progress:
                    progress(1)
    return rows


def count_runs(spec: SweepSpec) -> int:
    per_load = sum(len(spec.lams) if p in LAMBDA_POLICIES else 1 for p in spec.policies)
    return per_load * len(spec.loads)
