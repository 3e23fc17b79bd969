"""Poisson arrival times, one function for every body that opens the loop (simulator, live driver, live bench), so
the same seed gives the same arrivals wherever a run is made."""

from __future__ import annotations

import numpy as np

SIM_STREAM = 7  # the simulator's arrival stream: rng [seed, 7]
LIVE_STREAM = 2  # the agent driver's (and the live bench's simulated twin's): rng [seed, 2]


def poisson_arrivals(rate: float, n: int, seed: int, stream: int, start_at_zero: bool = False) -> np.ndarray:
    """n arrival times of a Poisson process of `rate` per second from rng [seed, stream]; `start_at_zero` shifts
    them so the first arrives at 0 (a live run starts with its first workflow, not one gap later)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    gaps = np.random.default_rng([seed, stream]).exponential(1.0 / rate, n)
    times = np.cumsum(gaps)
    return times - gaps[0] if start_at_zero and n else times
