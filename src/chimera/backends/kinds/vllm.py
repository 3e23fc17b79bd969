"""vLLM's OpenAI server: the policy's order as vLLM's `priority` (when the server runs `--scheduling-policy priority`)
and its Prometheus gauges (running, waiting, KV-cache usage), which refine the choice between replicas. A server
without those gauges leaves them unknown, so the kind is a safe default for any OpenAI-compatible server."""

from __future__ import annotations

import math
from typing import Any, Mapping

from prometheus_client.parser import text_string_to_metric_families

from chimera.backends.kinds.base import BackendKind, register_backend_kind

INT32 = 2**31 - 1
GAUGES = {  # vLLM metric name -> load figure
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",  # the older vLLM name (v0)
}
COUNTERS = {  # the engine's inter-token latency histogram, cumulative (the gateway's live speed estimate reads them)
    "vllm:inter_token_latency_seconds_sum": "itl_sum_s",
    "vllm:inter_token_latency_seconds_count": "itl_count",
    "vllm:time_per_output_token_seconds_sum": "tpot_sum_s",  # the older name of the same histogram
    "vllm:time_per_output_token_seconds_count": "tpot_count",
}


def vllm_priority(priority: float) -> int:
    """vLLM's `priority` is an int, lower first: the policy's key rounded and clamped (order kept)."""
    return int(max(-INT32, min(INT32, round(priority))))


def parse_vllm_gauges(text: str) -> dict[str, float]:
    """The known vLLM gauges (and inter-token latency counters) in a Prometheus text page; absent ones are left
    out. Counts are summed over label sets (several engines), KV-cache usage is the highest fraction seen."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = GAUGES.get(s.name) or COUNTERS.get(s.name)
            if key is None:
                continue
            v = float(s.value)
            if not math.isfinite(v) or v < 0:  # a broken or hostile exporter must not poison the load figures
                continue
            out[key] = max(out.get(key, 0.0), v) if key == "kv_cache_usage" else out.get(key, 0.0) + v
    return out


@register_backend_kind("vllm")
class VllmBackend(BackendKind):
    """vLLM: `priority: true` forwards the policy's order (the server must run the priority scheduling policy)."""

    metrics_path = "/metrics"

    class Params(BackendKind.Params):
        priority: bool = False

    def request_body(self, body: Mapping[str, Any], model: str, priority: float) -> dict[str, Any]:
        out = super().request_body(body, model, priority)
        if self.params.priority:
            out["priority"] = vllm_priority(priority)
        return out

    def load_gauges(self, metrics_text: str) -> dict[str, float]:
        return parse_vllm_gauges(metrics_text)
