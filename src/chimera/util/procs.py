"""A server in its own subprocess for a benchmark: started, waited for, and always stopped (its whole group)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import httpx


@dataclass
class Spawned:
    name: str
    url: str  # http://127.0.0.1:PORT (no /v1)
    pid: int
    log: Path
    ready_path: str
    timeout_s: float
    proc: subprocess.Popen


def chimera_cmd(*args: str) -> list[str]:
    """The `chimera` CLI run by this interpreter (works in a venv without activating it)."""
    return [sys.executable, "-c", "from chimera.cli import app; app()", *args]


@contextlib.contextmanager
def spawned(name: str, cmd: Sequence[str], port: int, ready_path: str, log: Path,
            env: Mapping[str, str] | None = None, timeout_s: float = 90.0, wait: bool = True) -> Iterator[Spawned]:
    """Run `cmd` (listening on 127.0.0.1:`port`) until the block exits; ready once GET `ready_path` answers 200.

    Output goes to `log`; a process that dies before it is ready raises an error naming that log. With
    `wait=False` the caller starts several and calls `wait_ready` on each (they start in parallel)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "wb")
    proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    sp = Spawned(name, f"http://127.0.0.1:{port}", proc.pid, log, ready_path, timeout_s, proc)
    try:
        if wait:
            wait_ready(sp)
        yield sp
    finally:
        _stop(proc)
        fh.close()


def wait_ready(sp: Spawned) -> None:
    deadline = time.monotonic() + sp.timeout_s
    with httpx.Client(timeout=1) as http:  # one client: each new one builds an SSL context (~70 ms of CPU)
        while True:
            if sp.proc.poll() is not None:
                raise RuntimeError(f"{sp.name} exited with {sp.proc.returncode} before it was ready; see {sp.log}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(sp.url + sp.ready_path).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sp.name} not ready on {sp.url} after {sp.timeout_s:.0f} s; see {sp.log}")
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (uvicorn's graceful stop; cProfile writes its file), then SIGTERM, then SIGKILL, to the group."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
