"""Chimera: predictive scheduling of multi-agent LLM workflows on heterogeneous clusters."""

__version__ = "0.1.0"
