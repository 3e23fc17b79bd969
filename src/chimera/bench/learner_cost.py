"""What the online learner adds to each call the gateway routes, measured in this process, free of the HTTP stack.

`chimera bench gateway --online` measures the whole gateway's CPU per request with and without online learning side
by side; on a shared machine that difference moves by a few tenths of a millisecond from run to run. This measures
the part that differs, alone: the gateway's backend pool (the admission core the gateway runs, with the gateway's
own policy and predictors built from the same config) taking `n` calls for `model: "chimera"`, each a new workflow
with a prompt of its own, through submit → dispatch → complete → the workflow's score → its end, with learning off
and on, in alternating rounds; CPU time of this thread per call.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

from chimera.sched.types import Call
from chimera.serve.app import build_policy
from chimera.serve.config import GatewayConfig, backends_for_cluster, build_gateway_config
from chimera.serve.model_infos import model_infos
from chimera.serve.pool import BackendPool


def _config(online: bool) -> GatewayConfig:
    backends = backends_for_cluster([{"model": m, "base_url": "http://127.0.0.1:9/v1", "max_inflight": 10_000}
                                     for m in ("bench-model", "bench-model-b")])
    return build_gateway_config(backends, learning={"online": True} if online else None)


def _round(online: bool, n: int, start: int) -> float:
    """CPU seconds for `n` calls (ids from `start`) through a fresh pool with learning `online`."""
    cfg = _config(online)
    infos = model_infos(cfg)
    pool = BackendPool(build_policy(cfg, infos), infos, cfg.backends, max_queue=100_000)
    t0 = time.thread_time()
    for i in range(start, start + n):
        now, wid = i * 0.001, f"wf-{i}"
        call = Call(call_id=i, workflow_id=wid, kind="chat", prompt=f"Say hi. (request {i})", stage=0,
                    prompt_tokens=8, arrival_s=now, workflow_arrival_s=now)
        pool.submit(call, now)
        pool.complete(call, now, 1)
        pool.core.feedback(wid, float(zlib.crc32(wid.encode()) % 2), now)
        pool.end_workflow(wid, now)
    return time.thread_time() - t0


def learner_work(n: int = 4000, rounds: int = 4) -> dict[str, Any]:
    """CPU ms per call without and with the online learner (the median round of each, rounds alternating) and the
    difference: the learner's own work per routed call, its score included."""
    off, on = [], []
    for r in range(rounds):
        for online, out in ((False, off), (True, on)) if r % 2 == 0 else ((True, on), (False, off)):
            out.append(1e3 * _round(online, n, r * n) / n)
    med = {k: sorted(v)[len(v) // 2] for k, v in (("off", off), ("on", on))}
    return {"calls": n, "rounds": rounds, "cpu_ms_per_call_off": med["off"], "cpu_ms_per_call_on": med["on"],
            "learner_ms_per_call": med["on"] - med["off"]}
