"""A call's life, in one place: identity → backpressure → predict → submit → await dispatch → upstream → relay →
settle(outcome), exactly once per attempt, on every path (completion, upstream fault, client gone, timeout,
exception). Settling frees the attempt's slot, queue entry and predicted load and writes its trace row.

The endpoints (serve/app.py) hand a request that passed the edge to `Director.run`; nothing here calls back up into
them. The backend pool resolves a future when the core dispatches the call; the stream relay (serve/relay.py) is a
pure transform whose results are reported here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar
from urllib.parse import quote

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chimera.sched.policy import Policy
from chimera.sched.types import Call, Prediction
from chimera.serve.call import CallContext, Outcome, Phase
from chimera.serve.clock import GatewayClock
from chimera.serve.config import IdentityConfig, Limits
from chimera.serve.edge import CHAT, RESPONSES, EdgeError, WorkflowHints, prompts
from chimera.serve.identity import Identity, IdentitySource, WorkflowIdentity, offers_tools
from chimera.serve.metrics import GatewayMetrics
from chimera.serve.pool import BackendPool, BackendState, QueueFull
from chimera.serve.proxy import (DisconnectAwareStream, StreamBroken, UpstreamClients, UpstreamError, UpstreamReply,
                                 open_upstream, request_content)
from chimera.serve.records import CallRecorder
from chimera.serve.relay import (Relayed, SseRelay, rewrite_model, sse_error, usage_completion_tokens,
                                 usage_prompt_tokens, wants_usage, whole_answer)
from chimera.serve.responses import ResponseHomes, ResponsesRelay, answer_of, failure_of

if TYPE_CHECKING:  # Redis is imported only by a gateway configured with shared state
    from chimera.serve.shared.state import SharedState

log = logging.getLogger("chimera.serve")
MAX_ATTEMPTS = 3  # the first try and up to 2 retries
INLINE_COUNT_CHARS = 1_000  # prompts up to this long are tokenised on the loop (~60 µs, what a thread hop costs)
# Workflows other replicas may serve too (their state is shared); the others were found in this replica's own table.
SHARED_WORKFLOWS = (IdentitySource.HINT, IdentitySource.SESSION)
# The scheduled endpoints' paths are named by the edge, which validates their bodies; exported here for the endpoints.
__all__ = ["CHAT", "RESPONSES", "ClientGone", "Director", "count_tokens", "error"]
T = TypeVar("T")


def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI-style error body, so SDKs raise their usual exception types."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status, headers=headers)


class ClientGone(Exception):
    """The client disconnected while the call waited."""


def count_tokens(text: str) -> int:
    """Prompt tokens for the policy; a rough estimate when the vocabulary cannot be loaded beats failing the call."""
    try:
        from chimera.workload.tokens import count_tokens as count

        return count(text)
    except Exception:
        return max(1, len(text) // 4)


async def prompt_tokens(text: str) -> int:
    """`count_tokens` of a prompt, on the event loop when it is short (a hop to a thread costs more CPU than counting
    ~1,000 characters), on a worker thread when it is long (so the loop is not held)."""
    if len(text) <= INLINE_COUNT_CHARS:
        return count_tokens(text)
    return await asyncio.to_thread(count_tokens, text)


async def _until_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class Director:
    """Runs every call's life against one backend pool; owns no HTTP routes and no lifespan."""

    def __init__(self, pool: BackendPool, policy: Policy, limits: Limits, metrics: GatewayMetrics,
                 recorder: CallRecorder, clock: GatewayClock, run_id: str,
                 predict_pool: Executor | None = None, identity: WorkflowIdentity | None = None,
                 shared: "SharedState | None" = None) -> None:
        self.pool, self.policy, self.limits, self.metrics, self.recorder = pool, policy, limits, metrics, recorder
        self.shared = shared  # several replicas on Redis (serve/shared/): global leases, shared workflow state
        self.now, self.run_id, self.predict_pool = clock.now, run_id, predict_pool
        self.upstream: UpstreamClients | None = None  # the upstream connection pools, opened by the lifespan
        self.identity = identity if identity is not None else WorkflowIdentity(IdentityConfig(), pool, run_id)
        self.responses = ResponseHomes()  # where each relayed Responses answer is kept (GET /v1/responses/{id})

    # ---- before any work -----------------------------------------------------------------------------------
    def backpressure(self, pinned: str | None) -> None:
        """EdgeError(429) when no model the call may go to can take it: decided before tokenising or predicting."""
        if not self.pool.open_models(pinned):
            raise EdgeError(429, f"gateway queue is full: {self.pool.backlog_reason(pinned)}", "queue_full",
                            "queue_full", {"Retry-After": str(self.pool.retry_after_s())})

    async def open(self, path: str, body: dict[str, Any], hints: WorkflowHints, pinned: str | None,
                   headers: Mapping[str, str] | None = None, raw: bytes | None = None) -> CallContext:
        """The call's context: its workflow and stage (serve/identity.py: hints, session, conversation, or a new
        one; a hinted stage wins), prompt and its tokens; `raw`, the bytes `body` was read from."""
        now = self.now()
        ident = self.identity.resolve(body, headers or {}, hints, now)
        if hints.stage is not None:
            ident = dataclasses.replace(ident, stage=hints.stage)
        if self.shared is not None and ident.source in SHARED_WORKFLOWS:
            ident = await self._shared_workflow(ident, hints.stage is not None, now)
        wid = ident.workflow_id
        wf = self.pool.workflows.get(wid, now)
        prompt, full = prompts(body, path)
        home = self.responses.chained(body) if path == RESPONSES else None
        if home is not None and pinned in (None, home.model):
            pinned = home.model  # only the server that made the previous response can continue from it
        call = Call(call_id=self.pool.next_id(), workflow_id=wid, kind=hints.kind or "chat", prompt=prompt,
                    stage=ident.stage,
                    prompt_tokens=await prompt_tokens(full), arrival_s=now,
                    workflow_arrival_s=wf.arrival_s, generated_so_far=wf.generated, pinned_model=pinned)
        ctx = CallContext(path=path, body=body, stream=bool(body.get("stream")), show_usage=wants_usage(body),
                          client_pinned=pinned is not None, call=call, raw=raw, identity=ident)
        if home is not None and pinned == home.model:  # its other replicas only when the home has no room
            ctx.tried |= {b.name for b in self.pool.backends[home.model] if b.cfg is not home}
        return ctx

    async def _shared_workflow(self, ident: Identity, hinted_stage: bool, now: float) -> Identity:
        """A hinted or session workflow (other replicas may serve it) as the replica set knows it: its stage counts
        the stages any replica finished. Workflows found in this replica's identity table are its own."""
        assert self.shared is not None
        st = await self.shared.pull_workflow(ident.workflow_id, now)
        if not hinted_stage and st.stages > ident.stage:
            ident = dataclasses.replace(ident, stage=st.stages)
        return ident

    # ---- the life ------------------------------------------------------------------------------------------
    async def run(self, request: Request, ctx: CallContext) -> Response:
        """Attempts until one answers the client; an upstream fault before any byte reached it is retried on the
        target the pool names (another replica, or another model when the policy chose)."""
        last_err = "no backend available"
        while True:
            try:
                response = await self._attempt(request, ctx)
            except asyncio.CancelledError:  # the server is tearing the request down
                self.settle(ctx, Outcome.CANCELLED, "request task cancelled")
                raise
            except BaseException as e:
                self.settle(ctx, Outcome.ERROR, f"gateway error: {type(e).__name__}")
                raise
            if response is not None:
                return response
            last_err = ctx.error or last_err
            failed = ctx.call
            target = self.pool.retry_target(failed, self.now(), ctx.tried, other_models=not ctx.client_pinned)
            if target is None or ctx.attempts >= MAX_ATTEMPTS:
                return error(502, f"all attempts failed; last error: {last_err}", "server_error",
                             "upstream_unavailable")
            self.metrics.retries.labels(failed.model).inc()
            log.warning(json.dumps({"event": "retry", "workflow_id": failed.workflow_id,
                                    "from": ctx.backend.name if ctx.backend else None, "to_model": target,
                                    "error": ctx.error}))
            ctx.retry(self._next_attempt(failed, target))

    def _next_attempt(self, failed: Call, target: str) -> Call:
        """The retry's Call: what the client asked, pinned to `target`, keeping the original arrival."""
        return Call(call_id=self.pool.next_id(), workflow_id=failed.workflow_id, kind=failed.kind,
                    prompt=failed.prompt, stage=failed.stage, prompt_tokens=failed.prompt_tokens,
                    arrival_s=failed.arrival_s, workflow_arrival_s=failed.workflow_arrival_s,
                    generated_so_far=failed.generated_so_far, pinned_model=target)

    async def _attempt(self, request: Request, ctx: CallContext) -> Response | None:
        """One try on one backend: the client's Response, or None after a retryable upstream fault (settled)."""
        call, timeout = ctx.call, self.limits.request_timeout_s
        dispatched: asyncio.Future[BackendState] = asyncio.get_running_loop().create_future()
        prediction = await self._predict_as_of(ctx)
        try:
            ctx.decision = self.pool.admit(call, self.now(), prediction, waiter=dispatched, avoid=ctx.tried)
        except QueueFull as e:  # the open models filled up while this call was being predicted
            self.settle(ctx, Outcome.REJECTED, "queue full", record=False)
            self.metrics.rejected.labels(ctx.path, "queue_full").inc()
            return error(429, f"gateway queue is full: {e}", "rate_limit_error", "queue_full",
                         headers={"Retry-After": str(self.pool.retry_after_s())})
        ctx.phase = Phase.QUEUED
        if dispatched.done():  # a free slot: dispatched inside submit, nothing to wait for
            be = dispatched.result()
        else:
            try:
                be = await self._race(request, dispatched, max(0.001, timeout - (self.now() - call.arrival_s)))
            except (ClientGone, TimeoutError) as e:
                return self._gave_up(ctx, e, "queued too long", "timed out waiting for a backend", "queue_timeout")
        ctx.phase, ctx.backend = Phase.DISPATCHED, be
        ctx.tried.add(be.name)
        if self.shared is not None and not await self.shared.try_acquire(call, be):  # another replica took the slot
            try:
                left = max(0.001, timeout - (self.now() - call.arrival_s))
                await self._race(request, self.shared.acquire(call, be), left)
            except (ClientGone, TimeoutError) as e:
                return self._gave_up(ctx, e, "no global lease", "timed out waiting for a backend", "queue_timeout")
        self.metrics.queue_wait_of(call.model).observe(max(0.0, self.now() - call.arrival_s))
        content = request_content(be.kind.request_body(ctx.body, be.cfg.model, call.priority), ctx.body, ctx.raw)
        try:
            assert self.upstream is not None, "the gateway's lifespan opens the upstream clients"
            reply = await self._race(request, open_upstream(self.upstream, be.cfg, ctx.path, content, ctx.stream,
                                                            timeout), timeout)
        except UpstreamError as e:
            self.settle(ctx, Outcome.ERROR, str(e), backend_down=True)
            return None
        except (ClientGone, TimeoutError) as e:
            return self._gave_up(ctx, e, "upstream timeout", "backend timed out", "upstream_timeout")
        if ctx.stream and reply.response.status_code < 400:
            ctx.phase, ctx.relayed = Phase.STREAMING, True
            return DisconnectAwareStream(self._relay(ctx, reply), media_type="text/event-stream",
                                         on_close=lambda: self.settle(ctx, Outcome.CANCELLED, "client left"),
                                         headers={"cache-control": "no-cache", **self._headers(ctx)})
        try:
            return self._answer(ctx, reply)
        finally:
            await reply.response.aclose()

    async def _predict_as_of(self, ctx: CallContext) -> Prediction | None:
        """The attempt's Prediction, and in `ctx.predictor_version` the version of the predictors that made it: a
        reload swaps predictors and version together on the loop, so one that lands while the prediction thread
        works is seen here, and the call is predicted again by the new ones."""
        while True:
            version = self.pool.predictor_version
            prediction = await self._predict(ctx.call)
            if self.pool.predictor_version == version:
                ctx.predictor_version = version
                return prediction

    async def _predict(self, call: Call) -> Prediction | None:
        if self.predict_pool is None:
            return None  # priors: cheap, computed inside `submit`
        return await asyncio.get_running_loop().run_in_executor(self.predict_pool, self.policy.predict, call)

    def _gave_up(self, ctx: CallContext, e: Exception, why: str, message: str, code: str) -> Response:
        """The client left (499) or time ran out (504) while the call waited."""
        if isinstance(e, ClientGone):
            self.settle(ctx, Outcome.CANCELLED)
            return Response(status_code=499)
        self.settle(ctx, Outcome.TIMEOUT, why)
        return error(504, message, "server_error", code)

    async def _race(self, request: Request, aw: Awaitable[T], timeout: float) -> T:
        """Await `aw` in this task unless the client leaves (raise ClientGone) or time runs out (TimeoutError): one
        watcher task cancels this one when the client leaves (`aw`, a future or a coroutine, is cancelled with it)."""
        task = asyncio.current_task()
        assert task is not None
        gone, racing = False, True

        def left(watcher: asyncio.Task) -> None:
            nonlocal gone
            if racing and not watcher.cancelled() and watcher.exception() is None:
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(_until_disconnect(request))
        watcher.add_done_callback(left)
        try:
            async with asyncio.timeout(timeout):
                return await aw
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                raise ClientGone() from None
            raise
        finally:
            racing = False  # a disconnect seen from now on is the next wait's (or the response's) business
            watcher.remove_done_callback(left)
            watcher.cancel()

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        """Where the call ran and the workflow it belongs to, so a client that sent no hints can name it later."""
        call, ident = ctx.call, ctx.identity
        return {"x-chimera-model": call.model or "", "x-chimera-backend": ctx.backend.name if ctx.backend else "",
                "x-chimera-workflow-id": header_text(call.workflow_id), "x-chimera-stage": str(call.stage),
                "x-chimera-identity": ident.source.value if ident is not None else ""}

    # ---- the answer ----------------------------------------------------------------------------------------
    def _answer(self, ctx: CallContext, reply: UpstreamReply) -> Response:
        """A whole (not streamed) answer: relayed naming the served model, or the backend's error (settled)."""
        resp, backend = reply.response, ctx.backend.name if ctx.backend else "?"
        try:
            data, as_is = whole_answer(resp.content, ctx.call.model or "")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            data, as_is = None, False
        if resp.status_code >= 400 or not isinstance(data, dict):
            msg = f"backend {backend} answered HTTP {resp.status_code}"
            self.settle(ctx, Outcome.ERROR, msg)
            if isinstance(data, dict) and "error" in data:
                return JSONResponse(data, resp.status_code if resp.status_code >= 400 else 502)
            return error(resp.status_code if resp.status_code >= 400 else 502, msg, "server_error", "bad_upstream")
        rewrite_model(data, ctx.call.model or "")
        if ctx.path == CHAT:
            ctx.response_id, ctx.reply = chat_reply(data)
        ctx.usage_tokens = usage_completion_tokens(data) or 0
        if usage_prompt_tokens(data):
            ctx.call.prompt_tokens = usage_prompt_tokens(data)
        failure = None
        if ctx.path == RESPONSES:
            self._kept(ctx, *answer_of(data))
            failure = failure_of(data)
        self.settle(ctx, Outcome.OK if failure is None else Outcome.ERROR, failure)
        if as_is:  # already what the client should see: relayed without re-serialising
            return Response(resp.content, media_type="application/json", headers=self._headers(ctx))
        return JSONResponse(data, headers=self._headers(ctx))

    def _kept(self, ctx: CallContext, response_id: str | None, reply: list[dict[str, Any]] | None) -> None:
        """A Responses answer's id and output items, and the backend that keeps it (for GET and chaining)."""
        ctx.response_id, ctx.reply = response_id, reply
        if response_id is not None and ctx.backend is not None:
            self.responses.remember(response_id, ctx.backend.cfg)

    def _transform(self, ctx: CallContext) -> tuple[SseRelay | ResponsesRelay, Callable[..., bytes]]:
        """The stream's pure transform for the call's API, and how it ends a stream the gateway cannot finish."""
        if ctx.path == RESPONSES:
            relay = ResponsesRelay(ctx.call.model or "")
            return relay, relay.error_event
        return SseRelay(ctx.call.model or "", ctx.show_usage), sse_error

    def _ended(self, ctx: CallContext, relay: SseRelay | ResponsesRelay, out: Relayed) -> None:
        """The stream said it ended: keep what the answer was, settle the attempt before the end reaches the client."""
        self._keep_streamed(ctx, relay)
        self.settle(ctx, Outcome.OK if out.error is None else Outcome.ERROR, out.error)

    def _keep_streamed(self, ctx: CallContext, relay: SseRelay | ResponsesRelay) -> None:
        """A streamed answer's id and reply (for the identity table, and GET for Responses), once, before settling."""
        if ctx.settled:
            return
        if isinstance(relay, ResponsesRelay):
            self._kept(ctx, relay.response_id, relay.reply)
        elif ctx.path == CHAT:
            ctx.response_id, ctx.reply = relay.response_id, [relay.message()]

    async def _relay(self, ctx: CallContext, reply: UpstreamReply) -> AsyncIterator[bytes]:
        """The stream, passed through: progress reported as chunks come, settled before `[DONE]` is forwarded (a
        client that saw the end also sees the trace row); a broken stream ends with an SSE error event."""
        call = ctx.call
        relay, broken = self._transform(ctx)
        try:
            async for line in reply.iter_lines():
                out = relay.feed(line)
                if out.tokens:
                    now = self.now()
                    if ctx.first_token_at is None:
                        ctx.first_token_at = now
                        self.metrics.ttft_of(call.model).observe(now - call.arrival_s)
                    ctx.tokens = relay.tokens
                    self.pool.progress(call, out.tokens, now)
                if out.done or relay.usage_tokens is not None:
                    ctx.usage_tokens = relay.usage_tokens
                    call.prompt_tokens = relay.prompt_tokens or call.prompt_tokens
                if out.done:
                    self._ended(ctx, relay, out)
                if out.data is not None:
                    yield out.data
            self._keep_streamed(ctx, relay)
            self.settle(ctx, Outcome.OK)
        except StreamBroken as e:
            err = f"stream broke after {ctx.tokens} tokens: {e}"
            self.settle(ctx, Outcome.ERROR, err, backend_down=True)
            yield broken(err)
        except Exception as e:
            self.metrics.internal_errors.labels("relay").inc()
            log.exception("stream relay failed")
            self.settle(ctx, Outcome.ERROR, f"gateway error in the relay: {type(e).__name__}", backend_down=True)
            yield broken("internal gateway error (logged)", "internal_error")
        finally:
            self.settle(ctx, Outcome.CANCELLED, "client left")  # a no-op unless the stream did not end on its own
            with anyio.CancelScope(shield=True):
                await reply.response.aclose()

    # ---- the one end of an attempt -------------------------------------------------------------------------
    def settle(self, ctx: CallContext, outcome: Outcome, err: str | None = None, *, backend_down: bool = False,
               record: bool = True) -> None:
        """End the attempt once: free its slot, queue entry and predicted load, learn, and trace it."""
        if ctx.settled:
            return
        ctx.phase, ctx.outcome, ctx.error = Phase.ENDED, outcome, err
        now = self.now()
        try:
            if outcome is Outcome.OK:
                self.pool.complete(ctx.call, now, ctx.unreported_tokens)  # the core feeds the online learners
                self._answered(ctx, now)
            else:
                self.pool.abandon(ctx.call, now, backend_down=backend_down)
        finally:
            if self.shared is not None:
                self.shared.release(ctx.call, completed=outcome is Outcome.OK and ctx.identity is not None
                                    and ctx.identity.source in SHARED_WORKFLOWS)
            if record:
                self.recorder.record(ctx, now)

    def _answered(self, ctx: CallContext, now: float) -> None:
        """The identity table learns the answer (the conversation's next key, the response id); a malformed
        answer only costs the link to the next stage."""
        if ctx.identity is None:
            return
        try:
            self.identity.answered(ctx.identity, ctx.reply, ctx.response_id, offers_tools(ctx.body), now)
        except Exception:
            self.metrics.internal_errors.labels("identity").inc()
            log.exception("could not record the answer's identity")


def chat_reply(data: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(the answer's id, [its assistant message]) of a whole chat completion, as far as they are well formed."""
    rid = data.get("id") if isinstance(data.get("id"), str) else None
    choices = data.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    msg = first.get("message")
    return rid, [msg] if isinstance(msg, dict) else None


def header_text(value: str) -> str:
    """`value` as an HTTP header value: printable ASCII as is, anything else percent-encoded (UTF-8)."""
    return value if value.isascii() and value.isprintable() else quote(value, safe="")
