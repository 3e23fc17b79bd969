"""Run the emulator: `serve_emulator` in the foreground, or `running_emulator` in a background thread for tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn
from starlette.applications import Starlette

from chimera.emulate.server import EmulatorState, build_emulator_app


def serve_emulator(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs: Any) -> None:
    """Serve `build_emulator_app(**kwargs)` with uvicorn until interrupted (loopback unless `host` says otherwise)."""
    uvicorn.run(build_emulator_app(**kwargs), host=host, port=port, log_level=log_level)


class EmulatorServer:
    """One emulator on 127.0.0.1 in a background thread; `stop()` joins the thread and closes the socket."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> None:
        self.app: Starlette = build_emulator_app(**kwargs)
        self.host, self.port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def state(self) -> EmulatorState:
        return self.app.state.emulator

    @property
    def base_url(self) -> str:
        """OpenAI base URL (ends in /v1)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 10.0) -> "EmulatorServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1,
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"chimera-emulator-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulator did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """Fault injection from another thread: in-flight requests die, new ones get 500 (see EmulatorState.fail)."""
        loop = self.state.clock._loop
        if loop is None or not loop.is_running():
            self.state.failed = True
            return

        async def _fail() -> None:  # on the server's loop: the engine and handles are not thread-safe
            self.state.fail()

        asyncio.run_coroutine_threadsafe(_fail(), loop).result(timeout=5)

    def stop(self, timeout: float = 10.0) -> None:
        """End in-flight requests, ask uvicorn to exit, wait for the thread, close the socket (idempotent)."""
        loop = self.state.clock._loop
        if self._thread is not None and loop is not None and loop.is_running():
            async def _end() -> None:  # open streams would otherwise hold uvicorn's graceful shutdown
                self.state.clock.fail_all("emulator stopped")

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_end(), loop).result(timeout=5)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "EmulatorServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_emulator(**kwargs: Any) -> Iterator[str]:
    """Start an emulator on a free 127.0.0.1 port for the block; yields its OpenAI base URL (…/v1)."""
    with EmulatorServer(**kwargs) as srv:
        yield srv.base_url
