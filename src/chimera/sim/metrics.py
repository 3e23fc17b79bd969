"""The summary every run reports (simulated or live): accuracy, latency percentiles, queue time, per-model load."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class WorkflowRecord:
    """Outcome of one workflow: when it arrived and ended, its score, and how long its calls waited."""

    workflow_id: str
    task_id: str
    kind: str
    arrival_s: float
    end_s: float
    score: float
    queue_s: float
    calls: int
    models: list[str] = field(default_factory=list)
    failed: str | None = None
    explored: int = 0  # calls routed by exploration (a learning predictor's), not by the policy's choice

    @property
    def latency_s(self) -> float:
        return self.end_s - self.arrival_s


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


WINDOW = 500  # workflows per window of a run's learning curve


def windows(records: list[WorkflowRecord], size: int = WINDOW) -> list[dict]:
    """Accuracy, mean latency and the share of calls explored per consecutive `size` workflows in arrival order:
    how a run that learns improves (a last window shorter than half of `size` joins the one before)."""
    ordered = sorted(records, key=lambda r: r.arrival_s)
    starts = list(range(0, len(ordered), size))
    if len(starts) > 1 and len(ordered) - starts[-1] < size / 2:
        starts.pop()
    out = []
    for k, start in enumerate(starts):
        chunk = ordered[start:starts[k + 1] if k + 1 < len(starts) else len(ordered)]
        calls = sum(r.calls for r in chunk)
        out.append({"start": start, "workflows": len(chunk),
                    "accuracy": float(np.mean([r.score for r in chunk])),
                    "latency_mean_s": float(np.mean([r.latency_s for r in chunk])),
                    "exploration": sum(r.explored for r in chunk) / calls if calls else 0.0})
    return out


def summarize(
    policy: str,
    records: list[WorkflowRecord],
    per_model: dict[str, dict[str, int]],
    wall_s: float,
    extra: dict | None = None,
) -> dict:
    """Build the JSON summary of a run (the contract of `chimera simulate --json`)."""
    lat = np.array([r.latency_s for r in records], dtype=float)
    q = np.array([r.queue_s for r in records], dtype=float)
    scores = np.array([r.score for r in records], dtype=float)
    if records:
        span = max(r.end_s for r in records) - min(r.arrival_s for r in records)
    else:
        span = 0.0
    out = {
        "policy": policy,
        "tasks": len(records),
        "accuracy": float(scores.mean()) if len(scores) else 0.0,
        "latency_s": {
            "mean": float(lat.mean()) if len(lat) else 0.0,
            "p50": _pct(lat, 50),
            "p90": _pct(lat, 90),
            "p99": _pct(lat, 99),
        },
        "queue_s": {"mean": float(q.mean()) if len(q) else 0.0, "p99": _pct(q, 99)},
        "throughput_tasks_per_s": len(records) / span if span > 0 else 0.0,
        "per_model": per_model,
        "failed": sum(1 for r in records if r.failed),
        "wall_s": wall_s,
        "windows": windows(records),
    }
    if extra:
        out.update(extra)
    return out
