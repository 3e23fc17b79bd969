"""Kept for existing imports: the in-process server helpers live in chimera.threaded (below every body)."""

from chimera.threaded import ThreadedServer, free_port, serve_in_thread

__all__ = ["ThreadedServer", "free_port", "serve_in_thread"]
