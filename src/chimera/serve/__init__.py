"""The live gateway body: OpenAI-compatible HTTP in front of real backends, driven by a `chimera.sched` Policy."""

from chimera.serve.app import build_gateway, run_gateway
from chimera.serve.config import GatewayConfig, GatewayConfigError, load_gateway_config

__all__ = ["GatewayConfig", "GatewayConfigError", "build_gateway", "load_gateway_config", "run_gateway"]
