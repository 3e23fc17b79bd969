"""`chimera demo --simulated`: vLLM-style serving against Chimera and the other policies on a simulated cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from chimera.bench.sweep import capacity_workflows_per_s
from chimera.sim.experiment import Prepared, run_policy

# (policy, λ): the baseline first, every other run is compared with it
RUNS: tuple[tuple[str, float | None], ...] = (
    ("vllm", None), ("least-loaded", None), ("routellm", None), ("sjf", None), ("chimera", 0.02), ("chimera", 0.05),
    ("chimera-oracle", 0.02))


@dataclass
class SimulatedDemo:
    rows: list[dict]  # `run_policy` summaries in RUNS order
    rate: float  # workflows/s every run was offered


def run_simulated_demo(prep: Prepared, tasks: int, load: float,
                       progress: Callable[[int], None] | None = None) -> SimulatedDemo:
    """Every run of RUNS on the same `tasks` workflows at `load` × the rate round-robin sustains when saturated."""
    rate = load * capacity_workflows_per_s(prep)
    wfs = prep.workflows(tasks, 0)
    rows = []
    for policy, lam in RUNS:
        rows.append(run_policy(prep, policy, rate=rate, workflows=wfs, lam=lam))
        if progress:
            progress(1)
    return SimulatedDemo(rows, rate)


def versus(base: dict, other: dict) -> str:
    """'2.10× lower mean latency, +3.2 points accuracy' (or 'higher') of `other` against `base`."""
    b, o = base["latency_s"]["mean"], other["latency_s"]["mean"]
    speed = f"{b / o:.2f}× lower" if o <= b else f"{o / b:.2f}× higher"
    return f"{speed} mean latency, {100 * (other['accuracy'] - base['accuracy']):+.1f} points accuracy"
