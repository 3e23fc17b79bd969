"""Small helpers shared by the source loaders: compressed-file readers."""

from __future__ import annotations

import csv
import io
import json
import lzma
from pathlib import Path
from typing import Any, Iterator

from chimera.workload.datadir import require_file


def open_text(data_dir: Path, relpath: str) -> io.TextIOBase:
    """Open a data file as text, transparently decompressing .xz; a missing file names itself and the data dir."""
    path = require_file(data_dir, relpath)
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def read_json(data_dir: Path, relpath: str) -> Any:
    """Parse a whole (optionally .xz) JSON file."""
    with open_text(data_dir, relpath) as fh:
        return json.load(fh)


def iter_jsonl(data_dir: Path, relpath: str) -> Iterator[dict]:
    """Yield the objects of a (optionally .xz) JSONL file, skipping blank lines."""
    with open_text(data_dir, relpath) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def iter_csv(data_dir: Path, relpath: str) -> Iterator[dict[str, str]]:
    """Yield the rows of a (optionally .xz) CSV file as dicts."""
    with open_text(data_dir, relpath) as fh:
        yield from csv.DictReader(fh)


def take(items: list, limit: int | None) -> list:
    """The first `limit` items (all when limit is None); a negative limit is an error."""
    if limit is None:
        return items
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return items[:limit]
