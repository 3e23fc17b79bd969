"""Self-contained HTML report of the live demo (matplotlib PNGs embedded as base64)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

COLORS = {"vllm": "tab:red", "chimera": "tab:blue"}
TWIN = "simulated twin"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _name(run) -> str:
    return run.policy if run.lam is None else f"{run.policy} (λ={run.lam:g})"


def _frontier(runs, label: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        s = r.summary
        ax.scatter([s["latency_s"]["mean"]], [100 * s["accuracy"]], s=80, color=COLORS.get(r.policy), label=_name(r))
        ax.annotate(_name(r), (s["latency_s"]["mean"], 100 * s["accuracy"]), textcoords="offset points",
                    xytext=(6, 6))
    ax.set_xlabel("mean workflow latency (s, emulated time-scaled)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Latency–accuracy\n{label}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _load(runs, label: str) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3 * len(runs)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], runs):
        rows = [c for c in r.calls if c["dispatched_at"] is not None and c["ended_at"] is not None]
        if rows:
            t0 = min(c["queued_at"] or c["dispatched_at"] for c in rows)
            t_end = max(c["ended_at"] for c in rows) - t0
            grid = np.linspace(0, t_end, 400)
            for m in sorted({c["model"] for c in rows}):
                st = np.array([c["dispatched_at"] - t0 for c in rows if c["model"] == m])
                en = np.array([c["ended_at"] - t0 for c in rows if c["model"] == m])
                inflight = (st[None, :] <= grid[:, None]).sum(1) - (en[None, :] <= grid[:, None]).sum(1)
                ax.plot(grid, inflight, label=m)
            ax.legend(fontsize=8)
        ax.set_ylabel("in-flight calls")
        ax.set_title(f"{_name(r)}: per-model load (gateway trace store)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(f"wall time since first call (s) — {label}")
    return _png(fig)


def _queue(runs, label: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    data = []
    for r in runs:
        q = [c["dispatched_at"] - c["queued_at"] for c in r.calls
             if c["dispatched_at"] is not None and c["queued_at"] is not None]
        data.append((r, np.maximum(np.array(q, dtype=float), 1e-4)))
    allq = np.concatenate([d for _, d in data]) if data else np.array([1e-4])
    bins = np.logspace(np.log10(max(allq.min(), 1e-4)), np.log10(max(allq.max(), 1e-3)) + 1e-9, 40)
    for r, q in data:
        ax.hist(q, bins=bins, alpha=0.55, color=COLORS.get(r.policy),
                label=f"{_name(r)} (mean {q.mean():.3f} s, p99 {np.percentile(q, 99):.3f} s)")
    ax.set_xscale("log")
    ax.set_xlabel("gateway queue time per call: dispatched − queued (s; 0 drawn at 1e-4)")
    ax.set_ylabel("calls")
    ax.set_title(f"Queue time distribution\n{label}", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def summary_rows(runs, twins: bool = False) -> list[dict[str, Any]]:
    """One table row per live run; with `twins`, each followed by its simulated twin's row (where it has one)."""
    rows = []
    pairs = [(r, r.summary, _name(r)) for r in runs]
    if twins:
        pairs = [p for r, s, name in pairs
                 for p in [(r, s, name)] + ([(r, r.twin, f"{name}, {TWIN}")] if r.twin is not None else [])]
    for r, s, name in pairs:
        rows.append({"policy": name, "tasks": s["tasks"], "accuracy": s["accuracy"],
                     "latency_mean_s": s["latency_s"]["mean"], "latency_p50_s": s["latency_s"]["p50"],
                     "latency_p99_s": s["latency_s"]["p99"], "throughput_tasks_per_s": s["throughput_tasks_per_s"],
                     "calls_per_model": {m: v["calls"] for m, v in s["per_model"].items()}, "failed": s["failed"]})
    return rows


def write_report(demo, path: Path | str) -> Path:
    import matplotlib

    matplotlib.use("Agg")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = demo.runs
    what = demo.label  # what the runs are: the engine, and whether the agents sent workflow hints
    label = html.escape(what)
    imgs = [("Latency–accuracy points of the two runs", _frontier(runs, what)),
            ("Per-model load over time (in-flight calls per model, from the gateway's trace store)", _load(runs, what)),
            ("Queue time distribution (dispatched − queued, from the gateway's trace store)", _queue(runs, what))]
    head = ("<tr><th>policy</th><th>tasks</th><th>accuracy</th><th>mean lat (s)</th><th>p50</th><th>p99</th>"
            "<th>tasks/s</th><th>calls per model</th><th>failed</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(r['policy'])}</td><td>{r['tasks']}</td><td>{100 * r['accuracy']:.1f}%</td>"
        f"<td>{r['latency_mean_s']:.2f}</td><td>{r['latency_p50_s']:.2f}</td><td>{r['latency_p99_s']:.2f}</td>"
        f"<td>{r['throughput_tasks_per_s']:.3f}</td>"
        f"<td>{html.escape(', '.join(f'{m}:{c}' for m, c in r['calls_per_model'].items()))}</td>"
        f"<td>{r['failed']}</td></tr>" for r in summary_rows(runs, twins=True))
    ratio = html.escape(versus(runs[0].summary, runs[-1].summary)) if len(runs) > 1 else ""
    twin = twin_versus(runs)
    if twin is not None:
        ratio += "<br>" + html.escape(twin)
    figs = "".join(f"<h2>{html.escape(t)}</h2><img alt=\"{html.escape(t)}\" src=\"data:image/png;base64,{b}\"/>"
                   for t, b in imgs)
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Chimera demo — {label}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.note{{background:#fff3cd;padding:8px}}
img{{max-width:100%}}</style></head><body>
<h1>Chimera vs vLLM-style serving</h1>
<p class="note"><b>{label}.</b> Workload {html.escape(demo.workload)}, {demo.tasks} workflows per run,
open loop at {demo.rate:.2f} workflows/s, time scale {demo.time_scale:g}× (emulators and tool sleeps);
models {", ".join(sorted(r for r in runs[0].summary["per_model"]))} on emulated A6000s; fresh emulators and gateway per
run; same tasks and arrival seed. The {TWIN} rows: the discrete-event simulator on the same workflows and arrival
times, under the same policy with the gateway's priors (lengths learnt online from a cold start) — what the live
comparison is expected to show.</p>
<table>{head}{body}</table>
<p><b>{ratio}</b></p>
{figs}
<p class="note">All numbers: {label}.</p>
</body></html>
"""
    path.write_text(doc, encoding="utf-8")
    return path


def versus(base: dict, other: dict, what: str = "live, emulated backends") -> str:
    """One line comparing two runs' summaries: the mean-latency ratio and the accuracy difference; `what` says what
    was measured (the live runs, or their simulated twins)."""
    b, o = base["latency_s"]["mean"], other["latency_s"]["mean"]
    speed = f"{b / o:.2f}× lower" if o <= b else f"{o / b:.2f}× higher"
    return (f"{other['policy']} vs {base['policy']}: {speed} mean latency, "
            f"{100 * (other['accuracy'] - base['accuracy']):+.1f} points accuracy ({what})")


def twin_versus(runs) -> str | None:
    """The simulated twins' comparison line, to read beside the live one (None where a run has no twin)."""
    base, other = (runs[0].twin, runs[-1].twin) if len(runs) > 1 else (None, None)
    if base is None or other is None:
        return None
    return versus(base, other, f"{TWIN}: the simulator on the same workflows and arrival times")
