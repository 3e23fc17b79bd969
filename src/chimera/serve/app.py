"""The live gateway: OpenAI-compatible endpoints in front of the backends, scheduled by the same Policy as the simulator.

Run: `uvicorn --factory 'chimera.serve.app:app_from_env'` with CHIMERA_GATEWAY_CONFIG=gateway.yaml, or
`uvicorn.run(build_gateway(load_gateway_config(path)), host=..., port=...)`.
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
from typing import Any, AsyncIterator

import anyio
import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chimera.sched.policy import Policy
from chimera.sched.registry import make_policy
from chimera.sched.types import Call
from chimera.serve.config import GatewayConfig, load_gateway_config
from chimera.serve.health import HealthChecker
from chimera.serve.metrics import GatewayMetrics
from chimera.serve.offload import OffloadedConfidence, OffloadedLength, Offloader
from chimera.serve.priors import RunningLength, SizePriorConfidence, model_infos
from chimera.serve.proxy import (
    DisconnectAwareStream, UpstreamError, UpstreamReply, count_content_tokens, open_upstream, parse_sse,
    rewrite_model, sse_error, upstream_body,
)
from chimera.serve.scheduler import QueueFull, Scheduler, Ticket
from chimera.serve.trace import TraceStore

log = logging.getLogger("chimera.serve")
MAX_ATTEMPTS = 3  # the first try and up to 2 retries
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI-style error body, so SDKs raise their usual exception types."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status, headers=headers)


class _ClientGone(Exception):
    pass


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workflow_id: str = Field(min_length=1)
    score: float = Field(ge=0.0, le=1.0)


def build_policy(cfg: GatewayConfig, infos) -> Policy:
    """The configured policy with trained predictors (`predictors: DIR`) or the online priors."""
    if cfg.predictors:
        from chimera.engine.profiles import profile
        from chimera.predict.artifacts import load_predictors
        from chimera.predict.length import ForestLengths
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
        # Trained predictors can take milliseconds per call: they run on the prediction thread (serve/offload.py).
        conf = OffloadedConfidence(RouterConfidence(preds.router, mapping))
        length = OffloadedLength(ForestLengths(preds.length, mapping))
    else:
        conf, length = SizePriorConfidence(infos), RunningLength([i.name for i in infos])
    return make_policy(cfg.policy.name, confidence=conf, length=length, lam=cfg.policy.lam, **cfg.policy.params)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompts(body: dict[str, Any], path: str) -> tuple[str, str]:
    """(task prompt for the router: first user message, whole prompt text for token counting)."""
    if path == CHAT:
        msgs = [m for m in body["messages"] if isinstance(m, dict)]
        first = next((_text(m.get("content")) for m in msgs if m.get("role") == "user"), "")
        return first, "\n".join(_text(m.get("content")) for m in msgs)
    p = body.get("prompt")
    text = p if isinstance(p, str) else "\n".join(x for x in p if isinstance(x, str)) if isinstance(p, list) else ""
    return text, text


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
        self.sched = Scheduler(self.policy, self.infos, cfg.backends, cfg.limits.max_queue)
        conf, length = getattr(self.policy, "confidence", None), getattr(self.policy, "length", None)
        self.offload = None
        if isinstance(conf, OffloadedConfidence) or isinstance(length, OffloadedLength):
            self.offload = Offloader(conf if isinstance(conf, OffloadedConfidence) else None,
                                     length if isinstance(length, OffloadedLength) else None)
        self.metrics = GatewayMetrics(self.sched)
        self.trace = TraceStore(cfg.trace_store)
        self.client: httpx.AsyncClient | None = None
        self.health_checker: HealthChecker | None = None
        self.run_id = uuid.uuid4().hex[:8]
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
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=200))
        await asyncio.to_thread(_count_tokens, "warm up")  # load the vocabulary before the first request
        if self.cfg.health.enabled:
            self.health_checker = HealthChecker([be for bes in self.sched.backends.values() for be in bes],
                                                self.cfg.health, self.client)
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
            await self.client.aclose()
            if self.offload is not None:
                self.offload.close()
            await asyncio.to_thread(self.trace.close)

    # ---- auth ----------------------------------------------------------------------------------------------
    @staticmethod
    def _bearer(request: Request) -> str | None:
        h = request.headers.get("authorization", "")
        return h[7:].strip() if h.lower().startswith("bearer ") else None

    def _authorised(self, request: Request, *, admin: bool = False, client_ok: bool = True) -> bool:
        a = self.cfg.auth
        allowed = set(a.admin_keys) | (set(a.api_keys) if client_ok else set())
        if admin and not a.admin_keys:
            return True
        if not admin and not a.api_keys:
            return True
        return self._bearer(request) in allowed

    # ---- endpoints -----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "draining" if self.draining else "ok", "models": self.sched.models,
                             "waiting": self.sched.waiting_total, "active": self.active})

    async def models(self, request: Request) -> Response:
        if not self._authorised(request):
            return error(401, "missing or invalid API key", "authentication_error", "invalid_api_key")
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "chimera"} for m in self.sched.models]
        data.append({"id": "chimera", "object": "model", "created": 0, "owned_by": "chimera"})
        return JSONResponse({"object": "list", "data": data})

    async def metrics_endpoint(self, request: Request) -> Response:
        if not self._authorised(request, admin=True, client_ok=False):
            return error(401, "an admin key is required for /metrics", "authentication_error", "invalid_api_key")
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def feedback(self, request: Request) -> Response:
        if not self._authorised(request):
            return error(401, "missing or invalid API key", "authentication_error", "invalid_api_key")
        body, err = await self._read_json(request)
        if err is not None:
            return err
        try:
            fb = Feedback.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            return error(400, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}", code="invalid_feedback")
        self.trace.log_feedback(fb.workflow_id, fb.score)
        self.sched.end_workflow(fb.workflow_id)
        return JSONResponse({"ok": True, "workflow_id": fb.workflow_id, "score": fb.score})

    async def _read_json(self, request: Request) -> tuple[Any, Response | None]:
        limit = self.cfg.limits.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            self.metrics.rejected.labels("too_large").inc()
            return None, error(413, f"request body over {limit} bytes", code="body_too_large")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                self.metrics.rejected.labels("too_large").inc()
                return None, error(413, f"request body over {limit} bytes", code="body_too_large")
        try:
            return json.loads(buf), None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.metrics.rejected.labels("bad_json").inc()
            return None, error(400, f"malformed JSON body: {e}", code="invalid_json")

    async def chat(self, request: Request) -> Response:
        return await self._completion(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, COMPLETIONS)

    # ---- the call path -------------------------------------------------------------------------------------
    async def _completion(self, request: Request, path: str) -> Response:
        if self.draining:
            return error(503, "gateway is shutting down", "server_error", "draining")
        if not self._authorised(request):
            self.metrics.rejected.labels("auth").inc()
            return error(401, "missing or invalid API key", "authentication_error", "invalid_api_key")
        body, err = await self._read_json(request)
        if err is not None:
            return err
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object", code="invalid_body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "missing required parameter 'model'", code="missing_model")
        if path == CHAT and (not isinstance(body.get("messages"), list) or not body["messages"]):
            return error(400, "missing required parameter 'messages' (a non-empty list)", code="missing_messages")
        if path == COMPLETIONS and not isinstance(body.get("prompt"), (str, list)):
            return error(400, "missing required parameter 'prompt'", code="missing_prompt")
        if model != "chimera" and model not in self.sched.models:
            self.metrics.rejected.labels("unknown_model").inc()
            return error(404, f"model {model!r} is not served here; use 'chimera' or one of {self.sched.models}",
                         code="model_not_found")
        meta = body.get("chimera") if isinstance(body.get("chimera"), dict) else {}
        now = self.now()
        wid = request.headers.get("x-chimera-workflow-id") or meta.get("workflow_id")
        wid = str(wid) if wid else f"wf-{self.run_id}-{next(self._wf_ids)}"
        wf = self.sched.workflows.get(wid, now)
        stage_raw = request.headers.get("x-chimera-stage", meta.get("stage"))
        try:
            stage = int(stage_raw) if stage_raw is not None else wf.stages
        except (TypeError, ValueError):
            return error(400, f"stage must be an integer, got {stage_raw!r}", code="invalid_stage")
        kind = str(request.headers.get("x-chimera-kind") or meta.get("kind") or "chat")
        prompt, full = _prompts(body, path)
        prompt_tokens = await asyncio.to_thread(_count_tokens, full)
        self.active += 1
        try:
            return await self._schedule(request, path, body, dict(
                workflow_id=wid, kind=kind, prompt=prompt, stage=stage, prompt_tokens=prompt_tokens,
                workflow_arrival_s=wf.arrival_s, generated_so_far=wf.generated,
            ), pinned=None if model == "chimera" else model, arrival=now)
        finally:
            self.active -= 1

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

    async def _schedule(self, request: Request, path: str, body: dict[str, Any], fields: dict[str, Any],
                        pinned: str | None, arrival: float) -> Response:
        stream = bool(body.get("stream"))
        client_pinned = pinned is not None  # a pinned call is retried on replicas of that model only
        tried: set[str] = set()
        timeout = self.cfg.limits.request_timeout_s
        last_err = "no backend available"
        for attempt in range(MAX_ATTEMPTS):
            now = self.now()
            # A retry keeps the original arrival: FCFS-like keys must not send it to the back of the queue.
            call = Call(call_id=self.sched.next_id(), arrival_s=arrival, pinned_model=pinned, **fields)
            dispatched = asyncio.Event()
            ticket = Ticket(tried=tried, on_dispatch=lambda _t: dispatched.set())
            call.ctx = ticket
            if self.offload is not None and self.policy.needs_predictions:
                try:
                    await self.offload.prepare(call)
                except Exception as e:
                    self.offload.discard(call)
                    log.exception("predictor failed")
                    return error(500, f"predictor failed: {type(e).__name__}: {e}", "server_error", "predictor_error")
                except BaseException:
                    self.offload.discard(call)
                    raise
                now = self.now()
            try:
                self.sched.submit(call, now)
            except QueueFull as e:
                self.metrics.rejected.labels("queue_full").inc()
                return error(429, f"gateway queue is full: {e}", "rate_limit_error", "queue_full",
                             headers={"Retry-After": str(self._retry_after())})
            try:
                await self._race(request, dispatched.wait(), max(0.001, timeout - (self.now() - arrival)))
            except (_ClientGone, TimeoutError) as e:
                ticket.cancelled = True
                if dispatched.is_set():
                    self.sched.fail(call, self.now())
                gone = isinstance(e, _ClientGone)
                self._record(call, None, "cancelled" if gone else "timeout", "queued too long" if not gone else None)
                return error(504, "timed out waiting for a backend", "server_error", "queue_timeout") if not gone \
                    else Response(status_code=499)
            except asyncio.CancelledError:  # the server is tearing the request down: never leak a slot
                ticket.cancelled = True
                if dispatched.is_set():
                    self.sched.fail(call, self.now())
                self._record(call, None, "cancelled", "request task cancelled")
                raise
            be = ticket.backend
            assert be is not None
            self.metrics.queue_wait.labels(call.model).observe(max(0.0, self.now() - call.arrival_s))
            ub = upstream_body(body, be.cfg, call.priority)
            try:
                reply: UpstreamReply = await self._race(
                    request, open_upstream(self.client, be.cfg, path, ub, stream, timeout), timeout)
            except UpstreamError as e:
                self.sched.fail(call, self.now(), backend_down=True)
                self._record(call, be.name, "error", str(e))
                last_err = str(e)
                target = self.sched.retry_target(call, self.now(), other_models=not client_pinned)
                if target is None or attempt == MAX_ATTEMPTS - 1:
                    break
                self.metrics.retries.labels(call.model).inc()
                log.warning(json.dumps({"event": "retry", "workflow_id": call.workflow_id, "from": be.name,
                                        "to_model": target, "error": str(e)}))
                pinned = target
                continue
            except (_ClientGone, TimeoutError) as e:
                self.sched.fail(call, self.now())
                gone = isinstance(e, _ClientGone)
                self._record(call, be.name, "cancelled" if gone else "timeout", None if gone else "upstream timeout")
                return Response(status_code=499) if gone else error(504, "backend timed out", "server_error",
                                                                      "upstream_timeout")
            except asyncio.CancelledError:
                self.sched.fail(call, self.now())
                self._record(call, be.name, "cancelled", "request task cancelled")
                raise
            if stream and reply.response.status_code < 400:
                return DisconnectAwareStream(self._relay(call, be.name, reply), media_type="text/event-stream",
                                             headers={"cache-control": "no-cache", "x-chimera-model": call.model,
                                                      "x-chimera-backend": be.name})
            return self._finish_plain(call, be.name, reply)
        return error(502, f"all attempts failed; last error: {last_err}", "server_error", "upstream_unavailable")

    def _retry_after(self) -> int:
        """Seconds a client should wait: roughly the time to drain the queue at the current service rate."""
        cap = sum(self.sched.cap.values()) or 1
        return max(1, min(60, round(self.sched.waiting_total / cap)))

    def _finish_plain(self, call: Call, backend: str, reply: UpstreamReply) -> Response:
        resp = reply.response
        now = self.now()
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if resp.status_code >= 400 or not isinstance(data, dict):
            self.sched.fail(call, now)
            msg = f"backend {backend} answered HTTP {resp.status_code}"
            self._record(call, backend, "error", msg)
            if isinstance(data, dict) and "error" in data:
                return JSONResponse(data, resp.status_code if resp.status_code >= 400 else 502)
            return error(resp.status_code if resp.status_code >= 400 else 502, msg, "server_error", "bad_upstream")
        rewrite_model(data, call.model)  # type: ignore[arg-type]
        usage = data.get("usage") or {}
        tokens = int(usage.get("completion_tokens") or 0)
        self._complete(call, now, tokens)
        if usage.get("prompt_tokens"):
            call.prompt_tokens = int(usage["prompt_tokens"])
        self._record(call, backend, "ok", None, completion_tokens=tokens)
        return JSONResponse(data, headers={"x-chimera-model": call.model or "", "x-chimera-backend": backend})

    def _complete(self, call: Call, now: float, new_tokens: int) -> None:
        self.sched.complete(call, now, new_tokens)
        if isinstance(self.policy.length, RunningLength):
            self.policy.length.observe(call.kind, call.stage, call.model, call.tokens_seen)  # type: ignore[arg-type]

    async def _relay(self, call: Call, backend: str, reply: UpstreamReply) -> AsyncIterator[bytes]:
        """Pass the SSE stream through, naming the chosen model and reporting token progress to the policy.

        The call is settled (policy, slot, trace) before `[DONE]` is forwarded, so a client that saw the end
        also sees the trace row; a cancelled or broken stream is settled in `finally`.
        """
        tokens, usage_tokens, first_at = 0, None, None
        settled = False

        def settle(status: str, err: str | None = None) -> None:
            nonlocal settled
            if settled:
                return
            settled = True
            now = self.now()
            if status == "ok":
                self._complete(call, now, max(0, (usage_tokens or 0) - tokens))
            else:
                self.sched.fail(call, now, backend_down=status == "error")
            total = usage_tokens if usage_tokens is not None else tokens
            self._record(call, backend, status, err, completion_tokens=total, first_token_at=first_at)

        async def lines() -> AsyncIterator[str]:
            for line in reply.first or ():
                yield line
            async for line in reply.lines:  # type: ignore[union-attr]
                yield line

        try:
            async for line in lines():
                kind, obj = parse_sse(line)
                if kind == "data" and obj is not None:
                    rewrite_model(obj, call.model)  # type: ignore[arg-type]
                    n = count_content_tokens(obj)
                    if n:
                        now = self.now()
                        if first_at is None:
                            first_at = now
                            self.metrics.ttft.labels(call.model).observe(now - call.arrival_s)
                        tokens += n
                        self.sched.progress(call, n, now)
                    u = obj.get("usage")
                    if isinstance(u, dict) and u.get("completion_tokens") is not None:
                        usage_tokens = int(u["completion_tokens"])
                    yield f"data: {json.dumps(obj)}\n".encode()
                else:
                    if kind == "done":
                        settle("ok")
                    yield (line + "\n").encode()
            settle("ok")
        except httpx.HTTPError as e:
            err = f"stream broke after {tokens} tokens: {type(e).__name__}: {e}"
            settle("error", err)
            yield sse_error(err)
        finally:
            settle("cancelled")  # no-op unless the client left (bookkeeping first: no await needed)
            with anyio.CancelScope(shield=True):
                await reply.response.aclose()

    # ---- trace + logs --------------------------------------------------------------------------------------
    def _record(self, call: Call, backend: str | None, status: str, err: str | None,
                completion_tokens: int | None = None, first_token_at: float | None = None) -> None:
        now = self.now()
        row = {
            "workflow_id": call.workflow_id, "stage": call.stage, "call_id": f"{self.run_id}-{call.call_id}",
            "model": call.model, "backend": backend, "prompt_tokens": call.prompt_tokens,
            "completion_tokens": completion_tokens, "queued_at": self.wall(call.arrival_s),
            "dispatched_at": self.wall(call.dispatched_s), "first_token_at": self.wall(first_token_at),
            "ended_at": self.wall(now), "status": status, "error": err, "confidences": call.confidences,
            "pred_call_tokens": call.pred_call_tokens, "pred_remaining_tokens": call.pred_remaining_tokens,
            "policy": self.policy.name, "kind": call.kind,
        }
        self.trace.log_call({**row, "prompt": call.prompt})  # the router's prompt text: trace only, not the log
        self.metrics.requests.labels(call.model or "", status).inc()
        if status == "ok":
            self.metrics.latency.labels(call.model).observe(now - call.arrival_s)
        log.info(json.dumps({"event": "call", **row, "latency_s": round(now - call.arrival_s, 4),
                             "priority": call.priority}))


def build_gateway(config: GatewayConfig, policy: Policy | None = None) -> Starlette:
    """The ASGI app for a validated config; `policy` overrides the configured one (tests, custom predictors)."""
    gw = Gateway(config, policy)
    app = Starlette(
        routes=[
            Route(CHAT, gw.chat, methods=["POST"]),
            Route(COMPLETIONS, gw.completions, methods=["POST"]),
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/v1/chimera/feedback", gw.feedback, methods=["POST"]),
            Route("/metrics", gw.metrics_endpoint, methods=["GET"]),
            Route("/health", gw.health, methods=["GET"]),
        ],
        lifespan=gw.lifespan,
    )
    app.state.gateway = gw
    return app


def app_from_env() -> Starlette:
    """uvicorn --factory entry point: the config path comes from $CHIMERA_GATEWAY_CONFIG."""
    path = os.environ.get("CHIMERA_GATEWAY_CONFIG", "gateway.yaml")
    return build_gateway(load_gateway_config(path))


def run_gateway(config: GatewayConfig, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM on `listen.host:listen.port`; in-flight calls are drained on the way out."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    uvicorn.run(build_gateway(config), host=config.listen.host, port=config.listen.port, log_level=log_level,
                timeout_graceful_shutdown=max(1, math.ceil(config.limits.request_timeout_s)))
