"""Forwarding to OpenAI-compatible backends over one shared httpx client: open a call, classify its faults, and
stream the answer back while watching for the client leaving.

A fault before any byte reached the client is retryable (the caller re-schedules the call elsewhere);
a fault after streaming started ends the stream with an SSE error event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping

import anyio
import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chimera.serve.config import Backend


KEEPALIVE_S = 2.0  # idle upstream connections are dropped before the servers' own keep-alive timeout (5 s)
POOLS = 16  # connection pools the upstream calls are spread over (UpstreamClients)


class UpstreamClients:
    """The gateway's HTTP clients to its backends: several connection pools, one per call picked by its id, because
    httpcore's pool does O(connections²) work per request (httpcore 1.0.9): at a few hundred calls in flight one pool
    cost the gateway about half its CPU. The first client also carries the health probes."""

    def __init__(self, pools: int = POOLS) -> None:
        # At equal keep-alive timeouts a call could be sent on a connection the server is closing (ReadError).
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=200, keepalive_expiry=KEEPALIVE_S)
        tls = httpx.create_ssl_context()  # one for all pools (building one costs ~70 ms)
        self.clients = [httpx.AsyncClient(limits=limits, verify=tls) for _ in range(pools)]

    @property
    def probes(self) -> httpx.AsyncClient:
        return self.clients[0]

    def for_call(self, call_id: int) -> httpx.AsyncClient:
        return self.clients[call_id % len(self.clients)]

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


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

    async def iter_lines(self) -> AsyncIterator[str]:
        """Every line of a streamed answer, the ones already read first."""
        for line in self.first or ():
            yield line
        if self.lines is not None:
            async for line in self.lines:
                yield line


def request_content(sent: Mapping[str, Any], body: Mapping[str, Any], raw: bytes | None) -> bytes:
    """The bytes of the body `sent` upstream: the client's own (`raw`, which `body` was parsed from) when `sent` is the
    same document with one `model` key, so a body passed through is not re-serialised; else `sent` encoded as httpx's
    `json=` would (UTF-8, compact, finite numbers only)."""
    if raw is not None and sent == body and raw.count(b'"model"') == 1:
        return raw.removeprefix(b"\xef\xbb\xbf")
    return json.dumps(sent, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _headers(backend: Backend) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if backend.api_key:
        h["authorization"] = f"Bearer {backend.api_key}"
    return h


def _url(backend: Backend, path: str) -> str:
    """`base_url` ends in /v1 like the OpenAI SDK's, so the gateway's /v1 prefix is dropped."""
    return backend.base_url.rstrip("/") + path.removeprefix("/v1")


async def open_upstream(client: httpx.AsyncClient, backend: Backend, path: str, content: bytes,
                        stream: bool, timeout_s: float) -> UpstreamReply:
    """Send the request; raise UpstreamError for refusal/timeout/5xx (and, streaming, a break before line one).

    A 4xx is returned as is: the client's request was wrong, another backend would say the same.
    """
    req = client.build_request("POST", _url(backend, path), content=content, headers=_headers(backend),
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


async def get_upstream(client: httpx.AsyncClient, backend: Backend, path: str, timeout_s: float) -> httpx.Response:
    """GET `path` on the backend with its whole answer read (any status); UpstreamError when it cannot be reached."""
    try:
        return await client.get(_url(backend, path), headers=_headers(backend),
                                timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))
    except httpx.HTTPError as e:
        raise UpstreamError(f"{backend.name}: {type(e).__name__}: {e}") from None
