"""Run the emulator: `serve_emulator` in the foreground, or `running_emulator` in a background thread for tests."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterator

import uvicorn
from starlette.applications import Starlette

from chimera.emulate.server import build_emulator_app
from chimera.emulate.state import EmulatorState
from chimera.util.threaded import ThreadedServer


def serve_emulator(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs: Any) -> None:
    """Serve `build_emulator_app(**kwargs)` with uvicorn until interrupted (loopback unless `host` says otherwise)."""
    uvicorn.run(build_emulator_app(**kwargs), host=host, port=port, log_level=log_level)


class EmulatorServer:
    """One emulator on 127.0.0.1 in a background thread; `stop()` joins the thread and closes the socket."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> None:
        self.app: Starlette = build_emulator_app(**kwargs)
        self._srv = ThreadedServer(self.app, host, port, name="chimera-emulator", graceful_s=1)

    @property
    def host(self) -> str:
        return self._srv.host

    @property
    def port(self) -> int:
        return self._srv.port

    @property
    def state(self) -> EmulatorState:
        return self.app.state.emulator

    @property
    def base_url(self) -> str:
        """OpenAI base URL (ends in /v1)."""
        return f"{self._srv.url}/v1"

    def start(self, timeout: float = 10.0) -> "EmulatorServer":
        self._srv.start(timeout)
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
        if self._srv.thread is not None and loop is not None and loop.is_running():
            async def _end() -> None:  # open streams would otherwise hold uvicorn's graceful shutdown
                self.state.clock.fail_all("emulator stopped")

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_end(), loop).result(timeout=5)
        self._srv.stop(timeout)

    def __enter__(self) -> "EmulatorServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_emulator(**kwargs: Any) -> Iterator[str]:
    """Start an emulator on a free 127.0.0.1 port for the block; yields its OpenAI base URL (…/v1)."""
    with EmulatorServer(**kwargs) as srv:
        yield srv.base_url
