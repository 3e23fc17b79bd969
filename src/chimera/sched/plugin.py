"""Plugin registries for policies and Chimera's scorers: one registration line per plugin, typed parameters.

A policy class declares `Params` (a pydantic model that refuses unknown keys) and its capabilities as class
attributes; `@register_policy("name")` makes it buildable by name. A preset is a registered name for a policy
with fixed parameters and, optionally, a predictor choice (how the benchmarks keep their row labels): an opaque label
the brain stores and does not read; the predictor layer (chimera.predict.assembly) resolves and validates it.
The same Registry holds other plugins (the predictor factories of chimera.predict.registry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=type)


class PolicyParamsError(ValueError):
    """Parameters a policy does not take or cannot use; the message names the policy and the key."""


def parse_params(model: type[BaseModel], params: Mapping[str, Any], name: str, kind: str = "policy",
                 error: type[ValueError] = PolicyParamsError) -> BaseModel:
    """Validate `params` against a plugin's Params model; errors (`error`) name the plugin (`kind` and name) and the
    offending key."""
    try:
        return model.model_validate(dict(params))
    except ValidationError as e:
        takes = ", ".join(model.model_fields) or "none"
        parts = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "<params>"
            if err["type"] == "extra_forbidden":
                parts.append(f"{kind} {name!r} has no parameter {key!r} (it takes: {takes})")
            else:
                parts.append(f"{kind} {name!r} parameter {key!r}: {err['msg'].removeprefix('Value error, ')}")
        raise error("; ".join(parts)) from None


@dataclass(frozen=True)
class PolicyEntry:
    """A registered name: the plugin class, preset parameters, and the preset's predictor choice (None: the run's;
    a label for the predictor layer, not read here)."""

    name: str
    cls: type
    params: Mapping[str, Any] = field(default_factory=dict)
    predictions: str | None = None

    def takes(self, key: str) -> bool:
        """Whether the policy has parameter `key` (e.g. 'lam'): how callers decide, never by name."""
        return key in self.cls.Params.model_fields

    @property
    def is_preset(self) -> bool:
        return bool(self.params)


class Registry:
    """Names → plugin classes, filled by one decorator line in each plugin's file."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, PolicyEntry] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: `@REGISTRY.register("name")`."""
        def deco(cls: T) -> T:
            self._add(PolicyEntry(name, cls))
            cls.name = name  # type: ignore[attr-defined]
            return cls
        return deco

    def preset(self, name: str, base: str, predictions: str | None = None, **params: Any) -> PolicyEntry:
        """Register `name` as `base` with fixed parameters (checked now) and an optional predictor choice (a label the
        predictor layer resolves: chimera.predict.assembly)."""
        entry = self.get(base)
        parse_params(entry.cls.Params, params, name)
        return self._add(PolicyEntry(name, entry.cls, dict(params), predictions))

    def _add(self, entry: PolicyEntry) -> PolicyEntry:
        if entry.name in self._entries and self._entries[entry.name].cls is not entry.cls:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def get(self, name: str) -> PolicyEntry:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}")
        return self._entries[name]

    def unregister(self, name: str) -> None:
        """Drop a name (tests that register toy plugins clean up with this)."""
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)


POLICY_REGISTRY = Registry("policy")
SCORER_REGISTRY = Registry("scorer")
register_policy = POLICY_REGISTRY.register
register_scorer = SCORER_REGISTRY.register
