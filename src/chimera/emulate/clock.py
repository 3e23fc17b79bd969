"""Real-time asyncio driver around one `Engine`: virtual time = (loop time − start) × time_scale.

The engine has no clock; this driver sleeps until its next event (in real time), advances it, and tells each
waiting request how many tokens it has so far. Requests `submit` at the current virtual time and wake the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from typing import Callable

from chimera.perfmodel.batching import DECODE, DONE, PREFILL, WAITING, Engine, Seq


class Handle:
    """One request's view of its sequence: token count so far, done/error flags and a change signal."""

    __slots__ = ("seq", "generated", "done", "error", "changed", "submitted_real", "first_token_real")

    def __init__(self, seq: Seq) -> None:
        self.seq = seq
        self.generated = 0
        self.done = False
        self.error: str | None = None
        self.changed = asyncio.Event()
        self.submitted_real = 0.0
        self.first_token_real: float | None = None

    async def wait_change(self) -> None:
        """Wait until the token count, done flag or error changes (returns at once if it already did)."""
        await self.changed.wait()
        self.changed.clear()


def cancel_seq(engine: Engine, seq: Seq, now: float) -> None:
    """Take a sequence out of `engine` at virtual time `now` (caught up), discarding its output.

    Engine has no cancel: this edits its queues the way its own preemption does. Approximation: a cancelled
    sequence's share of the current step is still paid (the step time was fixed when the segment was planned);
    a decode segment is cut at the next step boundary so freed room is reused promptly.
    """
    if seq.state == DONE:
        return
    if seq.state == WAITING:
        engine.waiting = [item for item in engine.waiting if item[2] is not seq]
        heapq.heapify(engine.waiting)
    elif seq.state == PREFILL:
        engine.prefilling.remove(seq)
        engine.kv_prefill -= seq.kv_prompt
        if engine._seg_chunks is not None:
            engine._seg_chunks = [(s, c) for s, c in engine._seg_chunks if s is not seq]
    elif seq.state == DECODE:
        engine._stop_decode(seq)  # leaves a stale done-heap entry, which the engine skips
    seq.state, seq.error, seq.end_s = DONE, "cancelled", now
    if engine._seg_chunks is None and engine.next_event_time() != math.inf and now >= engine.t:
        engine._truncate(now)


class EngineClock:
    """Drives `engine` in real time on the running asyncio loop; start lazily from inside the loop."""

    def __init__(self, engine: Engine, time_scale: float = 1.0,
                 on_tokens: Callable[[int], None] | None = None) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.engine = engine
        self.time_scale = float(time_scale)
        self.on_tokens = on_tokens  # called with each batch of newly generated tokens (for counters)
        self.active: dict[int, Handle] = {}  # id(seq) -> handle: the requests the engine holds (running + waiting)
        self.peak = 0  # the most requests it ever held at once (since start or `reset_peak`)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._waiter: asyncio.Future | None = None  # the driver's current sleep; _kick resolves it
        self._task: asyncio.Task | None = None

    # ---- time ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running loop and start the driver task (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._task = self._loop.create_task(self._run(), name="chimera-emulator-clock")

    async def stop(self) -> None:
        """Stop the driver and fail what is still in flight."""
        self.fail_all("emulator stopped")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def now(self) -> float:
        """Current virtual time (engine seconds)."""
        assert self._loop is not None, "EngineClock.start() first"
        return (self._loop.time() - self._t0) * self.time_scale

    def real_at(self, virtual: float) -> float:
        """Loop time at which virtual time `virtual` is reached."""
        return self._t0 + virtual / self.time_scale

    # ---- requests ------------------------------------------------------------------------------------------
    def submit(self, seq: Seq) -> Handle:
        """Add `seq` at the current virtual time; the handle reports its progress."""
        self.start()
        now = self.now()
        self._catch_up(now)
        h = Handle(seq)
        h.submitted_real = self._loop.time()  # type: ignore[union-attr]
        self.active[id(seq)] = h
        seq.call = h
        rejected = self.engine.add(seq, now)
        self._publish(rejected)
        self.peak = max(self.peak, len(self.active))
        self._kick()
        return h

    def reset_peak(self) -> int:
        """Start counting the peak again from what is held now; the peak until then."""
        before, self.peak = self.peak, len(self.active)
        return before

    def cancel(self, h: Handle) -> None:
        """Client went away: drop its sequence from the engine (no-op when already finished)."""
        if self.active.pop(id(h.seq), None) is None:
            return
        now = self.now()
        self._catch_up(now)
        cancel_seq(self.engine, h.seq, now)
        h.done, h.error = True, h.error or "cancelled"
        h.changed.set()
        self._kick()

    def fail_all(self, reason: str) -> None:
        """Fail every in-flight request (fault injection, shutdown) and drop it from the engine."""
        now = self.now() if self._loop is not None else 0.0
        for h in list(self.active.values()):
            with contextlib.suppress(Exception):
                cancel_seq(self.engine, h.seq, max(now, self.engine.t))
            h.done, h.error = True, reason
            h.changed.set()
        self.active.clear()

    # ---- driver --------------------------------------------------------------------------------------------
    def _kick(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _catch_up(self, now: float) -> None:
        """Advance the engine through every event at or before virtual time `now`."""
        eng = self.engine
        changed = False
        while eng.next_event_time() <= now:
            self._publish(eng.advance(), progress=False)
            changed = True
        if changed:
            self._publish([])

    def _publish(self, finished: list[Seq], progress: bool = True) -> None:
        """Mark finished sequences done and, with `progress`, push token counts to every active handle."""
        loop_t = self._loop.time() if self._loop is not None else 0.0
        new_tokens = 0
        for seq in finished:
            h = self.active.pop(id(seq), None)
            if h is None:
                continue
            g = seq.generated if seq.error is None else h.generated
            new_tokens += max(0, g - h.generated)
            h.generated, h.done, h.error = g, True, seq.error
            if h.first_token_real is None and g > 0:
                h.first_token_real = loop_t
            h.changed.set()
        if progress:
            eng = self.engine
            for h in self.active.values():
                g = eng.generated(h.seq)
                if g > h.generated:
                    new_tokens += g - h.generated
                    h.generated = g
                    if h.first_token_real is None:
                        h.first_token_real = loop_t
                    h.changed.set()
        if new_tokens and self.on_tokens is not None:
            self.on_tokens(new_tokens)

    async def _run(self) -> None:
        # A plain future + call_at rather than wait_for(event.wait()): Python 3.11's wait_for can swallow a
        # cancellation that races with the event being set, which would hang shutdown.
        assert self._loop is not None
        loop = self._loop
        while True:
            self._catch_up(self.now())
            t_next = self.engine.next_event_time()
            if t_next != math.inf and self.real_at(t_next) <= loop.time():
                await asyncio.sleep(0)
                continue
            fut = self._waiter = loop.create_future()
            timer = None if t_next == math.inf else loop.call_at(self.real_at(t_next), _resolve, fut)
            try:
                await fut
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
