"""Continuous batching of one vLLM-like backend, advanced event by event (no clock: time comes in as arguments).

The engine skips ahead between batch changes: while the running set is fixed, every running sequence gains one
token per step, so the next completion (or the step the KV cache fills) is known in closed form. A segment of
k identical steps costs O(log n), not O(k·n). Step times come from the roofline model in `engine.perf`.

With `prefix_block_tokens` > 0 the replica caches whole KV blocks of the prompts (and outputs) it has computed,
as vLLM's automatic prefix caching does (`engine.prefix`): a sequence that carries a `prefix` (its token stream as
segments) prefills only what follows its longest cached run of leading blocks. Unreferenced cached blocks sit in
free KV and are evicted LRU at the events where the engine's KV use peaks, so they never delay admission.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Callable, Protocol

from chimera.perfmodel.prefix import PrefixCache, Segments, block_keys

WAITING, PREFILL, DECODE, DONE = 0, 1, 2, 3


class StepModel(Protocol):
    """The slice of `engine.perf.StepTimeModel` the batching engine uses."""

    kv_capacity_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int

    def step_time(self, n_decode: int, decode_context_tokens: int, prefill_tokens: int) -> float: ...


class Seq:
    """One request inside an engine: prompt to prefill, then `output_tokens` decode steps."""

    __slots__ = (
        "call", "prompt_tokens", "output_tokens", "key", "no", "state", "generated", "kv_prompt",
        "prefill_left", "join_step", "done_step", "start_s", "first_token_s", "end_s", "preemptions",
        "last_run_step", "error", "swapped", "prefix", "keys", "held",
    )

    def __init__(self, call: Any, prompt_tokens: int, output_tokens: int, key: float = 0.0,
                 prefix: Segments | None = None, prefill_tokens: int | None = None) -> None:
        self.call = call
        self.prompt_tokens = int(prompt_tokens)
        self.output_tokens = max(1, int(output_tokens))
        self.key = key
        self.no = 0
        self.state = WAITING
        self.generated = 0
        self.kv_prompt = self.prompt_tokens  # tokens to (re)compute before decoding resumes
        # fewer than the prompt only in a what-if where part of it is taken as cached (a preemption recomputes all)
        self.prefill_left = self.prompt_tokens if prefill_tokens is None else max(1, min(self.prompt_tokens,
                                                                                         int(prefill_tokens)))
        self.join_step = 0
        self.done_step = 0
        self.start_s: float | None = None
        self.first_token_s: float | None = None
        self.end_s: float | None = None
        self.preemptions = 0
        self.last_run_step = 0
        self.error: str | None = None
        self.swapped = False
        self.prefix = prefix  # token stream (prompt, then output) as (identity, tokens) segments, for prefix caching
        self.keys: list[int] | None = None  # block keys of the stream, computed on first admission
        self.held = 0  # leading blocks this sequence references in the prefix cache


KeyFn = Callable[[Seq, int, int, float], float]  # (seq, generated, waited_steps, now) -> rank, lower runs first


class Engine:
    """A single replica. Non-preemptive (vLLM FCFS/priority) unless `key_fn` is given (LTR/MLFQ-style)."""

    def __init__(
        self,
        name: str,
        perf: StepModel,
        key_fn: KeyFn | None = None,
        tick_steps: int = 16,
        max_segment_steps: int = 512,
        kv_watermark: float = 0.01,
        prefix_block_tokens: int = 0,
    ) -> None:
        self.name = name
        self.perf = perf
        self.key_fn = key_fn
        self.tick_steps = tick_steps
        self.max_segment_steps = max_segment_steps
        self.cap = int(perf.kv_capacity_tokens)
        self.admit_cap = int(self.cap * (1.0 - kv_watermark))
        self.max_seqs = int(perf.max_num_seqs)
        self.budget = int(perf.max_num_batched_tokens)
        self._no = itertools.count()
        self.waiting: list[tuple[float, int, Seq]] = []  # heap by (key, arrival no)
        self.prefilling: list[Seq] = []
        self.decoding: dict[int, Seq] = {}
        self._done_heap: list[tuple[int, int, Seq]] = []
        self.S = 0  # decode steps taken so far
        self.kv_base = 0  # sum over decoders of kv_prompt + generated_at_join - join_step
        self.kv_prefill = 0
        self.t = 0.0
        self._seg_end = math.inf
        self._seg_k = 0
        self._seg_tau = 0.0
        self._seg_chunks: list[tuple[Seq, int]] | None = None
        self.slowdown = 1.0  # step-time factor from outside the engine (CPU shared with busy peers)
        self.prefix_cache = PrefixCache(prefix_block_tokens) if prefix_block_tokens > 0 else None
        # statistics
        self.preemptions = 0
        self.tokens_out = 0
        self.busy_s = 0.0
        self.steps = 0

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def n_running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def kv_used(self) -> int:
        used = self.kv_base + len(self.decoding) * self.S + self.kv_prefill
        return used if self.prefix_cache is None else used - self.prefix_cache.shared

    def next_event_time(self) -> float:
        return self._seg_end

    def set_slowdown(self, factor: float, now: float) -> None:
        """Steps from the next step boundary at or after `now` take `factor` × their model time (the step under
        way finishes at the old speed); the caller re-reads `next_event_time()`."""
        if factor == self.slowdown:
            return
        self.slowdown = factor
        if self._seg_end < math.inf and self._seg_chunks is None:
            self._truncate(now)

    def generated(self, seq: Seq) -> int:
        if seq.state == DECODE:
            return seq.generated + (self.S - seq.join_step)
        return seq.generated

    # ---- inputs ----------------------------------------------------------------------------------------------
    def add(self, seq: Seq, now: float) -> list[Seq]:
        """Queue a sequence at `now`; returns sequences that finished on the way (none unless rejected)."""
        seq.no = next(self._no)
        seq.last_run_step = self.S
        if seq.prompt_tokens + 1 > self.admit_cap:
            seq.state, seq.error, seq.end_s = DONE, (
                f"prompt of {seq.prompt_tokens} tokens exceeds the KV cache of {self.name} ({self.cap} tokens)"), now
            return [seq]
        heapq.heappush(self.waiting, (seq.key, seq.no, seq))
        if self._seg_end == math.inf or now <= self.t:  # idle, or the segment starts now: plan afresh
            return self._plan(max(now, self.t))
        if self._seg_chunks is None and (self.key_fn is not None or self._can_admit_now()):
            self._truncate(now)
        return []

    def _can_admit_now(self) -> bool:
        if self.n_running >= self.max_seqs:
            return False
        head = self.waiting[0][2]
        return self.kv_used() + head.prefill_left + 1 <= self.admit_cap

    def _truncate(self, now: float) -> None:
        """Stop the current decode segment at the first step boundary at or after `now`."""
        if self._seg_tau <= 0:
            return
        j = math.ceil((now - self.t) / self._seg_tau - 1e-9)
        if j < self._seg_k:
            self._seg_k = max(0, j)
            self._seg_end = self.t + self._seg_k * self._seg_tau

    # ---- time passing ----------------------------------------------------------------------------------------
    def advance(self) -> list[Seq]:
        """Finish the current segment (at `next_event_time()`); returns the sequences completed at that time."""
        end = self._seg_end
        if end == math.inf:
            return []
        k, tau = self._seg_k, self._seg_tau
        finished: list[Seq] = []
        self.busy_s += k * tau
        self.steps += k
        if self.prefix_cache is not None:  # KV use peaks at the segment's end: evict cached blocks it needed
            self.prefix_cache.trim(self.cap - self.kv_used() - len(self.decoding) * k)
        if self._seg_chunks is not None:
            self.S += k
            self._pop_done(end, finished)
            for seq, chunk in self._seg_chunks:
                seq.prefill_left -= chunk
                if seq.prefill_left == 0:
                    self._finish_prefill(seq, end, finished)
        elif k:
            self.S += k
            self._pop_done(end, finished)
        return finished + self._plan(end)

    def _pop_done(self, now: float, finished: list[Seq]) -> None:
        heap = self._done_heap
        while heap and heap[0][0] <= self.S:
            step, no, seq = heapq.heappop(heap)
            if seq.state != DECODE or seq.done_step != step or self.decoding.get(no) is not seq:
                continue  # stale entry of a preempted sequence
            del self.decoding[no]
            self.kv_base -= seq.kv_prompt + seq.generated - seq.join_step
            seq.generated = seq.output_tokens
            self.tokens_out += seq.output_tokens
            seq.state, seq.end_s = DONE, now
            if self.prefix_cache is not None:
                self._release_blocks(seq, seq.prompt_tokens + seq.output_tokens - 1)
            finished.append(seq)

    def _finish_prefill(self, seq: Seq, now: float, finished: list[Seq]) -> None:
        self.prefilling.remove(seq)
        self.kv_prefill -= seq.kv_prompt
        pc = self.prefix_cache
        if pc is not None and seq.keys:
            seq.held = pc.hold(seq.keys, seq.held, seq.kv_prompt // pc.block)
        seq.generated += 1  # the step that completes the prefill also samples a token
        if seq.first_token_s is None:
            seq.first_token_s = now
        if seq.generated >= seq.output_tokens:
            self.tokens_out += seq.output_tokens
            seq.state, seq.end_s = DONE, now
            if pc is not None:
                self._release_blocks(seq, seq.kv_prompt)
            finished.append(seq)
            return
        self._start_decode(seq)

    def _start_decode(self, seq: Seq) -> None:
        seq.state = DECODE
        seq.join_step = self.S
        seq.done_step = self.S + seq.output_tokens - seq.generated
        self.decoding[seq.no] = seq
        self.kv_base += seq.kv_prompt + seq.generated - self.S
        heapq.heappush(self._done_heap, (seq.done_step, seq.no, seq))

    def _stop_decode(self, seq: Seq) -> None:
        """Take a decoding sequence out of the batch, keeping the tokens it produced."""
        del self.decoding[seq.no]
        self.kv_base -= seq.kv_prompt + seq.generated - seq.join_step
        seq.generated += self.S - seq.join_step
        seq.last_run_step = self.S
        seq.state = WAITING
        if self.prefix_cache is not None:
            self._release_blocks(seq, seq.prompt_tokens + seq.generated - 1)

    # ---- prefix cache ----------------------------------------------------------------------------------------
    def _release_blocks(self, seq: Seq, computed_tokens: int) -> None:
        """`seq` leaves the KV cache having computed `computed_tokens` of its stream: its blocks stay cached."""
        pc = self.prefix_cache
        assert pc is not None
        if seq.keys:
            pc.release(seq.keys, seq.held, computed_tokens // pc.block)
        seq.held = 0

    def _take_blocks(self, seq: Seq) -> None:
        """`seq` enters the KV cache: a prefill skips its cached leading blocks; a swapped-in sequence holds its own."""
        pc = self.prefix_cache
        assert pc is not None
        if seq.prefix is None:
            return
        if seq.keys is None:
            seq.keys = block_keys(seq.prefix, 1 << 62, pc.block)
        if seq.prefill_left > 0:
            n = pc.admit(seq.keys, seq.kv_prompt)
            seq.held = n
            seq.prefill_left -= n * pc.block
        else:
            seq.held = pc.hold(seq.keys, 0, (seq.prompt_tokens + seq.generated - 1) // pc.block)

    def cached_prompt_tokens(self, prefix: Segments, prompt_tokens: int) -> int:
        """Prompt tokens a call with this stream would find cached here now (0 when caching is off): what staying
        on this replica saves in prefill."""
        pc = self.prefix_cache
        if pc is None or prompt_tokens < 2:
            return 0
        n = (prompt_tokens - 1) // pc.block
        return pc.cached_blocks(block_keys(prefix, n, pc.block), prompt_tokens) * pc.block

    def prefix_stats(self) -> dict:
        """Prefix-cache counters for a summary ({} when caching is off)."""
        return {} if self.prefix_cache is None else {"prefix_cache": self.prefix_cache.stats()}

    # ---- scheduling ------------------------------------------------------------------------------------------
    def _preempt_one(self) -> None:
        """KV cache full: recompute-preempt the lowest-priority (then newest) running sequence, as vLLM does."""
        victim = max(self.decoding.values(), key=lambda s: (s.key, s.no))
        self._stop_decode(victim)
        victim.kv_prompt = victim.prompt_tokens + victim.generated
        victim.prefill_left = victim.kv_prompt
        victim.preemptions += 1
        self.preemptions += 1
        heapq.heappush(self.waiting, (victim.key, victim.no, victim))

    def _admit(self, seq: Seq, now: float) -> None:
        if seq.start_s is None:
            seq.start_s = now
        seq.last_run_step = self.S
        if self.prefix_cache is not None:
            self._take_blocks(seq)
        if seq.prefill_left > 0:
            seq.state = PREFILL
            self.prefilling.append(seq)
            self.kv_prefill += seq.kv_prompt
        else:  # swapped back in with its KV intact
            self._start_decode(seq)

    def _admit_fifo(self, now: float) -> None:
        while self.waiting and self.n_running < self.max_seqs:
            seq = self.waiting[0][2]
            if self.kv_used() + seq.prefill_left + 1 > self.admit_cap:
                break
            heapq.heappop(self.waiting)
            self._admit(seq, now)

    def _rerank(self, now: float) -> None:
        """Preemptive engines: keep the best-ranked sequences running, swap the rest out (swap cost ignored)."""
        assert self.key_fn is not None
        cands = [s for _, _, s in self.waiting] + list(self.decoding.values())
        waited = lambda s: self.S - s.last_run_step if s.state == WAITING else 0  # noqa: E731
        ranked = sorted(cands, key=lambda s: (self.key_fn(s, self.generated(s), waited(s), now), s.no))
        room = self.admit_cap - self.kv_prefill
        slots = self.max_seqs - len(self.prefilling)
        keep: set[int] = set()
        for s in ranked:
            need = (s.kv_prompt + self.generated(s)) if s.prefill_left == 0 else s.prefill_left + 1
            if slots <= 0:
                break
            if need <= room:
                keep.add(s.no)
                room -= need
                slots -= 1
        for s in list(self.decoding.values()):
            if s.no not in keep:
                self._stop_decode(s)
                s.swapped = True
                heapq.heappush(self.waiting, (s.key, s.no, s))
        rest = []
        for item in self.waiting:
            s = item[2]
            if s.no in keep:
                self._admit(s, now)
            else:
                rest.append(item)
        heapq.heapify(rest)
        self.waiting = rest

    def _plan(self, now: float) -> list[Seq]:
        """Choose the next segment starting at `now`."""
        self.t = now
        self._seg_chunks = None
        if self.key_fn is not None and (self.waiting or self.decoding):
            self._rerank(now)
        else:
            self._admit_fifo(now)
        n_dec = len(self.decoding)
        if self.prefilling:
            budget = max(1, self.budget - n_dec)
            chunks: list[tuple[Seq, int]] = []
            for seq in self.prefilling:
                if budget <= 0:
                    break
                c = min(seq.prefill_left, budget)
                chunks.append((seq, c))
                budget -= c
            tokens = sum(c for _, c in chunks)
            ctx = self.kv_base + n_dec * self.S
            self._seg_chunks, self._seg_k = chunks, 1
            self._seg_tau = self.perf.step_time(n_dec, ctx, tokens) * self.slowdown
        elif n_dec:
            while True:
                room = self.cap - self.kv_used()
                if room >= n_dec or n_dec <= 1:
                    break
                self._preempt_one()
                n_dec = len(self.decoding)
            k = self._done_heap_min() - self.S
            k = max(1, min(k, max(1, room // max(1, n_dec)), self.max_segment_steps))
            if self.key_fn is not None:
                k = min(k, self.tick_steps)
            ctx_mid = self.kv_base + n_dec * self.S + n_dec * (k - 1) // 2
            self._seg_k, self._seg_tau = k, self.perf.step_time(n_dec, ctx_mid, 0) * self.slowdown
        else:
            self._seg_k, self._seg_tau, self._seg_end = 0, 0.0, math.inf
            return []
        if self.prefix_cache is not None:
            self.prefix_cache.trim(self.cap - self.kv_used())
        self._seg_end = now + self._seg_k * self._seg_tau
        return []

    def _done_heap_min(self) -> int:
        heap = self._done_heap
        while heap:
            step, no, seq = heap[0]
            if seq.state == DECODE and seq.done_step == step and self.decoding.get(no) is seq:
                return step
            heapq.heappop(heap)
        return self.S + 1  # pragma: no cover - only when decoding is empty
