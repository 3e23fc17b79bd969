"""Block-granular prefix caching of one engine replica (vLLM's automatic prefix caching), pure bookkeeping.

A sequence describes its token stream as segments `((identity, tokens), ...)`: two streams hold the same tokens up
to position p exactly when they agree on every segment before the one containing p-1 and on that segment's identity
(a segment's identity names its content, so a shorter segment with the same identity is a prefix of a longer one).
Block j (tokens [j·B, (j+1)·B)) is keyed by the stream up to its end; only whole blocks are keys, so a partial last
block is never reused. Tokens past the described segments are unique to the sequence (never shared).

Blocks are referenced by the running sequences that hold them (they already count in the engine's KV use; a block
referenced by k sequences is stored once, so k-1 copies are `shared` and the engine subtracts them). A block nobody
references stays cached in free memory, in LRU order (tail blocks of a sequence first, as vLLM frees them), until
the engine needs the room: `trim(free)` evicts the least recently freed. Cached free blocks never block admission.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

Segments = Sequence[tuple[Hashable, int]]


def block_keys(segments: Segments, n_blocks: int, block: int) -> list[int]:
    """Keys of the first `n_blocks` whole blocks of the stream (fewer if the segments end before): 64-bit hashes
    of (stream before the block's segment, segment identity, offset of the block's end in it), as vLLM keys
    blocks by a hash of their tokens and their prefix."""
    keys: list[int] = []
    h = 0  # chained hash of the segments before the current one
    start = 0  # stream position where the current segment starts
    p = block  # end of the next block
    for sid, n in segments:
        if n <= 0:
            continue
        end = start + n
        if p <= end:
            hs = hash((h, sid))
            keys.extend([hash((hs, q - start)) for q in range(p, end + 1, block)])
            p += ((end - p) // block + 1) * block
            if len(keys) >= n_blocks:
                del keys[n_blocks:]
                break
        h = hash((h, sid, n))
        start = end
    return keys


class PrefixCache:
    """The cached blocks of one replica; token counts are whole blocks × `block` tokens."""

    __slots__ = ("block", "refs", "free", "shared", "queried_tokens", "hit_tokens", "evicted_blocks")

    def __init__(self, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block = int(block_tokens)
        self.refs: dict[int, int] = {}  # referenced blocks -> number of running sequences holding them
        self.free: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, least recent first
        self.shared = 0  # tokens of referenced blocks beyond their first holder (stored once, counted k times)
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.evicted_blocks = 0

    @property
    def free_tokens(self) -> int:
        return len(self.free) * self.block

    def cached_blocks(self, keys: Sequence[int], tokens: int) -> int:
        """How many leading blocks a prefill of `tokens` would hit now (a query: nothing changes, nothing counted)."""
        refs, free = self.refs, self.free
        n, limit = 0, min(len(keys), (tokens - 1) // self.block)
        while n < limit and (keys[n] in refs or keys[n] in free):
            n += 1
        return n

    def admit(self, keys: Sequence[int], tokens: int) -> int:
        """A sequence with `tokens` to compute starts prefill: reference its longest cached run of leading blocks
        (at most (tokens-1)//B blocks: at least one token is computed, as vLLM does) and return the hit tokens."""
        self.queried_tokens += tokens
        refs, free = self.refs, self.free
        n = 0
        limit = min(len(keys), (tokens - 1) // self.block)
        while n < limit:
            key = keys[n]
            r = refs.get(key)
            if r is not None:
                refs[key] = r + 1
                self.shared += self.block
            elif key in free:
                del free[key]
                refs[key] = 1
            else:
                break
            n += 1
        self.hit_tokens += n * self.block
        return n

    def hold(self, keys: Sequence[int], held: int, upto: int) -> int:
        """Blocks `held..upto-1` of a running sequence were computed: cache them (a block another sequence already
        cached is shared instead). Returns the new number of held leading blocks."""
        refs, free = self.refs, self.free
        upto = min(upto, len(keys))
        for key in keys[held:upto]:
            r = refs.get(key)
            if r is None:
                if key in free:
                    del free[key]
                refs[key] = 1
            else:
                refs[key] = r + 1
                self.shared += self.block
        return max(held, upto)

    def release(self, keys: Sequence[int], held: int, computed_blocks: int) -> None:
        """A sequence leaves the KV cache (finished or preempted): its held blocks and the whole blocks it computed
        since become free cached blocks, the tail ones first in line for eviction."""
        refs, free = self.refs, self.free
        top = min(computed_blocks, len(keys))
        for i in range(top - 1, held - 1, -1):  # computed after the last hold: cached unless already
            key = keys[i]
            if key not in refs and key not in free:
                free[key] = None
        for key in reversed(keys[:min(held, top)]):
            n = refs[key]
            if n > 1:
                refs[key] = n - 1
                self.shared -= self.block
            else:
                del refs[key]
                free[key] = None

    def trim(self, room_tokens: int) -> None:
        """Evict least-recently-freed blocks until the free cached blocks fit in `room_tokens` of free KV."""
        free = self.free
        over = len(free) - max(0, room_tokens) // self.block
        if over > 0:
            for _ in range(over):
                free.popitem(last=False)
            self.evicted_blocks += over

    def stats(self) -> dict:
        q, h = self.queried_tokens, self.hit_tokens
        return {"block_tokens": self.block, "queried_tokens": q, "hit_tokens": h,
                "hit_rate": round(h / q, 4) if q else 0.0, "evicted_blocks": self.evicted_blocks}
