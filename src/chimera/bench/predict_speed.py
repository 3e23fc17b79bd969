"""`chimera bench predict`: router + length prediction cost per request, batched as the gateway batches them."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from chimera.predict.artifacts import Predictors
from chimera.sched.types import Call
from chimera.workload.schema import Task


def _calls(tasks: Sequence[Task], n: int) -> list[Call]:
    out = []
    for i in range(n):
        t = tasks[i % len(tasks)]
        out.append(Call(call_id=i, workflow_id=f"{t.id}#{i}", kind=t.kind, prompt=t.prompt, stage=i % 3,
                        prompt_tokens=(t.prompt_tokens or len(t.prompt) // 4) + 40 * (i % 3),
                        arrival_s=0.0, workflow_arrival_s=0.0, generated_so_far=60 * (i % 3)))
    return out


def measure(pred: Predictors, tasks: Sequence[Task], models: Sequence[str], batch: int = 32, batches: int = 20,
            length_stat: str = "mean") -> dict:
    """Median and p90 milliseconds per request for the router, the length forest (read as the gateway reads it,
    `length_stat`) and both, caches off."""
    from chimera.predict.length import ForestLengths, stat_quantile
    from chimera.predict.router import RouterConfidence

    mapping = {m: m for m in models}
    router = RouterConfidence(pred.router, mapping, cache_size=0)
    length = ForestLengths(pred.length, mapping, quantile=stat_quantile(length_stat), cache_size=0)
    calls = _calls(tasks, batch * (batches + 2))
    r_ms, l_ms = [], []
    for b in range(batches + 2):
        chunk = calls[b * batch:(b + 1) * batch]
        t0 = time.perf_counter()
        router.predict_confidence(chunk)
        t1 = time.perf_counter()
        length.predict_lengths(chunk)
        t2 = time.perf_counter()
        if b >= 2:  # warm-up batches excluded
            r_ms.append(1000 * (t1 - t0) / batch)
            l_ms.append(1000 * (t2 - t1) / batch)
    r, ln = np.array(r_ms), np.array(l_ms)
    both = r + ln
    return {"batch": batch, "models": len(models), "length_stat": length_stat,
            "router_ms": float(np.median(r)), "length_ms": float(np.median(ln)),
            "total_ms": float(np.median(both)), "total_p90_ms": float(np.percentile(both, 90))}
