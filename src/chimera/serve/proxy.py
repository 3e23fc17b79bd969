"""Forwarding to OpenAI-compatible backends: open a call, classify its faults, and stream the answer back while
watching for the client leaving.

The calls go over aiohttp (its C HTTP parser and connection pool cost about a third of the CPU per forwarded request
that httpx + httpcore + anyio + h11 do, measured side by side); health probes and the rare GETs keep httpx.
A fault before any byte reached the client is retryable (the caller re-schedules the call elsewhere);
a fault after streaming started ends the stream with an SSE error event.
"""

from __future__ import annotations

import asyncio
import codecs
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
import anyio
import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chimera.serve.config import Backend


KEEPALIVE_S = 2.0  # idle upstream connections are dropped before the servers' own keep-alive timeout (5 s)
UPSTREAM_FAULTS = (aiohttp.ClientError, asyncio.TimeoutError)  # what a call's connection or stream can raise


class UpstreamClients:
    """The gateway's HTTP clients to its backends: one aiohttp session (connection pool) for the calls, one httpx
    client for health probes and stored-response GETs. Opened inside the running event loop (the lifespan)."""

    def __init__(self) -> None:
        tls = httpx.create_ssl_context()  # the same trust store for both clients (building one costs ~70 ms)
        # At equal keep-alive timeouts a call could be sent on a connection the server is closing (ReadError).
        self.probes = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=50,
                                                            keepalive_expiry=KEEPALIVE_S), verify=tls)
        # No cookie jar: one client's cookies are not another's. The environment's proxies are read once per backend
        # (`proxy_for`), not per call (aiohttp's trust_env costs two thread hops per request).
        self.calls = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S,
                                                                          ssl=tls),
                                           cookie_jar=aiohttp.DummyCookieJar())
        self._proxies: dict[str, str | None] = {}

    def proxy_for(self, backend: Backend) -> str | None:
        """The HTTP(S)_PROXY that applies to the backend (NO_PROXY honoured), as httpx reads them by default."""
        url = backend.base_url
        if url not in self._proxies:
            parts = urlsplit(url)
            bypass = parts.hostname is not None and proxy_bypass(parts.hostname)
            self._proxies[url] = None if bypass else getproxies().get(parts.scheme)
        return self._proxies[url]

    async def aclose(self) -> None:
        await self.calls.close()
        await self.probes.aclose()


class UpstreamError(Exception):
    """The backend refused, timed out or answered 5xx before anything was streamed (retry elsewhere)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StreamBroken(Exception):
    """The backend's stream broke after it started (the connection dropped or a read timed out)."""


class UpstreamResponse:
    """An upstream answer as the call's life reads it: status, the whole body (once read), close."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.raw = resp
        self.status_code = resp.status
        self.content = b""

    async def aclose(self) -> None:
        """Give the connection back when the answer was read to its end, else drop it (the backend stops)."""
        self.raw.release() if self.raw.content.at_eof() else self.raw.close()


@dataclass
class UpstreamReply:
    """An opened upstream response; `first` is the first SSE line already read (streaming only)."""

    response: UpstreamResponse
    lines: AsyncIterator[str] | None = None
    first: list[str] | None = None

    async def iter_lines(self) -> AsyncIterator[str]:
        """Every line of a streamed answer, the ones already read first; StreamBroken if the stream breaks."""
        for line in self.first or ():
            yield line
        if self.lines is not None:
            try:
                async for line in self.lines:
                    yield line
            except UPSTREAM_FAULTS as e:
                raise StreamBroken(f"{type(e).__name__}: {e}") from None


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The body's lines as text (UTF-8, undecodable bytes replaced), split where str.splitlines splits however the
    bytes arrive in chunks, with no limit on a line's length (a Responses API event can carry the whole answer)."""
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    pending = ""
    async for chunk in resp.content.iter_any():
        pieces = (pending + decode(chunk)).splitlines(keepends=True)
        pending = ""
        if pieces:
            last = pieces[-1]
            if last.endswith("\r") or len(last.splitlines()[0]) == len(last):
                pending = pieces.pop()  # unfinished, or a "\r" the next chunk's "\n" may complete
        for piece in pieces:
            yield piece.splitlines()[0]
    for line in (pending + decode(b"", final=True)).splitlines():
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


async def open_upstream(clients: UpstreamClients, backend: Backend, path: str, content: bytes,
                        stream: bool, timeout_s: float) -> UpstreamReply:
    """Send the request; raise UpstreamError for refusal/timeout/5xx (and, streaming, a break before line one).

    A 4xx is returned as is: the client's request was wrong, another backend would say the same. `timeout_s` bounds
    each read (and the connect, at most 10 s), as httpx's timeout does.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout_s), sock_read=timeout_s)
    try:
        raw = await clients.calls.post(_url(backend, path), data=content, headers=_headers(backend), timeout=timeout,
                                       proxy=clients.proxy_for(backend))
    except UPSTREAM_FAULTS as e:
        if isinstance(e, asyncio.TimeoutError):
            raise UpstreamError(f"{backend.name}: timed out ({type(e).__name__})") from None
        raise UpstreamError(f"{backend.name}: {type(e).__name__}: {e}") from None
    resp = UpstreamResponse(raw)
    if resp.status_code >= 500:
        text = (await _read_quietly(resp))[:300]
        raise UpstreamError(f"{backend.name}: HTTP {resp.status_code}: {text}", resp.status_code)
    if not stream or resp.status_code >= 400:
        try:
            resp.content = await raw.read()
        except UPSTREAM_FAULTS as e:
            raise UpstreamError(f"{backend.name}: body broke: {type(e).__name__}") from None
        finally:
            await resp.aclose()
        return UpstreamReply(resp)
    lines = _lines(raw)
    try:
        first = await _first_data_line(lines)
    except UPSTREAM_FAULTS as e:
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


async def _read_quietly(resp: UpstreamResponse) -> str:
    """The body of an error answer as text (its charset, else UTF-8; undecodable bytes replaced), or ''."""
    try:
        body = await resp.raw.read()
        try:
            return body.decode(resp.raw.charset or "utf-8", errors="replace")
        except LookupError:
            return body.decode("utf-8", errors="replace")
    except UPSTREAM_FAULTS:
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
