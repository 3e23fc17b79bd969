"""`chimera bench speed`: how fast the simulator plans and runs many workflows of the synthetic workload."""

from __future__ import annotations

import time
from dataclasses import dataclass

from chimera.bench.sweep import capacity_workflows_per_s
from chimera.perfmodel.profiles import ClusterConfig
from chimera.sim.experiment import prepare, run_policy
from chimera.workload.synthetic import generate


@dataclass
class SimulatorSpeed:
    plan_s: float  # drawing the workflows' plans
    result: dict  # the `run_policy` summary (its wall_s: the simulation)

    @property
    def total_s(self) -> float:
        return self.plan_s + self.result["wall_s"]

    @property
    def calls_per_s(self) -> float:
        return self.result["calls"] / self.total_s


def simulator_speed(tasks: int, policy: str, load: float, cluster: ClusterConfig, seed: int = 0) -> SimulatorSpeed:
    """Plan and simulate `tasks` workflows (2,000 synthetic tasks drawn again) at `load` × capacity, timed."""
    prep = prepare(generate(2000, seed=seed), cluster, seed=seed)
    rate = load * capacity_workflows_per_s(prep)
    t0 = time.perf_counter()
    wfs = prep.workflows(tasks, seed)
    plan_s = time.perf_counter() - t0
    return SimulatorSpeed(plan_s, run_policy(prep, policy, rate=rate, seed=seed, workflows=wfs))
