"""LiteLLM's proxy as the gateway people would otherwise deploy: its config, and the proxy run as a subprocess.

LiteLLM is a benchmark dependency only, installed by `make bench-live` (and `make test`) into its own virtual
environment `.venv-litellm` (its proxy extra pins a web stack of its own), so it never constrains Chimera's pins.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Mapping

from chimera.util.procs import Spawned, spawned
from chimera.util.threaded import free_port

LITELLM_VERSION = "1.102.4"  # pinned in the Makefile's .venv-litellm; the newest that resolves on this index
STRATEGIES = ("simple-shuffle", "least-busy")
GROUP = "pool"  # the one model group agents ask LiteLLM for; LiteLLM picks a deployment inside it
DEFAULT_BIN = Path(".venv-litellm/bin/litellm")


class LiteLLMMissing(RuntimeError):
    """No `litellm` executable: the head-to-head cannot run."""


def find_litellm(path: str | Path | None = None) -> Path:
    """The `litellm` executable: `path`, else ./.venv-litellm/bin/litellm, else `litellm` on PATH."""
    cands = [Path(path)] if path else [DEFAULT_BIN, *([Path(w)] if (w := shutil.which("litellm")) else [])]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c.resolve()
    where = str(path) if path else f"{DEFAULT_BIN} or PATH"
    raise LiteLLMMissing(f"LiteLLM proxy not found at {where}. Install it with `make bench-live` (litellm[proxy]=="
                         f"{LITELLM_VERSION} in .venv-litellm) or pass --litellm PATH; --no-litellm skips it.")


def litellm_config(deployments: Mapping[str, str], strategy: str, group: str = GROUP) -> dict:
    """A LiteLLM proxy config: every backend (served model name -> base URL ending in /v1) a deployment of one
    model group, routed by `strategy`. Client headers are forwarded so backends see workflow metadata."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown LiteLLM routing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not deployments:
        raise ValueError("LiteLLM needs at least one deployment")
    return {
        "model_list": [{"model_name": group,
                        "litellm_params": {"model": f"openai/{name}", "api_base": url, "api_key": "EMPTY",
                                           "timeout": 600}}
                       for name, url in deployments.items()],
        "router_settings": {"routing_strategy": strategy, "num_retries": 0},
        "litellm_settings": {"request_timeout": 600, "telemetry": False},
        "general_settings": {"forward_client_headers_to_llm_api": True},
    }


@contextlib.contextmanager
def litellm_proxy(config: dict, workdir: Path, binary: str | Path | None = None,
                  timeout_s: float = 90.0) -> Iterator[Spawned]:
    """Run `litellm --config` on 127.0.0.1 until the block exits.

    The cost map is read from the package (LITELLM_LOCAL_MODEL_COST_MAP), so nothing is fetched at run time."""
    exe = find_litellm(binary)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "litellm.yaml"
    cfg.write_text(json.dumps(config, indent=1))  # JSON is YAML
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "NO_DOCS": "True",
           "DISABLE_ADMIN_UI": "True"}
    with spawned("LiteLLM proxy", [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                 port, "/health/liveliness", workdir / "litellm.log", env=env, timeout_s=timeout_s) as sp:
        yield sp
