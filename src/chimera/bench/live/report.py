"""The live benchmark's report: results.json, results.md (the head-to-head, the frontier over λ, the twin's
fidelity, the real servers' CPU and counters), frontier.png, and the tables of `--resimulate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from chimera.bench.live.config import FIDELITY_METRICS, REAL_MAX_MODEL_LEN, REAL_MAX_NUM_BATCHED_TOKENS
from chimera.bench.live.contenders import LiveBench
from chimera.bench.live.twin import compared_metrics
from chimera.util.figures import save_figure


def resim_markdown(r: dict[str, Any]) -> str:
    lines = [f"Simulator again on the stored live runs: profiles {', '.join(r['profiles'].values())}, lengths "
             f"{r['sim_lengths']}, peer-busy slowdowns "
             f"{', '.join(f'{n} ×{v:.2f}' for n, v in r.get('contention', {}).items()) or 'none'} "
             f"(capacity of that cluster {r['capacity_wps']:.3f} workflows/s).", "",
             "| contender | mean lat sim / live (s) | p50 sim / live | p99 sim / live | tasks/s sim / live | "
             "accuracy sim / live | fidelity mean / p50 / p99 / tasks/s / accuracy |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        if row["sim"] is None:
            continue
        lines.append(f"| {row['contender']} | {_fidelity_cells(row['sim'], row['live'], row['fidelity_pct'])} |")
    names = r.get("servers") or []
    if r.get("prefix_caching") and names:
        lines += ["", "Prefix-cache hits, real server (simulated twin), share of prompt tokens:", "",
                  "| contender | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {row['contender']} | " + " | ".join(
            _hits_cell((row.get("server_metrics") or {}).get(n, {}), row["sim"], n) for n in names) + " |"
            for row in r["rows"] if row["sim"] is not None]
    return "\n".join(lines) + "\n"


def _fidelity_cells(sim: dict[str, Any], live: dict[str, Any], fid: dict[str, float]) -> str:
    """The cells of one simulated-vs-live row: each metric sim / live, then the fidelity of each."""
    a, b = compared_metrics(sim), compared_metrics(live)
    return (f"{a['latency_mean']:.2f} / {b['latency_mean']:.2f} | {a['latency_p50']:.2f} / {b['latency_p50']:.2f} | "
            f"{a['latency_p99']:.2f} / {b['latency_p99']:.2f} | {a['throughput']:.2f} / {b['throughput']:.2f} | "
            f"{100 * a['accuracy']:.1f}% / {100 * b['accuracy']:.1f}% | "
            + " / ".join(f"{fid[k]:.0f}%" for k in FIDELITY_METRICS))


def replica_pairs(b: LiveBench) -> list[tuple[Any, Any]]:
    """(run as several replicas, the same contender's run as one gateway, or None), in run order."""
    def key(r: Any) -> tuple:
        return r.contender.strategy, r.contender.lam, r.contender.online

    single = {key(r): r for r in b.runs if r.contender.gateway == "chimera" and r.contender.replicas == 1}
    return [(r, single.get(key(r))) for r in b.runs if r.contender.replicas > 1]


def _replica_lines(b: LiveBench) -> list[str]:
    """Each contender run as several replicas beside the same contender as one gateway (same tasks, arrivals)."""
    pairs = replica_pairs(b)
    if not pairs:
        return []
    how = ("each agent call sent to the next replica round robin" if b.config.replica_spread == "call" and b.config.hints
           else "each workflow sent to one replica (sticky sessions)")
    lines = ["", f"Chimera as several replicas sharing state on one Redis (docs/replicas.md), {how}, against one "
             "gateway (mean latency ratio > 1: the replicas faster):", "",
             "| replicas | vs one gateway | mean latency ratio | accuracy (points) |", "|---|---|---:|---:|"]
    for x, y in pairs:
        if y is None:
            lines.append(f"| {x.contender.label} | – | – | – |")
            continue
        xs, ys = x.summary, y.summary
        lines.append(f"| {x.contender.label} | {y.contender.label} | "
                     f"{ys['latency_s']['mean'] / xs['latency_s']['mean']:.2f}× | "
                     f"{100 * (xs['accuracy'] - ys['accuracy']):+.1f} |")
    return lines


def round_stats(b: LiveBench) -> list[dict[str, Any]]:
    """--repeat: per contender, each round's accuracy and mean latency, their mean and range; for a contender run as
    replicas, whether its means lie within one gateway's range over the same rounds, and a two-sided Mann-Whitney
    p-value of each metric (small: the rounds differ by more than their spread explains)."""
    if not b.rounds:
        return []
    from scipy.stats import mannwhitneyu

    out = []
    for label, sums in b.rounds.items():
        acc = [s["accuracy"] for s in sums]
        lat = [s["latency_s"]["mean"] for s in sums]
        calls: dict[str, float] = {}
        for s in sums:
            for m, v in s["per_model"].items():
                calls[m] = calls.get(m, 0.0) + v.get("calls", 0) / len(sums)
        out.append({"contender": label, "rounds": len(sums), "accuracy": acc, "latency_mean_s": lat,
                    "calls": [{m: v.get("calls", 0) for m, v in s["per_model"].items()} for s in sums],
                    "accuracy_mean": sum(acc) / len(acc), "latency_mean_s_mean": sum(lat) / len(lat),
                    "calls_mean": {m: round(v, 1) for m, v in sorted(calls.items())}})
    by_label = {x["contender"]: x for x in out}
    for r, twin in replica_pairs(b):
        one = None if twin is None else by_label.get(twin.contender.label)
        x = by_label.get(r.contender.label)
        if one is None or x is None:
            continue
        x["vs"] = one["contender"]
        for metric, mean in (("accuracy", x["accuracy_mean"]), ("latency_mean_s", x["latency_mean_s_mean"])):
            x[f"{metric}_within"] = min(one[metric]) <= mean <= max(one[metric])
            x[f"{metric}_p"] = float(mannwhitneyu(x[metric], one[metric], alternative="two-sided").pvalue)
    return out


def _round_lines(b: LiveBench) -> list[str]:
    stats = round_stats(b)
    if not stats:
        return []
    lines = ["", f"Every contender over {stats[0]['rounds']} rounds, round by round on the same tasks and arrivals "
             "(round 1 is the run above):", "",
             "| contender | accuracy per round | mean | mean latency per round (s) | mean | calls per model, mean |",
             "|---|---|---:|---|---:|---|"]
    for x in stats:
        lines.append(f"| {x['contender']} | {', '.join(f'{100 * a:.1f}' for a in x['accuracy'])} | "
                     f"{100 * x['accuracy_mean']:.1f}% | {', '.join(f'{v:.2f}' for v in x['latency_mean_s'])} | "
                     f"{x['latency_mean_s_mean']:.2f} | "
                     f"{', '.join(f'{m}:{v:g}' for m, v in x['calls_mean'].items())} |")
    pairs = [x for x in stats if "vs" in x]
    if pairs:
        lines += ["", "Replicas against one gateway over the rounds: each mean within the one gateway's range of "
                  "rounds, and the two-sided Mann-Whitney p of the rounds (small: a difference beyond the spread):",
                  "", "| replicas | vs one gateway | accuracy: within, p | mean latency: within, p | "
                  "latency ratio of the means |", "|---|---|---|---|---:|"]
        for x in pairs:
            one = next(y for y in stats if y["contender"] == x["vs"])
            lines.append(f"| {x['contender']} | {x['vs']} | {_yes(x['accuracy_within'])}, {x['accuracy_p']:.2f} | "
                         f"{_yes(x['latency_mean_s_within'])}, {x['latency_mean_s_p']:.2f} | "
                         f"{x['latency_mean_s_mean'] / one['latency_mean_s_mean']:.2f}× |")
    return lines


def _yes(v: bool) -> str:
    return "yes" if v else "**no**"


def live_frontier(b: LiveBench) -> list[dict[str, Any]]:
    """The λ-sweep frontier (bench.frontier) of the live runs: Chimera's contenders as policies, LiteLLM's
    least-busy standing in for least-loaded where Chimera's own least-loaded did not run; empty without `vllm`."""
    from chimera.bench.frontier import LEAST_LOADED, frontier

    rows = []
    for r in b.runs:
        c = r.contender
        policy = c.strategy if c.gateway == "chimera" else f"litellm:{c.strategy}"
        policy = policy if c.replicas == 1 else f"{policy} x{c.replicas}"  # not one of the λ sweep's points
        rows.append({"workload": b.config.workload, "load": b.config.load, "policy": policy, "lam": c.lam,
                     "latency_s": r.summary["latency_s"], "accuracy": r.summary["accuracy"]})
    if not any(x["policy"] == LEAST_LOADED for x in rows):
        rows += [{**x, "policy": LEAST_LOADED} for x in rows if x["policy"] == "litellm:least-busy"]
    return frontier(rows)


def to_json(b: LiveBench, front: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """results.json; `front`: the runs' live_frontier when the caller has it already."""
    out = {"config": b.config.model_dump(), "rate": b.rate, "label": b.label, "model_mapping": b.mapping,
           "runs": [{"contender": r.contender.label, "live": r.summary, "sim": r.sim, "fidelity_pct": r.fidelity}
                    for r in b.runs],
           "overhead": b.overhead, "frontier": live_frontier(b) if front is None else front}
    if b.rounds:
        out["rounds"] = round_stats(b)
    if b.engine is not None:
        out["engine"] = b.engine
        for row, r in zip(out["runs"], b.runs):
            row.update(cpu=r.cpu, server_metrics=r.server_metrics, servers=r.servers)
    return out


def _fmt_models(s: dict[str, Any]) -> str:
    return ", ".join(f"{m}:{v['calls']}" for m, v in s["per_model"].items() if v.get("calls"))


def markdown(b: LiveBench, front: list[dict[str, Any]] | None = None) -> str:
    c = b.config
    if b.engine is not None:
        head = real_header(b)
    else:
        head = (f"Workload `{c.workload}`, {c.tasks} workflows, open-loop Poisson at {b.rate:.2f} workflows/s (live), "
                f"time scale {c.time_scale:g} (1 s here ≈ {c.time_scale:g} s on the emulated A6000s), seed {c.seed}. "
                f"{c.label}.")
    lines = [head, "",
             "| contender | accuracy | mean lat (s) | p50 | p99 | tasks/s | failed | calls per model |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in b.runs:
        s = r.summary
        lat = s["latency_s"]
        lines.append(f"| {r.contender.label} | {100 * s['accuracy']:.1f}% | {lat['mean']:.2f} | {lat['p50']:.2f} | "
                     f"{lat['p99']:.2f} | {s['throughput_tasks_per_s']:.2f} | {s['failed']} | {_fmt_models(s)} |")
    lit = [r for r in b.runs if r.contender.gateway == "litellm"]
    chi = [r for r in b.runs if r.contender.gateway == "chimera"]
    if lit and chi:
        lines += ["", "Chimera against each LiteLLM strategy (mean latency ratio > 1: Chimera faster):", "",
                  "| Chimera | vs LiteLLM | mean latency ratio | p99 ratio | accuracy (points) |",
                  "|---|---|---:|---:|---:|"]
        for x in chi:
            for y in lit:
                xs, ys = x.summary, y.summary
                lines.append(f"| {x.contender.label} | {y.contender.label} | "
                             f"{ys['latency_s']['mean'] / xs['latency_s']['mean']:.2f}× | "
                             f"{ys['latency_s']['p99'] / xs['latency_s']['p99']:.2f}× | "
                             f"{100 * (xs['accuracy'] - ys['accuracy']):+.1f} |")
    lines += _replica_lines(b)
    lines += _round_lines(b)
    if front is None:
        front = live_frontier(b)
    if front:
        from chimera.bench.frontier import frontier_markdown

        lines += ["", "Frontier over the live λ values (against the `chimera vllm` run; least-loaded: Chimera's own, "
                  "else LiteLLM's least-busy):", "", frontier_markdown(front).rstrip()]
    fid = [r for r in b.runs if r.sim is not None]
    if fid:
        lines += ["", "Simulator vs live, same workflows and arrival times (fidelity = 100·(1 − |sim − live| / live)):",
                  "", "| contender | simulated as | mean lat sim / live (s) | p50 sim / live | p99 sim / live | "
                  "tasks/s sim / live | accuracy sim / live | fidelity mean / p50 / p99 / tasks/s / accuracy |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r.contender.label} | {r.sim['sim_policy']} | {_fidelity_cells(r.sim, r.summary, r.fidelity)} |"
                  for r in fid]
    learning = [r for r in b.runs if r.contender.online]
    if learning:
        lines += ["", "Learning online from the agents' feedback, per window of workflows in arrival order "
                  "(live accuracy / mean latency; the twin's in brackets, with its share of calls explored):", "",
                  "| contender | " + " | ".join(f"window {k + 1}" for k in range(max(len(r.summary["windows"])
                                                                                  for r in learning))) + " |",
                  "|---|" + "---|" * max(len(r.summary["windows"]) for r in learning)]
        for r in learning:
            twin = (r.sim or {}).get("windows", [])
            cells = [f"{100 * w['accuracy']:.1f}% / {w['latency_mean_s']:.2f} s" + (
                f" ({100 * t['accuracy']:.1f}% / {t['latency_mean_s']:.2f} s, {100 * t['exploration']:.1f}%)"
                if t else "") for w, t in zip(r.summary["windows"], twin + [None] * len(r.summary["windows"]))]
            lines.append(f"| {r.contender.label} | " + " | ".join(cells) + " |")
    if b.engine is not None:
        lines += real_tables(b)
    if b.overhead is not None:
        from chimera.bench.gateway_overhead import markdown_table

        lines += ["", "Gateway added latency (instant fake backend, real loopback measurements):", "",
                  markdown_table(b.overhead)]
    if any(m != e for e, m in b.mapping.items()):
        where = "the real vLLM servers" if b.engine is not None else "the emulated cluster"
        lines += ["", f"Workload models on {where}: "
                  + ", ".join(f"{m} → {e}" for e, m in b.mapping.items()) + "."]
    return "\n".join(lines) + "\n"


def real_header(b: LiveBench) -> str:
    c, e = b.config, b.engine or {}
    w = e.get("workload", {})
    srv = ", ".join(f"{x['model']} (core {i})" for i, x in enumerate(e.get("servers", [])))
    prof = e.get("profiles", {})
    how = {"together": "both measured at once by `chimera profile` before the runs",
           "loaded": "both measured at once by `chimera profile` before the runs, a finished one kept busy with the "
                     "run's kind of calls until the other was done",
           "alone": "each measured alone by `chimera profile` before the runs",
           "given": f"given ({c.profiles}"
                    + (f", measured by this benchmark in mode {prof['measured_as'].get('mode')!r})"
                       if isinstance(prof.get("measured_as"), dict) else ")")}.get(prof.get("mode", ""),
                                                                                 prof.get("mode", ""))
    rate_src = (f"{c.load:g} × the simulated round-robin capacity {e.get('capacity_wps', 0):.3f} workflows/s of the "
                "profiled cluster" if c.rate is None else "given")
    return (f"Workload `{c.workload}`, {c.tasks} workflows, open-loop Poisson at {b.rate:.3f} workflows/s ({rate_src}), "
            f"real time, seed {c.seed}. Servers: {srv}; vLLM {'priority' if c.priority else 'fcfs'} scheduling, "
            f"max_num_seqs = gateway max_inflight {c.max_inflight}, max_model_len {REAL_MAX_MODEL_LEN}, "
            f"max_num_batched_tokens {REAL_MAX_NUM_BATCHED_TOKENS}, fresh servers per contender. Lengths: output × "
            f"{w.get('length_scale', 1):g}, prompts × {w.get('prompt_scale', 1):g}, tool time × "
            f"{w.get('tool_scale', 1):g}, the same for every model ({w.get('capped_calls', 0)} of {w.get('calls', 0)} "
            f"calls capped to fit max_model_len). Profiles: {how}. {c.label}.")


def _cpu_cell(cpu: dict[str, Any] | None, role: str) -> str:
    r = (cpu or {}).get("roles", {}).get(role)
    if r is None:
        return "–"
    return f"{r['cpu_s']:.1f} ({100 * (r['cores'] or 0):.0f}%)"


def twin_hit_pct(sim: dict[str, Any] | None, name: str) -> float | None:
    """The simulated twin's prefix-cache hit rate on server `name` (all its replicas), in %; None: not modelled."""
    q = h = 0
    for rep, e in ((sim or {}).get("engines") or {}).items():
        pc = e.get("prefix_cache")
        if rep.split("#")[0] == name and pc:
            q, h = q + pc["queried_tokens"], h + pc["hit_tokens"]
    return 100.0 * h / q if q else None


def _hits_cell(live: dict[str, Any], sim: dict[str, Any] | None, name: str) -> str:
    twin = twin_hit_pct(sim, name)
    return f"{live.get('prefix_cache_hit_pct', 0):.0f}%" + (f" (twin {twin:.0f}%)" if twin is not None else "")


def _server_cells(runs, names: Sequence[str], cell: Callable[[dict[str, Any], dict[str, Any] | None, str], str]):
    """(run, one table cell per server from its vLLM counters over the run, its twin and its name) for each run."""
    for r in runs:
        sm = r.server_metrics or {}
        yield r, [cell(sm.get(n, {}), r.sim, n) for n in names]


def real_tables(b: LiveBench) -> list[str]:
    """Real engine: CPU time per process, what the servers did, and the profiles the simulator ran on."""
    names = list(b.config.real_models)
    lines = ["", "CPU seconds over each run (share of one core in brackets; the servers' engine cores are pinned, "
             "one core each; their API processes, the gateway and the driver float over both cores):", "",
             "| contender | run wall (s) | " + " | ".join(f"server {n}" for n in names)
             + " | gateway | driver | machine busy (% of all cores) |",
             "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|"]
    for r in b.runs:
        cpu = r.cpu or {}
        lines.append(f"| {r.contender.label} | {cpu.get('wall_s', 0):.0f} | "
                     + " | ".join(_cpu_cell(cpu, f"server {n}") for n in names)
                     + f" | {_cpu_cell(cpu, 'gateway')} | {_cpu_cell(cpu, 'driver')} | "
                     f"{cpu.get('machine_busy_pct') or 0:.0f}% |")
    lines += ["", "What the servers did over each run (vLLM counters) and whether lengths were as planned:", "",
              "| contender | " + " | ".join(f"{n}: prompt / output tokens, preemptions, prefix-cache hits (simulated twin)"
                                             for n in names) + " | prompt reported / planned | short calls |",
              "|---|" + "---|" * len(names) + "---:|---:|"]
    for r, cells in _server_cells(b.runs, names, lambda d, sim, n: (
            f"{d.get('prompt_tokens', 0):,.0f} / {d.get('generation_tokens', 0):,.0f}, "
            f"{d.get('num_preemptions', 0):.0f}, {_hits_cell(d, sim, n)}")):
        lc = r.summary.get("length_check") or {}
        ratio = lc.get("prompt_reported_over_planned")
        lines.append(f"| {r.contender.label} | " + " | ".join(cells)
                     + f" | {ratio:.3f} | {lc.get('short_calls', 0)} of {lc.get('calls', 0)} |" if ratio is not None
                     else f"| {r.contender.label} | " + " | ".join(cells) + " | – | – |")
    lines += ["", "The engines' own times over each run (vLLM histograms: mean inter-token time; per call: waiting in "
              "the server, prefill, decode, end to end):", "",
              "| contender | " + " | ".join(f"{n}: TPOT ms; queue / prefill / decode / e2e ms per call" for n in names)
              + " |", "|---|" + "---|" * len(names)]
    for r, cells in _server_cells(b.runs, names, lambda d, _sim, _n: (
            f"{d.get('engine_tpot_ms', 0):.2f}; {d.get('engine_queue_ms_per_call', 0):.0f} / "
            f"{d.get('engine_prefill_ms_per_call', 0):.0f} / {d.get('engine_decode_ms_per_call', 0):.0f}"
            f" / {d.get('engine_e2e_ms_per_call', 0):.0f}")):
        lines.append(f"| {r.contender.label} | " + " | ".join(cells) + " |")
    summ = (b.engine or {}).get("profiles", {}).get("summary", {})
    if summ:
        lines += ["", "Profiles the simulator ran on (fitted by `chimera profile`):", "",
                  "| server | TPOT batch 1 (ms) | decode tok/s at batch 32 | prefill tok/s (1,024 tokens) | "
                  "per-seq cost (ms) | fit RMS error |", "|---|---:|---:|---:|---:|---:|"]
        for n, d in summ.items():
            rms = d.get("rms_relative_error")
            lines.append(f"| {n} | {d['tpot_ms_c1']:.2f} | {d['tok_s_c32']:.0f} | {d['prefill_tok_s_1024']:.0f} | "
                         f"{1e3 * d['fitted'].get('per_seq_s', 0):.3f} | "
                         f"{'–' if rms is None else f'{100 * rms:.1f}%'} |")
    return lines


def plot_frontier(b: LiveBench, path: Path) -> Path:
    """Mean workflow latency against accuracy, one point per contender (live), hollow markers for the simulator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in b.runs:
        col = "tab:blue" if r.contender.gateway == "chimera" else "tab:orange"
        mk = "o" if r.contender.gateway == "chimera" else "s"
        s = r.summary
        ax.scatter(s["latency_s"]["mean"], 100 * s["accuracy"], color=col, marker=mk, s=60)
        ax.annotate(r.contender.label, (s["latency_s"]["mean"], 100 * s["accuracy"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
        if r.sim is not None:
            ax.scatter(r.sim["latency_s"]["mean"], 100 * r.sim["accuracy"], facecolors="none", edgecolors=col,
                       marker=mk, s=60)
    ax.set_xlabel("mean workflow latency (s, live, real time)" if b.engine is not None
                  else "mean workflow latency (s, live, time-scaled)")
    ax.set_ylabel("accuracy (%)")
    title = b.label if b.engine is None else b.label.replace("; ", ";\n")
    ax.set_title(f"LiteLLM vs Chimera — {title}\n(hollow: the simulator's prediction of the same run)", fontsize=9)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, bbox_inches="tight")
