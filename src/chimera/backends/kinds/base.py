"""The backend-kind interface and its registry: a kind turns a client's body into the one its server understands and
reads the server's load gauges; its parameters are typed and checked when the gateway config is loaded."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict

from chimera.sched.plugin import Registry, parse_params


class BackendKindError(ValueError):
    """A parameter the kind does not take or cannot use; the message names the kind and the key."""


class BackendKind:
    """Any OpenAI-compatible server: the client's body with the served model's name, and (streaming) the usage chunk
    that gives the engine's own token count. Subclasses add what their server understands."""

    name: ClassVar[str] = "base"
    metrics_path: ClassVar[str | None] = None  # where the server exports its load gauges (None: nothing to scrape)

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **params: Any) -> None:
        self.params: Any = parse_params(self.Params, params, self.name, kind="backend kind", error=BackendKindError)

    def request_body(self, body: Mapping[str, Any], model: str, priority: float) -> dict[str, Any]:
        """The request as the server should see it. `priority` is the policy's queue key (lower first)."""
        out = {k: v for k, v in body.items() if k not in ("chimera", "priority")}
        out["model"] = model
        if out.get("stream") is True and streams_usage_on_request(out):
            # the relay settles a stream's tokens from the engine's own count
            opts = out.get("stream_options") if isinstance(out.get("stream_options"), dict) else {}
            out["stream_options"] = {**opts, "include_usage": True}
        return out

    def load_gauges(self, metrics_text: str) -> dict[str, float]:
        """Load figures from the server's metrics page: `running`, `waiting` (requests) and `kv_cache_usage` (0–1),
        and the engine's cumulative inter-token latency sum and count (`itl_sum_s`, `itl_count`), each only where
        the server exports it."""
        return {}


def streams_usage_on_request(body: Mapping[str, Any]) -> bool:
    """Chat (`messages`) and completions (a `prompt` text or list) stream a usage chunk when asked; the Responses API
    (`input`; its `prompt` is a template object) reports usage in its last event and has no such option."""
    return "messages" in body or isinstance(body.get("prompt"), (str, list))


BACKEND_KINDS = Registry("backend kind")
register_backend_kind = BACKEND_KINDS.register  # class decorator: `@register_backend_kind("name")`


def make_backend_kind(name: str, **params: Any) -> BackendKind:
    """The kind `name` with its parameters checked (ValueError names an unknown kind, BackendKindError a bad key)."""
    return BACKEND_KINDS.get(name).cls(**params)
