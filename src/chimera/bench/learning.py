"""Learning curves of a sweep's runs that learn online (rows whose predictors explore), beside the fixed predictors.

Per consecutive window of workflows (the summary's `windows`): accuracy, mean latency and the share of calls explored.
The verdict compares each learning run's last window with the trained predictors' at equal latency: their last-window
(latency, accuracy) points over the λ sweep, interpolated at the learning run's latency.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from chimera.util.figures import save_figure

ONLINE = "online"


def _learns(r: dict) -> bool:
    return any(w["exploration"] > 0 for w in r.get("windows", ()))


def learning_rows(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if _learns(r)]


def _last(r: dict) -> dict:
    return r["windows"][-1]


def _at_latency(points: list[tuple[float, float]], latency: float) -> float | None:
    """Accuracy of a fixed predictor's λ sweep at `latency`: linear between the points of its frontier (last-window
    points that no faster point beats on accuracy); None outside the sweep's latencies."""
    pts, best = [], -1.0
    for lat, acc in sorted(points):
        if acc > best:
            pts.append((lat, acc))
            best = acc
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not pts or latency < xs[0] or latency > xs[-1]:
        return None
    return float(np.interp(latency, xs, ys))


def verdict(rows: Sequence[dict], reference: str = "chimera") -> list[dict]:
    """Per learning run: its last window beside vllm's last window and the `reference` family's (the trained
    predictors' chimera rows) accuracy at equal latency."""
    out = []
    for r in learning_rows(rows):
        same = [x for x in rows if x["workload"] == r["workload"] and x["load"] == r["load"] and x.get("windows")]
        base = next((x for x in same if x["policy"] == "vllm"), None)
        ref = [(_last(x)["latency_mean_s"], _last(x)["accuracy"]) for x in same if x["policy"] == reference]
        last = _last(r)
        ref_acc = _at_latency(ref, last["latency_mean_s"])
        out.append({
            "workload": r["workload"], "load": r["load"], "policy": r["policy"], "lam": r.get("lam"),
            "workflows": sum(w["workflows"] for w in r["windows"]), "last": last,
            "vllm_last": _last(base) if base else None,
            "reference_acc_at_latency": ref_acc,
            "delta_vs_reference": None if ref_acc is None else last["accuracy"] - ref_acc,
        })
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def learning_markdown(rows: Sequence[dict], reference: str = "chimera") -> str:
    """The windows of every learning run, then the verdict table."""
    lines = ["| workload | load | policy | λ | " + " | ".join(["window: acc / lat (s) / explored"]) + " |",
             "|---|---|---|---|---|"]
    for r in learning_rows(rows):
        cells = ", ".join(f"{100 * w['accuracy']:.1f}% / {w['latency_mean_s']:.2f} / {100 * w['exploration']:.1f}%"
                          for w in r["windows"])
        lines.append(f"| {r['workload']} | {r['load']:g} | {r['policy']} | {r.get('lam')} | {cells} |")
    lines += ["", f"Last window against the `{reference}` rows' last windows at equal latency (interpolated over "
                  "their λ sweep) and `vllm`'s last window:", "",
              "| workload | load | policy | λ | last window acc | lat (s) | explored | vllm lat (s) | "
              f"{reference} acc at that latency | Δ (pts) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in verdict(rows, reference):
        last, vl = v["last"], v["vllm_last"]
        delta = "-" if v["delta_vs_reference"] is None else f"{100 * v['delta_vs_reference']:+.1f}"
        lines.append(f"| {v['workload']} | {v['load']:g} | {v['policy']} | {v['lam']} | {_pct(last['accuracy'])} | "
                     f"{last['latency_mean_s']:.2f} | {100 * last['exploration']:.1f}% | "
                     f"{'-' if vl is None else format(vl['latency_mean_s'], '.2f')} | "
                     f"{_pct(v['reference_acc_at_latency'])} | {delta} |")
    return "\n".join(lines) + "\n"


def learning_plot(rows: Sequence[dict], out: str | Path) -> Path:
    """Accuracy (top) and mean latency (bottom) per window, one column per (workload, load): each learning run
    (solid) and the fixed predictors' runs at the same λ (trained dashed, oracle dotted). A learner moves along the
    latency–accuracy trade-off as it learns, so one panel alone would mislead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("windows"):
            groups[(r["workload"], r["load"])].append(r)
    keys = sorted(k for k in groups if any(_learns(r) for r in groups[k]))
    cols = max(1, len(keys))
    fig, axes = plt.subplots(2, cols, figsize=(6.4 * cols, 7.6), squeeze=False, sharex="col")
    for c, key in enumerate(keys):
        lams = sorted({r.get("lam") for r in groups[key] if _learns(r)})
        colours = dict(zip(lams, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
        for r in sorted(groups[key], key=lambda r: (r["policy"], r.get("lam") or 0.0)):
            if r["policy"] != "vllm" and r.get("lam") not in colours:
                continue
            ws, learns = r["windows"], _learns(r)
            xs = [w["start"] + w["workflows"] for w in ws]
            style = dict(color="black" if r["policy"] == "vllm" else colours[r.get("lam")],
                         alpha=1.0 if learns else 0.6, linewidth=2 if learns else 1, markersize=4,
                         label=r["policy"] + ("" if r.get("lam") is None else f" λ={r['lam']:g}"))
            fmt = "-o" if learns else (":" if "oracle" in r["policy"] else "--")
            axes[0][c].plot(xs, [100 * w["accuracy"] for w in ws], fmt, **style)
            axes[1][c].plot(xs, [w["latency_mean_s"] for w in ws], fmt, **style)
        axes[0][c].set_title(f"{key[0]} @ load {key[1]:g} (simulated)", fontsize=9)
        axes[0][c].set_ylabel("accuracy in the window (%)")
        axes[1][c].set_ylabel("mean workflow latency in the window (s)")
        axes[1][c].set_xlabel("workflows arrived (end of window)")
        for ax in (axes[0][c], axes[1][c]):
            ax.grid(alpha=0.3)
        axes[0][c].legend(fontsize=7, ncol=2)
    return save_figure(fig, out)
