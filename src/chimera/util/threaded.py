"""An ASGI app served by uvicorn in a background thread on 127.0.0.1: the one way demos, the emulator and tests run
an in-process server (the socket is bound before the thread starts, so the port is known and cannot be taken)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator


def free_port() -> int:
    """A port on 127.0.0.1 that is free right now (for a server in another process; in-process ones bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """`app` under uvicorn (lifespan on) in a daemon thread; `start()` waits until it serves, `stop()` joins the
    thread (forcing the exit after `graceful_s` if streams stay open) and closes the socket. Idempotent stop."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "chimera-server",
                 graceful_s: float = 5.0) -> None:
        self.app, self.host, self.port, self.name, self.graceful_s = app, host, port, name, graceful_s
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        """`http://HOST:PORT` (no /v1)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "ThreadedServer":
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port, self._sock = sock.getsockname()[1], sock
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on", access_log=False,
                                                    timeout_graceful_shutdown=self.graceful_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name=f"{self.name}-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        """Ask uvicorn to exit and wait; raise if the thread still runs after a forced exit."""
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(timeout_s)
            alive, self.thread = self.thread.is_alive(), None
            if alive:
                raise RuntimeError(f"{self.name} on {self.host}:{self.port} did not stop")
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(app: Any, start_timeout_s: float = 20.0, stop_timeout_s: float = 20.0) -> Iterator[str]:
    """Yield `http://127.0.0.1:PORT` while uvicorn serves `app` (lifespan on); stop and join the thread on exit."""
    srv = ThreadedServer(app).start(start_timeout_s)
    try:
        yield srv.url
    finally:
        srv.stop(stop_timeout_s)
