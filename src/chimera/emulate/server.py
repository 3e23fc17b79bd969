"""The emulated OpenAI-compatible backend: vLLM's HTTP surface on top of `EngineClock` (simulated, not a model)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from chimera.emulate.clock import EngineClock, Handle
from chimera.emulate.lengths import WorkloadLengths, plausible_length, token_pieces
from chimera.perfmodel.batching import Engine, Seq
from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import profile as get_profile
from chimera.workload.schema import Task
from chimera.workload.tokens import count_tokens

POLICIES = ("fcfs", "priority")
_LAT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ApiError(Exception):
    """An OpenAI-style error response (vLLM's shape: error.message/type/code)."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


class _Dropped(Exception):
    """The emulated backend failed mid-stream: drop the connection without finishing the response."""


@dataclass
class EmulatorState:
    """Everything one emulator app owns; `app.state.emulator`. `fail()` / `recover()` are the fault hooks."""

    model: str
    clock: EngineClock
    policy: str
    lengths: WorkloadLengths | None
    seed: int
    fail_after: int | None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    requests: int = 0
    failed: bool = False
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    success: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    ttft: "_Hist" = field(default_factory=lambda: _Hist())
    e2e: "_Hist" = field(default_factory=lambda: _Hist())

    @property
    def engine(self) -> Engine:
        return self.clock.engine

    def fail(self, reason: str = "emulated backend failure") -> None:
        """Kill the backend: in-flight requests die (streams drop), new ones get 500, /health says 503."""
        self.failed = True
        self.clock.fail_all(reason)

    def recover(self) -> None:
        """Undo `fail()` (requests count from zero again)."""
        self.failed, self.requests = False, 0


class _EngineCollector(Collector):
    """vLLM metric names, read from the engine at scrape time."""

    def __init__(self, st: EmulatorState) -> None:
        self.st = st

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        st, eng, lab = self.st, self.st.engine, [self.st.model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(lab, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(lab, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch (prefill or decode).", eng.n_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", eng.n_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0-1.", min(1.0, eng.kv_used() / max(1, eng.cap)))
        yield counter("vllm:num_preemptions", "Recompute preemptions.", eng.preemptions)
        yield counter("vllm:prompt_tokens", "Prompt tokens accepted.", st.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Tokens generated.", st.generation_tokens_total)
        ok = CounterMetricFamily("vllm:request_success", "Finished requests by reason.",
                                 labels=["model_name", "finished_reason"])
        for reason, n in st.success.items():
            ok.add_metric([st.model, reason], n)
        yield ok
        yield _histogram("vllm:time_to_first_token_seconds", "TTFT (wall seconds).", lab, st.ttft)
        yield _histogram("vllm:e2e_request_latency_seconds", "End-to-end latency (wall seconds).", lab, st.e2e)


class _Hist:
    """Cumulative-bucket histogram kept incrementally (scrapes stay O(buckets))."""

    def __init__(self) -> None:
        self.counts = [0] * len(_LAT_BUCKETS)
        self.n, self.total = 0, 0.0

    def observe(self, v: float) -> None:
        self.n, self.total = self.n + 1, self.total + v
        for i, b in enumerate(_LAT_BUCKETS):
            if v <= b:
                self.counts[i] += 1


def _histogram(name: str, doc: str, lab: list[str], hist: _Hist) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=["model_name"])
    buckets = [(repr(b), c) for b, c in zip(_LAT_BUCKETS, hist.counts)] + [("+Inf", hist.n)]
    h.add_metric(lab, buckets, hist.total)
    return h


# ---- request parsing ------------------------------------------------------------------------------------------
async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _opt_int(body: dict[str, Any], name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"field '{name}' must be an integer", param=name)
    if lo is not None and v < lo:
        raise ApiError(400, f"field '{name}' must be >= {lo}, got {v}", param=name)
    return v


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise ApiError(400, "message content must be a string or a list of content parts", param="messages")


def _chat_prompt(body: dict[str, Any]) -> str:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "field 'messages' is required and must be a non-empty list", param="messages")
    if not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise ApiError(400, "each message must be an object with a 'role'", param="messages")
    return "\n".join(_content_text(m.get("content")) for m in msgs)


def _completion_prompt(body: dict[str, Any]) -> tuple[str, int | None]:
    """(prompt text, token count when given as token ids)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1:
        p = p[0]
    if isinstance(p, str):
        return p, None
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return " ".join(map(str, p)), len(p)
    if p is None:
        raise ApiError(400, "field 'prompt' is required", param="prompt")
    raise ApiError(400, "field 'prompt' must be a string, a list of one string, or a list of token ids "
                        "(batched prompts are not emulated)", param="prompt")


def _metadata(body: dict[str, Any], request: Request) -> tuple[str | None, int]:
    meta = body.get("chimera")
    task_id, stage = request.headers.get("x-chimera-task-id"), request.headers.get("x-chimera-stage")
    if meta is not None:
        if not isinstance(meta, dict):
            raise ApiError(400, "field 'chimera' must be an object {task_id, stage}", param="chimera")
        task_id = meta.get("task_id", task_id)
        stage = meta.get("stage", stage)
    try:
        stage_i = int(stage) if stage is not None else 0
    except (TypeError, ValueError):
        raise ApiError(400, f"workflow stage must be an integer, got {stage!r}", param="chimera") from None
    return (str(task_id) if task_id is not None else None), stage_i


@dataclass
class _Job:
    """A validated request, ready for the engine."""

    kind: str  # "chat" | "text"
    prompt_tokens: int
    pieces: list[str]
    finish_reason: str
    key: float | None
    stream: bool
    include_usage: bool


def _make_job(st: EmulatorState, body: dict[str, Any], request: Request, kind: str) -> _Job:
    model = body.get("model")
    if model is not None and model != st.model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if kind == "chat":
        prompt, ptoks = _chat_prompt(body), None
        cap = _opt_int(body, "max_completion_tokens", 1)
        cap = cap if cap is not None else _opt_int(body, "max_tokens", 1)
    else:
        prompt, ptoks = _completion_prompt(body)
        cap = _opt_int(body, "max_tokens", 1)
    n = _opt_int(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, "the emulator serves n=1 only", param="n")
    priority = _opt_int(body, "priority") or 0
    if priority != 0 and st.policy != "priority":
        raise ApiError(400, f"Got priority {priority} but Priority scheduling is not enabled.", param="priority")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "field 'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "field 'stream_options' must be an object", param="stream_options")
    task_id, stage = _metadata(body, request)
    found = st.lengths.lookup(task_id, stage) if (st.lengths is not None and task_id is not None) else None
    length, text = found if found is not None else (plausible_length(prompt, st.seed), None)
    finish = "stop"
    if cap is not None and cap < length:
        length, finish = cap, "length"
    length = max(1, length)
    prompt_tokens = ptoks if ptoks is not None else count_tokens(prompt)
    key = float(priority) if st.policy == "priority" else None  # FCFS: arrival time, set on submit
    return _Job(kind, max(1, prompt_tokens), token_pieces(length, text), finish, key, stream,
                bool(opts.get("include_usage")))


# ---- responses ------------------------------------------------------------------------------------------------
def _usage(job: _Job, completion: int) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion}


def _full_response(st: EmulatorState, job: _Job, rid: str, created: int) -> dict[str, Any]:
    text = "".join(job.pieces)
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": job.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": st.model, "choices": [choice],
            "usage": _usage(job, len(job.pieces))}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream_chunks(st: EmulatorState, job: _Job, h: Handle, rid: str, created: int) -> AsyncIterator[bytes]:
    """SSE chunks, one per token, as the engine produces them; raises _Dropped if the backend fails."""
    chat = job.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": piece} if piece is not None else {})
            ch = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            ch = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return _sse({"id": rid, "object": obj, "created": created, "model": st.model, "choices": [ch]})

    if chat:
        yield chunk(None, None, role=True)
    emitted = 0
    while True:
        while emitted < h.generated and emitted < len(job.pieces):
            yield chunk(job.pieces[emitted], None)
            emitted += 1
        if h.done:
            break
        await h.wait_change()
    if h.error == "cancelled":
        return
    if h.error is not None:
        raise _Dropped(h.error)
    yield chunk(None if chat else "", job.finish_reason)
    if job.include_usage:
        yield _sse({"id": rid, "object": obj, "created": created, "model": st.model, "choices": [],
                    "usage": _usage(job, emitted)})
    yield b"data: [DONE]\n\n"


async def _watch_disconnect(receive: Receive, st: EmulatorState, h: Handle) -> None:
    """After the body is read, the next ASGI message is the disconnect: cancel the sequence then."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            st.clock.cancel(h)
            return


class _StreamResponse(Response):
    """SSE response that cancels its sequence when the client goes away and drops the connection on failure."""

    def __init__(self, st: EmulatorState, job: _Job, h: Handle, rid: str, created: int) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.st, self.job, self.h, self.rid, self.created = st, job, h, rid, created

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        st, h = self.st, self.h
        watcher = asyncio.ensure_future(_watch_disconnect(receive, st, h))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})
            async for data in _stream_chunks(st, self.job, h, self.rid, self.created):
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if h.error is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                _record(st, self.job, h)
        except _Dropped:
            return  # response left unfinished: the server closes the connection, as a crashed backend would
        except OSError:  # client gone while sending
            pass
        finally:
            _release(st, h, watcher)
            if h.error == "cancelled":
                st.success["abort"] += 1


def _release(st: EmulatorState, h: Handle, watcher: asyncio.Future) -> None:
    """Stop watching the client; a request that did not finish gives its engine slot back."""
    watcher.cancel()
    if not h.done:
        st.clock.cancel(h)


def _record(st: EmulatorState, job: _Job, h: Handle) -> None:
    st.success[job.finish_reason] = st.success.get(job.finish_reason, 0) + 1
    loop_t = asyncio.get_running_loop().time()
    if h.first_token_real is not None:
        st.ttft.observe(h.first_token_real - h.submitted_real)
    st.e2e.observe(loop_t - h.submitted_real)


_ids = itertools.count()


def _endpoint(kind: str):
    async def handler(request: Request) -> Response:
        st: EmulatorState = request.app.state.emulator
        try:
            body = await _json_body(request)
            job = _make_job(st, body, request, kind)
        except ApiError as e:
            return e.response()
        st.requests += 1
        if st.fail_after is not None and st.requests > st.fail_after and not st.failed:
            st.fail(f"emulated failure after {st.fail_after} requests")
        if st.failed:
            return ApiError(500, "emulated backend failure", "InternalServerError").response()
        st.prompt_tokens_total += job.prompt_tokens
        st.clock.start()
        seq = Seq(None, job.prompt_tokens, len(job.pieces), key=job.key if job.key is not None else st.clock.now())
        h = st.clock.submit(seq)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if job.stream:
            return _StreamResponse(st, job, h, rid, created)
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
        _record(st, job, h)
        return JSONResponse(_full_response(st, job, rid, created))

    handler.__name__ = f"{kind}_completions"
    return handler


async def _models(request: Request) -> Response:
    st: EmulatorState = request.app.state.emulator
    return JSONResponse({"object": "list", "data": [
        {"id": st.model, "object": "model", "created": 0, "owned_by": "chimera-emulator", "root": st.model,
         "parent": None, "max_model_len": int(st.engine.cap)}]})


async def _health(request: Request) -> Response:
    st: EmulatorState = request.app.state.emulator
    return Response(status_code=503 if st.failed else 200)


async def _metrics(request: Request) -> Response:
    st: EmulatorState = request.app.state.emulator
    return PlainTextResponse(generate_latest(st.registry), media_type=CONTENT_TYPE_LATEST)


def build_emulator_app(
    profile: str,
    served_model_name: str,
    time_scale: float = 1.0,
    scheduling_policy: str = "fcfs",
    workload: Sequence[Task] | None = None,
    workload_model: str | None = None,
    seed: int = 0,
    fail_after: int | None = None,
    max_num_seqs: int | None = None,
    segment_steps: int = 4,
) -> Starlette:
    """An OpenAI-compatible app emulating vLLM serving `profile` (a catalogue `MODEL@GPU`) in scaled real time.

    `fail_after`: the (N+1)-th completion request kills the backend (see EmulatorState.fail).
    `max_num_seqs` overrides the profile's batch limit (tests use 1 to make queueing visible).
    """
    if scheduling_policy not in POLICIES:
        raise ValueError(f"scheduling_policy must be one of {POLICIES}, got {scheduling_policy!r}")
    spec = get_profile(profile)
    if max_num_seqs is not None:
        spec = spec.model_copy(update={"max_num_seqs": int(max_num_seqs)})
    engine = Engine(served_model_name, StepTimeModel(spec), max_segment_steps=max(1, int(segment_steps)))
    lengths = (WorkloadLengths(workload, workload_model or served_model_name, seed)
               if workload else None)
    clock = EngineClock(engine, time_scale)
    st = EmulatorState(served_model_name, clock, scheduling_policy, lengths, seed, fail_after)

    def on_tokens(n: int) -> None:
        st.generation_tokens_total += n

    clock.on_tokens = on_tokens
    st.registry.register(_EngineCollector(st))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clock.start()
        yield
        await clock.stop()

    app = Starlette(routes=[
        Route("/v1/chat/completions", _endpoint("chat"), methods=["POST"]),
        Route("/v1/completions", _endpoint("text"), methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.emulator = st
    return app
