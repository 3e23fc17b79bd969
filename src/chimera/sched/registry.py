"""Policies by name, so every comparison is one flag; the names come from the plugins' registration lines."""

from __future__ import annotations

from typing import Any

import chimera.sched.policies  # noqa: F401  (registers the built-in policies and presets)
from chimera.sched.predictors import ConfidencePredictor, LengthPredictor
from chimera.sched.plugin import POLICY_REGISTRY, PolicyEntry, PolicyParamsError
from chimera.sched.policy import Policy

POLICIES: tuple[str, ...] = POLICY_REGISTRY.names()

__all__ = ["POLICIES", "POLICY_REGISTRY", "PolicyParamsError", "make_policy",
           "policy_entry", "takes_param"]


def policy_entry(name: str) -> PolicyEntry:
    """The registered policy or preset `name` (ValueError naming the choices if unknown)."""
    return POLICY_REGISTRY.get(name)


def takes_param(name: str, key: str) -> bool:
    """Whether policy `name` has parameter `key` (e.g. 'lam'): ask this, never test the name."""
    return policy_entry(name).takes(key)


def make_policy(
    name: str,
    confidence: ConfidencePredictor | None = None,
    length: LengthPredictor | None = None,
    lam: float | None = None,
    **params: Any,
) -> Policy:
    """Build a policy by name, its parameters validated by its Params (an unknown key is refused, `lam` too)."""
    entry = policy_entry(name)
    kw = {**entry.params, **params}
    if lam is not None:
        kw["lam"] = lam
    try:
        policy = entry.cls(confidence=confidence, length=length, **kw)
    except PolicyParamsError as e:
        raise PolicyParamsError(str(e).replace(f"policy {entry.cls.name!r}", f"policy {name!r}")) from None
    policy.name = name
    return policy
