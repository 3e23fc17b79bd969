"""Backend health checks and vLLM /metrics scraping, in the background of a running gateway.

Every `health.interval_s` each backend gets `GET {root}/health` and (when `scrape_metrics`) `GET {root}/metrics`,
where root is `base_url` without its trailing `/v1`. A connection error, a timeout or a 5xx on /health marks
the backend down (BackendState.healthy = False: the replica choice avoids it while another has room, and
retries skip it); the next good answer marks it up again. A 4xx on /health (a server without that route) counts
as up. Scraped vLLM gauges refine the choice between replicas (Scheduler._pick_backend); a server without them
(other OpenAI-compatible servers) leaves the values at None, which is the old behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import httpx
from prometheus_client.parser import text_string_to_metric_families

from chimera.serve.config import Health

if TYPE_CHECKING:
    from chimera.serve.scheduler import BackendState

log = logging.getLogger("chimera.serve.health")

GAUGES = {  # vLLM metric name -> BackendState attribute
    "vllm:num_requests_running": "scraped_running",
    "vllm:num_requests_waiting": "scraped_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",  # the older vLLM name (v0)
}


def backend_root(base_url: str) -> str:
    """`http://h:8000/v1` -> `http://h:8000` (the server's own routes live at the root)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def parse_vllm_gauges(text: str) -> dict[str, float]:
    """The known vLLM gauges in a Prometheus text page; absent ones are left out. Counts are summed over label
    sets (several engines), KV-cache usage is the highest fraction seen."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            attr = GAUGES.get(s.name)
            if attr is None:
                continue
            v = float(s.value)
            if attr == "kv_cache_usage":
                out[attr] = max(out.get(attr, 0.0), v)
            else:
                out[attr] = out.get(attr, 0.0) + v
    return out


class HealthChecker:
    """Probes every backend of a Scheduler each interval; `start()` / `stop()` from the gateway's lifespan."""

    def __init__(self, backends: list["BackendState"], cfg: Health, client: httpx.AsyncClient) -> None:
        self.backends = backends
        self.cfg = cfg
        self.client = client
        self._task: asyncio.Task | None = None
        self.rounds = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a probe bug kill the loop
                log.exception("health check round failed")
            await asyncio.sleep(self.cfg.interval_s)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(be) for be in self.backends))
        self.rounds += 1

    def _headers(self, be: "BackendState") -> dict[str, str]:
        return {"authorization": f"Bearer {be.cfg.api_key}"} if be.cfg.api_key else {}

    async def check(self, be: "BackendState") -> None:
        root = backend_root(be.cfg.base_url)
        headers = self._headers(be)
        try:
            r = await self.client.get(f"{root}/health", headers=headers, timeout=self.cfg.timeout_s)
            up, why = r.status_code < 500, f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            up, why = False, f"{type(e).__name__}: {e}"
        if up != be.healthy:
            log.warning("backend %s marked %s (%s)", be.name, "up" if up else "down", why)
        be.healthy = up
        if not up or not self.cfg.scrape_metrics:
            return
        try:
            r = await self.client.get(f"{root}/metrics", headers=headers, timeout=self.cfg.timeout_s)
            vals = parse_vllm_gauges(r.text) if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            vals = {}
        be.scraped_running = vals.get("scraped_running")
        be.scraped_waiting = vals.get("scraped_waiting")
        be.kv_cache_usage = vals.get("kv_cache_usage")
