"""Read the few vLLM Prometheus metrics `chimera profile` uses (pure text parsing; names as vLLM exports them)."""

from __future__ import annotations

import re
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"  # a fraction 0–1 despite the name
CACHE_INFO = "vllm:cache_config_info"  # labels carry the cache config: num_gpu_blocks, block_size, ...
# The engine's own inter-token latencies (stamped by the EngineCore when a step's outputs are made, so free of
# how the API server and the network deliver them): sum and count of the histogram.
ITL_SUM = "vllm:inter_token_latency_seconds_sum"
ITL_COUNT = "vllm:inter_token_latency_seconds_count"

_LINE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample line; comments and unparsable lines are skipped."""
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.append((m.group(1), labels, value))
    return out


@dataclass(frozen=True)
class Scrape:
    """One /metrics scrape, summed over engines and filtered to the profiled model where labelled."""

    t: float  # client clock at the scrape's midpoint
    running: float | None
    waiting: float | None
    kv_usage: float | None
    kv_capacity_tokens: int | None  # from cache_config_info (num_gpu_blocks × block_size), when exported
    itl_sum_s: float | None = None  # the engine's inter-token latencies so far: sum (seconds) and count
    itl_count: float | None = None


def read_scrape(text: str, model: str, t: float = 0.0) -> Scrape:
    samples = parse_prometheus(text)

    def pick(name: str) -> list[float]:
        vals = [(lab, v) for n, lab, v in samples if n == name]
        mine = [v for lab, v in vals if lab.get("model_name") in (None, model)]
        return mine if mine else [v for _, v in vals]

    def total(name: str) -> float | None:
        v = pick(name)
        return sum(v) if v else None

    kv = pick(KV_USAGE)
    cap = None
    for n, lab, _ in samples:
        if n != CACHE_INFO:
            continue
        try:
            if lab.get("kv_cache_size_tokens") not in (None, "", "None"):
                cap = int(float(lab["kv_cache_size_tokens"]))
            elif lab.get("num_gpu_blocks") not in (None, "", "None") and lab.get("block_size") not in (None, "", "None"):
                cap = int(float(lab["num_gpu_blocks"])) * int(float(lab["block_size"]))
        except ValueError:
            continue
        break
    return Scrape(t=t, running=total(RUNNING), waiting=total(WAITING),
                  kv_usage=(sum(kv) / len(kv)) if kv else None, kv_capacity_tokens=cap,
                  itl_sum_s=total(ITL_SUM), itl_count=total(ITL_COUNT))


def engine_tpot(before: Scrape | None, after: Scrape | None, min_count: float) -> float | None:
    """Mean time per output token the engine itself stamped between two scrapes (the inter-token latency
    histogram's sum / count over that span), or None when the server does not export it or fewer than
    `min_count` intervals were recorded (the scrape raced the last outputs)."""
    if before is None or after is None or None in (before.itl_sum_s, before.itl_count, after.itl_sum_s,
                                                    after.itl_count):
        return None
    n = after.itl_count - before.itl_count  # type: ignore[operator]
    if n < max(1.0, min_count):
        return None
    return (after.itl_sum_s - before.itl_sum_s) / n  # type: ignore[operator]
