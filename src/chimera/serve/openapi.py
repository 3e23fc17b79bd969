"""The gateway's own OpenAPI 3.1 document: its endpoints, request bodies and error shape, from pydantic models.

The request models describe what the edge accepts (extra OpenAI fields pass through to the backend untouched); the
fuzz harness (tests/test_fuzz_gateway.py) generates requests from this document.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from chimera.serve.config import SESSION_HEADERS
from chimera.serve.edge import MAX_ID_CHARS, MAX_STAGE, Feedback, WorkflowHints


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completions; `model: "chimera"` lets the policy choose, a served name pins it."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    chimera: WorkflowHints | None = None
    user: str | None = Field(default=None, max_length=MAX_ID_CHARS)  # names a session (serve/identity.py)
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_ID_CHARS)  # names a session


class CompletionRequest(BaseModel):
    """OpenAI (legacy) completions."""

    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str | list[str]
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    chimera: WorkflowHints | None = None


class ResponsesRequest(BaseModel):
    """OpenAI Responses, for backends that serve it; `model` as for chat."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    tools: list[Any] | None = None
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    chimera: WorkflowHints | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_MODELS = (ChatCompletionRequest, CompletionRequest, ResponsesRequest, Feedback, WorkflowHints, ErrorBody)
_HINT_HEADERS = [
    ("X-Chimera-Workflow-Id", {"type": "string", "minLength": 1, "maxLength": 256}, "the workflow this call belongs to"),
    ("X-Chimera-Stage", {"type": "integer", "minimum": 0, "maximum": MAX_STAGE}, "the call's stage in its workflow"),
    ("X-Chimera-Kind", {"type": "string", "minLength": 1, "maxLength": 256}, "the workflow's kind (math, code, ...)"),
    ("X-Chimera-Task-Id", {"type": "string", "minLength": 1, "maxLength": 256}, "the task id, for replay backends"),
    *((h, {"type": "string", "maxLength": MAX_ID_CHARS}, "a session: calls that name it are one workflow")
      for h in SESSION_HEADERS),
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "OpenAI-style error", "content": {"application/json": {"schema": _ref("ErrorBody")}}}
            for c in codes}


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _ok(description: str, media: str = "application/json") -> dict[str, Any]:
    return {"200": {"description": description, "content": {media: {"schema": {"type": "object"}}}}}


def openapi_document(models: list[str]) -> dict[str, Any]:
    """The document for a gateway serving `models` (plus the policy's own name, `chimera`)."""
    schemas: dict[str, Any] = {}
    for m in _MODELS:
        s = m.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[m.__name__] = s
    hint_params = [{"name": n, "in": "header", "required": False, "schema": sch, "description": d}
                   for n, sch, d in _HINT_HEADERS]
    completion_errors = _errors(400, 401, 404, 413, 415, 429, 502, 503, 504)
    secured = [{"bearer": []}]

    def scheduled(what: str, request_model: str, answer: str) -> dict[str, Any]:
        """A POST endpoint whose calls the policy routes and orders."""
        return {"post": {
            "summary": f"{what}, routed and ordered by the policy", "security": secured, "parameters": hint_params,
            "requestBody": _json_body(request_model),
            "responses": {**_ok(f"{answer} (JSON) or a text/event-stream when stream is true"), **completion_errors}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "Chimera gateway", "version": "1",
                 "description": f"Scheduling gateway for multi-agent LLM workflows. Models: {models + ['chimera']}."},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": scheduled("Chat completion", "ChatCompletionRequest", "completion"),
            "/v1/completions": scheduled("Text completion", "CompletionRequest", "completion"),
            "/v1/responses": scheduled("Response (OpenAI Responses API)", "ResponsesRequest", "response"),
            "/v1/responses/{response_id}": {"get": {
                "summary": "A stored response, read from the backend that made it", "security": secured,
                "parameters": [{"name": "response_id", "in": "path", "required": True,
                                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}}],
                "responses": {**_ok("response object"), **_errors(400, 401, 404, 502)}}},
            "/v1/models": {"get": {"summary": "Served models and `chimera`", "security": secured,
                                   "responses": {**_ok("model list"), **_errors(401)}}},
            "/v1/models/{model_id}": {"get": {
                "summary": "One served model", "security": secured,
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {**_ok("model object"), **_errors(401, 404)}}},
            "/v1/chimera/feedback": {"post": {
                "summary": "A finished workflow's score, naming it by workflow_id or by the id of any of its "
                           "responses (ends the workflow in the policy; the online learner learns from it once; "
                           "stored once for `chimera train --traces`)",
                "security": secured, "requestBody": _json_body("Feedback"),
                "responses": {**_ok("learnt or stored: {ok, workflow_id, score, outcome: learnt|ignored}"),
                              **_errors(400, 401, 404, 409, 410, 413, 415)}}},
            "/v1/chimera/admin/reload": {"post": {
                "summary": "Reload the trained predictors from the configured folder without a restart (as SIGHUP "
                           "does); calls in flight keep theirs. 409 with the reason when refused (old ones kept)",
                "security": secured,
                "responses": {**_ok("{ok, version, previous, seconds}"), **_errors(401, 409)}}},
            "/health": {"get": {"summary": "Liveness, queue, backends and the trace writer",
                                "responses": _ok("state")}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": secured,
                                 "responses": {**_ok("Prometheus text", "text/plain"), **_errors(401)}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": _ok("OpenAPI 3.1")}},
        },
    }
