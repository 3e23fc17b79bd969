"""Property-based fuzzing of every gateway endpoint against the gateway's own /openapi.json.

Two generators hit one live gateway (uvicorn on 127.0.0.1) in front of a fast fake upstream:

* schemathesis (4.x, pytest integration through `schemathesis.pytest.from_fixture`) generates requests for every
  operation in /openapi.json, positive and negative (`generation.mode = "all"`), in its coverage phase (boundary
  values, missing/mistyped fields, unexpected methods) and its fuzzing phase, each with a client key, an admin key,
  a wrong key or no key at all;
* plain hypothesis + httpx sends what a schema-based generator never produces: hostile JSON text (NaN/Infinity
  literals, 1e400, lone surrogates in values and keys, 5000-digit integers, `[`x100000 and `{"a":`x5000 nesting,
  bodies at the size limit), wrong Content-Types and hostile X-Chimera-* header values.

Every response must be < 500 and arrive in under 5 s; every 4xx the gateway itself writes must be the OpenAI error
shape {"error": {"message", "type", "code"}}; where the request settles the answer (wrong key, wrong Content-Type,
body over the limit, an unforwardable value, an invalid hint) it must be exactly that status. No ERROR may be logged.
Afterwards /health must show nothing stuck (waiting 0, inflight 0, the trace writer alive, no rows dropped) and a
normal completion must still succeed. The request/status tally of both fuzz tests is printed (`-s`) and written to
out/fuzz/summary.json.

Bounded for `make test` on 2 cores: fixed seeds, derandomized, about 1800 requests, 20-45 s in all (the generated
cases also follow the literals in this file and the gateway's source, which hypothesis mines for constants, so the
counts change when those change, not from run to run).
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import max_response_time, not_a_server_error

from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from upstreams import Served, fake_upstream

CLIENT_KEY, ADMIN_KEY, WRONG_KEY = "fuzz-client-key", "fuzz-admin-key", "not-a-key"
MODELS = ("small", "big")
MAX_BODY = 1_000_000  # the gateway's default limits.max_body_bytes, set explicitly so the hostile bodies track it
RESPONSE_LIMIT_S = 5.0
ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "out" / "fuzz" / "summary.json"

# ---- the tally (both fuzz tests) -----------------------------------------------------------------------------
_lock = threading.Lock()
_statuses: collections.Counter[int] = collections.Counter()
_plain: collections.Counter[int] = collections.Counter()  # 4xx not from the gateway's code (see _check_response)
_slowest = {"s": 0.0}


def _tally(status: int, elapsed: float) -> None:
    with _lock:
        _statuses[status] += 1
        _slowest["s"] = max(_slowest["s"], elapsed)


def _tally_plain(status: int) -> None:
    with _lock:
        _plain[status] += 1


NO_ANSWER = -1  # the tally's status for a request that got no answer in time (or a dropped connection)


def _summary() -> dict[str, Any]:
    with _lock:
        counts = {k: v for k, v in sorted(_statuses.items()) if k != NO_ANSWER}
        return {"requests": sum(_statuses.values()), "statuses": counts,
                "server_errors": sum(n for s, n in counts.items() if s >= 500),
                "no_answer": _statuses[NO_ANSWER],
                "plain_text_errors": dict(sorted(_plain.items())),  # uvicorn's 400s and Starlette's 405s
                "slowest_s": round(_slowest["s"], 3)}


def _summary_line(s: dict[str, Any]) -> str:
    line = f"fuzz: {s['requests']} requests, {s['statuses']}, {s['server_errors']} x 5xx"
    return line + (f", {s['no_answer']} unanswered" if s["no_answer"] else "") + f", slowest {s['slowest_s']} s"


def _write_summary() -> None:
    s = _summary()
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    as_json = {**s, "statuses": {str(k): v for k, v in s["statuses"].items()},
               "plain_text_errors": {str(k): v for k, v in s["plain_text_errors"].items()}}
    SUMMARY.write_text(json.dumps(as_json, indent=1) + "\n")
    print("\n" + _summary_line(s))


class _DropInvalidRequestWarnings(logging.Filter):
    """uvicorn warns once per request its HTTP parser refuses (the control-character headers sent on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


# "Exception in ASGI application" (uvicorn.error, which hands it to "uvicorn"), "internal error on ..." (chimera.serve).
# On "uvicorn" the handler comes after uvicorn's own stderr one, so a record is seen only once it has been printed:
# Python 3.11.7's traceback printing calls ast.parse, whose recursion guard is a process-wide counter (CPython
# gh-106905), and pytest parsing source for a failure report at the same moment fails with a SystemError.
ERROR_LOGGERS = ("uvicorn", "chimera.serve")


class _ErrorLog(logging.Handler):
    """Every ERROR the servers log (a traceback even where the client never saw the 500)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.records.append(f"{record.name}: {record.getMessage().strip()}"
                            + (f" ({type(exc).__module__}.{type(exc).__name__})" if exc else ""))


# ---- the servers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A fast fake upstream serving both models, and a gateway with keys, a small queue and online learning in front
    of it (so feedback reaches the learner: learnt, repeated, unknown; a reload is refused: no predictors folder)."""
    upstream = Served(fake_upstream("up", delay=0.0, words=3))
    cfg = gateway_config_from_dict({
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "policy": {"name": "chimera", "lam": 0.02},
        "trace_store": str(tmp_path_factory.mktemp("fuzz") / "traces.sqlite"),
        "backends": [{"name": f"{m}-0", "model": m, "base_url": upstream.url + "/v1", "max_inflight": 2}
                     for m in MODELS],
        "limits": {"max_queue": 4, "max_body_bytes": MAX_BODY, "request_timeout_s": 10},
        "learning": {"online": True},
    })
    app = build_gateway(cfg)
    quiet = _DropInvalidRequestWarnings()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    served = Served(app)
    errors = _ErrorLog()  # attached after the servers start: uvicorn's logging set-up replaces its loggers' handlers
    for name in ERROR_LOGGERS:
        logging.getLogger(name).addHandler(errors)
    try:
        yield {"url": served.url, "gw": app.state.gateway, "errors": errors.records}
    finally:
        _write_summary()
        for name in ERROR_LOGGERS:
            logging.getLogger(name).removeHandler(errors)
        logging.getLogger("uvicorn.error").removeFilter(quiet)
        served.stop()
        upstream.stop()


# ---- checks shared by both tests -----------------------------------------------------------------------------
def _check_response(status: int, ctype: str, body: bytes, elapsed: float, what: str) -> None:
    _tally(status, elapsed)
    assert status < 500, f"{what}: HTTP {status}: {body[:500]!r}"
    assert elapsed < RESPONSE_LIMIT_S, f"{what}: answered in {elapsed:.2f} s"
    if status >= 400 and not ctype.startswith("application/json"):
        # Not the gateway's own answers: Starlette's 405 for a method a route lacks, uvicorn's 400 for bytes its
        # HTTP parser refuses (control characters in a header, broken chunked framing). Anything else is JSON.
        assert (status == 405 and body == b"Method Not Allowed") or \
            (status == 400 and body == b"Invalid HTTP request received."), \
            f"{what}: HTTP {status} {ctype!r} is not an OpenAI JSON error: {body[:300]!r}"
        _tally_plain(status)
    elif status >= 400:
        doc = json.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        assert isinstance(err, dict), f"{what}: HTTP {status} JSON body is not OpenAI-shaped: {body[:300]!r}"
        assert isinstance(err.get("message"), str) and isinstance(err.get("type"), str), f"{what}: {doc}"
        assert "code" in err and (err["code"] is None or isinstance(err["code"], str)), f"{what}: {doc}"


# ---- 1. schemathesis against /openapi.json -------------------------------------------------------------------
# Checks: only `not_a_server_error` and `max_response_time` (5 s) run, plus `_check_response` above.
# Off, and why:
#   status_code_conformance / content_type_conformance / response_headers_conformance / response_schema_conformance:
#     the document does not (and cannot usefully) list every status and header an OpenAI proxy returns: Starlette's
#     own 405 is text/plain, upstream responses pass through with their own headers and shapes, and the 200
#     schemas are a bare `object`. The error *shape* is checked by `_check_response` instead.
#   positive_data_acceptance: a valid body may still be refused by design (404 for a model not served here, 401 when
#     the fuzzer sends a wrong or no key on purpose, 429 under backpressure).
#   negative_data_rejection: the request models allow extra fields (they pass through to the backend), and the
#     X-Chimera-* headers are optional, so many "negative" cases are legitimately accepted.
#   ignored_auth / missing_required_header / unsupported_method / allow_header_conformance: we choose the key
#     ourselves per case (right, admin, wrong, none) and check the answer in `_check_response`; Starlette's 405
#     carries an Allow header but schemathesis' stricter method probing adds nothing a 5xx check does not catch.
#   use_after_free / ensure_resource_availability / object_level_authorization: no resources are created here.
# The stateful phase is off (no links between operations).
SCHEMATHESIS_CONFIG = {
    "seed": 20240601,
    "generation": {"mode": "all", "max-examples": 40, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
               "stateful": {"enabled": False}},
    "checks": {"enabled": False, "not_a_server_error": {"enabled": True},
               "max_response_time": RESPONSE_LIMIT_S},
    "request-timeout": RESPONSE_LIMIT_S,
    # Served names and known workflow ids in place of random strings most of the time, so that positive cases get
    # past the 404 into tokenising, the policy, the upstream call and the trace writer (and feedback ends
    # workflows that exist).
    "dictionaries": {"models": {"values": [*MODELS, "chimera"]}, "workflows": {"values": ["wf-1", "wf-2"]}},
    "parameters": {"body.model": {"dictionary": "models", "probability": 0.7},
                   "path.model_id": {"dictionary": "models", "probability": 0.5},
                   "body.workflow_id": {"dictionary": "workflows", "probability": 0.5},
                   "body.chimera.workflow_id": {"dictionary": "workflows", "probability": 0.5},
                   "header.X-Chimera-Workflow-Id": {"dictionary": "workflows", "probability": 0.5}},
}
AUTHS = {"client": CLIENT_KEY, "admin": ADMIN_KEY, "wrong": WRONG_KEY, "none": None}
AUTH_WHEEL = ["client"] * 5 + ["admin", "wrong", "none"]


def _stable(obj: Any) -> str:
    """JSON for what json.dumps cannot write, without addresses (schemathesis' NOT_SET repr has one)."""
    return obj.hex() if isinstance(obj, bytes) else type(obj).__name__


def _pick_auth(case) -> str:
    """The key a case is sent with, chosen by a stable digest of the case (not a hypothesis draw: schemathesis runs
    its coverage phase only for tests without extra `given` arguments), so a replayed case keeps its key."""
    seen = json.dumps([case.method, case.path, case.path_parameters, case.headers, case.query, case.body],
                      sort_keys=True, default=_stable)
    return AUTH_WHEEL[zlib.crc32(seen.encode("utf-8", "surrogatepass")) % len(AUTH_WHEEL)]


@pytest.fixture(scope="module")
def gateway_schema(gateway):
    """The live /openapi.json. Loaded with `from_dict`, not `from_url`: schemathesis leaves out the operation that
    served the document it loaded from a URL, and GET /openapi.json is one of the gateway's endpoints too."""
    r = httpx.get(gateway["url"] + "/openapi.json", timeout=RESPONSE_LIMIT_S)
    assert r.status_code == 200
    cfg = schemathesis.Config.from_dict({**SCHEMATHESIS_CONFIG, "base-url": gateway["url"]})
    return schemathesis.openapi.from_dict(r.json(), config=cfg)


schema = schemathesis.pytest.from_fixture("gateway_schema")


@pytest.fixture(autouse=True)
def _schemathesis_pytest9_compat(request):
    """schemathesis 4.32.5's lazy (`from_fixture`) runner reads `request.node._nodeid`, which pytest 9.2 renamed; the
    attribute it then writes back is only used for its own subtest labels."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_operations_never_fail(case):
    auth = _pick_auth(case)
    key = AUTHS[auth]
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if key is not None:
        case.headers["Authorization"] = f"Bearer {key}"
    what = f"{case.method} {case.formatted_path} ({auth} key)"
    t0 = time.perf_counter()
    try:
        response = case.call(timeout=RESPONSE_LIMIT_S)
    except requests.RequestException as e:
        _tally(NO_ANSWER, time.perf_counter() - t0)
        raise AssertionError(f"{what}: no answer ({type(e).__name__}: {e}); reproduce with "
                             f"{case.as_curl_command()}") from None
    elapsed = time.perf_counter() - t0
    ctype = (response.headers.get("content-type") or [""])[0]
    _check_response(response.status_code, ctype, response.content, elapsed, what)
    case.validate_response(response, checks=[not_a_server_error, max_response_time])


# ---- 2. hostile values a schema-based generator does not produce ---------------------------------------------
CHAT, COMPLETIONS, FEEDBACK = "/v1/chat/completions", "/v1/completions", "/v1/chimera/feedback"
RESPONSES = "/v1/responses"
HINTS = ("X-Chimera-Stage", "X-Chimera-Workflow-Id", "X-Chimera-Kind", "X-Session-Id")

# Templates put one hostile JSON value (raw text, spliced in as `@V@`) where the edge must look at it.
TEMPLATES = {
    CHAT: ['{"model":"small","messages":[{"role":"user","content":@V@}]}',
           '{"model":"chimera","messages":[{"role":"user","content":"hi"}],"temperature":@V@,"stream":false}',
           '{"model":"big","messages":[{"role":"user","content":"hi"}],"chimera":{"workflow_id":"wf-1","stage":@V@}}',
           '{"model":"chimera","messages":[{"role":"user","content":"hi"}],"tools":[{"x":@V@}]}'],
    COMPLETIONS: ['{"model":"small","prompt":@V@}',
                  '{"model":"chimera","prompt":["a",@V@],"max_tokens":@V@}'],
    RESPONSES: ['{"model":"small","input":@V@}',
                '{"model":"chimera","input":[{"role":"user","content":@V@}],"stream":false}',
                '{"model":"big","input":"hi","previous_response_id":@V@,"instructions":@V@}',
                '{"model":"chimera","input":"hi","tools":[{"type":"function","name":"f","parameters":@V@}],'
                '"max_output_tokens":@V@}'],
    FEEDBACK: ['{"workflow_id":"wf-1","score":@V@}',
               '{"workflow_id":@V@,"score":0.5}'],
}
NEST = 5000
# (label, JSON text, unforwardable: the edge must refuse it with a 400 wherever it stands)
VALUES: list[tuple[str, str, bool]] = [
    ("NaN", "NaN", True), ("Infinity", "Infinity", True), ("-Infinity", "-Infinity", True),
    ("1e400", "1e400", True), ("-1E+999", "-1E+999", True), ("5000-digit float", "9" * 5000 + ".5", True),
    ("5000-digit int", "1" * 5000, True), ("-5000-digit int", "-" + "9" * 5000, True),
    ("17-digit int", "1" * 17, True), ("16-digit int", "9" * 16, False), ("tiny float", "0." + "0" * 5000 + "1", False),
    ("lone high surrogate", r'"\ud800"', True), ("lone low surrogate", r'"a\udfffb"', True),
    ("reversed pair", r'"\udc00\ud800"', True), ("valid pair", r'"\ud83d\ude00"', False),
    ("surrogate key", r'{"\ud800":1}', True), ("surrogate key, nested", r'[{"k":{"\udbff":"x"}}]', True),
    ("surrogate in a list", r'["ok",["\udfff"]]', True),
    ("NUL escape", r'"a\u0000b"', False), ("control escapes", r'"\u001b[31m\u0007\b\f"', False),
    ("[ x 100000", "[" * 100_000, True), ("[ x 100000 closed", "[" * 100_000 + "]" * 100_000, True),
    ('{"a": x 5000', '{"a":' * NEST, True), ('{"a": x 5000 closed', '{"a":' * NEST + "1" + "}" * NEST, True),
    ("depth 65", "[" * 65 + "]" * 65, True), ("depth 900", "[" * 900 + "]" * 900, True),
    ("depth 60", "[" * 60 + "]" * 60, False),
    ("true", "true", False), ("null", "null", False), ("empty object", "{}", False), ("-0.0", "-0.0", False),
    ("unterminated string", '"abc', True), ("trailing comma", "[1,]", True),
]
# Whole bodies. (label, bytes, unforwardable: 400 wherever it is sent)
RAW_BODIES: list[tuple[str, bytes, bool]] = [
    ("empty", b"", True), ("whitespace", b" \n\t", True), ("top-level NaN", b"NaN", True),
    ("top-level 1e400", b"1e400", True), ("top-level null", b"null", True), ("top-level list", b"[]", True),
    ("invalid UTF-8", b'{"model":"small","prompt":"\xff\xfe"}', True),
    ("CESU-8 surrogate bytes", b'{"model":"small","prompt":"\xed\xa0\x80"}', True),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"model":"small","prompt":"hi"}', False),
    ("UTF-16 (JSON on the wire is UTF-8: RFC 8259)", '{"model":"small","prompt":"hi"}'.encode("utf-16"), True),
    ("trailing garbage", b'{"model":"small","prompt":"hi"} x', True),
    ("two documents", b'{"model":"small","prompt":"hi"}{"a":1}', True),
    ("[ x 100000", b"[" * 100_000, True), ('{"a": x 5000', b'{"a":' * NEST, True),
    ("duplicate keys", b'{"model":"small","model":"nope","prompt":"hi"}', False),
]
MAX_BODY_SLACK = (-1, 0, 1)  # huge strings that make the body one byte under, at, and over max_body_bytes


def _huge_string_body(path: str, slack: int, char: str = "x") -> bytes:
    """A body of MAX_BODY + slack bytes whose bulk is one huge string in the field the endpoint reads."""
    template = {CHAT: '{"model":"chimera","messages":[{"role":"user","content":"@S@"}]}',
                COMPLETIONS: '{"model":"small","prompt":"@S@"}',
                RESPONSES: '{"model":"chimera","input":"@S@"}',
                FEEDBACK: '{"workflow_id":"wf-1","score":0.5,"x":"@S@"}'}[path]
    room = MAX_BODY + slack - len(template.encode()) + len("@S@")
    width = len(char.encode())
    text = char * (room // width) + "y" * (room % width)
    body = template.replace("@S@", text).encode()
    assert len(body) == MAX_BODY + slack
    return body


CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/vnd.openai+json",
                 "text/plain", "application/x-www-form-urlencoded", None, "multipart/form-data; boundary=x",
                 "APPLICATION/JSON", "application/jsonx", "json"]
GOOD_CT = {"application/json", "application/json; charset=utf-8", "application/vnd.openai+json", "APPLICATION/JSON"}
# (value, clearly invalid as a hint); control characters go over a raw socket (httpx refuses to send them)
HINT_VALUES: dict[str, list[tuple[str, bool]]] = {
    "X-Chimera-Stage": [("-1", True), ("12345678901234567890", True), ("10001", True), ("1" * 20_000, True),
                        ("+5", True), ("1e3", True), ("0x10", True), ("", True), ("\x01", True), ("7\x00", True),
                        ("\x1b[2J", True), ("3", False), (" 7 ", False), ("0010", False), ("-0", True)],
    "X-Chimera-Workflow-Id": [("x" * 20_000, True), ("-1", False), ("12345678901234567890", False), ("", True),
                              ("\x01\x02", True), ("wf\x7f", True), ("a\tb", True), ("\xa0", True),
                              ("wf-1", False), ("ÿþ", False)],
    "X-Chimera-Kind": [("k" * 20_000, True), ("-1", False), ("12345678901234567890", False), ("\x00", True),
                       ("math\x1b", True), ("", True), ("code", False)],
    "X-Session-Id": [("s" * 257, True), ("s" * 256, False), ("", False), ("\x01", True), ("a\tb", True),
                     ("\xa0", True), ("ÿþ", False), ("sess-1", False)],
}
KEYS = [CLIENT_KEY] * 6 + [ADMIN_KEY, WRONG_KEY, None]


def _httpx_can_send(value: str) -> bool:
    return all(c == "\t" or " " <= c <= "~" or "\x80" <= c <= "\xff" for c in value) and value == value.strip()


def _wire_refused(value: str) -> bool:
    return any((c < " " and c != "\t") or c == "\x7f" for c in value)


def _raw_post(url: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
    """POST over a plain socket, for header bytes httpx will not put on the wire; (status, content-type, body).

    The body waits for `100 Continue`: uvicorn refuses a malformed header at once and closes, and a body already
    on its way would turn that close into a reset that loses the answer."""
    host, port = url.removeprefix("http://").split(":")
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", f"Content-Length: {len(body)}",
            "Expect: 100-continue", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((host, int(port)), timeout=RESPONSE_LIMIT_S) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        raw = b""
        while b"\r\n\r\n" not in raw and (chunk := sock.recv(65536)):
            raw += chunk
        if raw.startswith(b"HTTP/1.1 100"):
            raw = raw.partition(b"\r\n\r\n")[2]
            sock.sendall(body)
        while chunk := sock.recv(65536):
            raw += chunk
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    ctype = next((ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("content-type:")), "")
    return status, ctype, payload


def _post(gateway, client: httpx.Client, path: str, body: bytes, ctype: str | None, key: str | None,
          hints: dict[str, str], label: str) -> int:
    headers = {k: v for k, v in hints.items()}
    if ctype is not None:
        headers["Content-Type"] = ctype
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    what = f"POST {path} [{label}] ct={ctype!r} key={'ok' if key in (CLIENT_KEY, ADMIN_KEY) else key!r} " \
           f"hints={ {k: v[:40] for k, v in hints.items()} }"
    t0 = time.perf_counter()
    try:
        if all(_httpx_can_send(v) for v in headers.values()):
            r = client.post(gateway["url"] + path, content=body,
                            headers={k: v.encode("latin-1") for k, v in headers.items()})
            status, rctype, payload = r.status_code, r.headers.get("content-type", ""), r.content
        else:
            status, rctype, payload = _raw_post(gateway["url"], path, headers, body)
    except (httpx.TransportError, OSError) as e:
        _tally(NO_ANSWER, time.perf_counter() - t0)
        raise AssertionError(f"{what}: no answer ({type(e).__name__}: {e})") from None
    _check_response(status, rctype, payload, time.perf_counter() - t0, what)
    return status


def _expected(path: str, body_bad: bool, size: int, ctype: str | None, key: str | None, hints_bad: bool,
              templated: bool, wire_refused: bool = False) -> int | None:
    """The status the edge must answer, where the request settles it (checked in this order), else None."""
    if wire_refused:
        return 400  # uvicorn's HTTP parser refuses control characters in a header before the app sees it
    if key not in (CLIENT_KEY, ADMIN_KEY):
        return 401
    if ctype not in GOOD_CT:
        return 415
    if size > MAX_BODY:
        return 413
    if body_bad:
        return 400
    if hints_bad and templated and path != FEEDBACK:
        return 400  # a templated body names a served model; its hints are validated next
    return None


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(timeout=RESPONSE_LIMIT_S) as c:
        yield c


def test_every_hostile_body_on_every_endpoint(gateway, client):
    """The sweep: each hostile value in each template, each raw body and each near-limit string, JSON, right key."""
    for path, templates in TEMPLATES.items():
        for t in templates:
            for label, text, bad in VALUES:
                body = t.replace("@V@", text).encode()
                status = _post(gateway, client, path, body, "application/json", CLIENT_KEY, {}, label)
                exp = _expected(path, bad, len(body), "application/json", CLIENT_KEY, False, True)
                assert exp is None or status == exp, f"POST {path} {t} with {label}: {status}, expected {exp}"
        for label, body, bad in RAW_BODIES:
            status = _post(gateway, client, path, body, "application/json", CLIENT_KEY, {}, label)
            exp = _expected(path, bad, len(body), "application/json", CLIENT_KEY, False, False)
            assert exp is None or status == exp, f"POST {path} raw {label}: {status}, expected {exp}"
        for slack in MAX_BODY_SLACK:
            for char in ("x", "é", "\u20ac"):
                body = _huge_string_body(path, slack, char)
                status = _post(gateway, client, path, body, "application/json", CLIENT_KEY, {},
                               f"{char!r} string, body {slack:+d} of the limit")
                # over the limit: 413; at it: served (feedback refuses its extra field "x" with a 400)
                exp = 413 if slack > 0 else 400 if path == FEEDBACK else 200
                assert status == exp, f"POST {path} {char!r} body {slack:+d} of the limit: {status}, expected {exp}"
    for header, values in HINT_VALUES.items():
        for value, bad in values:
            for path in (CHAT, COMPLETIONS, RESPONSES):
                body = TEMPLATES[path][0].replace("@V@", '"hi"').encode()
                status = _post(gateway, client, path, body, "application/json", CLIENT_KEY, {header: value},
                               f"{header}={value[:20]!r}")
                if bad:
                    assert status == 400, f"POST {path} with {header}: {value[:40]!r}: {status}, expected 400"
                else:
                    assert status == 200, f"POST {path} with {header}: {value[:40]!r}: {status}, expected 200"


@dataclass(frozen=True)
class Hostile:
    """One drawn request, with a short repr (hypothesis prints it on failure; the bodies run to a megabyte)."""

    path: str
    label: str
    source: str  # "template N", "raw", "huge"
    bad: bool
    ctype: str | None
    key: str | None
    hints: tuple[tuple[str, str], ...]
    hints_bad: bool
    slack: int = 0

    def body(self) -> bytes:
        if self.source == "huge":
            return _huge_string_body(self.path, self.slack)
        if self.source == "raw":
            return next(b for label, b, _ in RAW_BODIES if label == self.label)
        template = TEMPLATES[self.path][int(self.source.split()[1])]
        return template.replace("@V@", next(t for label, t, _ in VALUES if label == self.label)).encode()

    def __repr__(self) -> str:
        hints = {k: v if len(v) < 40 else f"{v[:20]!r}... ({len(v)} chars)" for k, v in self.hints}
        return (f"Hostile(POST {self.path}, {self.source}: {self.label!r}, ct={self.ctype!r}, "
                f"key={self.key!r}, hints={hints})")


@st.composite
def hostile_requests(draw) -> Hostile:
    path = draw(st.sampled_from(sorted(TEMPLATES)))
    kind = draw(st.sampled_from(["template"] * 7 + ["raw"] * 2 + ["huge"]))
    slack = 0
    if kind == "raw":
        label, _, bad = draw(st.sampled_from(RAW_BODIES))
        source = "raw"
    elif kind == "huge":
        slack = draw(st.sampled_from(MAX_BODY_SLACK))
        label, source, bad = f"huge string, body {slack:+d} of the limit", "huge", False
    else:
        i = draw(st.integers(0, len(TEMPLATES[path]) - 1))
        label, _, bad = draw(st.sampled_from(VALUES))
        source = f"template {i}"
    ctype = draw(st.sampled_from(CONTENT_TYPES[:3] * 3 + CONTENT_TYPES))
    key = draw(st.sampled_from(KEYS))
    hints: list[tuple[str, str]] = []
    hints_bad = False
    for name in draw(st.lists(st.sampled_from(HINTS), unique=True, max_size=3)):
        value, vbad = draw(st.sampled_from(HINT_VALUES[name]))
        hints.append((name, value))
        hints_bad |= vbad
    return Hostile(path, label, source, bad, ctype, key, tuple(hints), hints_bad, slack)


@given(req=hostile_requests())
@settings(max_examples=250, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_hostile_combinations(gateway, client, req):
    """Random combinations of hostile bodies, content types, keys and X-Chimera-* headers."""
    body = req.body()
    status = _post(gateway, client, req.path, body, req.ctype, req.key, dict(req.hints), req.label)
    exp = _expected(req.path, req.bad, len(body), req.ctype, req.key, req.hints_bad,
                    req.source.startswith("template"), any(map(_wire_refused, dict(req.hints).values())))
    assert exp is None or status == exp, f"{req!r}: HTTP {status}, expected {exp}"


# ---- 3. nothing stuck afterwards -----------------------------------------------------------------------------
def test_gateway_is_healthy_after_the_fuzzing(gateway, client):
    """Runs after both fuzz tests (file order): no call left queued or in flight, the trace writer alive, and a
    normal completion still served."""
    t0 = time.perf_counter()
    r = client.get(gateway["url"] + "/health", timeout=1.0)
    assert time.perf_counter() - t0 < 1.0 and r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["waiting"] == 0 and h["active"] == 0, h
    assert set(h["inflight"]) == set(MODELS) and all(v == 0 for v in h["inflight"].values()), h
    assert all(b["inflight"] == 0 for b in h["backends"].values()), h
    assert h["trace"]["alive"] is True and h["trace"]["errors"] == 0 and h["trace"]["dropped"] == 0, h
    r = client.post(gateway["url"] + CHAT, headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                    json={"model": "chimera", "messages": [{"role": "user", "content": "What is 2 + 2?"}],
                          "chimera": {"workflow_id": "wf-after-fuzz"}})
    assert r.status_code == 200, r.text
    assert r.json()["model"] in MODELS and r.json()["choices"][0]["message"]["content"].startswith("w0")
    rows = gateway["gw"].trace.query("SELECT status FROM calls WHERE workflow_id = 'wf-after-fuzz'")
    assert [row["status"] for row in rows] == ["ok"]
    key = {"Authorization": f"Bearer {CLIENT_KEY}"}
    score = {"workflow_id": "wf-after-fuzz", "score": 1.0}
    r = client.post(gateway["url"] + FEEDBACK, headers=key, json=score)
    assert r.status_code == 200 and r.json()["outcome"] == "learnt", r.text
    assert client.post(gateway["url"] + FEEDBACK, headers=key, json=score).status_code == 409  # once only
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = client.post(gateway["url"] + "/v1/chimera/admin/reload", headers=admin)
    assert r.status_code == 409 and r.json()["error"]["code"] == "reload_refused"  # no predictors folder to read
    text = client.get(gateway["url"] + "/metrics", headers=admin).text
    assert 'chimera_feedback_total{outcome="learnt"}' in text and "chimera_learner_decided" in text
    s = _summary()
    assert s["requests"] > 0 and s["server_errors"] == 0, _summary_line(s)
    assert gateway["errors"] == [], f"the gateway logged errors while being fuzzed: {gateway['errors'][:5]}"


# ---- 4. clients that leave mid-body (found by this harness: an unhandled ClientDisconnect before the fix) --------
def _headers_then(body: bytes, path: str, framing: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode() + body


DISCONNECTS = {
    "chat body cut short": _headers_then(b'{"model":', CHAT, "Content-Length: 100"),
    "completions body cut short": _headers_then(b'{"model":"small","prompt":"', COMPLETIONS, "Content-Length: 5000"),
    "responses body cut short": _headers_then(b'{"model":"small","input":"', RESPONSES, "Content-Length: 5000"),
    "feedback body cut short": _headers_then(b'{"workflow_id":', FEEDBACK, "Content-Length: 100"),
    "chat malformed chunked body": _headers_then(b"zz\r\nabc\r\n0\r\n\r\n", CHAT, "Transfer-Encoding: chunked"),
}


@pytest.mark.parametrize("case", sorted(DISCONNECTS))
def test_client_leaving_mid_body_logs_no_error(gateway, case):
    before = len(gateway["errors"])
    host, port = gateway["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=RESPONSE_LIMIT_S) as sock:
        sock.sendall(DISCONNECTS[case])
        if "chunked" in case:
            sock.recv(65536)  # uvicorn's own 400 for the framing, then it closes
        else:
            time.sleep(0.05)  # the gateway is reading the body when the client goes
    deadline = time.monotonic() + 0.5
    while len(gateway["errors"]) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # let the server thread finish the request it is logging (see ERROR_LOGGERS)
    assert gateway["errors"][before:] == [], f"{case}: {gateway['errors'][before:]}"
