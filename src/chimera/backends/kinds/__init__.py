"""Backend kinds: how the gateway talks to one kind of OpenAI-compatible server (the body it sends, the load gauges
it scrapes). One file per kind with one registration line; a gateway backend names its kind (`kind: vllm`).
Importing this package registers every module in this folder (a new kind needs no line here)."""

import importlib
import pkgutil

from chimera.backends.kinds.base import (BACKEND_KINDS, BackendKind, BackendKindError, make_backend_kind,
                                         register_backend_kind)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["BACKEND_KINDS", "BackendKind", "BackendKindError", "make_backend_kind", "register_backend_kind"]
