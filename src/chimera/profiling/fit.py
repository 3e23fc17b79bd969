"""Fit the engine's step-time model to measurements of a running server (pure: numbers in, coefficients out).

`chimera profile` (chimera.profiling) measures a server; this module turns what the client saw into engine terms:

- `analyze_wave`: c requests sent at once with the same output length decode together. Over the *steady window*
  (from the last sequence's first token to the first sequence's last token) every step runs the same batch, so
  each sequence's time per output token there is one step time at n = batch, with a known KV context. Bursty
  streams (several tokens per chunk) are handled by counting tokens, not chunks.
- `fit_step_model`: robust least squares (soft-L1 on log errors) of

      t(n_decode, C, P) = fixed + hypot(weights, per_token × (n_decode + P)) + per_seq × n_decode + per_ctx × C

  to the decode points (TPOT = t(n, C, 0)) and the prefill points (TTFT = request_overhead + prefill steps of
  at most max_num_batched_tokens each). It is the roofline's form of `engine.perf` with free constants, plus a
  per-sequence cost (sampling and output processing, which dominate on CPUs); every coefficient is ≥ 0.
- `fit_rows`: measured vs fitted for every point, the table `chimera profile` prints.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
from scipy.optimize import least_squares, nnls

DECODE_WARN = 0.15  # a decode point fitted worse than this is worth a warning
ROBUST_SCALE = 0.15  # log errors beyond this count linearly, not squared (soft-L1): one wild point cannot dominate


# ---- one wave of concurrent requests ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SeqTrace:
    """What the client saw of one streamed request (seconds on one monotonic clock)."""

    sent_s: float
    times: Sequence[float]  # arrival of each token-carrying chunk
    tokens: Sequence[int]  # completion tokens so far at each chunk (continuous usage, else the chunk's ordinal)
    prompt_tokens: int
    completion_tokens: int  # the final usage (or the chunk count when the server reports none)

    def token_index(self) -> list[float]:
        """Cumulative tokens per chunk; rescaled when chunk ordinals undercount the reported tokens (merged chunks)."""
        toks = [float(t) for t in self.tokens]
        if not toks:
            return toks
        n = self.completion_tokens
        if toks[-1] != n and len(toks) > 1 and n > toks[0]:
            first = toks[0]
            scale = (n - first) / (toks[-1] - first) if toks[-1] > first else 1.0
            toks = [first + (t - first) * scale for t in toks]
        return toks


@dataclass(frozen=True)
class WaveStats:
    """One wave reduced to engine terms."""

    concurrency: int  # requests sent
    n: float  # sequences decoding in the steady window (time average; < concurrency when the server queued some)
    queued: bool  # some requests got their first token only after others had finished
    first_batch: int  # requests that got their first token before the first full-length one finished
    tpot_s: float | None  # median over the window's sequences of their time per output token there
    ctx_tokens: float  # KV tokens of the whole batch, time average over the window
    window_s: float
    window_tokens: float  # decode steps the window spans
    ttft_s: float  # median time to first token
    ttft_max_s: float
    tok_s: float  # aggregate output tokens per second, first send to last token
    completion_tokens: int  # median
    prompt_tokens: int  # median
    steady: bool = True  # the sequences agree with each other and with the tokens delivered in the window
    unsteady_reason: str = ""
    method: str = "window"  # "window": steady-window slope; "makespan": unsteady, the wave's makespan per token;
    # "engine": the server's own inter-token latencies (vLLM /metrics), see with_engine_tpot
    client_tpot_s: float | None = None  # what the streams gave (window or makespan) when method is "engine"


def with_engine_tpot(w: WaveStats, tpot_s: float) -> WaveStats:
    """The wave with the engine's own mean time per output token as its TPOT.

    A CPU server's API process can deliver tokens late and in bursts (it shares cores with the engine and the
    client), so the streams' timing says more about delivery than about steps; the engine stamps each step's
    outputs when it makes them. The batch is the window's time average when the streams were steady, else the
    requests sent."""
    n = w.n if w.steady else float(w.concurrency)
    return replace(w, tpot_s=tpot_s, client_tpot_s=w.tpot_s, method="engine", steady=True, n=n,
                   unsteady_reason="")


STEADY_SPREAD = 0.4  # (p90 − p10) / median of the sequences' TPOTs in one wave
STEADY_RATE = 1.25  # tokens seen in the window vs n / TPOT, as a factor either way
BUFFERED = 0.1  # a stream whose tokens all arrive within this share of its life was buffered, not streamed
STEADY_VS_MAKESPAN = 0.6  # a window TPOT below this share of the makespan per token saw a stall's catch-up


def analyze_wave(seqs: Sequence[SeqTrace], concurrency: int | None = None, min_tokens: float = 4.0,
                 prefill_s: float = 0.0) -> WaveStats:
    """The steady-state decode step time of a wave of concurrent requests (see module docstring).

    The window runs from the last first token to the first last token among the *full-length* requests (those
    that reached the wave's largest output: a server that stops some requests early does not cut it short);
    requests that end inside it count for the part they were running. `tpot_s` is None when the window spans
    fewer than `min_tokens` steps (arrivals too staggered for the output length: send longer requests).

    An *unsteady* wave (most streams arrive in one burst, the requests disagree, the tokens seen contradict
    n / TPOT, or the window is much faster than the wave as a whole: a server too starved to stream evenly)
    gets the makespan estimate instead: (last token − first
    send − `prefill_s`, the time the wave's prompts take) / (output tokens − 1), at n = the requests sent.
    """
    seqs = [s for s in seqs if s.times]
    if not seqs:
        raise ValueError("no request of the wave returned a token")
    c = concurrency if concurrency is not None else len(seqs)
    idx = {id(s): s.token_index() for s in seqs}
    valid = [s for s in seqs if idx[id(s)][-1] > idx[id(s)][0]]
    longest = max((s.completion_tokens for s in valid), default=0)
    full = [s for s in valid if s.completion_tokens >= longest] or valid
    end = min((s.times[-1] for s in full), default=math.inf)
    first_batch = [s for s in seqs if s.times[0] < end]
    lead = [s for s in full if s.times[0] < end]
    start = max((s.times[0] for s in lead), default=end)
    window = end - start
    tpots, spans = [], []
    n_avg = ctx = delivered = 0.0
    if window > 0:
        for s in lead:
            t, k = _collapse(s.times, idx[id(s)])
            inside = [j for j, x in enumerate(t) if start <= x <= end]
            if not inside:
                continue
            j0, j1 = inside[0], inside[-1]
            if j1 > j0 and k[j1] - k[j0] >= min_tokens:
                slope = _slope(k[j0:j1 + 1], t[j0:j1 + 1])
                if slope is not None:
                    tpots.append(slope)
                    spans.append(k[j1] - k[j0])
        for s in valid:  # time-averaged batch and KV over the window
            a, b = max(start, s.times[0]), min(end, s.times[-1])
            if b <= a:
                continue
            frac = (b - a) / window
            n_avg += frac
            ctx += frac * (s.prompt_tokens + _tokens_at(s.times, idx[id(s)], (a + b) / 2))
            delivered += _tokens_at(s.times, idx[id(s)], b) - _tokens_at(s.times, idx[id(s)], a)
    total = sum(s.completion_tokens for s in seqs)
    wall = max(s.times[-1] for s in seqs) - min(s.sent_s for s in seqs)
    firsts = [s.times[0] - s.sent_s for s in seqs]
    reason = ""
    served = [s for s in valid if s.times[0] < end] or valid  # queued requests would double the span
    makespan = _makespan(served, prefill_s)
    buffered = [s for s in valid if s.times[-1] - s.times[0] < BUFFERED * (s.times[-1] - s.sent_s)]
    if len(buffered) * 2 > len(valid):
        reason = (f"{len(buffered)} of {len(valid)} streams delivered their tokens in one burst at the end "
                  "(the server or the client buffered them)")
    elif tpots:
        med = statistics.median(tpots)
        q = sorted(tpots)
        spread = (q[int(0.9 * (len(q) - 1))] - q[int(0.1 * (len(q) - 1))]) / med
        rate = delivered / window / (n_avg / med) if window > 0 and n_avg > 0 else 1.0
        if spread > STEADY_SPREAD:
            reason = f"the requests' TPOTs differ by {100 * spread:.0f}% of their median"
        elif not 1 / STEADY_RATE <= rate <= STEADY_RATE:
            reason = f"tokens seen in the window are {rate:.2f}× what n/TPOT implies"
        elif makespan is not None and med < STEADY_VS_MAKESPAN * makespan:
            reason = (f"the window's TPOT is {med / makespan:.2f}× the wave's makespan per token (tokens arrived "
                      "faster than they were made: delivery stalled, then caught up)")
    steady = bool(tpots) and not reason
    tpot = statistics.median(tpots) if tpots else None
    n_out = n_avg if tpots else float(len(lead))
    method = "window"
    if not steady and _makespan(valid, prefill_s) is not None:
        # No trustworthy window: the wave's makespan per output token (its throughput seen from c requests;
        # first tokens of a bursty wave say nothing about admission, so every request counts as served).
        tpot, method, n_out = _makespan(valid, prefill_s), "makespan", float(len(valid))
        ctx = sum(s.prompt_tokens + s.completion_tokens / 2 for s in valid)
    return WaveStats(
        concurrency=c,
        n=n_out,
        queued=len(first_batch) < len(seqs) or len(seqs) < c,
        first_batch=len(first_batch),
        tpot_s=tpot,
        ctx_tokens=ctx,
        window_s=max(0.0, window),
        window_tokens=statistics.median(spans) if spans else 0.0,
        ttft_s=statistics.median(firsts),
        ttft_max_s=max(firsts),
        tok_s=total / wall if wall > 0 else math.nan,
        completion_tokens=int(statistics.median(s.completion_tokens for s in seqs)),
        prompt_tokens=int(statistics.median(s.prompt_tokens for s in seqs)),
        steady=steady,
        unsteady_reason=reason or ("" if tpots else "no steady window"),
        method=method,
    )


def _makespan(seqs: Sequence[SeqTrace], prefill_s: float) -> float | None:
    """(last token − first send − prefill_s) / (median output tokens − 1)."""
    if not seqs:
        return None
    steps = statistics.median(s.completion_tokens for s in seqs) - 1
    span = max(s.times[-1] for s in seqs) - min(s.sent_s for s in seqs) - prefill_s
    return span / steps if steps >= 1 and span > 0 else None


def _collapse(times: Sequence[float], toks: Sequence[float]) -> tuple[list[float], list[float]]:
    """Chunks that arrive together (gap under a quarter of the mean time per token) as one point: the last.

    A burst's tokens were made over several steps but are seen at one time; only the burst's last token was seen
    when it was made. Keeping every chunk would bias a least-squares slope low by (b² − 1)/(N² − 1) for bursts of
    b tokens over N tokens (6% for 4-token bursts over 16 tokens)."""
    n = len(times)
    if n < 3 or toks[-1] <= toks[0]:
        return list(times), list(toks)
    tiny = 0.25 * (times[-1] - times[0]) / (toks[-1] - toks[0])
    t_out, k_out = [], []
    for j in range(n):
        if j + 1 < n and times[j + 1] - times[j] < tiny:
            continue
        t_out.append(times[j])
        k_out.append(toks[j])
    return t_out, k_out


def _tokens_at(times: Sequence[float], toks: Sequence[float], t: float) -> float:
    """Tokens generated by time t (linear between chunks)."""
    if t <= times[0]:
        return toks[0]
    for j in range(1, len(times)):
        if times[j] >= t:
            dt = times[j] - times[j - 1]
            w = (t - times[j - 1]) / dt if dt > 0 else 1.0
            return toks[j - 1] + w * (toks[j] - toks[j - 1])
    return toks[-1]


def _slope(k: Sequence[float], t: Sequence[float]) -> float | None:
    """Least-squares seconds per token of arrival time against token count. Unlike (t_last − t_first)/(k_last −
    k_first) it is not biased when tokens arrive in bursts (several per read): a staircase's slope is its mean."""
    n = len(k)
    if n < 2:
        return None
    mk, mt = sum(k) / n, sum(t) / n
    var = sum((x - mk) ** 2 for x in k)
    if var <= 0:
        return None
    slope = sum((x - mk) * (y - mt) for x, y in zip(k, t)) / var
    return slope if slope > 0 else None


# ---- measured points -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePoint:
    """TPOT at one concurrency (median over waves): one step of n decoding sequences with ctx_tokens of KV."""

    label: str  # "decode" | "decode-long" (long prompts: identifies the per-context-token cost)
    concurrency: int
    n: float
    ctx_tokens: float
    tpot_s: float
    tpot_min_s: float
    tpot_max_s: float
    tok_s: float
    ttft_s: float
    waves: int
    queued: bool
    prompt_tokens: int
    completion_tokens: int
    steady: bool = True  # False: the median wave was unsteady (bursty delivery): its TPOT is a makespan estimate
    note: str = ""


def decode_point(waves: Sequence[WaveStats], label: str = "decode") -> DecodePoint:
    """Median over the waves of one concurrency level (the wave nearest the median gives n and context): each
    wave's steady-window TPOT, or its makespan estimate when it was unsteady."""
    ok = [w for w in waves if w.tpot_s is not None]
    if not ok:
        raise ValueError(f"{label}: no wave produced a decode time (every request returned at most one token)")
    med = statistics.median(w.tpot_s for w in ok)  # type: ignore[misc]
    rep = min(ok, key=lambda w: abs(w.tpot_s - med))  # type: ignore[operator]
    return DecodePoint(label=label, concurrency=rep.concurrency, n=rep.n, ctx_tokens=rep.ctx_tokens, tpot_s=med,
                       tpot_min_s=min(w.tpot_s for w in ok), tpot_max_s=max(w.tpot_s for w in ok),  # type: ignore
                       tok_s=statistics.median(w.tok_s for w in ok), ttft_s=statistics.median(w.ttft_s for w in ok),
                       waves=len(ok), queued=any(w.queued for w in ok), prompt_tokens=rep.prompt_tokens,
                       completion_tokens=rep.completion_tokens, steady=rep.steady,
                       note="" if rep.steady else f"{rep.unsteady_reason}; TPOT is the wave's makespan per token")


@dataclass(frozen=True)
class PrefillPoint:
    """Time to first token of a lone request with prompt_tokens of prompt (median over repeats)."""

    prompt_tokens: int
    ttft_s: float
    ttft_min_s: float
    ttft_max_s: float
    repeats: int


def prefill_point(prompt_tokens: Sequence[int], ttfts: Sequence[float]) -> PrefillPoint:
    if not ttfts:
        raise ValueError("no prefill sample")
    return PrefillPoint(prompt_tokens=int(statistics.median(prompt_tokens)), ttft_s=statistics.median(ttfts),
                        ttft_min_s=min(ttfts), ttft_max_s=max(ttfts), repeats=len(ttfts))


# ---- the fit ---------------------------------------------------------------------------------------------------
FORM = ("t(n_decode, C, P) = fixed + hypot(weights, per_token*(n_decode + P)) + per_seq*n_decode^per_seq_exponent "
        "+ per_context_token*C; TTFT(P) = request_overhead + prefill steps of <= max_num_batched_tokens")
EXPONENT_MIN = 0.3  # per_seq_exponent in [0.3, 1]: 1 is a fixed cost per sequence, below 1 it amortises


@dataclass(frozen=True)
class StepFit:
    """Fitted coefficients (seconds); `step_time` matches engine.perf.StepTimeModel built from them."""

    fixed_s: float
    weights_s: float
    per_token_s: float
    per_seq_s: float
    per_context_token_s: float
    request_overhead_s: float
    max_num_batched_tokens: int
    per_seq_exponent: float = 1.0
    rms_rel_error: float = 0.0
    form: str = FORM

    def step_time(self, n_decode: float, ctx_tokens: float, prefill_tokens: float) -> float:
        n = n_decode + prefill_tokens
        if n <= 0:
            return 0.0
        return (self.fixed_s + math.hypot(self.weights_s, self.per_token_s * n)
                + self.per_seq_s * n_decode**self.per_seq_exponent + self.per_context_token_s * ctx_tokens)

    def prefill_time(self, tokens: int) -> float:
        full, rest = divmod(int(tokens), self.max_num_batched_tokens)
        t = full * self.step_time(0, 0, self.max_num_batched_tokens)
        return t + (self.step_time(0, 0, rest) if rest else 0.0)

    def ttft(self, prompt_tokens: int) -> float:
        return self.request_overhead_s + self.prefill_time(prompt_tokens)

    def tpot(self, p: DecodePoint) -> float:
        return self.step_time(p.n, p.ctx_tokens, 0)

    def coefficients(self) -> dict[str, float]:
        """The `fitted:` block's coefficients (engine.profiles.FittedStep field names)."""
        return {"fixed_s": self.fixed_s, "weights_s": self.weights_s, "per_token_s": self.per_token_s,
                "per_seq_s": self.per_seq_s, "per_seq_exponent": self.per_seq_exponent,
                "per_context_token_s": self.per_context_token_s, "request_overhead_s": self.request_overhead_s}


def _chunks(p: int, budget: int) -> tuple[int, int]:
    full, rest = divmod(int(p), budget)
    return full, rest


def fit_step_model(
    decode: Sequence[DecodePoint],
    prefill: Sequence[PrefillPoint],
    max_num_batched_tokens: int = 8192,
    decode_weight: float = 2.0,
) -> StepFit:
    """Robust least squares on log errors (soft-L1 beyond ROBUST_SCALE; decode points weighted `decode_weight`,
    prefill points 1), every coefficient ≥ 0.

    Starts from the linear special case (weights = 0, solved by NNLS), then refines the full form from several
    splits of the fixed cost between `fixed` and `weights`; the lowest cost wins.
    """
    if not decode:
        raise ValueError("at least one decode point is needed to fit")
    budget = max(1, int(max_num_batched_tokens))
    dn = np.array([p.n for p in decode], float)
    dc = np.array([p.ctx_tokens for p in decode], float)
    dy = np.array([p.tpot_s for p in decode], float)
    pp = [_chunks(p.prompt_tokens, budget) for p in prefill]
    py = np.array([p.ttft_s for p in prefill], float)
    if np.any(dy <= 0) or np.any(py <= 0):
        raise ValueError("measured times must be positive")
    wd, wp = float(decode_weight), 1.0

    # Linear start: t = fixed + (per_token + per_seq)·n + per_ctx·C; TTFT = r0 + chunks·fixed + per_token·P.
    rows, ys, ws = [], [], []
    for n, c, y in zip(dn, dc, dy):
        rows.append([1.0, n, n, c, 0.0])
        ys.append(y)
        ws.append(wd)
    for (full, rest), y, p in zip(pp, py, prefill):
        rows.append([full + (1 if rest else 0), float(p.prompt_tokens), 0.0, 0.0, 1.0])
        ys.append(y)
        ws.append(wp)
    a = np.array(rows) * (np.array(ws) / np.array(ys))[:, None]
    b = np.array(ws, float)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    x_lin, _ = nnls(a / scale, b)
    fixed0, f0, s0, k0, r00 = x_lin / scale
    if not prefill:  # per_token and per_seq are one slope without prefill points
        f0, s0 = f0 + s0, 0.0

    t0 = float(np.median(dy))
    units = np.array([t0, t0, t0 / max(dn.max(), 1.0), t0 / max(dn.max(), 1.0),
                      t0 / max(dc.max(), 1.0), max(t0, float(py.max()) if len(py) else t0), 1.0])

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fixed, w, f, s, k, r0, e = x
        td = fixed + np.hypot(w, f * dn) + s * dn**e + k * dc
        tp = np.array([r0 + full * (fixed + math.hypot(w, f * budget)) + (fixed + math.hypot(w, f * rest) if rest else 0.0)
                       for full, rest in pp])
        return td, tp

    def resid(q: np.ndarray) -> np.ndarray:  # log errors: symmetric, and a wild point cannot drag the rest to 0
        td, tp = predict(q * units)
        td, tp = np.maximum(td, 1e-12), np.maximum(tp, 1e-12)
        return np.concatenate([wd * np.log(td / dy), wp * np.log(tp / py) if len(py) else np.zeros(0)])

    starts = []
    for frac, e in ((0.0, 1.0), (0.5, 1.0), (0.9, 1.0), (0.99, 1.0), (0.0, 0.6), (0.5, 0.6)):
        starts.append(np.array([fixed0 * (1 - frac), fixed0 * frac, f0, s0, k0, r00, e]))
    lo = np.zeros(7)
    lo[6] = EXPONENT_MIN
    hi = np.full(7, np.inf)
    hi[6] = 1.0
    best = None
    for x0 in starts:
        q0 = np.clip(x0 / units, lo, hi)
        try:
            r = least_squares(resid, q0, bounds=(lo, hi), method="trf", x_scale=1.0, max_nfev=2000,
                              loss="soft_l1", f_scale=ROBUST_SCALE)
        except ValueError:  # pragma: no cover - degenerate start
            continue
        if best is None or r.cost < best.cost:
            best = r
    x = (best.x if best is not None else np.clip(starts[0] / units, lo, hi)) * units
    if not prefill:
        x[5] = 0.0
    res = resid(x / units)
    n_pts = len(dy) + len(py)
    rms = float(np.sqrt(np.sum((np.exp(res / np.array([wd] * len(dy) + [wp] * len(py))) - 1) ** 2) / max(1, n_pts)))
    fixed, w, f, s, k, r0, e = (float(v) for v in x)
    return StepFit(fixed_s=fixed, weights_s=w, per_token_s=f, per_seq_s=s, per_context_token_s=k,
                   request_overhead_s=r0, max_num_batched_tokens=budget, per_seq_exponent=e, rms_rel_error=rms)


# ---- the report ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitRow:
    kind: str  # "decode" | "decode-long" | "prefill"
    x: int  # concurrency (decode) or prompt tokens (prefill)
    n: float  # decoding batch (decode)
    ctx_tokens: float
    measured_s: float
    fitted_s: float
    spread: tuple[float, float] = field(default=(math.nan, math.nan))  # min, max over repeats
    steady: bool = True  # False: unsteady delivery, TPOT measured as the waves' makespan per token

    @property
    def error(self) -> float:
        """(fitted − measured) / measured."""
        return self.fitted_s / self.measured_s - 1.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = list(self.spread)
        d["error"] = self.error
        return d


def fit_rows(fit: StepFit, decode: Sequence[DecodePoint], prefill: Sequence[PrefillPoint]) -> list[FitRow]:
    rows = [FitRow(p.label, p.concurrency, p.n, p.ctx_tokens, p.tpot_s, fit.tpot(p), (p.tpot_min_s, p.tpot_max_s),
                   p.steady) for p in decode]
    rows += [FitRow("prefill", p.prompt_tokens, 0, 0.0, p.ttft_s, fit.ttft(p.prompt_tokens),
                    (p.ttft_min_s, p.ttft_max_s)) for p in prefill]
    return rows


def poorly_fitted(rows: Sequence[FitRow], tolerance: float = DECODE_WARN) -> list[FitRow]:
    """Decode points whose fitted TPOT is off by more than `tolerance`."""
    return [r for r in rows if r.kind.startswith("decode") and abs(r.error) > tolerance]


# ---- server limits ---------------------------------------------------------------------------------------------
def estimate_max_num_seqs(waves: Sequence[WaveStats], running_seen: Sequence[int] = ()) -> int | None:
    """The batch limit where the server queued requests: the largest batch seen in a steady wave that queued some
    (or the largest `num_requests_running` scraped), else None (no queueing up to the largest concurrency
    tried). Bursty waves do not count: their first tokens say when output was delivered, not admitted."""
    queued = [w for w in waves if w.steady and w.queued and w.first_batch < w.concurrency]
    if not queued:
        return None
    est = max(w.first_batch for w in queued)
    if running_seen:
        est = max(est, max(running_seen))
    return est


def kv_capacity_from_usage(tokens_in_use: float, usage_fraction: float) -> int | None:
    """KV capacity from a scrape of the KV-cache usage fraction while `tokens_in_use` tokens were resident."""
    if usage_fraction <= 0 or tokens_in_use <= 0:
        return None
    return int(tokens_in_use / usage_fraction)
