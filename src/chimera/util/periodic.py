"""A coroutine function run every few seconds on the running event loop until stopped: the background loops of a
server (the gateway's health checks and live learners) without each writing its own task, cancel and error handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

log = logging.getLogger("chimera")
STOP_RETRY_S = 0.5  # how long stop() waits for the loop to end before it cancels it again


class Periodic:
    """`fn()` every `interval_s`, the first time after `first_after_s` (a number, or a function asked at start;
    default: one interval); an exception is logged on `logger` and the loop goes on. `start()` from inside the
    loop, `await stop()` cancels it and waits for it to end."""

    def __init__(self, fn: Callable[[], Awaitable[object]], interval_s: float, what: str,
                 first_after_s: float | Callable[[], float] | None = None, logger: logging.Logger = log) -> None:
        self.fn, self.interval_s, self.what, self.log = fn, interval_s, what, logger
        self.first_after_s = first_after_s
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end; a cancel that `fn` swallowed (Python 3.11's `asyncio.wait_for`,
        used inside redis-py, can return a result and drop a cancel that came at the same moment) is sent again."""
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=STOP_RETRY_S)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()

    async def _loop(self) -> None:
        first = self.first_after_s
        first = self.interval_s if first is None else first() if callable(first) else first
        if first > 0:
            await asyncio.sleep(first)
        while True:
            try:
                await self.fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad round end the loop
                self.log.exception("%s failed", self.what)
            await asyncio.sleep(self.interval_s)
