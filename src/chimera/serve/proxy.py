"""Forwarding to OpenAI-compatible backends over one shared httpx client: open, classify faults, relay SSE.

A fault before any byte reached the client is retryable (the caller re-schedules the call elsewhere);
a fault after streaming started ends the stream with an SSE error event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import anyio
import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chimera.serve.config import Backend

INT32 = 2**31 - 1


class UpstreamError(Exception):
    """The backend refused, timed out or answered 5xx before anything was streamed (retry elsewhere)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class UpstreamReply:
    """An opened upstream response; `first` is the first SSE line already read (streaming only)."""

    response: httpx.Response
    lines: AsyncIterator[str] | None = None
    first: list[str] | None = None


def vllm_priority(priority: float) -> int:
    """vLLM's `priority` is an int, lower first: the policy's key rounded and clamped (order kept)."""
    return int(max(-INT32, min(INT32, round(priority))))


def upstream_body(body: dict[str, Any], backend: Backend, priority: float) -> dict[str, Any]:
    """The request as the backend should see it: its model name, `priority` only where it is understood, and, when
    streaming, the engine's own token count at the end (`stream_options.include_usage`; see `wants_usage`)."""
    out = {k: v for k, v in body.items() if k not in ("chimera", "priority")}
    out["model"] = backend.model
    if backend.priority:
        out["priority"] = vllm_priority(priority)
    if out.get("stream") is True:
        opts = out.get("stream_options") if isinstance(out.get("stream_options"), dict) else {}
        out["stream_options"] = {**opts, "include_usage": True}
    return out


def wants_usage(body: dict[str, Any]) -> bool:
    """The client asked for the usage chunk itself; if not, the relay hides the one the gateway asked for."""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _usage_count(obj: dict[str, Any], key: str) -> int | None:
    u = obj.get("usage")
    v = u.get(key) if isinstance(u, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 else None


def usage_completion_tokens(obj: dict[str, Any]) -> int | None:
    """`usage.completion_tokens` of a response or chunk, when it carries a sane count."""
    return _usage_count(obj, "completion_tokens")


def usage_prompt_tokens(obj: dict[str, Any]) -> int:
    """`usage.prompt_tokens` of a response or chunk when it carries a sane positive count, else 0."""
    return _usage_count(obj, "prompt_tokens") or 0


def _headers(backend: Backend) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if backend.api_key:
        h["authorization"] = f"Bearer {backend.api_key}"
    return h


def _url(backend: Backend, path: str) -> str:
    """`base_url` ends in /v1 like the OpenAI SDK's, so the gateway's /v1 prefix is dropped."""
    return backend.base_url.rstrip("/") + path.removeprefix("/v1")


async def open_upstream(client: httpx.AsyncClient, backend: Backend, path: str, body: dict[str, Any],
                        stream: bool, timeout_s: float) -> UpstreamReply:
    """Send the request; raise UpstreamError for refusal/timeout/5xx (and, streaming, a break before line one).

    A 4xx is returned as is: the client's request was wrong, another backend would say the same.
    """
    req = client.build_request("POST", _url(backend, path), json=body, headers=_headers(backend),
                               timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))
    try:
        resp = await client.send(req, stream=True)
    except httpx.TimeoutException as e:
        raise UpstreamError(f"{backend.name}: timed out ({type(e).__name__})") from None
    except httpx.HTTPError as e:
        raise UpstreamError(f"{backend.name}: {type(e).__name__}: {e}") from None
    if resp.status_code >= 500:
        text = (await _read_quietly(resp))[:300]
        raise UpstreamError(f"{backend.name}: HTTP {resp.status_code}: {text}", resp.status_code)
    if not stream or resp.status_code >= 400:
        try:
            await resp.aread()
        except httpx.HTTPError as e:
            await resp.aclose()
            raise UpstreamError(f"{backend.name}: body broke: {type(e).__name__}") from None
        finally:
            await resp.aclose()
        return UpstreamReply(resp)
    lines = resp.aiter_lines()
    try:
        first = await _first_data_line(lines)
    except httpx.HTTPError as e:
        await resp.aclose()
        raise UpstreamError(f"{backend.name}: stream broke before the first event: {type(e).__name__}") from None
    return UpstreamReply(resp, lines, first)


async def _first_data_line(lines: AsyncIterator[str]) -> list[str]:
    """Read up to and including the first non-empty line (so a dead stream is still retryable)."""
    got: list[str] = []
    async for line in lines:
        got.append(line)
        if line.strip():
            break
    return got


async def _read_quietly(resp: httpx.Response) -> str:
    try:
        await resp.aread()
        return resp.text
    except httpx.HTTPError:
        return ""
    finally:
        await resp.aclose()


def rewrite_model(obj: dict[str, Any], model: str) -> dict[str, Any]:
    """Every response names the model that served it, whatever the backend calls itself."""
    if isinstance(obj, dict) and "model" in obj:
        obj["model"] = model
    return obj


def parse_sse(line: str) -> tuple[str, dict[str, Any] | None]:
    """('data', obj) for a JSON data line, ('done', None) for [DONE], ('other', None) otherwise."""
    if not line.startswith("data:"):
        return "other", None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return "done", None
    try:
        return "data", json.loads(payload)
    except json.JSONDecodeError:
        return "other", None


def count_content_tokens(obj: dict[str, Any]) -> int:
    """One streamed chunk with text ≈ one token (vLLM sends one token per chunk by default)."""
    n = 0
    for ch in obj.get("choices") or ():
        delta = ch.get("delta") or {}
        if delta.get("content") or ch.get("text") or delta.get("reasoning_content"):
            n += 1
    return n


def sse_error(message: str, code: str = "upstream_error") -> bytes:
    err = {"error": {"message": message, "type": "server_error", "code": code}}
    return f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()


class DisconnectAwareStream(StreamingResponse):
    """A StreamingResponse that always watches for the client leaving and closes the body iterator at once,
    so the upstream request is cancelled instead of running to the end. `on_close` runs last on every path, even
    when the body iterator never started (its own `finally` would not run then)."""

    def __init__(self, *args: Any, on_close: Callable[[], None] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
