"""OpenAI-shaped errors and request-field parsing shared by the emulator's endpoints (400s name the field)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    """An OpenAI-style error response (vLLM's shape: error.message/type/param/code)."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or a 400."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def opt_int(body: dict[str, Any], name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"field '{name}' must be an integer", param=name)
    if lo is not None and v < lo:
        raise ApiError(400, f"field '{name}' must be >= {lo}, got {v}", param=name)
    return v


def opt_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"field '{name}' must be a boolean", param=name)
    return v


def opt_str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise ApiError(400, f"field '{name}' must be a string", param=name)
    return v


def content_text(content: Any, param: str) -> str:
    """A message's text: a string, or the text of its content parts (`text`, `input_text`, `output_text`, ...)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise ApiError(400, f"'{param}' content must be a string or a list of content parts", param=param)


def sse(obj: Any, event: str | None = None) -> bytes:
    """One server-sent event (with an `event:` line when named, as the Responses API sends them)."""
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data
