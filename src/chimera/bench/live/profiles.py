"""Profiles of the real servers for the simulated twin: each measured by `chimera profile` (alone, together, or
with the others kept busy), how much each slows while the others are busy, or profiles given as files."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from chimera.bench.live.config import CONTENTION_FILE, REAL_MAX_MODEL_LEN, REAL_MAX_NUM_BATCHED_TOKENS, LiveBenchConfig
from chimera.bench.live.servers import cluster_kwargs, params_b, real_server_specs, server_workdir
from chimera.bench.live.twin import profiled_cluster
from chimera.bench.loadgen import Answer, LoadThread, Request
from chimera.workload.schema import Task


def profile_command(server, out: Path, cfg: LiveBenchConfig, size_b: float | None) -> list[str]:
    """The pluggable profiling step: `chimera profile` against one running server, writing `out` (PROFILE.yaml).

    Replace this (or pass `profiles`) to plug in another way of measuring; what the benchmark needs is a profile
    file per server that a cluster file can load as `profile_file:`."""
    from chimera.util.procs import chimera_cmd

    cmd = chimera_cmd("profile", "--base-url", server.base_url, "--model", server.served_model_name,
                      "--out", str(out), "--json", str(out.with_suffix(".json")),
                      "--max-num-seqs", str(cfg.max_inflight),
                      "--max-num-batched-tokens", str(REAL_MAX_NUM_BATCHED_TOKENS),
                      "--gpu", f"cpu-core-{server.core}-vllm-cpu", "--rounds", str(cfg.profile_rounds),
                      "--concurrency", cfg.profile_concurrency)
    if size_b is not None:
        cmd += ["--params-b", f"{size_b:.6g}"]
    return cmd


def run_commands(cmds: dict[str, list[str]], logs: dict[str, Path], together: bool, timeout_s: float = 900.0,
                 on_done: Callable[[str], None] | None = None) -> dict:
    """Run the commands (in parallel if `together`), each in its own process group, logging to its file; every
    one is stopped by its own handle if anything fails; `on_done(name)` as each finishes. Returns {name: s}."""
    import signal
    import subprocess

    procs: dict[str, subprocess.Popen] = {}
    t0: dict[str, float] = {}
    took: dict[str, float] = {}
    fhs = []

    def start(name: str) -> None:
        fh = open(logs[name], "wb")
        fhs.append(fh)
        t0[name] = time.monotonic()
        procs[name] = subprocess.Popen(cmds[name], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                       stdin=subprocess.DEVNULL)

    def finish(name: str, rc: int) -> None:
        took[name] = time.monotonic() - t0[name]
        if rc != 0:
            tail = "\n".join(logs[name].read_text(errors="replace").splitlines()[-8:])
            raise RuntimeError(f"profiling {name} failed (exit {rc}); see {logs[name]}:\n{tail}")
        if on_done is not None:
            on_done(name)

    def wait(name: str) -> None:
        try:
            rc = procs[name].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmds[name][3:6])}: no result after {timeout_s:.0f} s; see {logs[name]}")
        finish(name, rc)

    try:
        if together:
            for n in cmds:
                start(n)
            left = set(cmds)
            while left:  # in the order they finish (on_done starts background load on a finished server)
                for n in sorted(left):
                    rc = procs[n].poll()
                    if rc is not None:
                        left.discard(n)
                        finish(n, rc)
                    elif time.monotonic() - t0[n] > timeout_s:
                        raise RuntimeError(f"profiling {n}: no result after {timeout_s:.0f} s; see {logs[n]}")
                time.sleep(0.2)
        else:
            for n in cmds:
                start(n)
                wait(n)
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pr.wait(10)
                if pr.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pr.pid, signal.SIGKILL)
                    pr.wait(5)
        for fh in fhs:
            fh.close()
    return took


class BackgroundLoad:
    """Calls shaped like the run's (each a stage of the benchmark's workflows: its planned prompt of filler, exactly
    its output with ignore_eos, not streamed) to every server `add`ed, until `stop`: open-loop Poisson at `rps` per
    server, or with `in_flight` a closed loop keeping that many in flight on each. Sent by the shared load
    generator from a thread of this process (where the agents run). Profile mode "loaded" uses it so that a server
    is measured while the others are busy, as in a run; the contention check keeps the peers busy with it."""

    def __init__(self, workflows: Sequence[tuple[str, Any, Task]], rps: float, seed: int = 0,
                 in_flight: int | None = None) -> None:
        calls = []
        for _, plan, _ in workflows:
            outs = [plan.output_tokens(i, plan.models[0]) for i in range(plan.n_stages)]
            calls += [(plan.prompt_tokens(i, outs), outs[i]) for i in range(plan.n_stages)]
        self.calls = calls or [(256, 32)]
        self.rps, self.in_flight = rps, in_flight
        self.rng = np.random.default_rng([seed, 7])
        self.sent = self.errors = 0
        self._load = LoadThread(timeout_s=600, name="background-load")

    def add(self, server) -> None:
        """Start sending to `server` (a handle with `served_model_name` and `base_url`)."""
        stop = self._load.stopped.is_set
        if self.in_flight is not None:
            self._load.call(lambda gen: gen.closed_loop(lambda: self._call(server), self.in_flight, stop,
                                                        self._answer))
        else:
            self._load.call(lambda gen: gen.open_loop(lambda: float(self.rng.exponential(1.0 / self.rps)),
                                                      lambda _late: gen.fire(self._call(server), self._answer),
                                                      first_at_zero=True, stop=stop))

    def stop(self) -> dict[str, int]:
        self._load.stop()
        return {"sent": self.sent, "errors": self.errors}

    def _call(self, srv) -> Request:
        prompt, out = self.calls[int(self.rng.integers(len(self.calls)))]
        prompt = min(prompt, REAL_MAX_MODEL_LEN - out - 64)
        self.sent += 1
        return Request(srv.base_url + "/chat/completions", {
            "model": srv.served_model_name, "max_tokens": max(1, out), "ignore_eos": True,
            "messages": [{"role": "user", "content": "the" + " the" * max(0, prompt - 8)}]})

    def _answer(self, a: Answer) -> None:
        self.errors += a.status != 200


def profile_real_servers(cfg: LiveBenchConfig, folders: dict[str, Path], out: Path,
                         on_stage: Callable[[str], None] | None = None,
                         workflows: Sequence[tuple[str, Any, Task]] | None = None) -> dict[str, Any]:
    """Fresh servers (the contenders' settings), each measured by `chimera profile` — both at once with
    profile_mode "together" (both busy, the clients on the same cores); "loaded": also, a server whose profile is
    done gets the run's kind of calls (`BackgroundLoad`, `background_rps`) until every profile is done, so the
    slow server is not measured beside an idle one; "alone": one by one — then stopped.
    Returns {"paths": {name: PROFILE.yaml}, "seconds": {...}, "startup_s": {...}, "mode": ...}."""
    from chimera.backends.vllm_cpu import vllm_cluster

    out.mkdir(parents=True, exist_ok=True)
    if on_stage is not None:
        on_stage(f"profiling {', '.join(cfg.real_models)} ({cfg.profile_mode})")
    background: dict[str, int] | None = None
    with vllm_cluster(real_server_specs(cfg), workdir=server_workdir(out, cfg.real_models),
                      **cluster_kwargs(cfg)) as cl:
        paths = {s.served_model_name: out / f"{s.served_model_name}.yaml" for s in cl}
        cmds = {s.served_model_name: profile_command(s, paths[s.served_model_name], cfg,
                                                     params_b(folders[s.served_model_name])) for s in cl}
        bg = BackgroundLoad(workflows or [], cfg.background_rps, cfg.seed) if cfg.profile_mode == "loaded" else None
        try:
            took = run_commands(cmds, {n: out / f"{n}.log" for n in cmds}, cfg.profile_mode != "alone",
                                on_done=(lambda n: bg.add(cl.by_name(n))) if bg is not None else None)
        finally:
            if bg is not None:
                background = bg.stop()
        if cfg.contention and len(cl) > 1:
            if on_stage is not None:
                on_stage("measuring how much each server slows while the others are busy")
            contention = measure_peer_slowdown(list(cl), cfg, workflows or [])
            (out / CONTENTION_FILE).write_text(json.dumps(contention, indent=1))
        startup = {s.served_model_name: s.startup_s for s in cl}
    res = {"paths": {n: str(p) for n, p in paths.items()}, "seconds": took, "startup_s": startup,
           "mode": cfg.profile_mode, "measured": True}
    if background is not None:
        res["background_load"] = {**background, "rps_per_server": cfg.background_rps}
    (out / "profiling.json").write_text(json.dumps(res, indent=1))
    return res


def measure_peer_slowdown(cl, cfg: LiveBenchConfig, workflows: Sequence[tuple[str, Any, Task]]
                          ) -> dict[str, dict[str, Any]]:
    """How much each server slows while the others are busy (they share the machine's cores; docs/perfmodel.md):
    its TPOT at batch `contention_batch` with the others idle, then with the others kept busy by the run's kind of
    calls (closed loop, `contention_batch` in flight each), as the engine itself measures it (vLLM's inter-token
    latency). The ratio is the simulator's `peer_busy_slowdown` for that server."""
    from chimera.profiling.client import ProfileConfig, measure_decode_tpots

    out: dict[str, dict[str, Any]] = {}
    k, waves = cfg.contention_batch, 3
    for srv in cl:
        pcfg = ProfileConfig(base_url=srv.base_url, model=srv.served_model_name, decode_tokens=64, seed=cfg.seed)
        alone = statistics.median(measure_decode_tpots(pcfg, k, waves))
        bg = BackgroundLoad(workflows, cfg.background_rps, cfg.seed, in_flight=k)
        for other in cl:
            if other is not srv:
                bg.add(other)
        try:
            time.sleep(2.0)  # let the peers fill up
            busy = statistics.median(measure_decode_tpots(pcfg, k, waves))
        finally:
            sent = bg.stop()
        out[srv.served_model_name] = {"tpot_alone_ms": 1e3 * alone, "tpot_peers_busy_ms": 1e3 * busy,
                                      "slowdown": min(10.0, max(1.0, busy / alone)), "batch": k, "waves": waves,
                                      "peer_calls": sent}
    return out


def given_profiles(cfg: LiveBenchConfig) -> dict[str, Any]:
    """Profiles from `cfg.profiles` (NAME.yaml per real model), instead of measuring."""
    d = Path(cfg.profiles or "")
    paths = {m: d / f"{m}.yaml" for m in cfg.real_models}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"profiles: no {', '.join(missing)} (write them with `chimera profile --out`, or "
                                "leave --profiles out to measure the servers first)")
    res: dict[str, Any] = {"paths": {n: str(p) for n, p in paths.items()}, "mode": "given", "measured": False}
    with contextlib.suppress(OSError, ValueError):  # how they were measured, when they came from this benchmark
        res["measured_as"] = json.loads((d / "profiling.json").read_text())
    return res


def profile_summary(paths: dict[str, str], cfg: LiveBenchConfig) -> dict[str, dict[str, Any]]:
    """Per profile: the fitted coefficients, the fit's RMS error and what the fit predicts at batch 1 and 32."""
    import yaml

    from chimera.perfmodel.perf import StepTimeModel

    cl = profiled_cluster(paths, cfg)
    out = {}
    for spec in cl.models:
        doc = yaml.safe_load(Path(paths[spec.name]).read_text())
        perf = StepTimeModel(spec)
        rep = doc.get("fit_report") or {}
        fitted = {k: v for k, v in doc["fitted"].items() if k != "source"}
        out[spec.name] = {
            "file": paths[spec.name], "fitted": fitted, "rms_relative_error": rep.get("rms_relative_error"),
            "notes": rep.get("notes", []), "source": doc["fitted"].get("source"),
            "tpot_ms_c1": 1e3 * perf.step_time(1, 300, 0), "tok_s_c32": 32 / perf.step_time(32, 32 * 300, 0),
            "prefill_tok_s_1024": 1024 / perf.prefill_time(1024),
        }
    return out
