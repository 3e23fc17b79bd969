"""Congestion per model, measured as in-flight *predicted* tokens (queued + running), as in the paper, and the calls
the engines report beyond this scheduler's own."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chimera.sched.types import Call


class LoadMonitor:
    """Tracks predicted tokens still owed by each model; decremented as real tokens stream back."""

    def __init__(self, models: list[str]) -> None:
        self.pred_tokens: dict[str, float] = {m: 0.0 for m in models}
        self.calls: dict[str, int] = {m: 0 for m in models}
        # Calls on the model's engines that this scheduler did not send (other clients, calls it gave up on that the
        # engine still runs), as the engines last reported them; the gateway sets it from scraped gauges, the
        # simulator leaves it at zero (it is every engine's only client).
        self.external: dict[str, float] = {m: 0.0 for m in models}
        # Calls and predicted tokens other gateway replicas hold on the model (queued + running), as they last
        # published them (serve/shared/); zero for one gateway and for the simulator.
        self.remote_calls: dict[str, float] = {m: 0.0 for m in models}
        self.remote_tokens: dict[str, float] = {m: 0.0 for m in models}
        self._owed: dict[int, float] = {}
        self._on: dict[str, dict[int, Call]] = {m: {} for m in models}  # model -> its calls (queued or running)

    def add(self, call: Call) -> None:
        m = call.model
        assert m is not None
        self.pred_tokens[m] += call.pred_call_tokens
        self.calls[m] += 1
        self._owed[call.call_id] = call.pred_call_tokens
        self._on[m][call.call_id] = call

    def inflight_tokens(self, names: Sequence[str], inflight: np.ndarray, typical_tokens: np.ndarray) -> np.ndarray:
        """Per model of `names`: the in-flight predicted tokens of our calls (`inflight`, as the caller reckons them)
        plus those of the calls the engines run beyond ours (`external`), each as long as our mean call on that
        model, or `typical_tokens` where none of ours is in flight, plus the other gateway replicas' own."""
        out = inflight
        if any(self.external.values()):
            calls = np.array([self.calls[n] for n in names], dtype=float)
            per_call = np.where(calls > 0, inflight / np.maximum(calls, 1.0), typical_tokens)
            out = out + np.array([self.external[n] for n in names], dtype=float) * per_call
        if any(self.remote_tokens.values()):
            out = out + np.array([self.remote_tokens[n] for n in names], dtype=float)
        return out

    def inflight_calls(self, names: Sequence[str]) -> np.ndarray:
        """Per model of `names`: calls in flight, ours (queued or running), those the engines run beyond ours and
        the other gateway replicas'."""
        calls = np.array([self.calls[n] for n in names], dtype=float)
        if any(self.external.values()):
            calls = calls + np.array([self.external[n] for n in names], dtype=float)
        if any(self.remote_calls.values()):
            calls = calls + np.array([self.remote_calls[n] for n in names], dtype=float)
        return calls

    def owed_and_elapsed(self, model: str, now: float) -> tuple[np.ndarray, np.ndarray]:
        """Per call of `model`: predicted tokens still owed, and seconds since it was dispatched (0 while queued)."""
        on = self._on[model]
        owed = np.fromiter((self._owed[c] for c in on), float, len(on))
        elapsed = np.fromiter((0.0 if c.dispatched_s is None else max(0.0, now - c.dispatched_s)
                               for c in on.values()), float, len(on))
        return owed, elapsed

    def progress(self, call: Call, new_tokens: int) -> None:
        """Tokens streamed back reduce what the model still owes (never below zero)."""
        owed = self._owed.get(call.call_id)
        if owed is None or new_tokens <= 0:
            return
        dec = min(owed, float(new_tokens))
        self._owed[call.call_id] = owed - dec
        self.pred_tokens[call.model] -= dec  # type: ignore[index]

    def remove(self, call: Call) -> None:
        owed = self._owed.pop(call.call_id, None)
        if owed is None:
            return
        m = call.model
        self._on[m].pop(call.call_id, None)  # type: ignore[index]
        self.pred_tokens[m] = max(0.0, self.pred_tokens[m] - owed)  # type: ignore[index]
        self.calls[m] -= 1  # type: ignore[index]
