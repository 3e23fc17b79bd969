"""Read a YAML config file with errors that name the file (shared by the cluster and gateway loaders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, error: type[Exception], what: str) -> Any:
    """Parsed document of `path`; `error(...)` says '<path>: <what> not found' or '<path>: not valid YAML'."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: {what} not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML: {e}") from None
