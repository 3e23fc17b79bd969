"""Find the public-benchmark data directory at run time (the data is never part of the repository)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CHIMERA_DATA_DIR"


class DataDirError(FileNotFoundError):
    """The data directory (or a file inside it) is missing; the message says what was tried."""


def _repo_root() -> Path | None:
    """The checkout root (parent of src/) when running from a src-layout checkout, else None."""
    here = Path(__file__).resolve()
    src = here.parents[2]  # .../src/chimera/workload/datadir.py -> .../src
    return src.parent if src.name == "src" else None


def candidate_dirs(explicit: str | Path | None = None) -> list[tuple[str, Path]]:
    """The places looked at, in order, each labelled with why it is a candidate."""
    if explicit is not None:
        return [("explicit argument", Path(explicit).expanduser())]
    env = os.environ.get(ENV_VAR)
    if env:
        return [(f"${ENV_VAR}", Path(env).expanduser())]
    found = [("../shared/data relative to the current directory", Path.cwd() / ".." / "shared" / "data")]
    root = _repo_root()
    if root is not None:
        found.append(("../shared/data relative to the repository root", root / ".." / "shared" / "data"))
    return found


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """Return the data directory: explicit arg, else $CHIMERA_DATA_DIR, else ../shared/data (cwd, then repo root).

    An explicit argument or a set environment variable is never silently replaced by a fallback.
    """
    tried = candidate_dirs(explicit)
    for _, path in tried:
        if path.is_dir():
            return path.resolve()
    lines = "\n".join(f"  - {why}: {path}" for why, path in tried)
    raise DataDirError(
        f"data directory not found; tried:\n{lines}\n"
        f"Pass data_dir=..., or set {ENV_VAR} to the folder holding the public benchmark data "
        "(see the data README), or use chimera.workload.synthetic on machines without it."
    )


def require_file(data_dir: str | Path, relpath: str | Path) -> Path:
    """Return data_dir/relpath, raising DataDirError naming the file and the data directory if it is missing."""
    base = Path(data_dir)
    path = base / relpath
    if not path.is_file():
        raise DataDirError(f"required data file {str(relpath)!r} not found in data directory {base}")
    return path
