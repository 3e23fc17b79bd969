"""The soak from start to end: predictors trained (or loaded), emulated backends and a gateway started, both
phases run, everything stopped; results.json and results.md, and the summary over the windows."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from chimera.bench.gateway_process import gateway_process
from chimera.bench.live.config import MODELS
from chimera.bench.live.providers import emulated_cluster
from chimera.bench.proc_cpu import rss_mib
from chimera.bench.soak.config import CLASSES, HELD_MODEL, LABEL, PHASES, SoakConfig, command_line
from chimera.bench.soak.report import markdown
from chimera.bench.soak.traffic import Soak
from chimera.serve.config import GatewayConfig, backends_for_cluster, build_gateway_config
from chimera.util.procs import Spawned
from chimera.util.threaded import free_port


def train_synthetic(dest: Path, n_tasks: int, trees: int, seed: int = 0) -> Path:
    """`chimera train -w synthetic:N --out DEST --trees T` (hashing encoder), as a function."""
    from chimera.train.predictors import gather, train_predictors
    from chimera.workload.source import load_workload

    tasks, _ = load_workload(f"synthetic:{n_tasks}", seed=seed)
    pred = train_predictors(gather([(f"synthetic:{n_tasks}", tasks)], 0.7), encoder="hashing", seed=seed,
                            n_estimators=trees)
    pred.save(dest)
    return dest


def gateway_config(cfg: SoakConfig, emus: dict[str, Spawned], predictors: Path, out: Path, port: int
                   ) -> GatewayConfig:
    """The soak's gateway: trained predictors, trace store in OUT, loopback only, a small queue limit.

    The held calls wait for the whole reject phase, so the request timeout outlasts it."""
    backends = backends_for_cluster(
        {"model": m, "base_url": e.url + "/v1", "profile": MODELS[m], "workload_model": m,
         "max_inflight": cfg.held_inflight if m == HELD_MODEL else cfg.inflight} for m, e in emus.items())
    return build_gateway_config(backends, lam=cfg.lam, port=port, predictors=predictors,
                                trace_store=out / "traces.sqlite",
                                limits={"max_queue": cfg.max_queue, "request_timeout_s": cfg.reject_s + 300.0})


def _phase_totals(rows: list[dict], phase: str) -> dict[str, Any]:
    rs = [r for r in rows if r["phase"] == phase]
    counts = {c: sum(r["counts"][c] for r in rs) for c in CLASSES}
    return {"windows": len(rs), "sent": sum(r["sent"] for r in rs), "feedback": sum(r["feedback"] for r in rs),
            "counts": counts, "seconds": (rs[-1]["end_s"] - rs[0]["start_s"]) if rs else 0.0}


def summarise(cfg: SoakConfig, rows: list[dict], held: dict) -> dict[str, Any]:
    steady = [r for r in rows if r["phase"] == "steady"]
    warm = steady[0]["rss_end_mib"] if steady else float("nan")
    end = rows[-1]["rss_end_mib"] if rows else float("nan")
    steady_end = steady[-1]["rss_end_mib"] if steady else float("nan")
    phases = {p: _phase_totals(rows, p) for p in PHASES if any(r["phase"] == p for r in rows)}
    totals = {c: sum(ph["counts"][c] for ph in phases.values()) for c in CLASSES}  # held + recovery: on their own
    s: dict[str, Any] = {
        "rss_warmup_mib": warm, "rss_steady_end_mib": steady_end, "rss_end_mib": end,
        "rss_max_mib": max((r["rss_max_mib"] for r in rows), default=float("nan")),
        "rss_growth_pct": 100.0 * (end - warm) / warm if warm else float("nan"),
        "rss_growth_steady_pct": 100.0 * (steady_end - warm) / warm if warm else float("nan"),
        "phases": phases, "held": held, "totals": totals,
        "errors": totals["5xx"] + totals["conn"],
        "recovery_errors": sum(v for k, v in held.get("recovery", {}).items() if k != "200"),
        "steady_rejected": phases.get("steady", {}).get("counts", {}).get("429", 0),
    }
    rej = phases.get("reject")
    if rej and rej["counts"]["429"]:
        s["reject_kib_per_1000_429"] = 1024.0 * (end - steady_end) / rej["counts"]["429"] * 1000.0
    return s


def run_soak(cfg: SoakConfig, out: Path | str = "out/bench-soak",
             on_stage: Callable[[str], None] | None = None,
             on_window: Callable[[dict], None] | None = None,
             on_tick: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Train (or load) predictors, start the backends and the gateway, run both phases, stop everything,
    write OUT/results.json and OUT/results.md; returns the results."""
    from chimera.predict.artifacts import load_predictors
    from chimera.workload.schema import write_tasks
    from chimera.workload.source import load_workload

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md"):  # an interrupted run leaves none behind, not an older run's
        (out / name).unlink(missing_ok=True)
    say = on_stage or (lambda _m: None)
    t_start = time.time()
    if cfg.predictors is None:
        say(f"training predictors on synthetic:{cfg.train_tasks}")
        pred_dir = train_synthetic(out / "predictors", cfg.train_tasks, cfg.train_trees, cfg.seed)
    else:
        pred_dir = Path(cfg.predictors)
    known = load_predictors(pred_dir).models  # a bad folder fails here, before anything starts
    missing = [m for m in MODELS if m not in known]
    if missing:
        raise ValueError(f"{pred_dir} was trained on {known}; the soak's backends serve {list(MODELS)} "
                         f"(missing {missing}): train with `chimera train -w synthetic`")
    tasks, _ = load_workload("synthetic", seed=cfg.seed)
    prompts = [(t.kind, t.prompt) for t in tasks]
    wl = out / "workload.jsonl"
    write_tasks(tasks, wl)
    say("starting emulated backends and the gateway")
    pids: dict[str, int] = {}
    with emulated_cluster(wl, cfg.time_scale, cfg.seed, out) as emus:
        pids.update({f"emulator {m}": e.pid for m, e in emus.items()})
        with gateway_process(gateway_config(cfg, emus, pred_dir, out, free_port()), out) as gw:
            pids["gateway"] = gw.pid
            soak = Soak(cfg, gw, emus[HELD_MODEL], prompts, on_window, on_tick)
            say("steady")
            try:
                asyncio.run(soak.run())
            finally:
                soak.resume_held()  # never leave a stopped process behind (Ctrl-C, errors)
            rss_final = rss_mib(gw.pid)
    held = {"model": HELD_MODEL, "sent": soak.held_sent, "counts": soak.held_counts, "recovery": soak.recovery}
    result = {
        "label": LABEL, "command": command_line(cfg), "config": cfg.model_dump(), "predictors": str(pred_dir),
        "gateway_config": str(out / "gateway.yaml"), "held_model": HELD_MODEL, "windows": soak.rows,
        "summary": summarise(cfg, soak.rows, held), "rss_before_stop_mib": rss_final,
        "rss_samples": [[round(t, 2), v] for t, v in soak.rss_samples], "pids": pids,
        "cpus": os.cpu_count(), "wall_s": time.time() - t_start,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    return result
