"""A Chimera gateway in its own process for a benchmark: the config written, its trace store fresh, always stopped.

The live benchmark and the soak run `chimera serve --config` (what a user runs); the gateway-overhead benchmark runs
the same app under uvicorn's factory entry point (no access log, optionally under cProfile) beside its other uvicorn
processes.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator, Mapping

from chimera.serve.config import GatewayConfig, write_gateway_config
from chimera.util.procs import Spawned, chimera_cmd, spawned

FACTORY = "chimera.serve.app:app_from_env"  # uvicorn --factory target; the config path from $CHIMERA_GATEWAY_CONFIG


def uvicorn_cmd(target: str, port: int, profile_to: Path | None = None) -> list[str]:
    """`python -m uvicorn TARGET --factory` on 127.0.0.1:`port`, quiet; under cProfile writing `profile_to`."""
    py = [sys.executable]
    if profile_to is not None:
        py += ["-m", "cProfile", "-o", str(profile_to)]
    return py + ["-m", "uvicorn", target, "--factory", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "warning", "--no-access-log"]


def clear_trace_store(path: str | Path) -> None:
    """Remove a SQLite trace store and its WAL files, so a run's trace holds that run only."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


@contextlib.contextmanager
def gateway_process(cfg: GatewayConfig, workdir: Path, *, factory: str | None = None,
                    env: Mapping[str, str] | None = None, profile_to: Path | None = None, timeout_s: float = 90.0,
                    wait: bool = True, name: str = "gateway") -> Iterator[Spawned]:
    """Write `cfg` to WORKDIR/NAME.yaml, clear its trace store, and run the gateway on `cfg.listen.port` until
    the block exits (log: WORKDIR/NAME.log): `chimera serve --config`, or with `factory` uvicorn on that target
    (the config passed in $CHIMERA_GATEWAY_CONFIG). `wait=False`: the caller calls `wait_ready` (parallel starts)."""
    port = cfg.listen.port
    if "listen" not in cfg.model_fields_set or not port:
        raise ValueError("gateway_process: the config needs listen.port (a free port)")
    path = write_gateway_config(cfg, Path(workdir) / f"{name}.yaml")
    clear_trace_store(cfg.trace_store)
    if factory is None:
        cmd = chimera_cmd("serve", "--config", str(path))
    else:
        cmd = uvicorn_cmd(factory, port, profile_to)
        env = {**(env or {}), "CHIMERA_GATEWAY_CONFIG": str(path)}
    label = "chimera gateway" if name == "gateway" else f"chimera gateway {name}"
    with spawned(label, cmd, port, "/health", Path(workdir) / f"{name}.log", env=env,
                 timeout_s=timeout_s, wait=wait) as sp:
        yield sp
