"""Markdown tables and latency–accuracy frontier plots from sweep rows."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from chimera.util.figures import save_figure  # noqa: E402


def _baseline(rows: Sequence[dict], workload: str, load: float) -> dict | None:
    for r in rows:
        if r["workload"] == workload and r["load"] == load and r["policy"] == "vllm":
            return r
    return None


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per run; speed-up and accuracy gain are against `vllm` at the same workload and load."""
    head = ("| workload | load (wf/s) | policy | λ | accuracy | Δacc vs vllm (pts) | mean lat (s) | speed-up vs vllm "
            "| p50 (s) | p99 (s) | queue mean (s) | tasks/s |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in rows:
        base = _baseline(rows, r["workload"], r["load"])
        lam = "" if r.get("lam") is None else f"{r['lam']:g}"
        if base:
            dacc = f"{100 * (r['accuracy'] - base['accuracy']):+.1f}"
            speed = f"{base['latency_s']['mean'] / r['latency_s']['mean']:.2f}×" if r["latency_s"]["mean"] else "-"
        else:
            dacc = speed = "-"
        lines.append(
            f"| {r['workload']} | {r['load']:g} ({r['rate']:.2f}) | {r['policy']} | {lam} | {100 * r['accuracy']:.1f}% | {dacc} "
            f"| {r['latency_s']['mean']:.1f} | {speed} | {r['latency_s']['p50']:.1f} | {r['latency_s']['p99']:.1f} "
            f"| {r['queue_s']['mean']:.1f} | {r['throughput_tasks_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


_STYLE = {  # policy -> (colour, marker); fixed so the same policy looks the same in every panel
    "vllm": ("black", "*"),
    "least-loaded": ("tab:gray", "s"),
    "routellm": ("tab:olive", "D"),
    "sjf": ("tab:cyan", "v"),
    "ltr": ("tab:pink", "^"),
    "mlfq": ("tab:brown", "<"),
    "chimera": ("tab:blue", "o"),
    "chimera-oracle": ("tab:purple", "o"),
    "chimera-no-route": ("tab:green", "X"),
    "chimera-no-stjf": ("tab:red", "P"),
    "chimera-no-load": ("tab:orange", "h"),
}


def frontier_plot(rows: Sequence[dict], out: str | Path) -> Path:
    """Accuracy vs mean latency (log scale), one panel per (workload, load); λ sweeps drawn as labelled lines."""
    keys = sorted({(r["workload"], r["load"]) for r in rows}, key=lambda k: (k[0], k[1]))
    workloads = sorted({k[0] for k in keys})
    loads = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(len(workloads), len(loads), figsize=(5.2 * len(loads), 4.2 * len(workloads)),
                             squeeze=False)
    for i, w in enumerate(workloads):
        for j, load in enumerate(loads):
            ax = axes[i][j]
            lines: dict[str, list[dict]] = defaultdict(list)
            for r in rows:
                if r["workload"] == w and r["load"] == load:
                    lines[r["policy"]].append(r)
            for policy, rs in sorted(lines.items()):
                rs = sorted(rs, key=lambda r: (r.get("lam") or 0.0))
                xs = [r["latency_s"]["mean"] for r in rs]
                ys = [100 * r["accuracy"] for r in rs]
                colour, marker = _STYLE.get(policy, (None, "o"))
                ax.plot(xs, ys, "-" if len(rs) > 1 else "", marker=marker, color=colour, label=policy,
                        markersize=9 if policy == "vllm" else 6, linewidth=2 if policy == "chimera" else 1)
                if policy == "chimera":
                    for r, x, y in zip(rs, xs, ys):
                        ax.annotate(f"λ={r['lam']:g}", (x, y), textcoords="offset points", xytext=(4, -10),
                                    fontsize=7, color=colour)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{w} @ load {load:g}", fontsize=9)
            ax.set_xlabel("mean workflow latency (s, simulated, log scale)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    return save_figure(fig, out, rect=(0, 0.07, 1, 1))
