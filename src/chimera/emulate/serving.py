"""One request's life on the emulated engine, whatever the API: admission fields, the planned answer, submit, wait
or stream token by token, cancel on disconnect, drop on failure, metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from chimera.emulate.api import ApiError, opt_bool, opt_int
from chimera.emulate.clock import Handle
from chimera.emulate.conversation import StagePlan
from chimera.emulate.lengths import token_pieces
from chimera.emulate.state import EmulatorState
from chimera.emulate.tools import Tool, ToolCall, tool_call
from chimera.perfmodel.batching import Seq


class Dropped(Exception):
    """The emulated backend failed mid-stream (or the client left): end without finishing the response."""


@dataclass(frozen=True)
class Answer:
    """What the engine will generate: one piece per token, of text or of a tool call's arguments."""

    pieces: list[str]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    call: ToolCall | None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def plan_answer(plan: StagePlan, cap: int | None, tool: Tool | None) -> Answer:
    """The stage's planned length (cut by `cap`: finish "length"); a tool call on stages before the last, or when the
    request forces one; a text answer otherwise (and whenever the cap cuts the answer short)."""
    length, finish = plan.length, "stop"
    if cap is not None and cap < length:
        length, finish = cap, "length"
    length = max(1, length)
    if tool is not None and finish == "stop" and (tool.required or not plan.last):
        call = tool_call(tool, length)
        return Answer(token_pieces(length, call.arguments), "tool_calls", call)
    return Answer(token_pieces(length, plan.text), finish, None)


def admission(st: EmulatorState, body: dict[str, Any]) -> tuple[float | None, bool]:
    """(engine queue key or None for arrival order, stream) after checking `model`, `priority` and `stream`."""
    model = body.get("model")
    if model is not None and model != st.model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    priority = opt_int(body, "priority") or 0
    if priority != 0 and st.policy != "priority":
        raise ApiError(400, f"Got priority {priority} but Priority scheduling is not enabled.", param="priority")
    key = float(priority) if st.policy == "priority" else None  # FCFS: arrival time, set on submit
    return key, opt_bool(body, "stream", False)


class Job:
    """A validated request ready for the engine; each API's subclass writes the answer (`full`, `chunks`)."""

    id_prefix = "cmpl"

    def __init__(self, st: EmulatorState, body: dict[str, Any], prompt_tokens: int, plan: StagePlan,
                 answer: Answer) -> None:
        self.st, self.plan, self.answer = st, plan, answer
        self.prompt_tokens = max(1, prompt_tokens)
        self.key, self.stream = admission(st, body)
        self.id = self.new_id()
        self.created = int(time.time())

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"

    @property
    def output_tokens(self) -> int:
        return len(self.answer.pieces)

    def full(self) -> dict[str, Any]:
        """The whole answer as one JSON object."""
        raise NotImplementedError

    def chunks(self, tokens: AsyncIterator[str]) -> AsyncIterator[bytes]:
        """The streamed answer: SSE bytes around the pieces `tokens` yields as the engine generates them."""
        raise NotImplementedError

    def completed(self) -> None:
        """Called once the whole answer went out (the Responses API stores it here)."""


async def generated(h: Handle, pieces: list[str]) -> AsyncIterator[str]:
    """The answer's pieces as the engine produces them; raises Dropped if the sequence failed or was cancelled."""
    emitted = 0
    while True:
        while emitted < h.generated and emitted < len(pieces):
            yield pieces[emitted]
            emitted += 1
        if h.done:
            break
        await h.wait_change()
    if h.error is not None:
        raise Dropped(h.error)


async def _watch_disconnect(receive: Receive, st: EmulatorState, h: Handle) -> None:
    """After the body is read, the next ASGI message is the disconnect: cancel the sequence then."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            st.clock.cancel(h)
            return


def _release(st: EmulatorState, h: Handle, watcher: asyncio.Future) -> None:
    """Stop watching the client; a request that did not finish gives its engine slot back."""
    watcher.cancel()
    if not h.done:
        st.clock.cancel(h)


def _record(job: Job, h: Handle) -> None:
    st = job.st
    reason = "length" if job.answer.finish_reason == "length" else "stop"  # vLLM: a tool call stops at EOS
    st.success[reason] = st.success.get(reason, 0) + 1
    loop_t = asyncio.get_running_loop().time()
    if h.first_token_real is not None:
        st.ttft.observe(h.first_token_real - h.submitted_real)
    st.e2e.observe(loop_t - h.submitted_real)
    job.completed()


class _StreamResponse(Response):
    """SSE response that cancels its sequence when the client goes away and drops the connection on failure."""

    def __init__(self, job: Job, h: Handle) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.job, self.h = job, h

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        st, h = self.job.st, self.h
        watcher = asyncio.ensure_future(_watch_disconnect(receive, st, h))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})
            async for data in self.job.chunks(generated(h, self.job.answer.pieces)):
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            _record(self.job, h)
        except Dropped:
            return  # response left unfinished: the server closes the connection, as a crashed backend would
        except OSError:  # client gone while sending
            pass
        finally:
            _release(st, h, watcher)
            if h.error == "cancelled":
                st.success["abort"] += 1


async def run(job: Job, request: Request) -> Response:
    """Submit the job to the engine; answer as a stream, or once it is done (499 if the client left, 400 if the
    engine rejected it, 500 if the backend failed)."""
    st = job.st
    st.requests += 1
    if st.fail_after is not None and st.requests > st.fail_after and not st.failed:
        st.fail(f"emulated failure after {st.fail_after} requests")
    if st.failed:
        return ApiError(500, "emulated backend failure", "InternalServerError").response()
    st.prompt_tokens_total += job.prompt_tokens
    st.clock.start()
    h = st.clock.submit(Seq(None, job.prompt_tokens, job.output_tokens,
                            key=job.key if job.key is not None else st.clock.now()))
    if job.stream:
        return _StreamResponse(job, h)
    watcher = asyncio.ensure_future(_watch_disconnect(request.receive, st, h))
    try:
        while not h.done:
            await h.wait_change()
    finally:
        _release(st, h, watcher)
    if h.error == "cancelled":
        st.success["abort"] += 1
        return ApiError(499, "request cancelled", "Cancelled").response()
    if h.error is not None:  # rejected by the engine (prompt too long) -> 400; killed or stopped -> 500
        status = 400 if h.error == h.seq.error and not st.failed else 500
        return ApiError(status, h.error, "InternalServerError" if status == 500 else "BadRequestError").response()
    _record(job, h)
    return JSONResponse(job.full())
