"""KEY=VALUE strings from the command line (policy parameters, tuning grids) read as YAML scalars."""

from __future__ import annotations

from typing import Any, Iterable

import yaml


def split_pair(pair: str, flag: str, shape: str = "KEY=VALUE") -> tuple[str, str]:
    """('KEY', 'VALUE') of 'KEY=VALUE'; an error names the flag and the expected shape."""
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{flag} expects {shape}, got {pair!r}")
    return key.strip(), value


def parse_pairs(pairs: Iterable[str], flag: str = "--param") -> dict[str, Any]:
    """KEY=VALUE strings → a dict, values read as YAML scalars (0.5, true, null, {a: 1}); the policy checks keys."""
    out = {}
    for pair in pairs:
        key, value = split_pair(pair, flag)
        out[key] = yaml.safe_load(value)
    return out


def parse_value_lists(pairs: Iterable[str], flag: str) -> dict[str, list[Any]]:
    """KEY=V1,V2,… strings → {KEY: [V1, V2, …]}, each value read as `parse_pairs` reads one."""
    out = {}
    for pair in pairs:
        key, values = split_pair(pair, flag, "KEY=V1,V2,…")
        if not values.strip():
            raise ValueError(f"{flag} expects KEY=V1,V2,…, got {pair!r}")
        out[key] = [yaml.safe_load(v) for v in values.split(",")]
    return out
