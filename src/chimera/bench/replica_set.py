"""Several `chimera serve` replicas sharing state on one Redis, on this host: what the replica tests, the gateway
benchmark's `--replicas` and the live benchmark's multi-replica contender run.

One gateway config serves every replica; each gets its own listen port, `state.replica_id` (r0..rN-1), trace store
WORKDIR/rI.sqlite, config WORKDIR/rI.yaml and log WORKDIR/rI.log. The replicas start in parallel and are stopped by
their process handles, as is the Redis the set started itself (a given one is left running).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import httpx

from chimera.bench.gateway_process import gateway_process
from chimera.serve.config import GatewayConfig, gateway_config_document, gateway_config_from_dict
from chimera.util.procs import Spawned, wait_ready
from chimera.util.redis_server import RedisServer
from chimera.util.threaded import free_port


@dataclass
class Replica:
    """One running replica: its id, process and trace store."""

    index: int
    replica_id: str
    process: Spawned
    trace_store: Path
    config: GatewayConfig

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT` (no /v1)."""
        return self.process.url

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def proc(self) -> subprocess.Popen:
        return self.process.proc

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class ReplicaSet:
    """The running set: the replicas (in index order) and the Redis they share (None: not shared)."""

    redis: RedisServer | None
    replicas: list[Replica]
    workdir: Path

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def pids(self) -> list[int]:
        return [r.pid for r in self.replicas]

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, i: int) -> Replica:
        return self.replicas[i]

    def kill(self, i: int, timeout_s: float = 10.0) -> int:
        """SIGKILL replica `i` (its process group: a crash, no graceful stop) and wait until it is gone; its pid."""
        proc = self.replicas[i].proc
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout_s)
        return proc.pid

    def health(self, i: int, timeout_s: float = 2.0) -> dict[str, Any]:
        """Replica `i`'s GET /health JSON (its `state` block says shared or degraded)."""
        r = httpx.get(self.replicas[i].url + "/health", timeout=timeout_s)
        r.raise_for_status()
        return r.json()


def replica_config(config: Mapping[str, Any] | GatewayConfig, index: int, n: int, redis_url: str | None,
                   workdir: Path) -> GatewayConfig:
    """Replica `index` of `n`: `config` with a free listen port, its own trace store, `state.replica_id` rINDEX and
    `state.redis_url`; `state.replicas` defaults to `n`; every other `state` key is kept as given. No `redis_url`:
    no `state` block (independent replicas, each alone with the backends: the unshared baseline)."""
    doc = gateway_config_document(config) if isinstance(config, GatewayConfig) else dict(config)
    if redis_url is None:
        doc.pop("state", None)
    else:
        doc["state"] = {"replicas": n, **(doc.get("state") or {}), "redis_url": redis_url, "replica_id": f"r{index}"}
    doc["listen"] = {**(doc.get("listen") or {}), "port": free_port()}
    doc["trace_store"] = str(Path(workdir) / f"r{index}.sqlite")
    return gateway_config_from_dict(doc, source=f"replica r{index}")


@contextlib.contextmanager
def replica_set(config: Mapping[str, Any] | GatewayConfig, n: int, workdir: str | Path, *,
                redis: RedisServer | None = None, shared: bool = True, factory: str | None = None,
                env: Mapping[str, str] | None = None, timeout_s: float = 90.0) -> Iterator[ReplicaSet]:
    """`n` replicas of the gateway `config` sharing `redis` (started here, on a free port, when not given), ready
    when the block starts; every replica stopped (and a Redis started here) when it ends. `shared=False`: no Redis
    and no `state` block (n independent gateways). `factory`: run each under uvicorn on that target instead of
    `chimera serve` (see bench.gateway_process)."""
    if n < 1:
        raise ValueError(f"replica_set: n must be at least 1, got {n}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if shared and redis is None:
            redis = stack.enter_context(RedisServer(log_dir=workdir))
        url = redis.url if shared and redis is not None else None
        replicas = []
        for i in range(n):
            cfg = replica_config(config, i, n, url, workdir)
            sp = stack.enter_context(gateway_process(cfg, workdir, factory=factory, env=env, timeout_s=timeout_s,
                                                     wait=False, name=f"r{i}"))
            replicas.append(Replica(i, f"r{i}", sp, Path(cfg.trace_store), cfg))
        for r in replicas:
            wait_ready(r.process)
        yield ReplicaSet(redis if shared else None, replicas, workdir)
