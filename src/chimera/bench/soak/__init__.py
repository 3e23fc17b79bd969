"""`chimera bench soak`: the gateway under steady mixed traffic, then under a flood of 429s, watching its memory.

Set-up (all on 127.0.0.1, every server a subprocess of this one): three `chimera emulate` backends (Qwen2.5
1.5B / 7B / 14B on A6000, `time_scale`× faster than real time, as `chimera bench live` starts them) and one
`chimera serve` gateway whose config (written to OUT/gateway.yaml) names trained predictors (`chimera train -w
synthetic`, trained into OUT/predictors unless a folder is given), keeps its trace store in OUT, and has a small
`limits.max_queue`. The gateway's resident memory is read from /proc/PID/status (VmRSS) of its process.

Phase 1, "steady": open-loop Poisson arrivals at `rate` requests/s from one asyncio loop and one
httpx.AsyncClient (no connection cap). Each arrival is one request, drawn from a mix: chat or legacy completions,
streaming or not, model `chimera` or a pinned served model, a stage of a multi-stage workflow
(X-Chimera-Workflow-Id / X-Chimera-Stage / X-Chimera-Kind headers, the next stage sent only after the previous one
answered) or a one-stage call; half the finished workflows post `POST /v1/chimera/feedback`. Nothing here should
be refused: the fast backends have far more slots than the traffic needs, so the gateway queue stays empty.

Phase 2, "reject": the backend of one model (the *held* model) is paused with SIGSTOP (by its process handle),
and `max_inflight + max_queue` requests pinned to that model are sent: they fill its slots and then the gateway's
whole queue (`waiting_total` ≥ `limits.max_queue`, checked on /health) and are held there. From then on the same
mix (endpoints, streaming, workflow headers) at `reject_rate`, every request pinned to the held model, goes through
the gateway's scheduling path (token count, trained predictions, `Scheduler.submit`) and is refused with 429
`queue_full` — the path on which prepared prediction rows used to leak. The held model has neither a free slot
nor queue room, so this holds whether the gateway's queue limit is global or per model. At the end the backend is
the held requests are cancelled by the client (the gateway frees their slots and queue places), the backend is
resumed (SIGCONT), and a few pinned calls check that the model serves again (`recovery`, expected all 200).
Held and recovery calls are reported on their own line, not in the windows. (Letting the held calls finish after
SIGCONT instead races the resumed uvicorn closing keep-alive connections that idled through the pause, which the
gateway cannot retry for a pinned call: a pause artefact, not a gateway error.)

Per window of `window_s` seconds: requests sent, answers by class (200, 429, other 4xx, 5xx including broken
streams, connection errors), client latency p50/p99 of 200 answers (and p50 of 429s), the gateway's RSS at the
window end and the largest 1 Hz sample in it, its CPU share, and how late the load generator sent (its p99, so a
saturated client shows). Live run against emulated backends (engine model), not real GPUs.

The modules: config (SoakConfig), traffic (the mix, sent through the shared load generator, and the windows),
run (set-up, both phases, the summary) and report (results.md).
"""

from chimera.bench.proc_cpu import alive, rss_mib
from chimera.bench.soak.config import CLASSES, HELD_MODEL, LABEL, PHASES, SoakConfig, command_line
from chimera.bench.soak.report import WINDOW_COLUMNS, fmt_num, markdown, summary_lines, window_cells
from chimera.bench.soak.run import run_soak, summarise

__all__ = ["CLASSES", "HELD_MODEL", "LABEL", "PHASES", "WINDOW_COLUMNS", "SoakConfig", "alive", "command_line",
           "fmt_num", "markdown", "rss_mib", "run_soak", "summarise", "summary_lines", "window_cells"]
