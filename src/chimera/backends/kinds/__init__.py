"""Backend kinds: how the gateway talks to one kind of OpenAI-compatible server (the body it sends, the load gauges
it scrapes). One file per kind, one registration line; a gateway backend names its kind (`kind: vllm`)."""

from chimera.backends.kinds.base import (BACKEND_KINDS, BackendKind, BackendKindError, make_backend_kind,
                                         register_backend_kind)
from chimera.backends.kinds import openai, vllm  # noqa: F401,E402  (registers the built-in kinds)

__all__ = ["BACKEND_KINDS", "BackendKind", "BackendKindError", "make_backend_kind", "register_backend_kind"]
