"""The gateway's edge: who may call, which bodies are read, and typed, bounded workflow hints.

Everything here does work bounded by the request's size (itself capped by `limits.max_body_bytes`), never by a number
the client chose, and refuses what it cannot use with a 4xx whose message names the field. A body that passes
`parse_body` can always be encoded for the upstream call (no NaN/Infinity, no lone surrogates, no huge integers,
bounded nesting), so nothing fails later, inside the forwarding path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from typing import Annotated, Any, Iterable, Mapping

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, ValidationError

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


# ---- bodies --------------------------------------------------------------------------------------------------
class _Bad:
    """A JSON token refused after parsing (so the error can name where it stood)."""

    def __init__(self, what: str) -> None:
        self.what = what


class _Tokens:
    """json.loads hooks that mark a document holding an unforwardable number, so only such documents are walked."""

    def __init__(self) -> None:
        self.flagged = False

    def int(self, s: str) -> int | _Bad:
        digits = len(s.lstrip("-"))
        if digits > MAX_INT_DIGITS:
            self.flagged = True
            return _Bad(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
        return int(s)

    def float(self, s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            self.flagged = True
        return v

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


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate can appear in UTF-8 JSON text


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
    if tokens.flagged or text.count("[") + text.count("{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(text):
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
    """A workflow's outcome, reported by the client once it is scored."""

    model_config = ConfigDict(extra="forbid")
    workflow_id: Ident
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)


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
    try:
        return WorkflowHints.model_validate(raw)
    except ValidationError as e:
        raise EdgeError(400, _describe(e, where), "invalid_stage" if "stage" in str(e.errors()[0]["loc"]) else
                        "invalid_hint", "bad_field") from None


def feedback(doc: Any) -> Feedback:
    try:
        return Feedback.model_validate(doc)
    except ValidationError as e:
        raise EdgeError(400, _describe(e, {}), "invalid_feedback", "bad_field") from None
