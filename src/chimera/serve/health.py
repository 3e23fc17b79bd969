"""Backend health checks, backend identity checks and load-gauge scraping, in the background of a gateway.

Every `health.interval_s` each backend gets, concurrently, `GET {root}/health` and `GET {base_url}/models` (the
OpenAI list endpoint; root is `base_url` without its trailing `/v1`), then (when `scrape_metrics` and the backend
is up and its kind exports load gauges: chimera.backends.kinds, e.g. vLLM) `GET {root}/metrics`. Every probe sends the backend's `api_key` as a Bearer token when one is set and is
bounded by `health.timeout_s`.

Liveness (/health): a connection error, a timeout or a 5xx marks the backend down (BackendState.healthy = False:
the replica choice avoids it while another has room, and retries skip it); the next good answer marks it up
again. A 4xx on /health (a server without that route) counts as up.

Identity (/v1/models): a live backend must also serve the configured `model`, i.e. that name must be among the
`data[].id` the server lists. A server that lists other names (a foreign server on the configured port, or one
restarted with another model) is marked down with `down_reason = "serves ['x', 'y'], not 'configured'"`, so
calls are not sent where they would only get 404s; a later round that finds the name again marks it up. What
cannot verify the identity keeps the /health verdict: a 404/405 or other non-200 answer, a body that is not the
OpenAI list JSON (a server without that route), or a connection error / timeout on /v1/models alone (the
/health probe is the one that judges reachability). "Cannot verify" is logged once per backend and reason, at
info level (a connection error on /v1/models only at debug: it is usually a blip that /health also sees).

Logging: one line per transition, not per round. A warning when a backend goes down, comes up, or changes why
it is down (say from a failed /health to a wrong model); the wrong-model line names the backend, the configured
model and the names the server lists. `down_reason` holds the reason of the current down verdict (None when up).

Cost: the identity probe runs every round, not only at the first one. It is one small GET that vLLM answers from
memory, in parallel with /health (a round still takes at most about two timeouts per backend, all backends in
parallel), and a server can change identity at any time (restarted on the same port with another
`--served-model-name`), which /health alone never notices; checking every round bounds that to one interval.

Start-up: `check_all()` may be awaited once before `start()` (the gateway's lifespan does so, under a timeout,
so that the first calls already avoid dead or foreign backends); `start()` then continues with the loop, whose
first round waits out the rest of the interval after that round instead of probing again at once. Rounds never
overlap (a lock), and a round cancelled by the caller's timeout leaves each backend either updated or untouched.

Scraped gauges refine the choice between replicas (BackendPool._place); a server without them (other
OpenAI-compatible servers) leaves the values at None, which is the old behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import httpx

from chimera.serve.config import Health
from chimera.util.periodic import Periodic

if TYPE_CHECKING:
    from chimera.serve.pool import BackendState

log = logging.getLogger("chimera.serve.health")

def backend_root(base_url: str) -> str:
    """`http://h:8000/v1` -> `http://h:8000` (the server's own routes live at the root)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def external_calls(running: float | None, waiting: float | None, ours: int) -> float:
    """Calls the engine holds beyond the `ours` the gateway has in flight on it (other clients); 0 when unknown."""
    if running is None and waiting is None:
        return 0.0
    return max(0.0, (running or 0.0) + (waiting or 0.0) - ours)


def parse_model_ids(body: Any) -> list[str] | None:
    """The `data[].id` of an OpenAI `GET /v1/models` answer, or None when the body is not that shape."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    ids = [m.get("id") for m in body["data"] if isinstance(m, dict)]
    return [i for i in ids if isinstance(i, str)] if all(isinstance(i, str) for i in ids) else None


class HealthChecker:
    """Probes every backend of a Scheduler each interval; `start()` / `stop()` from the gateway's lifespan.
    `check_all()` may be awaited on its own (one round), before `start()` or instead of it."""

    def __init__(self, backends: list["BackendState"], cfg: Health, client: httpx.AsyncClient) -> None:
        self.backends = backends
        self.cfg = cfg
        self.client = client
        self._loop = Periodic(self.check_all, cfg.interval_s, "health check round", self._first_wait, log)
        self._lock = asyncio.Lock()
        self._last_round: float | None = None  # time.monotonic() at the end of the last completed round
        self._verdict: dict[str, tuple] = {}  # backend name -> key of the last logged verdict (log on change)
        self._noted: dict[str, set[str]] = {}  # backend name -> "cannot verify" reasons already logged
        self.rounds = 0
        self.on_scrape: Callable[["BackendState", dict[str, float]], None] | None = None  # told of each scrape

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    def _first_wait(self) -> float:
        """A round was just done (at start-up): wait out the rest of its interval; else probe at once."""
        if self._last_round is None:
            return 0.0
        return max(0.0, self.cfg.interval_s - (time.monotonic() - self._last_round))

    async def check_all(self) -> None:
        """One probe round over all backends (in parallel); rounds never overlap."""
        async with self._lock:
            await asyncio.gather(*(self.check(be) for be in self.backends))
            self.rounds += 1
            self._last_round = time.monotonic()

    def _headers(self, be: "BackendState") -> dict[str, str]:
        return {"authorization": f"Bearer {be.cfg.api_key}"} if be.cfg.api_key else {}

    async def _probe_health(self, root: str, headers: dict[str, str]) -> tuple[bool, str]:
        try:
            r = await self.client.get(f"{root}/health", headers=headers, timeout=self.cfg.timeout_s)
            return r.status_code < 500, f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            return False, f"{type(e).__name__}: {e}"

    async def _probe_models(self, be: "BackendState", headers: dict[str, str]) -> tuple[list[str] | None, str, bool]:
        """(served model names, "", False), or (None, why they cannot be known, whether it was a connection
        error or timeout rather than an answer)."""
        url = f"{be.cfg.base_url.rstrip('/')}/models"
        try:
            r = await self.client.get(url, headers=headers, timeout=self.cfg.timeout_s)
        except httpx.HTTPError as e:
            return None, type(e).__name__, True
        if r.status_code != 200:
            return None, f"HTTP {r.status_code}", False
        try:
            ids = parse_model_ids(r.json())
        except ValueError:
            ids = None
        return (ids, "", False) if ids is not None else (None, "not an OpenAI model list", False)

    def _note_unverified(self, be: "BackendState", why: str, connection: bool) -> None:
        """Log once per backend and reason that its identity cannot be checked."""
        noted = self._noted.setdefault(be.name, set())
        if why in noted:
            return
        noted.add(why)
        log.log(logging.DEBUG if connection else logging.INFO,
                "backend %s: cannot verify that it serves %r: GET %s/models: %s (keeping the /health verdict)",
                be.name, be.cfg.model, be.cfg.base_url.rstrip("/"), why)

    async def check(self, be: "BackendState") -> None:
        root = backend_root(be.cfg.base_url)
        headers = self._headers(be)
        (up, why), (served, mwhy, conn) = await asyncio.gather(self._probe_health(root, headers),
                                                               self._probe_models(be, headers))
        if not up:
            key: tuple = ("down", "health")
            reason: str | None = f"/health: {why}"
        elif served is not None and be.cfg.model not in served:
            up, key = False, ("down", "model", tuple(sorted(set(served))))
            reason = f"serves {served!r}, not {be.cfg.model!r}"
        else:
            key, reason = ("up",), None
            if served is None:
                self._note_unverified(be, mwhy, conn)
        prev = self._verdict.get(be.name, ("up",) if be.healthy else ("down", "health"))
        if key != prev:
            if key[0] == "up":
                log.warning("backend %s marked up (%s%s)", be.name, why,
                            f", serves {be.cfg.model!r}" if served is not None else "")
            elif key[1] == "model":
                log.warning("backend %s marked down: configured model %r is not served there; the server lists %r",
                            be.name, be.cfg.model, served)
            else:
                log.warning("backend %s marked down (%s)", be.name, why)
        self._verdict[be.name] = key
        be.healthy, be.down_reason = up, reason
        if not up or not self.cfg.scrape_metrics or be.kind.metrics_path is None:
            return
        try:
            r = await self.client.get(f"{root}{be.kind.metrics_path}", headers=headers, timeout=self.cfg.timeout_s)
            vals = be.kind.load_gauges(r.text) if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            vals = {}
        be.scraped_running = vals.get("running")
        be.scraped_waiting = vals.get("waiting")
        be.kv_cache_usage = vals.get("kv_cache_usage")
        be.external_calls = external_calls(be.scraped_running, be.scraped_waiting, be.inflight + be.remote_inflight)
        if self.on_scrape is not None and vals:
            self.on_scrape(be, vals)
