"""Live agent driver: run a workload's workflows stage by stage against an OpenAI-compatible endpoint."""

from chimera.agents.driver import AgentConfig, AgentRun, run_agents, run_agents_sync

__all__ = ["AgentConfig", "AgentRun", "run_agents", "run_agents_sync"]
