"""Baseline policies (kept as an import path); each lives in its own file under sched/policies/."""

from chimera.sched.policies.least_loaded import LeastLoadedPolicy
from chimera.sched.policies.ltr import LtrPolicy
from chimera.sched.policies.mlfq import MlfqPolicy
from chimera.sched.policies.routellm import RouteLLMPolicy
from chimera.sched.policies.sjf import SjfPolicy
from chimera.sched.policies.vllm import VllmPolicy
from chimera.sched.policy import RoundRobinMixin

__all__ = ["LeastLoadedPolicy", "LtrPolicy", "MlfqPolicy", "RouteLLMPolicy", "RoundRobinMixin", "SjfPolicy",
           "VllmPolicy"]
