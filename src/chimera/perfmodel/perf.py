"""Step time of one vLLM-like replica: a roofline over weights, GEMM FLOPs and KV reads, calibrated in docs/perfmodel.md.

    t = fixed + smoothmax(weights / BW_eff, FLOPs / (peak × MFU)) + KV bytes read / BW_eff + all-reduce

`smoothmax(a, b) = sqrt(a² + b²)` instead of max(a, b): decode GEMMs at 64–256 tokens sit near the ridge point,
where real kernels are slower than either bound (the published A6000 curve bends too early for a hard max).
Per GPU of a tensor-parallel group, weights, FLOPs and KV are divided by tp; the loss is two all-reduces per layer.

A spec with a `fitted` block (FittedModelSpec, from `chimera profile`) uses measured coefficients in the same form
instead of the roofline: t = fixed + hypot(weights, per_token × N) + per_seq × n_decode^e + per_context_token × C.
"""

from __future__ import annotations

import math

from chimera.perfmodel.profiles import ModelSpec


class StepTimeModel:
    """Seconds per continuous-batching step; constants are precomputed so `step_time` is a few float operations."""

    __slots__ = (
        "spec", "kv_bytes_per_token", "weight_bytes", "kv_capacity_tokens", "max_num_seqs", "max_num_batched_tokens",
        "_t_fixed", "_t_weights", "_t_flop_tok", "_t_kv_tok", "_t_ar_tok", "_moe_miss", "_t_seq", "_seq_exp", "fitted",
    )

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._t_seq = 0.0  # per decoding sequence per step: 0 in the roofline, fitted for measured servers
        self._seq_exp = 1.0
        self.fitted = getattr(spec, "fitted", None)
        if self.fitted is not None:
            self._init_fitted(spec)
            return
        g = spec.gpu_spec
        tp = spec.tp
        self.kv_bytes_per_token: int = spec.kv_bytes_per_token
        self.weight_bytes: float = spec.weight_bytes
        self.kv_capacity_tokens: int = spec.kv_capacity_tokens
        self.max_num_seqs: int = spec.max_num_seqs
        self.max_num_batched_tokens: int = spec.max_num_batched_tokens
        bw, flops = g.bw_bytes_s, g.flops_s
        self._t_weights = spec.weight_bytes / tp / bw  # stream this GPU's weight shard once
        self._t_flop_tok = 2.0 * spec.active_params / tp / flops  # linear-layer FLOPs of one token
        self._t_kv_tok = spec.kv_stored_bytes_per_token / tp / bw  # read one context token's K and V
        fixed = g.step_overhead_s + spec.layers * g.layer_overhead_s
        ar_tok = 0.0
        if tp > 1:  # two ring all-reduces of the hidden state per layer (attention out, MLP out)
            fixed += 2 * spec.layers * g.allreduce_latency_s
            ar_tok = 2 * spec.layers * spec.hidden_size * spec.dtype_bytes * 2 * (tp - 1) / tp / (g.link_bw_gbs * 1e9)
        self._t_fixed = fixed
        self._t_ar_tok = ar_tok
        # MoE: a token reads a fraction a = active/total of the weights; n tokens read 1 − (1 − a)^n of them.
        a = spec.active_params / (spec.params_b * 1e9)
        self._moe_miss = 1.0 - a if a < 1.0 else 0.0

    def _init_fitted(self, spec: ModelSpec) -> None:
        f = self.fitted
        self.kv_bytes_per_token = spec.kv_bytes_per_token  # 0 when the profile names no architecture
        self.weight_bytes = spec.weight_bytes
        self.kv_capacity_tokens = int(f.kv_capacity_tokens)
        self.max_num_seqs = spec.max_num_seqs
        self.max_num_batched_tokens = spec.max_num_batched_tokens
        self._t_fixed = f.fixed_s
        self._t_weights = f.weights_s
        self._t_flop_tok = f.per_token_s
        self._t_kv_tok = f.per_context_token_s
        self._t_ar_tok = 0.0
        self._moe_miss = 0.0
        self._t_seq = f.per_seq_s
        self._seq_exp = f.per_seq_exponent

    def step_time(self, n_decode: int, decode_context_tokens: int, prefill_tokens: int) -> float:
        """One step: n_decode sequences emit a token (KV contexts summing to decode_context_tokens) + prefill_tokens."""
        n = n_decode + prefill_tokens
        if n <= 0:
            return 0.0
        t_w = self._t_weights
        if self._moe_miss:
            t_w *= 1.0 - self._moe_miss**n
        t = (
            self._t_fixed
            + math.hypot(t_w, self._t_flop_tok * n)
            + self._t_kv_tok * decode_context_tokens
            + self._t_ar_tok * n
        )
        if self._t_seq:  # fitted profiles only
            t += self._t_seq * n_decode**self._seq_exp
        return t

    def decode_tpot(self, concurrency: int, context_tokens_per_seq: float) -> float:
        """Time per output token with `concurrency` sequences decoding together at the given context each."""
        return self.step_time(concurrency, concurrency * context_tokens_per_seq, 0)

    def prefill_time(self, tokens: int) -> float:
        """Time to prefill `tokens` prompt tokens alone, in chunks of max_num_batched_tokens (one step per chunk)."""
        full, rest = divmod(int(tokens), self.max_num_batched_tokens)
        t = full * self.step_time(0, 0, self.max_num_batched_tokens) if full else 0.0
        return t + (self.step_time(0, 0, rest) if rest else 0.0)

    def __repr__(self) -> str:
        s = self.spec
        if self.fitted is not None:
            return (f"StepTimeModel({s.name}@{s.gpu} fitted: room {self.kv_capacity_tokens} tokens, "
                    f"batch-1 TPOT {self.decode_tpot(1, 1024) * 1e3:.2f} ms)")
        return (
            f"StepTimeModel({s.name}@{s.gpu} tp={s.tp}: weights {self.weight_bytes / 1e9:.1f} GB, "
            f"KV {self.kv_bytes_per_token // 1024} KiB/token, room {self.kv_capacity_tokens} tokens, "
            f"batch-1 TPOT {self.decode_tpot(1, 1024) * 1e3:.1f} ms)"
        )
