"""Aggregate decode speed of OpenAI-compatible servers: streaming chat, fixed output length (`ignore_eos`), closed loop.

Used for the speed table in docs/real-engines.md (`chimera engines speed`). The client runs on the same cores as the
servers, so the numbers are what this machine gives, not what the engines could do alone.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass

import httpx


@dataclass
class LevelResult:
    model: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tok_s: float  # aggregate output tokens per second
    ttft_p50_s: float
    exact: bool  # every request returned exactly max_tokens
    retries: int = 0  # requests sent again after a connection error (its partial output is not counted)


async def _one(client: httpx.AsyncClient, base_url: str, model: str, max_tokens: int, prompt: str) -> tuple[int, float]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 1.0}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", base_url + "/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, ttft if ttft is not None else time.perf_counter() - t0


async def _level(base_url: str, model: str, concurrency: int, requests: int, max_tokens: int,
                 min_s: float) -> LevelResult:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _one(client, base_url, model, 8, "warm up")
        results: list[tuple[int, float]] = []
        started, retries = [0], [0]

        async def worker() -> None:  # at least `requests` requests and at least `min_s` seconds
            while started[0] < requests or time.perf_counter() - t0 < min_s:
                started[0] += 1
                prompt = f"request {started[0]}: write some code"
                for attempt in range(3):
                    try:
                        results.append(await _one(client, base_url, model, max_tokens, prompt))
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                        retries[0] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    toks = sum(t for t, _ in results)
    ttfts = sorted(f for _, f in results)
    return LevelResult(model, concurrency, len(results), toks, round(wall, 3), round(toks / wall, 1),
                       round(ttfts[len(ttfts) // 2], 3), all(t == max_tokens for t, _ in results), retries[0])


def requests_for(concurrency: int) -> int:
    return max(8, 3 * concurrency)


def measure(targets: list[tuple[str, str]], levels: tuple[int, ...] = (1, 8, 32), max_tokens: int = 128,
            together: bool = False, rounds: int = 1, min_s: float = 8.0) -> list[LevelResult]:
    """For each (base_url ending in /v1, served model) and concurrency level: at least `requests_for(c)` requests
    and `min_s` seconds, c requests at a time (closed loop). The targets run one after the other, interleaved per
    level so they see the same machine, `rounds` times; `together`: all at once per level (as under a gateway)."""

    async def run() -> list[LevelResult]:
        out = []
        for _ in range(rounds):
            for c in levels:
                if together:
                    out += await asyncio.gather(*(_level(u, m, c, requests_for(c), max_tokens, min_s)
                                                  for u, m in targets))
                    continue
                for u, m in targets:
                    out.append(await _level(u, m, c, requests_for(c), max_tokens, min_s))
        return out

    return asyncio.run(run())


def medians(results: list[LevelResult]) -> dict[tuple[str, int], float]:
    """Median tok/s per (model, concurrency) over rounds."""
    by: dict[tuple[str, int], list[float]] = {}
    for r in results:
        by.setdefault((r.model, r.concurrency), []).append(r.tok_s)
    return {k: statistics.median(v) for k, v in by.items()}


def ratios(results: list[LevelResult], fast: str, slow: str) -> dict[int, dict[str, float]]:
    """Per concurrency: the median tok/s ratio of `fast` over `slow`, and the lowest per-round ratio."""
    by: dict[tuple[str, int], list[float]] = {}
    for r in results:
        by.setdefault((r.model, r.concurrency), []).append(r.tok_s)
    out = {}
    for (m, c), fs in by.items():
        if m != fast or (slow, c) not in by:
            continue
        per_round = [f / s for f, s in zip(fs, by[(slow, c)])]
        out[c] = {"median": round(statistics.median(fs) / statistics.median(by[(slow, c)]), 2),
                  "min": round(min(per_round), 2)}
    return out


def to_json(results: list[LevelResult]) -> list[dict]:
    return [asdict(r) for r in results]


def markdown_table(results: list[LevelResult], fast: str, slow: str) -> str:
    """Median aggregate output tok/s per model and concurrency, and the fast/slow ratio (median; lowest round)."""
    med = medians(results)
    levels = sorted({c for _, c in med})
    models = list(dict.fromkeys(r.model for r in results))
    head = "| model | " + " | ".join(f"c={c}" for c in levels) + " |"
    lines = [head, "|---|" + "---:|" * len(levels)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{med.get((m, c), float('nan')):.0f}" for c in levels) + " |")
    rat = ratios(results, fast, slow)
    if rat:
        lines.append(f"| {fast} / {slow} | " + " | ".join(
            f"{rat[c]['median']:.1f}× (min {rat[c]['min']:.1f}×)" if c in rat else "" for c in levels) + " |")
    return "\n".join(lines)
