"""The backend-kind interface and its registry: a kind turns a client's body into the one its server understands and
reads the server's load gauges; its parameters are typed and checked when the gateway config is loaded."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=type)


class BackendKindError(ValueError):
    """An unknown kind or a parameter the kind does not take; the message names the kind and the key."""


class BackendKind:
    """Any OpenAI-compatible server: the client's body with the served model's name, and (streaming) the usage chunk
    that gives the engine's own token count. Subclasses add what their server understands."""

    name: ClassVar[str] = "base"
    metrics_path: ClassVar[str | None] = None  # where the server exports its load gauges (None: nothing to scrape)

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params.model_validate(params)
        except ValidationError as e:
            takes = ", ".join(self.Params.model_fields) or "none"
            parts = []
            for err in e.errors():
                key = ".".join(str(x) for x in err["loc"]) or "<params>"
                if err["type"] == "extra_forbidden":
                    parts.append(f"backend kind {self.name!r} has no parameter {key!r} (it takes: {takes})")
                else:
                    parts.append(f"backend kind {self.name!r} parameter {key!r}: "
                                 f"{err['msg'].removeprefix('Value error, ')}")
            raise BackendKindError("; ".join(parts)) from None

    def request_body(self, body: Mapping[str, Any], model: str, priority: float) -> dict[str, Any]:
        """The request as the server should see it. `priority` is the policy's queue key (lower first)."""
        out = {k: v for k, v in body.items() if k not in ("chimera", "priority")}
        out["model"] = model
        if out.get("stream") is True:  # the relay settles a stream's tokens from the engine's own count
            opts = out.get("stream_options") if isinstance(out.get("stream_options"), dict) else {}
            out["stream_options"] = {**opts, "include_usage": True}
        return out

    def load_gauges(self, metrics_text: str) -> dict[str, float]:
        """Load figures from the server's metrics page: `running`, `waiting` (requests) and `kv_cache_usage` (0–1),
        each only where the server exports it."""
        return {}


BACKEND_KINDS: dict[str, type[BackendKind]] = {}


def register_backend_kind(name: str) -> Callable[[T], T]:
    """Class decorator: `@register_backend_kind("name")` makes the kind usable as `kind: name` in a gateway config."""
    def deco(cls: T) -> T:
        if name in BACKEND_KINDS and BACKEND_KINDS[name] is not cls:
            raise ValueError(f"backend kind {name!r} is registered twice")
        BACKEND_KINDS[name] = cls  # type: ignore[assignment]
        cls.name = name  # type: ignore[attr-defined]
        return cls
    return deco


def make_backend_kind(name: str, **params: Any) -> BackendKind:
    """The kind `name` with its parameters checked (BackendKindError names an unknown kind or key)."""
    cls = BACKEND_KINDS.get(name)
    if cls is None:
        raise BackendKindError(f"unknown backend kind {name!r}; choose one of: {', '.join(BACKEND_KINDS)}")
    return cls(**params)
