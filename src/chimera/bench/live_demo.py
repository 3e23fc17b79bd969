"""The live main job (`chimera demo`): agents drive the built-in workload through the Chimera gateway in front of an
emulated 3-model cluster, once under the `vllm` policy and once under `chimera`, each with fresh emulators and a
fresh gateway, all in their own processes. Live run against emulated backends (engine model), not real GPUs. Beside
each live run, its simulated twin: the simulator on the same workflows and arrival times, the prediction to check the
live comparison against."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chimera.bench.html_report import twin_versus, versus, write_report  # noqa: F401 - re-exported for the CLI
from chimera.bench.live import LABEL, MODELS  # noqa: F401 - re-exported for the CLI and tests

# The defaults (docs/live.md, "chimera demo: what it compares, and why its defaults"): loaded and long enough that the
# simulated twin predicts a clear gain, at a call rate two cores serve without becoming the bottleneck; ~1 min.
DEMO_TASKS = 300
DEMO_LOAD = 0.9
DEMO_LAM = 0.03
DEMO_TIME_SCALE = 2.0


@dataclass
class LiveRun:
    policy: str
    lam: float | None
    summary: dict[str, Any]
    calls: list[dict[str, Any]] = field(default_factory=list)  # trace-store rows: model, queued/dispatched/end
    twin: dict[str, Any] | None = None  # the simulator's prediction of this run (bench.live.simulate_same_run)


@dataclass
class LiveDemo:
    runs: list[LiveRun]
    rate: float
    tasks: int
    time_scale: float
    workload: str
    load: float = DEMO_LOAD
    report: Path | None = None
    label: str = LABEL  # what the runs are (with --no-hints: says the agents sent no workflow hints)


def read_calls(trace: Path) -> list[dict[str, Any]]:
    """The gateway's per-call rows (written by `chimera serve` to its SQLite trace store)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{trace}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(
            "SELECT workflow_id, model, queued_at, dispatched_at, ended_at, status FROM calls")]


def run_live_demo(n: int = DEMO_TASKS, time_scale: float = DEMO_TIME_SCALE, workload: str = "synthetic",
                  load: float = DEMO_LOAD, lam: float = DEMO_LAM, out: Path | str = "out/demo", seed: int = 0,
                  on_record: Callable | None = None, on_run: Callable[[str], None] | None = None,
                  hints: bool = True, append_only: bool = False) -> LiveDemo:
    """Both runs (vllm, then chimera λ=`lam`) on the same tasks and arrival times, each with fresh emulator and
    gateway processes (as `chimera bench live` runs them), each followed by its simulated twin (lengths learnt online
    from a cold start, as the gateway learns them); writes out/report.html. `hints=False`: the agents send no
    workflow hints, so the gateway infers each workflow from its conversation (the twin is unchanged); `append_only`:
    the agents send append-only conversations with their hints (the hintless run's messages, hinted)."""
    from chimera.bench.live import (EmulatedProvider, LiveBenchConfig, arrival_rate, parse_contender, run_contender,
                                    to_emulated_models)
    from chimera.bench.live.twin import simulate_same_run
    from chimera.workload.schema import write_tasks
    from chimera.workload.source import load_workload

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, _ = load_workload(workload, seed=seed)
    tasks, _ = to_emulated_models(tasks)
    wl = out / "workload.jsonl"
    write_tasks(tasks, wl)
    rate = arrival_rate(tasks, load, time_scale)
    cfg = LiveBenchConfig(contenders=["chimera:vllm", f"chimera:chimera@{lam}"], workload=workload, tasks=n,
                          rate=rate, time_scale=time_scale, seed=seed, overhead_rates=[], hints=hints,
                          append_only=append_only)
    provider = EmulatedProvider(wl, time_scale, seed, cfg.label)
    runs = []
    for spec in cfg.contenders:
        c = parse_contender(spec)
        if on_run is not None:
            on_run(c.strategy)
        r = run_contender(c, provider, tasks, cfg, rate, out / c.strategy, on_record)
        r.summary["policy"] = c.strategy
        r.summary["lam"] = c.lam
        twin = simulate_same_run(c, tasks, cfg, rate, online_lengths=True)
        if twin is not None:
            twin["policy"] = c.strategy
        runs.append(LiveRun(c.strategy, c.lam, r.summary, read_calls(out / c.strategy / "traces.sqlite"), twin))
    demo = LiveDemo(runs, rate, n, time_scale, workload, load, label=cfg.label)
    demo.report = write_report(demo, out / "report.html")
    return demo
