"""The live gateway: OpenAI-compatible endpoints in front of the backends, scheduled by the same Policy as the simulator.

Run: `uvicorn --factory 'chimera.serve.app:app_from_env'` with CHIMERA_GATEWAY_CONFIG=gateway.yaml, or
`uvicorn.run(build_gateway(load_gateway_config(path)), host=..., port=...)`.

The parts: the HTTP edge (serve/edge.py: auth, content type, size, a body that can be forwarded, typed hints), the
admission core's gateway side (serve/scheduler.py: backends, backpressure, retries around chimera.sched.admission),
the stream relay (serve/relay.py), the trace writer (serve/records.py); this module holds the endpoints and a call's
life (attempts, retries, cancellation). A request passes the edge and backpressure (Scheduler.open_models) before any
tokenising or prediction. From `Scheduler.submit` on, the call's life ends in exactly one `settle`, on every path
(completion, upstream fault, client gone, timeout, exception), which frees its slot, its queue entry and its
predicted load, and writes its trace row.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chimera.sched.policy import Policy
from chimera.sched.registry import make_policy
from chimera.sched.types import Call, Prediction
from chimera.serve import edge
from chimera.serve.config import GatewayConfig, load_gateway_config
from chimera.serve.edge import EdgeError
from chimera.serve.health import HealthChecker
from chimera.serve.metrics import GatewayMetrics
from chimera.serve.openapi import openapi_document
from chimera.serve.priors import RunningLength, SizePriorConfidence, model_infos
from chimera.serve.proxy import (
    DisconnectAwareStream, UpstreamError, UpstreamReply, open_upstream, rewrite_model, upstream_body,
    usage_completion_tokens, usage_prompt_tokens, wants_usage,
)
from chimera.serve.records import CallRecorder
from chimera.serve.relay import StreamRelay
from chimera.serve.scheduler import QueueFull, Scheduler, Ticket
from chimera.serve.trace import TraceStore

log = logging.getLogger("chimera.serve")
MAX_ATTEMPTS = 3  # the first try and up to 2 retries
CHAT, COMPLETIONS, FEEDBACK = "/v1/chat/completions", "/v1/completions", "/v1/chimera/feedback"
UPSTREAM_KEEPALIVE_S = 2.0
# Upstream calls are spread over this many connection pools: httpcore's pool does O(connections²) work per request
# (httpcore 1.0.9), which at a few hundred calls in flight cost the gateway about half its CPU.
UPSTREAM_POOLS = 16
UPSTREAM_LOGGERS = ("httpx", "httpcore")  # one INFO line per upstream call and probe: off unless asked for


def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI-style error body, so SDKs raise their usual exception types."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status, headers=headers)


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "server_error"}


class _ClientGone(Exception):
    pass


def build_policy(cfg: GatewayConfig, infos) -> Policy:
    """The configured policy with trained predictors (`predictors: DIR`) or the online priors."""
    if cfg.predictors:
        from chimera.perfmodel.profiles import profile
        from chimera.predict.artifacts import load_predictors
        from chimera.predict.length import ForestLengths, stat_quantile
        from chimera.predict.router import RouterConfidence

        from chimera.serve.config import GatewayConfigError

        try:
            preds = load_predictors(cfg.predictors)
        except ValueError as e:
            raise GatewayConfigError(f"key 'predictors': {e}") from None
        mapping = {}
        for m in cfg.models:
            bes = [b for b in cfg.backends if b.model == m]
            explicit = next((b.workload_model for b in bes if b.workload_model), None)
            prof = next((b.profile for b in bes if b.profile), None)
            wl = profile(prof).workload_model if prof else None
            mapping[m] = explicit or (wl if wl in preds.models else m)
        unknown = sorted(m for m, w in mapping.items() if w not in preds.models)
        if unknown:
            raise GatewayConfigError(
                f"key 'predictors': {cfg.predictors} was trained on {preds.models}; served model(s) {unknown} are "
                "not among them: set `workload_model` on their backends to one of those names")
        conf = RouterConfidence(preds.router, mapping)
        length = ForestLengths(preds.length, mapping, quantile=stat_quantile(cfg.length_stat))
    else:
        conf, length = SizePriorConfidence(infos), RunningLength([i.name for i in infos])
    return make_policy(cfg.policy.name, confidence=conf, length=length, lam=cfg.policy.lam, **cfg.policy.params)


def _count_tokens(text: str) -> int:
    try:
        from chimera.workload.tokens import count_tokens

        return count_tokens(text)
    except Exception:  # no vocabulary file: a rough estimate is better than failing the request
        return max(1, len(text) // 4)


async def _until_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class Gateway:
    """State of one running gateway: scheduler, shared HTTP client, trace store, metrics."""

    def __init__(self, cfg: GatewayConfig, policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.infos = model_infos(cfg)
        self.policy = policy if policy is not None else build_policy(cfg, self.infos)
        self.sched = Scheduler(self.policy, self.infos, cfg.backends, cfg.limits.max_queue,
                               cfg.limits.max_queue_per_model)
        # Trained predictors take milliseconds per call: they run on one prediction thread (they are not
        # thread-safe; one thread keeps them so), and the Prediction comes back as a value for `submit`.
        self.predict_pool = ThreadPoolExecutor(1, thread_name_prefix="chimera-predict") \
            if cfg.predictors and self.policy.needs_predictions else None
        self.trace = TraceStore(cfg.trace_store)
        self.metrics = GatewayMetrics(self.sched, self.trace)
        self.auth = edge.Auth(cfg.auth.api_keys, cfg.auth.admin_keys)
        self.client: httpx.AsyncClient | None = None  # the health checks'; the first of the upstream pools
        self.pools: list[httpx.AsyncClient] = []
        self.health_checker: HealthChecker | None = None
        self.run_id = uuid.uuid4().hex[:8]
        self.recorder = CallRecorder(self.trace, self.metrics, self.run_id, self.policy.name, self.wall)
        self._t0: float | None = None
        self._wall0 = time.time()
        self.active = 0
        self.draining = False
        self._wf_ids = itertools.count()

    # ---- clock ---------------------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the gateway started, on the loop's monotonic clock (the policy's `now`)."""
        t = asyncio.get_running_loop().time()
        if self._t0 is None:
            self._t0 = t
        return t - self._t0

    def wall(self, now: float | None) -> float | None:
        return None if now is None else self._wall0 + now

    def busy(self) -> bool:
        """Anything still owed to a client: requests being read or scheduled, calls queued or running."""
        return bool(self.active or self.sched.waiting_total or any(self.sched.inflight.values()))

    # ---- lifespan ------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.now()
        self._wall0 = time.time()
        # Idle upstream connections are dropped after 2 s, before the server's own keep-alive timeout (uvicorn's and
        # vLLM's: 5 s); at equal timeouts a call could be sent on a connection the server is closing (ReadError).
        tls = httpx.create_ssl_context()  # one for all pools (building one costs ~70 ms)
        self.pools = [httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=200,
                                                            keepalive_expiry=UPSTREAM_KEEPALIVE_S), verify=tls)
                      for _ in range(UPSTREAM_POOLS)]
        self.client = self.pools[0]
        await asyncio.to_thread(_count_tokens, "warm up")  # load the vocabulary before the first request
        if self.cfg.health.enabled:
            self.health_checker = HealthChecker([be for bes in self.sched.backends.values() for be in bes],
                                                self.cfg.health, self.client)
            # One round before serving, so a backend that is down or serves another model gets no first calls.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.health_checker.check_all(), 2 * self.cfg.health.timeout_s + 1)
            self.health_checker.start()
        try:
            yield
        finally:
            self.draining = True
            deadline = time.monotonic() + self.cfg.limits.request_timeout_s
            while self.busy() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.health_checker is not None:
                await self.health_checker.stop()
            for pool in self.pools:
                await pool.aclose()
            if self.predict_pool is not None:
                self.predict_pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(self.trace.close)

    # ---- the edge: auth, bodies, refusals ------------------------------------------------------------------
    def _refuse(self, endpoint: str, e: EdgeError) -> JSONResponse:
        self.metrics.rejected.labels(endpoint, e.reason).inc()
        return error(e.status, e.message, _ERROR_TYPES.get(e.status, "invalid_request_error"), e.code, e.headers)

    # ---- endpoints -----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        backends = {be.name: {"model": m, "up": be.healthy, "reason": be.down_reason, "inflight": be.inflight}
                    for m, bes in self.sched.backends.items() for be in bes}
        return JSONResponse({"status": "draining" if self.draining else "ok", "models": self.sched.models,
                             "waiting": self.sched.waiting_total, "active": self.active,
                             "inflight": dict(self.sched.inflight), "backends": backends,
                             "trace": self.trace.stats()})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self.sched.models))

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "chimera"}

    async def models(self, request: Request) -> Response:
        try:
            self.auth.require_client(request.headers)
        except EdgeError as e:
            return self._refuse("/v1/models", e)
        return JSONResponse({"object": "list", "data": [self._model_object(m) for m in [*self.sched.models,
                                                                                       "chimera"]]})

    async def model(self, request: Request) -> Response:
        try:
            self.auth.require_client(request.headers)
            name = request.path_params["model_id"]
            if name != "chimera" and name not in self.sched.models:
                raise EdgeError(404, f"model {name[:100]!r} is not served here; use 'chimera' or one of "
                                     f"{self.sched.models}", "model_not_found", "unknown_model")
        except EdgeError as e:
            return self._refuse("/v1/models/{model_id}", e)
        return JSONResponse(self._model_object(name))

    async def metrics_endpoint(self, request: Request) -> Response:
        try:
            self.auth.require_metrics(request.headers)
        except EdgeError as e:
            return self._refuse("/metrics", e)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def feedback(self, request: Request) -> Response:
        try:
            self.auth.require_client(request.headers)
            fb = edge.feedback(await edge.read_json(request, self.cfg.limits))
        except EdgeError as e:
            return self._refuse(FEEDBACK, e)
        self.trace.log_feedback(fb.workflow_id, fb.score)
        self.sched.end_workflow(fb.workflow_id, self.now())
        return JSONResponse({"ok": True, "workflow_id": fb.workflow_id, "score": fb.score})

    async def chat(self, request: Request) -> Response:
        return await self._completion(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, COMPLETIONS)

    # ---- the call path -------------------------------------------------------------------------------------
    async def _completion(self, request: Request, path: str) -> Response:
        try:
            if self.draining:
                raise EdgeError(503, "gateway is shutting down", "draining", "draining")
            self.auth.require_client(request.headers)
            body = await edge.read_json(request, self.cfg.limits)
            model = edge.completion_model(body, chat=path == CHAT)
            if model != "chimera" and model not in self.sched.models:
                raise EdgeError(404, f"model: {model[:100]!r} is not served here; use 'chimera' or one of "
                                     f"{self.sched.models}", "model_not_found", "unknown_model")
            hints = edge.workflow_hints(body.get("chimera"), request.headers)
            pinned = None if model == "chimera" else model
            self._admit_or_raise(pinned)  # before any tokenising or prediction: a 429 costs next to nothing
        except EdgeError as e:
            return self._refuse(path, e)
        self.active += 1
        try:
            return await self._schedule(request, path, body, hints, pinned)
        except Exception:
            self.metrics.internal_errors.labels(path).inc()
            log.exception("internal error on %s", path)
            return error(500, "internal gateway error (logged)", "server_error", "internal_error")
        finally:
            self.active -= 1

    def _admit_or_raise(self, pinned: str | None) -> None:
        if not self.sched.open_models(pinned):
            raise EdgeError(429, f"gateway queue is full: {self.sched.backlog_reason(pinned)}", "queue_full",
                            "queue_full", {"Retry-After": str(self._retry_after())})

    async def _schedule(self, request: Request, path: str, body: dict[str, Any], hints: edge.WorkflowHints,
                        pinned: str | None) -> Response:
        now = arrival = self.now()
        wid = hints.workflow_id or f"wf-{self.run_id}-{next(self._wf_ids)}"
        wf = self.sched.workflows.get(wid, now)
        prompt, full = edge.prompts(body, chat=path == CHAT)
        fields = dict(workflow_id=wid, kind=hints.kind or "chat", prompt=prompt,
                      stage=hints.stage if hints.stage is not None else wf.stages,
                      prompt_tokens=await asyncio.to_thread(_count_tokens, full),
                      workflow_arrival_s=wf.arrival_s, generated_so_far=wf.generated)
        stream = bool(body.get("stream"))
        client_pinned = pinned is not None  # a pinned call is retried on replicas of that model only
        tried: set[str] = set()
        last_err = "no backend available"
        for attempt in range(MAX_ATTEMPTS):
            # A retry keeps the original arrival: FCFS-like keys must not send it to the back of the queue.
            call = Call(call_id=self.sched.next_id(), arrival_s=arrival, pinned_model=pinned, **fields)
            call.ctx = Ticket(tried=tried)
            try:
                outcome = await self._attempt(request, path, body, call, stream)
            except asyncio.CancelledError:  # the server is tearing the request down
                self.settle(call, "cancelled", "request task cancelled")
                raise
            except BaseException as e:
                self.settle(call, "error", f"gateway error: {type(e).__name__}")
                raise
            if isinstance(outcome, Response):
                return outcome
            last_err = outcome  # an upstream fault before any byte reached the client: the call is settled
            target = self.sched.retry_target(call, self.now(), other_models=not client_pinned)
            if target is None or attempt == MAX_ATTEMPTS - 1:
                break
            self.metrics.retries.labels(call.model).inc()
            log.warning(json.dumps({"event": "retry", "workflow_id": call.workflow_id, "from": call.ctx.backend.name,
                                    "to_model": target, "error": outcome}))
            pinned = target
        return error(502, f"all attempts failed; last error: {last_err}", "server_error", "upstream_unavailable")

    async def _predict(self, call: Call) -> Prediction | None:
        if self.predict_pool is None:
            return None  # priors: cheap, computed inside `submit`
        return await asyncio.get_running_loop().run_in_executor(self.predict_pool, self.policy.predict, call)

    async def _attempt(self, request: Request, path: str, body: dict[str, Any], call: Call,
                       stream: bool) -> Response | str:
        """One try on one backend: a Response for the client, or the upstream error text (retryable, settled).
        The caller settles the call if this raises; a returned stream settles it when it ends."""
        ticket: Ticket = call.ctx
        timeout = self.cfg.limits.request_timeout_s
        dispatched = asyncio.Event()
        ticket.on_dispatch = lambda _t: dispatched.set()
        try:
            prediction = await self._predict(call)
            self.sched.submit(call, self.now(), prediction)
        except QueueFull as e:  # the open models filled up while this call was being predicted
            self.settle(call, "rejected", "queue full", record=False)
            self.metrics.rejected.labels(path, "queue_full").inc()
            return error(429, f"gateway queue is full: {e}", "rate_limit_error", "queue_full",
                         headers={"Retry-After": str(self._retry_after())})
        try:
            await self._race(request, dispatched.wait(), max(0.001, timeout - (self.now() - call.arrival_s)))
        except (_ClientGone, TimeoutError) as e:
            gone = isinstance(e, _ClientGone)
            self.settle(call, "cancelled" if gone else "timeout", None if gone else "queued too long")
            return Response(status_code=499) if gone else error(504, "timed out waiting for a backend",
                                                                 "server_error", "queue_timeout")
        be = ticket.backend
        assert be is not None
        self.metrics.queue_wait.labels(call.model).observe(max(0.0, self.now() - call.arrival_s))
        try:
            pool = self.pools[call.call_id % len(self.pools)]
            reply: UpstreamReply = await self._race(
                request, open_upstream(pool, be.cfg, path, upstream_body(body, be.cfg, call.priority),
                                       stream, timeout), timeout)
        except UpstreamError as e:
            self.settle(call, "error", str(e), backend_down=True)
            return str(e)
        except (_ClientGone, TimeoutError) as e:
            gone = isinstance(e, _ClientGone)
            self.settle(call, "cancelled" if gone else "timeout", None if gone else "upstream timeout")
            return Response(status_code=499) if gone else error(504, "backend timed out", "server_error",
                                                                  "upstream_timeout")
        if stream and reply.response.status_code < 400:
            relay = StreamRelay(self, call, be.name, reply, show_usage=wants_usage(body))
            return DisconnectAwareStream(relay.run(), media_type="text/event-stream", on_close=relay.closed,
                                         headers={"cache-control": "no-cache", "x-chimera-model": call.model,
                                                  "x-chimera-backend": be.name})
        try:
            return self._finish_plain(call, be.name, reply)
        finally:
            await reply.response.aclose()

    async def _race(self, request: Request, aw, timeout: float):
        """Await `aw` unless the client leaves (raise _ClientGone) or time runs out (TimeoutError)."""
        task = asyncio.ensure_future(aw)
        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if watcher in done:
            raise _ClientGone()
        raise TimeoutError()

    def _retry_after(self) -> int:
        """Seconds a client should wait: roughly the time to drain the queue at the current service rate."""
        cap = sum(self.sched.cap.values()) or 1
        return max(1, min(60, round(self.sched.waiting_total / cap)))

    def _finish_plain(self, call: Call, backend: str, reply: UpstreamReply) -> Response:
        resp = reply.response
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            data = None
        if resp.status_code >= 400 or not isinstance(data, dict):
            msg = f"backend {backend} answered HTTP {resp.status_code}"
            self.settle(call, "error", msg, backend=backend)
            if isinstance(data, dict) and "error" in data:
                return JSONResponse(data, resp.status_code if resp.status_code >= 400 else 502)
            return error(resp.status_code if resp.status_code >= 400 else 502, msg, "server_error", "bad_upstream")
        rewrite_model(data, call.model)  # type: ignore[arg-type]
        tokens = usage_completion_tokens(data) or 0
        if usage_prompt_tokens(data):
            call.prompt_tokens = usage_prompt_tokens(data)
        self.settle(call, "ok", backend=backend, new_tokens=tokens, completion_tokens=tokens)
        return JSONResponse(data, headers={"x-chimera-model": call.model or "", "x-chimera-backend": backend})

    # ---- the one end of a call's life ----------------------------------------------------------------------
    def settle(self, call: Call, status: str, err: str | None = None, *, backend: str | None = None,
                backend_down: bool = False, new_tokens: int = 0, completion_tokens: int | None = None,
                first_token_at: float | None = None, record: bool = True) -> None:
        """End the call's life once: free its slot, queue entry and predicted load, learn, and trace it."""
        ticket: Ticket = call.ctx
        if ticket.settled:
            return
        ticket.settled = True
        ticket.cancelled = status != "ok"
        now = self.now()
        if backend is None and ticket.backend is not None:
            backend = ticket.backend.name
        try:
            if status == "ok":
                self.sched.complete(call, now, new_tokens)  # the core feeds online learners (running lengths)
            else:
                self.sched.abandon(call, now, backend_down=backend_down)
        finally:
            if record:
                self.recorder.record(call, backend, status, err, now, completion_tokens, first_token_at)



def build_gateway(config: GatewayConfig, policy: Policy | None = None) -> Starlette:
    """The ASGI app for a validated config; `policy` overrides the configured one (tests, custom predictors)."""
    gw = Gateway(config, policy)
    app = Starlette(
        routes=[
            Route(CHAT, gw.chat, methods=["POST"]),
            Route(COMPLETIONS, gw.completions, methods=["POST"]),
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", gw.model, methods=["GET"]),
            Route(FEEDBACK, gw.feedback, methods=["POST"]),
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
