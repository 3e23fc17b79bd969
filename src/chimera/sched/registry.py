"""Policies by name, so every comparison is one flag."""

from __future__ import annotations

from typing import Callable

from chimera.sched.predictors import ConfidencePredictor, LengthPredictor
from chimera.sched.baselines import LeastLoadedPolicy, LtrPolicy, MlfqPolicy, RouteLLMPolicy, SjfPolicy, VllmPolicy
from chimera.sched.chimera import ChimeraPolicy
from chimera.sched.policy import Policy

_FACTORIES: dict[str, Callable[..., Policy]] = {
    "vllm": VllmPolicy,
    "least-loaded": LeastLoadedPolicy,
    "routellm": RouteLLMPolicy,
    "sjf": SjfPolicy,
    "ltr": LtrPolicy,
    "mlfq": MlfqPolicy,
    "chimera": ChimeraPolicy,
    "chimera-oracle": ChimeraPolicy,
    "chimera-no-route": lambda **kw: ChimeraPolicy(route=False, **kw),
    "chimera-no-stjf": lambda **kw: ChimeraPolicy(stjf=False, **kw),
    "chimera-no-load": lambda **kw: ChimeraPolicy(load=False, **kw),
}
POLICIES: tuple[str, ...] = tuple(_FACTORIES)
ORACLE_POLICIES = frozenset({"chimera-oracle"})
LAMBDA_POLICIES = frozenset(n for n in POLICIES if n.startswith("chimera"))


def make_policy(
    name: str,
    confidence: ConfidencePredictor | None = None,
    length: LengthPredictor | None = None,
    lam: float | None = None,
    **params,
) -> Policy:
    """Build a policy by name; `lam` applies to the chimera family only."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    kw = dict(params)
    if lam is not None and name in LAMBDA_POLICIES:
        kw["lam"] = lam
    policy = _FACTORIES[name](confidence=confidence, length=length, **kw)
    policy.name = name
    return policy
