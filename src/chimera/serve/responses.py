"""The OpenAI Responses API in the gateway: its streamed events as a client sees them (the served model named, output
tokens counted, usage and the answer read on the way), and where each relayed response is kept, so that
`GET /v1/responses/{id}` reaches the backend that holds it. The transform is pure, like the chat one (serve/relay.py);
the call's life (serve/director.py) feeds it lines and reports what it returns."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from starlette.responses import JSONResponse, Response

from chimera.predict.cache import LRUCache
from chimera.serve.config import Backend
from chimera.serve.edge import RESPONSES, EdgeError
from chimera.serve.proxy import UpstreamError, get_upstream
from chimera.serve.relay import Relayed, parse_sse, rewrite_model, usage_completion_tokens, usage_prompt_tokens

# Events that stream output: one per engine step (≈ one token), as a chat chunk with content is.
DELTAS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta",
                    "response.reasoning_text.delta"})
ENDS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
MAX_REMEMBERED = 100_000


def answer_of(response: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(the response's id, its output items as the client sends them back in a later `input`)."""
    rid, output = response.get("id"), response.get("output")
    return (rid if isinstance(rid, str) else None,
            [x for x in output if isinstance(x, dict)] if isinstance(output, list) else None)


def failure_of(response: dict[str, Any]) -> str | None:
    """Why a response whose `status` is `failed` failed (its `error.message`); None for any other response."""
    if response.get("status") != "failed":
        return None
    err = response.get("error")
    return f"backend response failed: {str(err.get('message') if isinstance(err, dict) else err)[:300]}"


def _failure(obj: dict[str, Any], response: dict[str, Any] | None) -> str | None:
    """Why a `response.failed` or `error` event says the answer failed (None for a good end)."""
    kind = obj.get("type")
    if kind == "error":
        return f"backend stream error: {str(obj.get('message'))[:300]}"
    if kind == "response.failed":
        return failure_of({**(response or {}), "status": "failed"})
    return None


class ResponsesRelay:
    """One upstream Responses event stream passed through: every `response` object in it names `model`; output deltas
    are counted in `tokens`; the engine's usage, the response id and its output items are kept from the events that
    carry the whole response (created, completed, incomplete, failed)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.tokens = 0
        self.usage_tokens: int | None = None
        self.prompt_tokens = 0
        self.response_id: str | None = None
        self.reply: list[dict[str, Any]] | None = None
        self.sequence = 0  # the last event's sequence_number, continued by an error event the gateway adds

    def feed(self, line: str) -> Relayed:
        kind, obj = parse_sse(line)
        if kind != "data" or not isinstance(obj, dict):  # `event:` lines, blank lines, comments pass as they are
            return Relayed((line + "\n").encode(), 0, kind == "done")
        seq, event = obj.get("sequence_number"), obj.get("type")
        if type(seq) is int:
            self.sequence = max(self.sequence, seq)
        n = 1 if event in DELTAS and obj.get("delta") else 0
        self.tokens += n
        response = obj.get("response")
        if not isinstance(response, dict):
            return Relayed((line + "\n").encode(), n, event in ENDS, _failure(obj, None))
        rewrite_model(response, self.model)
        rid, output = answer_of(response)
        self.response_id = rid or self.response_id
        if event in ENDS:
            self.reply = output
            self.usage_tokens = usage_completion_tokens(response)
            self.prompt_tokens = usage_prompt_tokens(response) or self.prompt_tokens
        return Relayed(f"data: {json.dumps(obj)}\n".encode(), n, event in ENDS, _failure(obj, response))

    def error_event(self, message: str, code: str = "upstream_error") -> bytes:
        """The Responses API's own `error` event, ending a stream the gateway could not finish."""
        self.sequence += 1
        err = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": self.sequence}
        return f"event: error\ndata: {json.dumps(err)}\n\n".encode()


class ResponseHomes:
    """Which backend keeps each response the gateway relayed (LRU of at most `cap` ids): a stored response lives in
    the memory of the server that made it, so reading it back, or chaining from it, must go there."""

    def __init__(self, cap: int = MAX_REMEMBERED) -> None:
        self._homes = LRUCache(cap)

    def remember(self, response_id: str, backend: Backend) -> None:
        self._homes.put(response_id, backend)

    def home(self, response_id: str) -> Backend:
        """The backend keeping `response_id`, or EdgeError(404) in OpenAI's shape when the gateway does not know it."""
        backend = self._homes.get(response_id)
        if backend is None:
            raise EdgeError(404, f"response_id: no response {response_id[:100]!r} is known to this gateway",
                            "response_not_found", "unknown_response")
        return backend

    def chained(self, body: dict[str, Any]) -> Backend | None:
        """The backend keeping the response a Responses body continues (`previous_response_id`), when known."""
        rid = body.get("previous_response_id")
        return self._homes.get(rid) if isinstance(rid, str) else None

    def __len__(self) -> int:
        return len(self._homes)


async def fetch_stored(client: httpx.AsyncClient, backend: Backend, response_id: str, query: str,
                       timeout_s: float) -> Response:
    """`GET /v1/responses/{id}` answered by the backend that keeps the response, naming the served model."""
    path = f"{RESPONSES}/{quote(response_id, safe='')}" + (f"?{query}" if query else "")
    try:
        resp = await get_upstream(client, backend, path, timeout_s)
    except UpstreamError as e:
        raise EdgeError(502, f"the backend keeping response_id could not be reached: {e}", "upstream_unavailable",
                        "upstream") from None
    try:
        data = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        data = None
    if isinstance(data, dict):
        return JSONResponse(rewrite_model(data, backend.model), resp.status_code)
    if resp.status_code >= 400:
        raise EdgeError(502 if resp.status_code >= 500 else resp.status_code,
                        f"backend {backend.name} answered HTTP {resp.status_code}", "bad_upstream", "upstream")
    return Response(resp.content, resp.status_code, media_type=resp.headers.get("content-type"))
