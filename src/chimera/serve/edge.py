"""The gateway's edge: who may call, which bodies are read, and typed, bounded workflow hints.

Everything here does work bounded by the request's size (itself capped by `limits.max_body_bytes`), never by a number
the client chose, and refuses what it cannot use with a 4xx whose message names the field. A body that passes
`parse_body` can always be encoded for the upstream call (no NaN/Infinity, no lone surrogates, no huge integers,
bounded nesting), so nothing fails later, inside the forwarding path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
from typing import Annotated, Any, Iterable, Mapping

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, ValidationError,
                      model_validator)
from starlette.requests import ClientDisconnect, Request

from chimera.serve.config import IdentityConfig, Limits
from chimera.serve.relay import SURROGATE_ESCAPE, NumberScreen

MAX_DEPTH = 64  # nesting of a JSON body (tool schemas nest; a hostile `[`×100000 must not reach the recursion limit)
MAX_INT_DIGITS = 16  # |integers| up to 10^16 (beyond 2^53 JSON clients and upstreams disagree on the value anyway)
MAX_STAGE = 10_000
MAX_ID_CHARS = 256
_SURROGATE = re.compile("[\ud800-\udfff]")


class EdgeError(Exception):
    """A request refused at the edge: HTTP status, OpenAI-style `code`, a message naming the field, metrics reason."""

    def __init__(self, status: int, message: str, code: str, reason: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.reason, self.headers = status, message, code, reason, headers


# ---- auth ----------------------------------------------------------------------------------------------------
class KeyRing:
    """Bearer keys compared in constant time (digests of equal length, every key compared, no early exit)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, presented: str | None) -> bool:
        if presented is None:
            return False
        d = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        ok = False
        for k in self._digests:
            ok |= hmac.compare_digest(d, k)
        return ok


def bearer(headers: Mapping[str, str]) -> str | None:
    h = headers.get("authorization", "")
    return h[7:].strip() if h[:7].lower() == "bearer " else None


class Auth:
    """Client endpoints: open when no `api_keys` are configured, else a client or an admin key. Admin endpoints
    (/metrics, reload): admin keys when configured, else client keys when configured, else open."""

    def __init__(self, api_keys: Iterable[str], admin_keys: Iterable[str]) -> None:
        api_keys, admin_keys = list(api_keys), list(admin_keys)
        self.client_keys = KeyRing([*api_keys, *admin_keys]) if api_keys else None
        self.admin_keys = KeyRing(admin_keys) if admin_keys else None

    def require_client(self, headers: Mapping[str, str]) -> None:
        if self.client_keys is not None and not self.client_keys.accepts(bearer(headers)):
            raise EdgeError(401, "missing or invalid API key", "invalid_api_key", "auth")

    def require_admin(self, headers: Mapping[str, str], what: str) -> None:
        """An admin endpoint (`what` names it in the refusal)."""
        ring = self.admin_keys if self.admin_keys is not None else self.client_keys
        if ring is not None and not ring.accepts(bearer(headers)):
            kind = "an admin key" if self.admin_keys is not None else "an API key"
            raise EdgeError(401, f"{kind} is required for {what}", "invalid_api_key", "auth")


# ---- bodies --------------------------------------------------------------------------------------------------
class _Bad:
    """A JSON token refused after parsing (so the error can name where it stood)."""

    def __init__(self, what: str) -> None:
        self.what = what


class _Tokens(NumberScreen):
    """json.loads hooks that mark a document holding an unforwardable number, so only such documents are walked."""

    def int(self, s: str) -> int | _Bad:
        digits = len(s.lstrip("-"))
        if digits > MAX_INT_DIGITS:
            self.flagged = True
            return _Bad(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
        return int(s)

    def constant(self, s: str) -> _Bad:
        self.flagged = True
        return _Bad(f"{s} (not valid JSON: numbers must be finite)")


def check_content_type(headers: Mapping[str, str]) -> None:
    """Only JSON bodies: a browser page cannot send `application/json` cross-origin without a CORS preflight."""
    ct = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ct != "application/json" and not (ct.startswith("application/") and ct.endswith("+json")):
        raise EdgeError(415, f"Content-Type must be application/json, got {ct or 'none'!r}",
                        "unsupported_media_type", "unsupported_media_type")


def _path(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _find_unforwardable(obj: Any) -> tuple[str, str] | None:
    """(field path, what is wrong) for the first value that cannot be forwarded, walking iteratively."""
    stack: list[tuple[Any, tuple, int]] = [(obj, (), 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return _path(path), "a string with a lone surrogate (not encodable as UTF-8)"
        elif isinstance(v, _Bad):
            return _path(path), v.what
        elif isinstance(v, float):
            if not math.isfinite(v):
                return _path(path), "a number out of range (numbers must be finite)"
        elif isinstance(v, dict):
            if depth >= MAX_DEPTH:
                return _path(path), f"nested deeper than {MAX_DEPTH} levels"
            for k, x in v.items():
                if _SURROGATE.search(k):
                    return _path(path), "a key with a lone surrogate (not encodable as UTF-8)"
                stack.append((x, (*path, k), depth + 1))
        elif isinstance(v, list):
            if depth >= MAX_DEPTH:
                return _path(path), f"nested deeper than {MAX_DEPTH} levels"
            stack.extend((x, (*path, i), depth + 1) for i, x in enumerate(v))
    return None




def parse_body(raw: bytes) -> Any:
    """The JSON document in `raw` (UTF-8, as RFC 8259 requires on the wire), or EdgeError(400) naming the first field
    that could not be forwarded upstream. A C-speed screen decides whether the document needs walking at all."""
    try:
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeError(400, f"body: not valid UTF-8 (byte {e.start})", "invalid_json", "bad_json") from None
    tokens = _Tokens()
    try:
        doc = json.loads(text, parse_int=tokens.int, parse_float=tokens.float, parse_constant=tokens.constant)
    except RecursionError:
        raise EdgeError(400, f"body: nested deeper than {MAX_DEPTH} levels", "invalid_json", "bad_json") from None
    except json.JSONDecodeError as e:
        raise EdgeError(400, f"malformed JSON body: {e}", "invalid_json", "bad_json") from None
    if tokens.flagged or text.count("[") + text.count("{") > MAX_DEPTH or SURROGATE_ESCAPE.search(text):
        bad = _find_unforwardable(doc)
        if bad is not None:
            field, what = bad
            raise EdgeError(400, f"{field}: {what}", "invalid_value", "bad_value")
    return doc


# ---- typed fields --------------------------------------------------------------------------------------------
def _printable(s: str) -> str:
    if not s.isprintable():
        raise ValueError("must be printable text (no control characters)")
    return s


Ident = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_printable)]
Stage = Annotated[StrictInt, Field(ge=0, le=MAX_STAGE)]


class WorkflowHints(BaseModel):
    """What a client may say of a call's workflow (body field `chimera`, or the X-Chimera-* headers, which win)."""

    model_config = ConfigDict(extra="forbid")
    workflow_id: Ident | None = None
    stage: Stage | None = None
    kind: Ident | None = None
    task_id: Ident | None = None


class Feedback(BaseModel):
    """A workflow's outcome, reported by the client once it is scored: the workflow named by its id, or by the id
    of any response of it (a client that sent no hints knows those)."""

    model_config = ConfigDict(extra="forbid")
    workflow_id: Ident | None = None
    response_id: Ident | None = None
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_name(self) -> "Feedback":
        if (self.workflow_id is None) == (self.response_id is None):
            raise ValueError("workflow_id, response_id: give exactly one of them")
        return self


HINT_HEADERS = {"workflow_id": "x-chimera-workflow-id", "stage": "x-chimera-stage", "kind": "x-chimera-kind",
                "task_id": "x-chimera-task-id"}
_STAGE_TEXT = re.compile(r"\d{1,6}")


def _describe(e: ValidationError, where: dict[str, str]) -> str:
    first = e.errors()[0]
    loc = [str(x) for x in first["loc"]]
    name = where.get(loc[0], ".".join(loc)) if loc else "body"
    msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    return f"{name}: {msg}"


def workflow_hints(body_hints: Any, headers: Mapping[str, str]) -> WorkflowHints:
    """Merge and validate the body's `chimera` object and the X-Chimera-* headers; EdgeError(400) names the field."""
    if body_hints is not None and not isinstance(body_hints, dict):
        raise EdgeError(400, "chimera: must be an object {workflow_id, stage, kind, task_id}", "invalid_hint",
                        "bad_field")
    raw: dict[str, Any] = dict(body_hints or {})
    where = {k: f"chimera.{k}" for k in raw}
    for key, header in HINT_HEADERS.items():
        value = headers.get(header)
        if value is None:
            continue
        where[key] = f"header {header}"
        if key == "stage":
            if not _STAGE_TEXT.fullmatch(value.strip()):
                raise EdgeError(400, f"header {header}: must be an integer 0..{MAX_STAGE}, got {value[:40]!r}",
                                "invalid_stage", "bad_field")
            raw[key] = int(value)
        else:
            raw[key] = value
    if not raw:  # no hints (most clients): nothing to validate
        return WorkflowHints.model_construct()
    try:
        return WorkflowHints.model_validate(raw)
    except ValidationError as e:
        raise EdgeError(400, _describe(e, where), "invalid_stage" if "stage" in str(e.errors()[0]["loc"]) else
                        "invalid_hint", "bad_field") from None


def _session_value(where: str, value: Any) -> None:
    if not isinstance(value, str):
        raise EdgeError(400, f"{where}: must be a string", "invalid_session", "bad_field")
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise EdgeError(400, f"{where}: must be at most {MAX_ID_CHARS} printable characters (got {len(value)})",
                        "invalid_session", "bad_field")


def check_session(body: Mapping[str, Any], headers: Mapping[str, str], cfg: IdentityConfig) -> None:
    """The session headers and fields the gateway reads (and `previous_response_id`) are short printable strings;
    EdgeError(400) names the header or field. Only their hashes become workflow ids (serve/identity.py)."""
    for name in cfg.session_headers:
        value = headers.get(name)
        if value is not None:
            _session_value(f"header {name}", value)
    for name in (*cfg.session_fields, "previous_response_id"):
        if body.get(name) is not None:
            _session_value(name, body[name])


def feedback(doc: Any) -> Feedback:
    try:
        return Feedback.model_validate(doc)
    except ValidationError as e:
        raise EdgeError(400, _describe(e, {}), "invalid_feedback", "bad_field") from None


async def read_json(request: Request, limits: Limits) -> Any:
    """The body as JSON, within `max_body_bytes` and `body_timeout_s`; EdgeError (413/415/408/499/400) otherwise."""
    return (await read_json_raw(request, limits))[0]


async def read_json_raw(request: Request, limits: Limits) -> tuple[Any, bytes]:
    """`read_json`, and the bytes it was parsed from (forwarded as they are when the call changes nothing)."""
    check_content_type(request.headers)
    limit = limits.max_body_bytes
    cl = (request.headers.get("content-length") or "").lstrip("0") or "0"
    if cl.isdigit() and (len(cl) > 12 or int(cl) > limit):
        raise EdgeError(413, f"request body over {limit} bytes", "body_too_large", "too_large")
    buf = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout_s):  # a trickled body cannot hold a slot
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise EdgeError(413, f"request body over {limit} bytes", "body_too_large", "too_large")
    except ClientDisconnect:
        raise EdgeError(499, "the client left before its body was read", "client_gone", "client_gone") from None
    except TimeoutError:
        raise EdgeError(408, f"body: not received within {limits.body_timeout_s:g} s", "body_timeout",
                        "body_timeout") from None
    raw = bytes(buf)
    return parse_body(raw), raw


# ---- completion bodies ---------------------------------------------------------------------------------------
CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"  # the scheduled endpoints


def _id_text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS and v.isprintable()


# The Responses fields the edge reads or the backend must get right: (name, accepted, what it must be); null passes.
_RESPONSES_FIELDS = (
    ("previous_response_id", _id_text, f"a string of 1 to {MAX_ID_CHARS} printable characters"),
    ("instructions", lambda v: isinstance(v, str), "a string or null"),
    ("tools", lambda v: isinstance(v, list), "a list"),
    ("max_output_tokens", lambda v: type(v) is int and v >= 1, "a positive integer"),
)


def _check_responses(body: dict[str, Any]) -> None:
    """A Responses body the gateway can schedule: `input` text or items, the fields it reads well typed."""
    inp = body.get("input")
    if not isinstance(inp, (str, list)):
        raise EdgeError(400, "input: missing required parameter 'input' (a string or a non-empty list of items)",
                        "missing_input", "bad_field")
    if isinstance(inp, list) and (not inp or not all(isinstance(x, dict) for x in inp)):
        raise EdgeError(400, "input: must be a string or a non-empty list of input items (objects)",
                        "invalid_value", "bad_field")
    for name, accepted, what in _RESPONSES_FIELDS:
        v = body.get(name)
        if v is not None and not accepted(v):
            raise EdgeError(400, f"{name}: must be {what}", "invalid_value", "bad_field")


def completion_model(body: Any, path: str) -> str:
    """The requested model name, or EdgeError naming the missing or mistyped field."""
    if not isinstance(body, dict):
        raise EdgeError(400, "body: must be a JSON object", "invalid_body", "bad_field")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise EdgeError(400, "model: missing required parameter 'model' (a string)", "missing_model", "bad_field")
    if path == CHAT and (not isinstance(body.get("messages"), list) or not body["messages"]):
        raise EdgeError(400, "messages: missing required parameter 'messages' (a non-empty list)",
                        "missing_messages", "bad_field")
    if path == RESPONSES:
        _check_responses(body)
    if path == COMPLETIONS and not isinstance(body.get("prompt"), (str, list)):
        raise EdgeError(400, "prompt: missing required parameter 'prompt' (a string or a list)", "missing_prompt",
                        "bad_field")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise EdgeError(400, "stream: must be a boolean", "invalid_value", "bad_field")
    return model


def response_id(value: str) -> str:
    """A response id from a URL, as the edge accepts ids: printable, at most MAX_ID_CHARS characters."""
    if not _id_text(value):
        raise EdgeError(400, f"response_id: must be 1 to {MAX_ID_CHARS} printable characters", "invalid_value",
                        "bad_field")
    return value


def _text(content: Any) -> str:
    """A message's text: a string, or the `text` of its parts (chat `text`, Responses `input_text`/`output_text`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _item_text(item: dict[str, Any]) -> str:
    """The prompt text one Responses input item adds: a message's content, a tool call's arguments, its output."""
    kind = item.get("type", "message")
    if kind == "message":
        return _text(item.get("content"))
    if kind == "function_call":
        return _text(item.get("arguments"))
    if kind == "function_call_output":
        return _text(item.get("output"))
    return ""


def _responses_prompts(body: dict[str, Any]) -> tuple[str, str]:
    inp, instructions = body["input"], _text(body.get("instructions"))
    if isinstance(inp, str):
        return inp, f"{instructions}\n{inp}" if instructions else inp
    items = [x for x in inp if isinstance(x, dict)]
    first = next((_text(x.get("content")) for x in items if x.get("role") == "user"
                  and x.get("type", "message") == "message"), "")
    return first, "\n".join([instructions, *map(_item_text, items)])


def prompts(body: dict[str, Any], path: str) -> tuple[str, str]:
    """(task prompt for the router: the first user message, the whole prompt text for token counting)."""
    if path == CHAT:
        msgs = [m for m in body["messages"] if isinstance(m, dict)]
        first = next((_text(m.get("content")) for m in msgs if m.get("role") == "user"), "")
        return first, "\n".join(_text(m.get("content")) for m in msgs)
    if path == RESPONSES:
        return _responses_prompts(body)
    p = body.get("prompt")
    text = p if isinstance(p, str) else "\n".join(x for x in p if isinstance(x, str)) if isinstance(p, list) else ""
    return text, text
