"""Measure a running OpenAI-compatible server for `chimera profile` (one asyncio loop, httpx, streamed requests).

What it sends (every prompt starts with a random nonce, so no prefix cache can serve it):

1. probes: `/v1/models` (the model must be listed; `max_model_len` if reported), `/metrics` (vLLM names), one
   request that calibrates prompt tokens per word, one that checks `max_tokens` + `ignore_eos` give exact lengths;
2. decode: waves of c concurrent streamed requests (short prompt, `max_tokens` = decode_tokens, `ignore_eos`)
   for every c, `rounds` times (each round sweeps every c, so slow drift spreads over all levels), plus waves
   with long prompts at a few c (the per-context-token cost); a /metrics scrape during each wave;
3. prefill: lone requests with prompts of several lengths and max_tokens 1: time to first token.

Times are what the client sees (`time.perf_counter` when the bytes arrive). The client is kept cheap because it
shares the cores with the server: SSE events are split and matched as bytes; JSON is parsed only for errors.
Reduction to engine terms is in `chimera.profiling.fit` (pure).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import httpx

from chimera.profiling.fit import (
    DecodePoint,
    PrefillPoint,
    SeqTrace,
    WaveStats,
    analyze_wave,
    decode_point,
    with_engine_tpot,
    estimate_max_num_seqs,
    kv_capacity_from_usage,
    prefill_point,
)
from chimera.profiling.metrics import Scrape, engine_tpot, read_scrape

Progress = Callable[[str, int, int], None]  # (what is running, steps done, steps in all)
NOISY = 1.35  # max / min TPOT of a level's waves beyond which it gets `extra_waves` more

_WORDS = ("time data value system model result order point field state group level table query change "
          "number report input output signal window method answer record summary context program network "
          "measure market figure detail chapter surface battery library college theory garden engine account "
          "history picture planet morning village pattern weather surgery kitchen concert").split()
_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')
_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')


class _Retry(Exception):
    """A connection failed before the response began (e.g. a pooled keep-alive connection the server closed)."""


class MeasureError(RuntimeError):
    """The server could not be measured (unreachable, an HTTP error, no tokens): `chimera profile` exits 2."""


@dataclass
class ProfileConfig:
    base_url: str
    model: str
    api: str = "completions"  # "completions" | "chat"
    api_key: str | None = None
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_tokens: int = 64
    rounds: int = 2
    prompt_tokens: int = 32  # decode waves' prompt
    prefill_lengths: tuple[int, ...] | None = None  # None: 16 … 1536 within max_model_len
    long_prompt_tokens: int | None = None  # None: min(1024, room in max_model_len); 0: no long-context waves
    long_concurrency: tuple[int, ...] = (1, 8)
    metrics: bool = True
    timeout_s: float = 300.0
    seed: int = 0
    extra_waves: int = 2  # more waves for a level whose waves disagree by more than NOISY (median of all)
    tpot_source: str = "auto"  # "engine": the server's inter-token latency metric; "client": the streams; auto

    def __post_init__(self) -> None:
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {self.api!r}")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError("concurrency levels must be ≥ 1")
        if self.decode_tokens < 8:
            raise ValueError("decode_tokens must be ≥ 8 (the steady window needs several steps)")
        if self.rounds < 1:
            raise ValueError("rounds must be ≥ 1")
        if self.tpot_source not in ("auto", "engine", "client"):
            raise ValueError(f"tpot_source must be 'auto', 'engine' or 'client', got {self.tpot_source!r}")
        self.concurrency = tuple(sorted(set(int(c) for c in self.concurrency)))
        self.long_concurrency = tuple(sorted(set(int(c) for c in self.long_concurrency)))

    @property
    def v1(self) -> str:
        u = self.base_url.rstrip("/")
        return u if u.endswith("/v1") else u + "/v1"

    @property
    def root(self) -> str:
        return self.v1[: -len("/v1")]


@dataclass
class Measurements:
    """Everything measured, raw enough to refit (`measurements:` in the profile YAML)."""

    base_url: str
    model: str
    api: str
    max_model_len: int | None = None
    metrics_exposed: bool = False
    continuous_usage: bool = False  # the server reports completion_tokens in every chunk (vLLM)
    engine_tpot: bool = False  # decode TPOTs are the engine's own inter-token latencies (vLLM /metrics)
    exact_lengths: bool = True  # every decode request returned exactly max_tokens
    inexact_requests: int = 0
    decode_requests: int = 0
    longer_waves: int = 0  # waves sent again with a longer output (staggered arrivals)
    extra_waves: int = 0  # waves added to levels whose waves disagreed
    tokens_per_word: float = 1.0
    decode: list[DecodePoint] = field(default_factory=list)
    prefill: list[PrefillPoint] = field(default_factory=list)
    waves: list[WaveStats] = field(default_factory=list)
    wave_labels: list[str] = field(default_factory=list)
    scrapes: list[Scrape] = field(default_factory=list)
    running_max: int | None = None
    waiting_seen: bool = False
    max_num_seqs_estimate: int | None = None
    kv_capacity_tokens: int | None = None
    kv_capacity_source: str = "none"
    started_at: str = ""
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("scrapes")
        d["waves"] = [{"label": lab, **asdict(w)} for lab, w in zip(self.wave_labels, self.waves)]
        d.pop("wave_labels")
        return d


def measurements_from_dict(d: dict[str, Any]) -> Measurements:
    """Rebuild Measurements from a profile's `measurements:` record (`chimera profile --refit`)."""
    d = dict(d)
    try:
        decode = [DecodePoint(**p) for p in d.pop("decode", [])]
        prefill = [PrefillPoint(**p) for p in d.pop("prefill", [])]
        raw_waves = d.pop("waves", [])
        labels = [w.get("label", "decode") for w in raw_waves]
        waves = [WaveStats(**{k: v for k, v in w.items() if k != "label"}) for w in raw_waves]
        known = set(Measurements.__dataclass_fields__)
        m = Measurements(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise MeasureError(f"the profile's measurements cannot be read: {e}") from None
    if waves:  # recompute the points from the waves (the current reduction, not the stored one)
        groups: dict[tuple[str, int], list[WaveStats]] = {}
        for lab, w in zip(labels, waves):
            groups.setdefault((lab, w.concurrency), []).append(w)
        decode = [decode_point(ws, lab) for (lab, _), ws in groups.items()]
    m.decode, m.prefill, m.waves, m.wave_labels = decode, prefill, waves, labels
    return m


class _Watch:
    """When to scrape /metrics during a wave: once every request has its first token (KV estimate), or when one
    request is a quarter through (a queue that holds some requests back is visible then)."""

    def __init__(self, c: int, max_tokens: int) -> None:
        self.c, self.quarter = c, max(3, max_tokens // 4)
        self.started = 0
        self.event = asyncio.Event()

    def on_chunk(self, k: int) -> None:
        if k == 1:
            self.started += 1
        if self.started >= self.c or k >= self.quarter:
            self.event.set()


class Profiler:
    """One measuring session against one server; `await run()` returns Measurements."""

    def __init__(self, cfg: ProfileConfig, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.rng = random.Random(cfg.seed)
        self.meas = Measurements(base_url=cfg.v1, model=cfg.model, api=cfg.api)
        self._done = 0
        self._total = 0
        self._client: httpx.AsyncClient | None = None
        self._lone: dict[int, float] = {}  # prompt tokens -> a lone request's time to first token (warm-up)

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def _step(self, what: str, k: int = 1) -> None:
        self._done += k
        if self.progress:
            self.progress(what, self._done, self._total)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}

    # ---- prompts ---------------------------------------------------------------------------------------------
    def _prompt(self, tokens: int) -> str:
        """A unique prompt of about `tokens` tokens (nonce first: prefix caches cannot reuse it)."""
        nonce = f"{self.rng.getrandbits(48):012x}"
        words = max(1, round(tokens / self.meas.tokens_per_word) - 6)
        body = " ".join(self.rng.choice(_WORDS) for _ in range(words))
        return f"{nonce} {body}"

    def _body(self, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
        b: dict[str, Any] = {"model": self.cfg.model, "max_tokens": int(max_tokens), "ignore_eos": True,
                             "stream": stream}
        if stream:
            b["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if self.cfg.api == "chat":
            b["messages"] = [{"role": "user", "content": prompt}]
        else:
            b["prompt"] = prompt
        return b

    @property
    def _url(self) -> str:
        return self.cfg.v1 + ("/chat/completions" if self.cfg.api == "chat" else "/completions")

    # ---- requests --------------------------------------------------------------------------------------------
    async def _error(self, r: httpx.Response) -> MeasureError:
        text = (await r.aread()).decode("utf-8", "replace")
        try:
            msg = json.loads(text).get("error", {}).get("message") or text
        except (ValueError, AttributeError):
            msg = text
        return MeasureError(f"{self._url}: HTTP {r.status_code}: {str(msg)[:300]}")

    async def _once(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """A non-streamed request; the usage."""
        assert self._client is not None
        try:
            r = await self._client.post(self._url, json=self._body(prompt, max_tokens, False), headers=self._headers())
        except httpx.HTTPError as e:
            raise MeasureError(f"{self._url}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise await self._error(r)
        usage = r.json().get("usage") or {}
        return usage

    async def _stream(self, prompt: str, max_tokens: int, watch: _Watch | None = None) -> SeqTrace:
        """One streamed request; sent once more if the connection fails before any byte came back."""
        try:
            return await self._stream_once(prompt, max_tokens, watch)
        except _Retry:
            return await self._stream_once(prompt, max_tokens, watch)

    async def _stream_once(self, prompt: str, max_tokens: int, watch: _Watch | None = None) -> SeqTrace:
        """One streamed request: arrival time and cumulative completion tokens of every token-carrying chunk."""
        assert self._client is not None
        chat = self.cfg.api == "chat"
        empty = b'"content":""' if chat else b'"text":""'
        times: list[float] = []
        toks: list[int] = []
        prompt_tokens = completion = -1
        done = cont = got_bytes = False
        sent = time.perf_counter()
        try:
            async with self._client.stream("POST", self._url, json=self._body(prompt, max_tokens, True),
                                           headers=self._headers()) as r:
                if r.status_code != 200:
                    raise await self._error(r)
                buf = b""
                async for data in r.aiter_raw():
                    now = time.perf_counter()
                    got_bytes = True
                    buf += data
                    while True:
                        i = buf.find(b"\n\n")
                        if i < 0:
                            break
                        ev, buf = buf[:i].strip(), buf[i + 2:]
                        if not ev.startswith(b"data:"):
                            continue
                        ev = ev[5:].strip()
                        if ev == b"[DONE]":
                            done = True
                            continue
                        if b'"error"' in ev and b'"choices"' not in ev:
                            raise MeasureError(f"{self._url}: error in stream: {ev[:300].decode('utf-8', 'replace')}")
                        m = _COMPLETION.search(ev)
                        if m is not None:
                            n = int(m.group(1))
                            p = _PROMPT.search(ev)
                            if p is not None:
                                prompt_tokens = int(p.group(1))
                            if b'"choices":[]' in ev:  # the final usage chunk
                                completion = n
                                continue
                            if n > (toks[-1] if toks else 0):
                                cont = True
                                times.append(now)
                                toks.append(n)
                                if watch is not None:
                                    watch.on_chunk(len(toks))
                            continue
                        if b'"choices":[]' in ev or b'"choices":[{' not in ev:
                            continue
                        if empty in ev or (chat and b'"content"' not in ev):
                            continue  # role-only or empty delta (e.g. the finish chunk)
                        times.append(now)
                        toks.append(len(toks) + 1)
                        if watch is not None:
                            watch.on_chunk(len(toks))
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as e:
            if not times and not got_bytes:
                raise _Retry() from e
            raise MeasureError(f"{self._url}: {type(e).__name__} mid-stream: {e}") from None
        except httpx.HTTPError as e:
            raise MeasureError(f"{self._url}: {type(e).__name__}: {e}") from None
        if not done and not times:
            raise MeasureError(f"{self._url}: stream ended without tokens or [DONE]")
        self.meas.continuous_usage = self.meas.continuous_usage or cont
        if completion < 0:
            completion = toks[-1] if toks else 0
        if prompt_tokens < 0:
            prompt_tokens = round(len(prompt.split()) * self.meas.tokens_per_word)
        return SeqTrace(sent_s=sent, times=times, tokens=toks, prompt_tokens=prompt_tokens, completion_tokens=completion)

    async def _scrape(self) -> Scrape | None:
        assert self._client is not None
        t0 = time.perf_counter()
        try:
            r = await self._client.get(self.cfg.root + "/metrics", headers=self._headers(), timeout=10)
        except httpx.HTTPError:
            return None
        if r.status_code != 200 or "vllm:" not in r.text:
            return None
        return read_scrape(r.text, self.cfg.model, (t0 + time.perf_counter()) / 2)

    # ---- phases ----------------------------------------------------------------------------------------------
    async def _probe(self) -> None:
        assert self._client is not None
        try:
            r = await self._client.get(self.cfg.v1 + "/models", headers=self._headers(), timeout=30)
        except httpx.HTTPError as e:
            raise MeasureError(f"{self.cfg.v1}/models: {type(e).__name__}: {e} (is the server running?)") from None
        if r.status_code != 200:
            raise MeasureError(f"{self.cfg.v1}/models: HTTP {r.status_code}: {r.text[:200]}")
        try:
            data = r.json().get("data", [])
        except ValueError:
            raise MeasureError(f"{self.cfg.v1}/models: not JSON") from None
        ids = [m.get("id") for m in data if isinstance(m, dict)]
        entry = next((m for m in data if isinstance(m, dict) and m.get("id") == self.cfg.model), None)
        if entry is None:
            raise MeasureError(f"model {self.cfg.model!r} is not served at {self.cfg.v1} (served: {', '.join(map(str, ids))})")
        if isinstance(entry.get("max_model_len"), int):
            self.meas.max_model_len = entry["max_model_len"]
        if self.cfg.metrics:
            s = await self._scrape()
            self.meas.metrics_exposed = s is not None
            if s is not None and s.kv_capacity_tokens:
                self.meas.kv_capacity_tokens = s.kv_capacity_tokens
                self.meas.kv_capacity_source = "metrics: vllm:cache_config_info"
        # Tokens per word of this server's tokenizer (prompt sizes are targets; the fit uses reported counts).
        words = 200
        usage = await self._once(f"{self.rng.getrandbits(48):012x} " + " ".join(
            self.rng.choice(_WORDS) for _ in range(words)), 1)
        pt = usage.get("prompt_tokens")
        if isinstance(pt, int) and pt > 0:
            self.meas.tokens_per_word = pt / (words + 1)

    def _room(self, prompt: int, want: int | None = None) -> int:
        """max_tokens (default decode_tokens) that fits beside a prompt within max_model_len."""
        want = self.cfg.decode_tokens if want is None else want
        mml = self.meas.max_model_len
        return want if mml is None else max(1, min(want, mml - prompt - 16))

    async def _wave(self, c: int, prompt_tokens: int, label: str) -> WaveStats:
        """One wave; sent again with twice the output (up to 3 times) while it was unsteady or arrivals were too
        staggered for a steady window of at least a quarter of the output (slow request handling at high
        concurrency)."""
        max_tokens = self._room(prompt_tokens)
        for _ in range(3):
            w = await self._wave_once(c, prompt_tokens, max_tokens, label)
            if w.method == "engine" or (w.steady and w.window_tokens >= max_tokens / 4):
                break
            if "one burst" in w.unsteady_reason:
                break  # buffered delivery: longer outputs do not help; the makespan estimate stands
            longer = self._room(prompt_tokens, 2 * max_tokens)
            if longer <= max_tokens:
                break
            max_tokens = longer
            self.meas.longer_waves += 1
        if w.tpot_s is None:
            raise MeasureError(f"{label} c={c}: no decode time could be read from the streams")
        self.meas.waves.append(w)
        self.meas.wave_labels.append(label)
        return w

    async def _wave_once(self, c: int, prompt_tokens: int, max_tokens: int, label: str) -> WaveStats:
        watch = _Watch(c, max_tokens)
        prompts = [self._prompt(prompt_tokens) for _ in range(c)]
        use_engine = self.meas.metrics_exposed and self.cfg.tpot_source != "client"
        before = await self._scrape() if use_engine else None
        scrape_task = asyncio.ensure_future(self._scrape_when(watch.event)) if self.meas.metrics_exposed else None
        try:
            traces = await asyncio.gather(*(self._stream(p, max_tokens, watch) for p in prompts))
        finally:
            if scrape_task is not None and not scrape_task.done():
                watch.event.set()
        scrape = await scrape_task if scrape_task is not None else None
        self.meas.decode_requests += c
        bad = sum(1 for t in traces if t.completion_tokens != max_tokens)
        if bad:
            self.meas.exact_lengths = False
            self.meas.inexact_requests += bad
        if all(t.completion_tokens <= 1 for t in traces):
            raise MeasureError(f"{label} c={c}: no request returned more than one token")
        # What the wave's prompts take before decoding (used only if the wave is unsteady): one lone request's
        # time to first token plus the prefill compute of the other c − 1 prompts.
        short, long_ = self._lone.get(self.cfg.prompt_tokens, 0.0), self._lone.get(prompt_tokens, 0.0)
        w = analyze_wave(traces, c, prefill_s=long_ + (c - 1) * max(0.0, long_ - short))
        if scrape is not None:
            self.meas.scrapes.append(scrape)
            self._use_scrape(scrape, traces)
        if before is not None:
            w = await self._engine_wave(w, before, sum(max(0, t.completion_tokens - 1) for t in traces))
        return w

    async def _engine_wave(self, w: WaveStats, before: Scrape, intervals: int) -> WaveStats:
        """The wave with the engine's own TPOT when /metrics has the inter-token latencies of (nearly) all its
        tokens; a scrape can run ahead of the engine's last stats by a moment, so it is read up to 3 times."""
        for k in range(3):
            tpot = engine_tpot(before, await self._scrape(), 0.98 * intervals)
            if tpot is not None:
                self.meas.engine_tpot = True
                return with_engine_tpot(w, tpot)
            await asyncio.sleep(0.05 * (k + 1))
        if self.cfg.tpot_source == "engine":
            raise MeasureError("--tpot-source engine: the server's /metrics has no vllm:inter_token_latency_seconds "
                               "for the wave's tokens")
        return w

    async def _scrape_when(self, started: asyncio.Event) -> Scrape | None:
        await started.wait()
        return await self._scrape()

    def _use_scrape(self, s: Scrape, traces: list[SeqTrace]) -> None:
        if s.running is not None:
            self.meas.running_max = max(self.meas.running_max or 0, int(s.running))
        if s.waiting:
            self.meas.waiting_seen = True
        if s.kv_capacity_tokens:
            return
        if s.kv_usage and self.meas.kv_capacity_source in ("none", "metrics: kv_cache_usage_perc"):
            resident = 0.0
            for t in traces:
                if t.times and t.times[0] <= s.t:
                    k = sum(1 for x in t.times if x <= s.t)
                    resident += t.prompt_tokens + (t.token_index()[k - 1] if k else 0)
            est = kv_capacity_from_usage(resident, s.kv_usage)
            # keep the estimate made with the most resident tokens (block rounding matters least)
            if est is not None and resident > getattr(self, "_kv_resident", 0.0):
                self._kv_resident = resident
                self.meas.kv_capacity_tokens = est
                self.meas.kv_capacity_source = "metrics: kv_cache_usage_perc"

    def _prefill_lengths(self) -> list[int]:
        if self.cfg.prefill_lengths is not None:
            lengths = list(self.cfg.prefill_lengths)
        else:
            lengths = [16, 64, 256, 512, 1024, 1536]
            mml = self.meas.max_model_len
            if mml is not None:
                lengths = [p for p in lengths if p <= 0.8 * mml] or [max(8, mml // 4)]
        return sorted(set(int(p) for p in lengths if p >= 1))

    def _long_prompt(self) -> int:
        if self.cfg.long_prompt_tokens is not None:
            return int(self.cfg.long_prompt_tokens)
        mml = self.meas.max_model_len
        room = 1024 if mml is None else mml - self.cfg.decode_tokens - 64
        return max(0, min(1024, room))

    async def run(self) -> Measurements:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.meas.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # keep-alive shorter than uvicorn's 5 s: a pooled connection the server is closing would fail a request
        limits = httpx.Limits(max_connections=max(cfg.concurrency + cfg.long_concurrency) + 4,
                              max_keepalive_connections=max(cfg.concurrency + cfg.long_concurrency) + 4,
                              keepalive_expiry=2.0)
        timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
            self._client = client
            await self._probe()
            long_p = self._long_prompt()
            long_levels = cfg.long_concurrency if long_p > cfg.prompt_tokens else ()
            lengths = self._prefill_lengths()
            self._total = 2 + cfg.rounds * (len(cfg.concurrency) + len(long_levels) + len(lengths))
            self._step("warm-up")
            # Warm-up (not recorded): a lone request, then a wave at the largest concurrency.
            await self._stream(self._prompt(cfg.prompt_tokens), min(16, self._room(cfg.prompt_tokens)))
            await asyncio.gather(*(self._stream(self._prompt(cfg.prompt_tokens), 8)
                                   for _ in range(max(cfg.concurrency))))
            for p in {cfg.prompt_tokens, long_p} if long_levels else {cfg.prompt_tokens}:
                ttfts = []
                for _ in range(3):
                    tr = await self._stream(self._prompt(p), 1)
                    ttfts.append(tr.times[0] - tr.sent_s if tr.times else 0.0)
                self._lone[p] = sorted(ttfts)[1]
            self._step("warm-up")
            waves: dict[tuple[str, int], list[WaveStats]] = {}
            samples: dict[int, list[tuple[int, float]]] = {}
            for r in range(cfg.rounds):
                for c in cfg.concurrency:
                    waves.setdefault(("decode", c), []).append(await self._wave(c, cfg.prompt_tokens, "decode"))
                    self._step(f"decode c={c} (round {r + 1}/{cfg.rounds})")
                for c in long_levels:
                    waves.setdefault(("decode-long", c), []).append(await self._wave(c, long_p, "decode-long"))
                    self._step(f"decode, {long_p}-token prompts, c={c} (round {r + 1}/{cfg.rounds})")
                for p in lengths:
                    tr = await self._stream(self._prompt(p), 1)
                    if not tr.times:
                        raise MeasureError(f"prefill {p} tokens: no token returned")
                    samples.setdefault(p, []).append((tr.prompt_tokens, tr.times[0] - tr.sent_s))
                    self._step(f"prefill {p} tokens (round {r + 1}/{cfg.rounds})")
            noisy = [key for key, ws in waves.items() if _spread(ws) > NOISY] if cfg.rounds >= 2 else []
            self._total += len(noisy) * cfg.extra_waves
            for k in range(cfg.extra_waves):
                for label, c in noisy:
                    prompt = cfg.prompt_tokens if label == "decode" else long_p
                    waves[(label, c)].append(await self._wave(c, prompt, label))
                    self._step(f"{label} c={c}: extra wave {k + 1}/{cfg.extra_waves} (waves disagreed)")
            m_extra = len(noisy) * cfg.extra_waves
        self._client = None
        m = self.meas
        m.decode = [decode_point(ws, label) for (label, _), ws in waves.items()]
        m.prefill = [prefill_point([s[0] for s in ss], [s[1] for s in ss]) for _, ss in sorted(samples.items())]
        m.max_num_seqs_estimate = estimate_max_num_seqs(m.waves, [m.running_max] if m.waiting_seen and m.running_max
                                                        else [])
        m.wall_s = time.perf_counter() - t0
        m.extra_waves = m_extra
        return m


    async def decode_tpots(self, c: int, waves: int) -> list[float]:
        """A quick speed check: the TPOT (the engine's own where /metrics has it) of `waves` waves of c requests;
        `bench live` uses it to measure how much a server slows while its neighbours are busy."""
        limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4, keepalive_expiry=2.0)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.cfg.timeout_s, connect=10.0),
                                     trust_env=False) as client:
            self._client = client
            try:
                await self._probe()
                await asyncio.gather(*(self._stream(self._prompt(self.cfg.prompt_tokens), 8) for _ in range(c)))
                return [(await self._wave_once(c, self.cfg.prompt_tokens, self._room(self.cfg.prompt_tokens),
                                               "decode")).tpot_s or math.nan for _ in range(waves)]
            finally:
                self._client = None


def _spread(ws: list[WaveStats]) -> float:
    t = [w.tpot_s for w in ws if w.tpot_s]
    return max(t) / min(t) if len(t) >= 2 else 1.0


def measure_decode_tpots(cfg: ProfileConfig, c: int, waves: int) -> list[float]:
    """`Profiler.decode_tpots` in its own event loop."""
    return asyncio.run(Profiler(cfg).decode_tpots(c, waves))


def measure(cfg: ProfileConfig, progress: Progress | None = None) -> Measurements:
    """Run a measuring session to completion (its own event loop)."""
    return asyncio.run(Profiler(cfg, progress).run())

