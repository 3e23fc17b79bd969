"""The stream relay: one upstream SSE stream passed through to the client.

The relay names the chosen model in every chunk, reports token progress to the scheduler, hides the usage chunk the
gateway asked for unless the client did, and ends the call's life exactly once through the gateway's `settle`.
`gw` is the Gateway (serve/app.py): `settle`, `now`, `metrics`, `sched`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

import anyio
import httpx

from chimera.sched.types import Call
from chimera.serve.proxy import (
    UpstreamReply, count_content_tokens, parse_sse, rewrite_model, sse_error, usage_completion_tokens,
    usage_prompt_tokens,
)

log = logging.getLogger("chimera.serve")


class StreamRelay:
    """Pass one SSE stream through, naming the chosen model and reporting token progress to the policy.

    The call is settled before `[DONE]` is forwarded, so a client that saw the end also sees the trace row; a
    broken stream is settled in `run`, a client that left (or a stream that never started) in `closed`.
    """

    def __init__(self, gw: Any, call: Call, backend: str, reply: UpstreamReply, show_usage: bool) -> None:
        self.gw, self.call, self.backend, self.reply = gw, call, backend, reply
        self.show_usage = show_usage  # the client asked for the usage chunk (the gateway always does, upstream)
        self.tokens, self.usage_tokens, self.first_at = 0, None, None

    def settle(self, status: str, err: str | None = None) -> None:
        total = self.usage_tokens if self.usage_tokens is not None else self.tokens
        self.gw.settle(self.call, status, err, backend=self.backend, backend_down=status == "error",
                        new_tokens=max(0, (self.usage_tokens or 0) - self.tokens), completion_tokens=total,
                        first_token_at=self.first_at)

    def closed(self) -> None:
        self.settle("cancelled", "client left")  # a no-op unless the stream did not end on its own

    async def _lines(self) -> AsyncIterator[str]:
        for line in self.reply.first or ():
            yield line
        async for line in self.reply.lines:  # type: ignore[union-attr]
            yield line

    async def run(self) -> AsyncIterator[bytes]:
        gw, call = self.gw, self.call
        try:
            async for line in self._lines():
                kind, obj = parse_sse(line)
                if kind == "data" and isinstance(obj, dict):
                    rewrite_model(obj, call.model)  # type: ignore[arg-type]
                    n = count_content_tokens(obj)
                    if n:
                        now = gw.now()
                        if self.first_at is None:
                            self.first_at = now
                            gw.metrics.ttft.labels(call.model).observe(now - call.arrival_s)
                        self.tokens += n
                        gw.sched.progress(call, n, now)
                    used = usage_completion_tokens(obj)
                    if used is not None:
                        self.usage_tokens = used  # the engine's own count: it settles the call's tokens
                        if usage_prompt_tokens(obj):
                            call.prompt_tokens = usage_prompt_tokens(obj)
                    if not self.show_usage:
                        if "usage" in obj and not obj.get("choices"):
                            continue  # the usage-only chunk the gateway asked for, not the client
                        obj.pop("usage", None)
                    yield f"data: {json.dumps(obj)}\n".encode()
                else:
                    if kind == "done":
                        self.settle("ok")
                    yield (line + "\n").encode()
            self.settle("ok")
        except httpx.HTTPError as e:
            err = f"stream broke after {self.tokens} tokens: {type(e).__name__}: {e}"
            self.settle("error", err)
            yield sse_error(err)
        except Exception as e:
            gw.metrics.internal_errors.labels("relay").inc()
            log.exception("stream relay failed")
            self.settle("error", f"gateway error in the relay: {type(e).__name__}")
            yield sse_error("internal gateway error (logged)", "internal_error")
        finally:
            self.closed()  # bookkeeping first: no await needed
            with anyio.CancelScope(shield=True):
                await self.reply.response.aclose()
