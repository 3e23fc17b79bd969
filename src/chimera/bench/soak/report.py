"""The soak's report: a row per window and the summary lines (results.md, and the CLI's live table)."""

from __future__ import annotations

import math

from chimera.bench.live.config import MODELS
from chimera.bench.soak.config import CLASSES


def fmt_num(x: float, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


WINDOW_COLUMNS = ("phase", "window", "t (s)", "sent", "req/s", "200", "429", "4xx", "5xx", "conn err",
                  "p50 ms", "p99 ms", "429 p50 ms", "RSS end MiB", "RSS max MiB", "gw CPU %", "send late p99 ms")


def window_cells(r: dict) -> list[str]:
    c = r["counts"]
    return [r["phase"], str(r["window"]), f"{r['start_s']:.0f}–{r['end_s']:.0f}", str(r["sent"]),
            fmt_num(r["sent_per_s"]), str(c["200"]), str(c["429"]), str(c["4xx"]), str(c["5xx"]), str(c["conn"]),
            fmt_num(r["p50_ms"]), fmt_num(r["p99_ms"]), fmt_num(r["reject_p50_ms"]), fmt_num(r["rss_end_mib"]),
            fmt_num(r["rss_max_mib"]), fmt_num(r["gateway_cpu_pct"], 0), fmt_num(r["send_late_p99_ms"])]


def summary_lines(res: dict) -> list[str]:
    s = res["summary"]
    lines = [f"gateway RSS: {fmt_num(s['rss_warmup_mib'])} MiB after warm-up (end of the first window) → "
             f"{fmt_num(s['rss_steady_end_mib'])} MiB at the end of the steady phase → "
             f"{fmt_num(s['rss_end_mib'])} MiB at the end ({s['rss_growth_pct']:+.1f}%; steady phase alone "
             f"{s['rss_growth_steady_pct']:+.1f}%); max {fmt_num(s['rss_max_mib'])} MiB"]
    for p, ph in s["phases"].items():
        c = ph["counts"]
        lines.append(f"{p}: {ph['sent']} sent in {ph['seconds']:.0f} s ({ph['feedback']} feedback posts) — "
                     + ", ".join(f"{k} {c[k]}" for k in CLASSES))
    h = s["held"]
    if h["sent"]:
        lines.append(f"held on paused {h['model']} (its slots + the gateway queue, cancelled by the client at the end "
                     f"of the phase; not counted above): {h['sent']} sent — "
                     + ", ".join(f"{k} {v}" for k, v in h["counts"].items())
                     + f"; after SIGCONT, recovery calls to {h['model']}: "
                     + ", ".join(f"{k} {v}" for k, v in h["recovery"].items()))
    if "reject_kib_per_1000_429" in s:
        lines.append(f"RSS change over the reject phase per 1000 rejected requests: "
                     f"{s['reject_kib_per_1000_429']:+.0f} KiB")
    lines.append(f"errors (5xx + connection errors, both phases): {s['errors']}; 429s in the steady phase: "
                 f"{s['steady_rejected']}; recovery calls not 200: {s['recovery_errors']}")
    return lines


def markdown(res: dict) -> str:
    lines = [f"`{res['command']}`", "",
             f"Gateway soak — {res['label']}: 3 `chimera emulate` backends ({', '.join(MODELS)}, time scale "
             f"{res['config']['time_scale']:g}) behind `chimera serve` with trained predictors "
             f"(`{res['predictors']}`); {res['cpus']} CPUs. Steady: open-loop Poisson, mixed chat/completions, "
             f"streaming and not, `chimera` and pinned models, multi-stage workflows, feedback. Reject: "
             f"{res['held_model']}'s backend paused (SIGSTOP) with its slots and the gateway queue "
             f"(max_queue {res['config']['max_queue']}) held full, so the same mix pinned to it is refused with 429. "
             "Latency percentiles are of 200 answers; RSS is the gateway process's VmRSS.", "",
             "| " + " | ".join(WINDOW_COLUMNS) + " |",
             "|" + "|".join("---" if c == "phase" else "---:" for c in WINDOW_COLUMNS) + "|"]
    lines += ["| " + " | ".join(window_cells(r)) + " |" for r in res["windows"]]
    lines += [""] + [f"- {x}" for x in summary_lines(res)]
    return "\n".join(lines) + "\n"
