"""The background loop every server task runs on: it keeps going through errors and always stops when asked."""

from __future__ import annotations

import asyncio
import logging

from chimera.util.periodic import Periodic


def test_an_error_is_logged_and_the_loop_goes_on(caplog) -> None:
    calls = []

    async def fn() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("one bad round")

    async def scenario() -> None:
        p = Periodic(fn, 0.01, "test loop", first_after_s=0.0, logger=logging.getLogger("test.periodic"))
        p.start()
        await asyncio.sleep(0.1)
        await p.stop()
        assert not p.running

    with caplog.at_level(logging.ERROR, logger="test.periodic"):
        asyncio.run(scenario())
    assert len(calls) >= 3 and "test loop failed" in caplog.text


def test_stop_ends_a_loop_whose_round_swallowed_the_cancel() -> None:
    """A round that drops a cancel and returns (as Python 3.11's asyncio.wait_for inside redis-py can, when its inner
    work finishes as the cancel arrives) used to leave stop() waiting forever on a loop that went back to sleep."""
    entered = asyncio.Event()

    async def swallowing_round() -> None:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return  # the cancel is dropped: the round "completed"

    async def scenario() -> None:
        p = Periodic(swallowing_round, 5.0, "test loop", first_after_s=0.0)
        p.start()
        loop_task = p._task
        await entered.wait()
        stopping = asyncio.ensure_future(p.stop())
        done, _ = await asyncio.wait([stopping], timeout=3)
        assert stopping in done and loop_task.done()  # before: stop() still waiting, the loop asleep for 5 s

    asyncio.run(scenario())
