"""The live gateway: OpenAI-compatible endpoints in front of the backends, scheduled by the same Policy as the simulator.

Run: `chimera serve --config gateway.yaml`, `uvicorn --factory 'chimera.serve.app:app_from_env'` with
CHIMERA_GATEWAY_CONFIG=gateway.yaml, or `uvicorn.run(build_gateway(load_gateway_config(path)), ...)`.

This module holds the lifespan and the endpoints, and they are thin: a completion passes the edge (serve/edge.py:
auth, content type, size, a forwardable body, typed hints) and backpressure, then its whole life is the director's
(serve/director.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chimera.sched.policy import Policy
from chimera.sched.types import ModelInfo
from chimera.predict.artifacts import manifest_digest
from chimera.predict.assembly import PredictorConfigError, gateway_policy
from chimera.serve import edge
from chimera.serve.clock import GatewayClock
from chimera.serve.config import GatewayConfig, GatewayConfigError, load_gateway_config
from chimera.serve.director import CHAT, RESPONSES, Director, count_tokens, error
from chimera.serve.edge import COMPLETIONS, EdgeError
from chimera.serve.health import HealthChecker
from chimera.serve.identity import WorkflowIdentity
from chimera.serve.live_learning import LiveLearning
from chimera.serve.metrics import GatewayMetrics
from chimera.serve.model_infos import model_infos, workload_names
from chimera.serve.openapi import openapi_document
from chimera.serve.pool import BackendPool
from chimera.serve.proxy import UpstreamClients
from chimera.serve.records import CallRecorder
from chimera.serve.reload import PredictorReloader
from chimera.serve.responses import fetch_stored
from chimera.serve.scores import STORED, WorkflowScores, refusal
from chimera.serve.trace import TraceStore

if TYPE_CHECKING:
    from chimera.serve.shared.lengths import SharedLengths
    from chimera.serve.shared.state import SharedState

log = logging.getLogger("chimera.serve")
FEEDBACK = "/v1/chimera/feedback"
RELOAD = "/v1/chimera/admin/reload"
STORED_RESPONSE = RESPONSES + "/{response_id}"
UPSTREAM_LOGGERS = ("httpx", "httpcore")  # one INFO line per upstream call and probe: off unless asked for
_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 502: "server_error", 503: "server_error"}
_FEEDBACK_REFUSED = {400: "invalid", 404: "unknown"}  # edge refusals of a score that count as its outcome


def build_policy(cfg: GatewayConfig, infos: list[ModelInfo]) -> Policy:
    """The configured policy with its predictors, built by the one assembly (chimera.predict.assembly): trained ones
    from `predictors: DIR`, else the cold-start priors (confidence by model size, lengths learnt online); with
    `learning: {online: true}`, confidence learnt from workflow scores, warm-started from either."""
    try:
        return gateway_policy(cfg.policy.name, cfg.policy.lam, cfg.policy.params, infos, cfg.predictors,
                              workload_names(cfg), cfg.length_stat,
                              cfg.learning.params if cfg.learning.online else None)
    except PredictorConfigError as e:
        raise GatewayConfigError(str(e)) from None


class Gateway:
    """One running gateway: its backend pool, the director of every call's life, trace store, metrics, lifespan."""

    def __init__(self, cfg: GatewayConfig, policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.infos = model_infos(cfg)
        self.policy = policy if policy is not None else build_policy(cfg, self.infos)
        self.pool = BackendPool(self.policy, self.infos, cfg.backends, cfg.limits.max_queue,
                                cfg.limits.max_queue_per_model)
        # Trained predictors take milliseconds per call: they run on one prediction thread (they are not
        # thread-safe; one thread keeps them so), and the Prediction comes back as a value for `submit`.
        self.predict_pool = ThreadPoolExecutor(1, thread_name_prefix="chimera-predict") \
            if cfg.predictors and self.policy.needs_predictions else None
        self.trace = TraceStore(cfg.trace_store)
        self.metrics = GatewayMetrics(self.pool, self.trace)
        self.reloader = PredictorReloader(cfg, self.infos, workload_names(cfg), self.pool, self.metrics,
                                          manifest_digest(cfg.predictors) if cfg.predictors else None)
        self.scores = WorkflowScores(self.pool, self.trace, self.metrics)
        self.auth = edge.Auth(cfg.auth.api_keys, cfg.auth.admin_keys)
        self.health_checker: HealthChecker | None = None
        self.run_id = uuid.uuid4().hex[:8]
        self.clock = GatewayClock()
        recorder = CallRecorder(self.trace, self.metrics, self.run_id, self.policy.name, self.clock)
        self.live = LiveLearning(cfg.live, self.policy, self.infos, self.pool.all_backends, cfg.trace_store,
                                 self.run_id, self.clock) if cfg.live is not None else None
        if self.live is not None:
            recorder.observers.append(self.live.observe)
            self.metrics.registry.register(self.live.collector())
        self.identity = WorkflowIdentity(cfg.identity, self.pool, self.run_id)
        self.shared: SharedState | None = None  # several replicas sharing state on Redis (serve/shared/)
        self.shared_lengths: SharedLengths | None = None
        if cfg.state is not None:
            from chimera.serve.shared.learning import SharedLearning  # Redis loads only when configured
            from chimera.serve.shared.lengths import SharedLengths
            from chimera.serve.shared.state import SharedState

            self.shared = SharedState(cfg.state, self.pool, clock=self.clock,
                                      workflow_ttl_s=cfg.identity.idle_timeout_s)
            self.metrics.registry.register(self.shared.collector())
            # a score judged once and learnt by every replica's learner (serve/shared/learning.py)
            self.scores.shared = SharedLearning.for_core(self.shared.conn, self.pool.core, cfg.state.sync_interval_s,
                                                         self.metrics.registry)
            # the running-mean length predictor learns from every replica's completions (serve/shared/lengths.py)
            self.shared_lengths = SharedLengths(self.shared.conn, lambda: getattr(self.policy, "length", None),
                                                cfg.state.sync_interval_s, self.metrics.registry)
        self.director = Director(self.pool, self.policy, cfg.limits, self.metrics, recorder, self.clock, self.run_id,
                                 self.predict_pool, self.identity, self.shared)
        self.active = 0
        self.draining = False
        self._signalled: set[asyncio.Task] = set()  # reloads asked for by SIGHUP, until they finish

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self.reloader.reload("SIGHUP"))
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    def busy(self) -> bool:
        """Anything still owed to a client: requests being read or scheduled, calls queued or running."""
        return bool(self.active) or not self.pool.holds_nothing()

    # ---- lifespan ------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.clock.start()
        upstream = self.director.upstream = UpstreamClients()
        await asyncio.to_thread(count_tokens, "warm up")  # load the vocabulary before the first request
        if self.cfg.health.enabled:
            self.health_checker = HealthChecker(self.pool.all_backends, self.cfg.health, upstream.probes)
            # One round before serving, so a backend that is down or serves another model gets no first calls.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.health_checker.check_all(), 2 * self.cfg.health.timeout_s + 1)
            self.health_checker.start()
        if self.live is not None:
            self.live.start(self.health_checker)
        if self.shared is not None:
            self.shared.start()
        if self.scores.shared is not None:
            self.scores.shared.start()
        if self.shared_lengths is not None:
            self.shared_lengths.start()
        loop = asyncio.get_running_loop()
        try:  # SIGHUP reloads the predictors; only the main thread may handle signals (not a gateway in a test thread)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            hup = True
        except (ValueError, RuntimeError, NotImplementedError, AttributeError):
            hup = False
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            if self._signalled:  # a reload SIGHUP started finishes (or fails) before the pool goes away
                await asyncio.gather(*self._signalled, return_exceptions=True)
            self.draining = True
            deadline = time.monotonic() + self.cfg.limits.request_timeout_s
            while self.busy() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.health_checker is not None:
                await self.health_checker.stop()
            if self.live is not None:
                await self.live.stop()
            if self.scores.shared is not None:
                await self.scores.shared.stop()
            if self.shared_lengths is not None:
                await self.shared_lengths.stop()
            if self.shared is not None:
                await self.shared.stop()
            await upstream.aclose()
            if self.predict_pool is not None:
                self.predict_pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(self.trace.close)

    # ---- endpoints -----------------------------------------------------------------------------------------
    def _refuse(self, endpoint: str, e: EdgeError) -> JSONResponse:
        self.metrics.rejected.labels(endpoint, e.reason).inc()
        return error(e.status, e.message, _ERROR_TYPES.get(e.status, "invalid_request_error"), e.code, e.headers)

    async def health(self, request: Request) -> Response:
        pool = self.pool
        backends = {be.name: {"model": be.cfg.model, "up": be.healthy, "reason": be.down_reason,
                              "inflight": be.inflight} for be in pool.all_backends}
        out = {"status": "draining" if self.draining else "ok", "models": pool.models, "waiting": pool.waiting_total,
               "active": self.active, "inflight": dict(pool.inflight), "backends": backends,
               "trace": self.trace.stats()}
        if self.shared is not None:
            out["state"] = self.shared.status()  # degraded still serves (200): on local caps
        return JSONResponse(out)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self.pool.models))

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "chimera"}

    def _served(self, name: str, field: str) -> None:
        if name != "chimera" and name not in self.pool.models:
            raise EdgeError(404, f"{field}{name[:100]!r} is not served here; use 'chimera' or one of "
                                 f"{self.pool.models}", "model_not_found", "unknown_model")

    async def models(self, request: Request) -> Response:
        try:
            self.auth.require_client(request.headers)
        except EdgeError as e:
            return self._refuse("/v1/models", e)
        return JSONResponse({"object": "list", "data": [self._model_object(m) for m in [*self.pool.models,
                                                                                       "chimera"]]})

    async def model(self, request: Request) -> Response:
        try:
            self.auth.require_client(request.headers)
            name = request.path_params["model_id"]
            self._served(name, "model ")
        except EdgeError as e:
            return self._refuse("/v1/models/{model_id}", e)
        return JSONResponse(self._model_object(name))

    async def metrics_endpoint(self, request: Request) -> Response:
        try:
            self.auth.require_admin(request.headers, "/metrics")
        except EdgeError as e:
            return self._refuse("/metrics", e)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def feedback(self, request: Request) -> Response:
        """A workflow's score: learnt once and stored once (serve/scores.py), or refused saying why."""
        try:
            self.auth.require_client(request.headers)
            fb = edge.feedback(await edge.read_json(request, self.cfg.limits))
            wid = fb.workflow_id or self.identity.workflow_of_response(fb.response_id or "")
            if wid is None:
                raise EdgeError(404, "response_id: unknown response_id (not served here, or forgotten)",
                                "unknown_response_id", "unknown_response")
        except EdgeError as e:
            if e.status in _FEEDBACK_REFUSED:
                self.metrics.feedback.labels(_FEEDBACK_REFUSED[e.status]).inc()
            return self._refuse(FEEDBACK, e)
        now = self.clock.now()
        outcome = await self.scores.take(wid, fb.score, now)
        self.identity.end(wid, now)
        if outcome not in STORED:
            return self._refuse(FEEDBACK, refusal(outcome, wid))
        return JSONResponse({"ok": True, "workflow_id": wid, "score": fb.score, "outcome": outcome.value})

    async def reload(self, request: Request) -> Response:
        """Reload the predictors from the configured folder (admin): 200 with the new version, or 409 with the
        reason, the old predictors kept (serve/reload.py)."""
        try:
            self.auth.require_admin(request.headers, RELOAD)
        except EdgeError as e:
            return self._refuse(RELOAD, e)
        result = await self.reloader.reload("admin endpoint")
        if not result.ok:
            return self._refuse(RELOAD, EdgeError(409, f"reload refused, the predictors in use are kept: "
                                                       f"{result.reason}", "reload_refused", "reload_refused"))
        return JSONResponse(result.as_dict())

    async def chat(self, request: Request) -> Response:
        return await self._completion(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, COMPLETIONS)

    async def responses(self, request: Request) -> Response:
        return await self._completion(request, RESPONSES)

    async def stored_response(self, request: Request) -> Response:
        """A response read back from the backend that made and keeps it (the gateway remembers which one)."""
        try:
            self.auth.require_client(request.headers)
            rid = edge.response_id(request.path_params["response_id"])
            backend = self.director.responses.home(rid)
            assert self.director.upstream is not None, "the gateway's lifespan opens the upstream clients"
            return await fetch_stored(self.director.upstream.probes, backend, rid, request.url.query,
                                      self.cfg.limits.request_timeout_s)
        except EdgeError as e:
            return self._refuse(STORED_RESPONSE, e)

    async def _completion(self, request: Request, path: str) -> Response:
        """The edge and backpressure (a 4xx/429 costs next to nothing), then the director runs the call's life."""
        try:
            if self.draining:
                raise EdgeError(503, "gateway is shutting down", "draining", "draining")
            self.auth.require_client(request.headers)
            body, raw = await edge.read_json_raw(request, self.cfg.limits)
            model = edge.completion_model(body, path)
            self._served(model, "model: ")
            hints = edge.workflow_hints(body.get("chimera"), request.headers)
            edge.check_session(body, request.headers, self.cfg.identity)
            pinned = None if model == "chimera" else model
            self.director.backpressure(pinned)
        except EdgeError as e:
            return self._refuse(path, e)
        self.active += 1
        try:
            return await self.director.run(request, await self.director.open(path, body, hints, pinned,
                                                                         request.headers, raw))
        except Exception:
            self.metrics.internal_errors.labels(path).inc()
            log.exception("internal error on %s", path)
            return error(500, "internal gateway error (logged)", "server_error", "internal_error")
        finally:
            self.active -= 1


def build_gateway(config: GatewayConfig, policy: Policy | None = None) -> Starlette:
    """The ASGI app for a validated config; `policy` overrides the configured one (tests, custom predictors)."""
    gw = Gateway(config, policy)
    app = Starlette(
        routes=[
            Route(CHAT, gw.chat, methods=["POST"]),
            Route(COMPLETIONS, gw.completions, methods=["POST"]),
            Route(RESPONSES, gw.responses, methods=["POST"]),
            Route(RESPONSES + "/{response_id:path}", gw.stored_response, methods=["GET"]),
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", gw.model, methods=["GET"]),
            Route(FEEDBACK, gw.feedback, methods=["POST"]),
            Route(RELOAD, gw.reload, methods=["POST"]),
            Route("/metrics", gw.metrics_endpoint, methods=["GET"]),
            Route("/health", gw.health, methods=["GET"]),
            Route("/openapi.json", gw.openapi, methods=["GET"]),
        ],
        lifespan=gw.lifespan,
    )
    app.state.gateway = gw
    return app


def app_from_env() -> Starlette:
    """uvicorn --factory entry point: the config path comes from $CHIMERA_GATEWAY_CONFIG."""
    path = os.environ.get("CHIMERA_GATEWAY_CONFIG", "gateway.yaml")
    return build_gateway(load_gateway_config(path))


def quiet_upstream_logs(upstream: bool = False) -> None:
    """httpx logs every upstream call and probe at INFO (57k lines in a 10-minute soak): WARNING unless asked."""
    for name in UPSTREAM_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if upstream else logging.WARNING)


def run_gateway(config: GatewayConfig, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM on `listen.host:listen.port`; in-flight calls are drained on the way out."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_upstream_logs()
    uvicorn.run(build_gateway(config), host=config.listen.host, port=config.listen.port, log_level=log_level,
                timeout_graceful_shutdown=max(1, math.ceil(config.limits.request_timeout_s)))
