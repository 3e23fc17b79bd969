"""What a client sees of a backend's answer: the served model named in it, the usage chunk the gateway asked for
hidden unless the client asked too, token counts read on the way. Pure (no I/O, no clock): the call's life
(serve/director.py) feeds it lines and reports what it returns."""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple


class Relayed(NamedTuple):
    """One upstream SSE line as relayed: the bytes for the client (None: nothing), content chunks in it, the end
    (with why the answer failed, when the stream says it did)."""

    data: bytes | None
    tokens: int
    done: bool
    error: str | None = None


class SseRelay:
    """One upstream SSE stream passed through: every chunk names `model`; the engine's own token counts (its usage
    chunk) are kept in `usage_tokens` / `prompt_tokens`; streamed content chunks are counted in `tokens`. The chat
    answer is assembled on the way (`message()`, `response_id`): the client sends it back as the next stage."""

    def __init__(self, model: str, show_usage: bool) -> None:
        self.model = model
        self.show_usage = show_usage  # the client asked for the usage chunk (the gateway always does, upstream)
        self.tokens = 0
        self.usage_tokens: int | None = None
        self.prompt_tokens = 0
        self.response_id: str | None = None  # the chunks' `id` (chat: `chatcmpl-…`)
        self._content: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # tool call index -> the call, its arguments still in pieces

    def feed(self, line: str) -> Relayed:
        kind, obj = parse_sse(line)
        if kind != "data" or not isinstance(obj, dict):
            return Relayed((line + "\n").encode(), 0, kind == "done")
        rewrite_model(obj, self.model)
        self._assemble(obj)
        n = count_content_tokens(obj)
        self.tokens += n
        used = usage_completion_tokens(obj)
        if used is not None:
            self.usage_tokens = used  # the engine's own count: it settles the call's tokens
            self.prompt_tokens = usage_prompt_tokens(obj) or self.prompt_tokens
        if not self.show_usage:
            if "usage" in obj and not obj.get("choices"):
                return Relayed(None, n, False)  # the usage-only chunk the gateway asked for, not the client
            obj.pop("usage", None)
        return Relayed(f"data: {json.dumps(obj)}\n".encode(), n, False)


    def _assemble(self, obj: dict[str, Any]) -> None:
        """Add the first choice's content and tool-call deltas of one chunk to the answer being assembled."""
        if self.response_id is None and isinstance(obj.get("id"), str):
            self.response_id = obj["id"]
        choices = obj.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        delta = first.get("delta") if isinstance(first, dict) and first.get("index", 0) == 0 else None
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("content"), str):
            self._content.append(delta["content"])
        for tc in delta.get("tool_calls") or ():
            if not isinstance(tc, dict) or not isinstance(tc.get("index", 0), int):
                continue
            call = self._calls.setdefault(tc.get("index", 0), {"id": "", "type": "function", "name": [], "args": []})
            if isinstance(tc.get("id"), str):
                call["id"] = tc["id"]
            fn = tc.get("function")
            if isinstance(fn, dict):
                if isinstance(fn.get("name"), str):
                    call["name"].append(fn["name"])
                if isinstance(fn.get("arguments"), str):
                    call["args"].append(fn["arguments"])

    def message(self) -> dict[str, Any]:
        """The assistant message the stream carried, as the client will send it back."""
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(self._content) or None}
        if self._calls:
            msg["tool_calls"] = [{"id": c["id"], "type": c["type"], "function": {
                "name": "".join(c["name"]), "arguments": "".join(c["args"])}} for _, c in sorted(self._calls.items())]
        return msg


def wants_usage(body: dict[str, Any]) -> bool:
    """The client asked for the usage chunk itself; if not, the relay hides the one the gateway asked for."""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _usage_count(obj: dict[str, Any], key: str) -> int | None:
    u = obj.get("usage")
    v = u.get(key) if isinstance(u, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 else None


def usage_completion_tokens(obj: dict[str, Any]) -> int | None:
    """`usage.completion_tokens` (chat, completions) or `usage.output_tokens` (Responses) of a response or chunk, when
    it carries a sane count."""
    n = _usage_count(obj, "completion_tokens")
    return n if n is not None else _usage_count(obj, "output_tokens")


def usage_prompt_tokens(obj: dict[str, Any]) -> int:
    """`usage.prompt_tokens` (or Responses' `input_tokens`) when it is a sane positive count, else 0."""
    return _usage_count(obj, "prompt_tokens") or _usage_count(obj, "input_tokens") or 0


def rewrite_model(obj: dict[str, Any], model: str) -> dict[str, Any]:
    """Every response names the model that served it, whatever the backend calls itself."""
    if isinstance(obj, dict) and "model" in obj:
        obj["model"] = model
    return obj


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate can appear in JSON text
_SURROGATE_ESCAPE_BYTES = re.compile(SURROGATE_ESCAPE.pattern.encode())


class NumberScreen:
    """json.loads hooks that flag a document holding numbers JSON cannot carry (NaN, ±Infinity, overflowing floats),
    so only such documents are looked at again."""

    def __init__(self) -> None:
        self.flagged = False

    def float(self, s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            self.flagged = True
        return v

    def constant(self, s: str) -> Any:
        self.flagged = True
        return float(s)


def whole_answer(content: bytes, model: str) -> tuple[Any, bool]:
    """A whole (not streamed) answer parsed, and whether its bytes can go to the client as they are: UTF-8 JSON that
    already names `model` (or no model) and holds nothing a re-encoding would refuse (non-finite numbers, lone
    surrogates), so re-serialising it would only cost CPU. Raises what json.loads raises."""
    screen = NumberScreen()
    data = json.loads(content, parse_float=screen.float, parse_constant=screen.constant)
    as_is = (isinstance(data, dict) and data.get("model", model) == model and not screen.flagged
             and content[:1] == b"{" and content[1:2] != b"\x00" and not _SURROGATE_ESCAPE_BYTES.search(content))
    return data, as_is


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


