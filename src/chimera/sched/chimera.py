"""Chimera's policy (kept as an import path); it lives in sched/policies/chimera.py."""

from chimera.sched.policies.chimera import ChimeraPolicy

__all__ = ["ChimeraPolicy"]
