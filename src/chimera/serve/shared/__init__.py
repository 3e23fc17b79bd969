"""State several gateway replicas share on Redis: leases on backend slots, global caps, workflow state, congestion and
learning; degraded to local caps when Redis is gone (docs/replicas.md)."""
