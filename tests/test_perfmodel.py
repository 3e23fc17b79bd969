"""Engine performance model: calibration against published vLLM measurements, memory figures, cluster loading.

Run `python tests/test_perfmodel.py` to print the calibration table (it is copied into docs/perfmodel.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from chimera.perfmodel.gpus import GPUS
from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import (
    ClusterConfig,
    ClusterError,
    ModelSpec,
    catalogue,
    default_cluster,
    load_cluster,
    profile,
)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15
KIB = 1024


def _model(key: str, **changes: object) -> StepTimeModel:
    """A catalogue profile, optionally on another GPU/config (re-validated)."""
    return StepTimeModel(ModelSpec(**{**profile(key).model_dump(), **changes}))


# ---- benchmark scenarios: how each published figure maps onto engine steps -----------------------------------
def closed_loop_tpot(m: StepTimeModel, c: int, prompt: int, out: float, uncached: float) -> float:
    """Median TPOT of a closed-loop sweep at concurrency c in steady state: c sequences decode at a mean context of
    prompt + out/2, and each of the other c−1 clients submits a new prompt (its non-prefix-cached part) every `out`
    steps, so the average step also prefills (c−1)·uncached/out tokens."""
    return m.step_time(c, round(c * (prompt + out / 2)), (c - 1) * uncached / out)


def batch1_tok_s(m: StepTimeModel, prompt: int, out: int) -> float:
    """Single-request decode rate at the mean context of a prompt + out generation."""
    return 1.0 / m.decode_tpot(1, prompt + out / 2)


def wave_tok_s(m: StepTimeModel, n: int, prompt: int, out_mean: float, out_max: int) -> float:
    """n requests sent at once: all prompts prefilled first, then decoding until the longest finishes. Output lengths
    uniform on [2·mean − max, max] (mean = published generated tokens / n, max = the request's max_tokens)."""
    lo = 2 * out_mean - out_max
    t = m.prefill_time(n * prompt)
    for s in range(1, out_max + 1):
        live = n * (1.0 if s <= lo else (out_max - s + 1) / (out_max - lo + 1))
        t += m.step_time(live, round(live * (prompt + s)), 0)
    return n * out_mean / t


def prefill_tok_s(m: StepTimeModel, tokens: int) -> float:
    return tokens / m.prefill_time(tokens)


LLAMA2_7B_H100 = StepTimeModel(  # meta-llama/Llama-2-7b-hf config.json: 32 layers, 32 heads (MHA), hidden 4096
    ModelSpec(name="llama-2-7b", gpu="h100", params_b=6.7384, layers=32, kv_heads=32, head_dim=128, hidden=4096)
)

A6000_SRC = ("ld-singh/ai-factory-ops-lab inference-benchmark-report: RTX A6000, vLLM 0.23, Qwen2.5-7B-Instruct, "
             "loadgen.py (one fixed chat prompt, ~52 output tokens, 512 requests per level)")
A6000_ASSUME = ("prompt 41 tok (Qwen template + default system prompt + the fixed question), mean output 52 → "
                "context 67/seq; prefix cache leaves 9 uncached prompt tokens per new request")
A100_SRC = "Qwen2.5 speed benchmark (qwen.readthedocs.io): A100 80GB, vLLM, batch 1, input 1 token, 2048 generated"
A100_ASSUME = "batch 1, mean context 1 + 2048/2 = 1025 tokens, no other requests"
H100_SRC = ("yobitelcomm/bench concurrency-sweep recipe: H100 80GB HBM3, vLLM 0.21, Llama-3.1-8B-Instruct, "
            "chatbot-short (built-in short questions, max_tokens 128, closed loop, litellm client)")
H100_ASSUME = ("prompt 46 tok (12-token question + Llama-3.1 template with default system header), mean output "
               "110 → context 101/seq; 30 uncached prompt tokens per new request")
H100_CLIENT_BOUND = (
    "client-bound, not engine-bound: throughput is flat from c=16 (1,384 tok/s) to c=64 (1,312 tok/s), so "
    "TPOT ≈ c / 1.35k tok/s — the single-process, thread-per-request litellm streaming client is the bottleneck. "
    "An H100 decoding 16–64 short sequences of an 8B model takes 6.5–7.5 ms per step."
)
A40_SRC = ("databasemart A40 vLLM benchmark: 50 requests at once, 100 input / max 600 output tokens; Qwen2.5-7B "
           "25,703 generated in 23.48 s; Qwen2.5-14B 25,213 in 47.58 s")
A40_ASSUME = ("5,000 prompt tokens prefilled first; output lengths uniform with the published mean (514 / 504) "
              "and max 600; A6000 constants (same GA102 silicon) with A40 datasheet bandwidth/FLOPS")
A40_SLOW = (
    "the published run decodes at 1.7–1.8× the weight-read floor for both sizes (≈38 ms/step for 7B, ≈77 ms for "
    "14B: an effective 55–58% of the A40's 696 GB/s), while the same GA102 engine on the A6000 reaches 0.93. The "
    "gap scales with bytes, so it is a setup effect (unknown vLLM version, ECC/clocks or a shared GPU); "
    "refitting bw_eff≈0.57 for the A40 would only fit this one benchmark."
)
PREFILL_SRC = "REFERENCE.md calibration figures (prefill of linear layers, one step)"


@dataclass(frozen=True)
class Point:
    """One published figure, the assumption that maps it onto engine steps, and the model's prediction."""

    name: str
    unit: str
    published: float
    predict: Callable[[], float]
    source: str
    assumption: str
    role: str  # "fit": the figure set some constant in gpus.py; "check": out of sample
    xfail: str | None = None

    @property
    def error(self) -> float:
        return self.predict() / self.published - 1.0


def _a6000_points() -> list[Point]:
    m = _model("qwen2.5-7b@a6000")
    return [
        Point(f"A6000 Qwen2.5-7B TPOT c={c}", "ms", pub,
              (lambda c=c: 1e3 * closed_loop_tpot(m, c, prompt=41, out=52, uncached=9)),
              A6000_SRC, A6000_ASSUME, "fit (3 constants / 5 points)")
        for c, pub in [(1, 21.9), (8, 22.3), (64, 27.5), (128, 36.0), (256, 53.1)]
    ]


def _a100_points() -> list[Point]:
    return [
        Point(f"A100 {name} batch-1", "tok/s", pub,
              (lambda key=key: batch1_tok_s(_model(key), prompt=1, out=2048)),
              A100_SRC, A100_ASSUME, "fit (2 constants / 3 points)")
        for name, key, pub in [("Qwen2.5-1.5B", "qwen2.5-1.5b@a100-80gb", 183.0),
                               ("Qwen2.5-7B", "qwen2.5-7b@a100-80gb", 84.3),
                               ("Qwen2.5-14B", "qwen2.5-14b@a100-80gb", 46.3)]
    ]


def _h100_points() -> list[Point]:
    m = _model("llama-3.1-8b@h100")
    pts = []
    for c, pub, role, why in [(1, 6.48, "fit (step overhead)", None), (4, 6.59, "check", None),
                              (16, 10.94, "check", H100_CLIENT_BOUND), (64, 46.91, "check", H100_CLIENT_BOUND)]:
        pts.append(Point(f"H100 Llama-3.1-8B TPOT c={c}", "ms", pub,
                         (lambda c=c: 1e3 * closed_loop_tpot(m, c, prompt=46, out=110, uncached=30)),
                         H100_SRC, H100_ASSUME, role, why))
    return pts


def _a40_points() -> list[Point]:
    return [
        Point(f"A40 {name} 50-concurrent output", "tok/s", pub,
              (lambda key=key, mean=mean: wave_tok_s(_model(key, gpu="a40"), n=50, prompt=100, out_mean=mean,
                                                     out_max=600)),
              A40_SRC, A40_ASSUME, "check", A40_SLOW)
        for name, key, pub, mean in [("Qwen2.5-7B", "qwen2.5-7b@a6000", 1094.54, 25703 / 50),
                                     ("Qwen2.5-14B", "qwen2.5-14b@a6000", 529.88, 25213 / 50)]
    ]


def _prefill_points() -> list[Point]:
    return [
        Point("A100 Llama-3-8B prefill", "tok/s", 14000,
              lambda: prefill_tok_s(_model("llama-3.1-8b@a100-80gb"), 8192),
              PREFILL_SRC, "one 8192-token chunk, no decode; attention FLOPs excluded like the figure", "fit (mfu)"),
        Point("H100 Llama-2-7B prefill", "tok/s", 50000, lambda: prefill_tok_s(LLAMA2_7B_H100, 8192),
              PREFILL_SRC, "one 8192-token chunk, no decode; attention FLOPs excluded like the figure", "fit (mfu)"),
    ]


POINTS = _a6000_points() + _a100_points() + _h100_points() + _a40_points() + _prefill_points()


@pytest.mark.parametrize(
    "point",
    [pytest.param(p, id=p.name, marks=[pytest.mark.xfail(strict=True, reason=p.xfail)] if p.xfail else [])
     for p in POINTS],
)
def test_calibration_point(point: Point) -> None:
    assert abs(point.error) <= TOLERANCE, f"{point.name}: predicted {point.predict():.2f} vs {point.published}"


# ---- memory figures ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,kib", [("qwen2.5-1.5b@a6000", 28), ("qwen2.5-7b@a6000", 56),
                                     ("qwen2.5-14b@a6000", 192), ("llama-3.1-8b@h100", 128)])
def test_kv_bytes_per_token_exact(key: str, kib: int) -> None:
    assert StepTimeModel(profile(key)).kv_bytes_per_token == kib * KIB


@pytest.mark.parametrize("key,tokens", [("qwen2.5-1.5b@a6000", 1_400_000), ("qwen2.5-7b@a6000", 506_000),
                                        ("qwen2.5-14b@a6000", 75_000)])
def test_kv_room_on_a6000(key: str, tokens: int) -> None:
    m = StepTimeModel(profile(key))
    assert m.spec.gpu_memory_utilization == 0.9
    assert abs(m.kv_capacity_tokens / tokens - 1) <= TOLERANCE


def test_weight_bytes_and_limits_exposed() -> None:
    m = StepTimeModel(profile("qwen2.5-7b@a6000"))
    assert m.weight_bytes == pytest.approx(15.23e9, rel=1e-3)
    assert (m.max_num_seqs, m.max_num_batched_tokens) == (256, 8192)


# ---- shape of the step-time model -------------------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(catalogue()))
def test_step_time_monotone(key: str) -> None:
    m = StepTimeModel(profile(key))
    batch = [m.step_time(b, b * 500, 0) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    ctx = [m.step_time(32, c, 0) for c in (0, 1_000, 10_000, 100_000, 400_000)]
    pre = [m.step_time(8, 8 * 500, p) for p in (0, 16, 256, 2048, 8192)]
    for series in (batch, ctx, pre):
        assert all(b > a for a, b in zip(series, series[1:])), series


def test_empty_step_and_prefill_chunking() -> None:
    m = StepTimeModel(profile("qwen2.5-7b@a6000"))
    assert m.step_time(0, 0, 0) == 0.0
    n = m.max_num_batched_tokens
    assert m.prefill_time(2 * n + 100) == pytest.approx(2 * m.step_time(0, 0, n) + m.step_time(0, 0, 100))
    assert m.decode_tpot(8, 1000) == m.step_time(8, 8000, 0)


def test_moe_reads_only_active_experts_at_batch_1() -> None:
    moe = StepTimeModel(profile("mixtral-8x7b@h100"))
    dense_like = _model("mixtral-8x7b@h100", active_params_b=None)
    assert moe.step_time(1, 100, 0) < 0.5 * dense_like.step_time(1, 100, 0)
    assert moe.step_time(64, 6400, 0) == pytest.approx(dense_like.step_time(64, 6400, 0), rel=0.1)


def test_tensor_parallel_splits_weights_but_costs_all_reduce() -> None:
    tp4 = StepTimeModel(profile("llama-3.1-70b@h100"))
    tp8 = _model("llama-3.1-70b@h100", tp=8)
    assert tp8.step_time(1, 1000, 0) < tp4.step_time(1, 1000, 0)
    ideal = tp4.spec.weight_bytes / 8 / GPUS["h100"].bw_bytes_s
    assert tp8.step_time(1, 1000, 0) > ideal + 2 * 80 * GPUS["h100"].allreduce_latency_s


# ---- catalogue and cluster files -------------------------------------------------------------------------------
REQUIRED_PROFILES = [f"qwen2.5-{s}@{g}" for s in ("1.5b", "7b", "14b") for g in ("a6000", "a100-80gb", "h100")] + [
    "llama-3.1-8b@a100-80gb", "llama-3.1-8b@h100", "llama-3.1-70b@a100-80gb", "llama-3.1-70b@h100",
    "mixtral-8x7b@a100-80gb", "mixtral-8x7b@h100"]


def test_catalogue_has_required_profiles() -> None:
    cat = catalogue()
    assert set(REQUIRED_PROFILES) <= set(cat)
    assert cat["llama-3.1-70b@h100"].tp == 4 and cat["mixtral-8x7b@h100"].tp == 2
    assert cat["mixtral-8x7b@a100-80gb"].active_params_b == pytest.approx(12.9, abs=0.05)
    assert cat["qwen2.5-7b@a6000"].name == "qwen2.5-7b" == cat["qwen2.5-7b@a6000"].workload_model


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    return p


def test_profile_with_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, "models:\n  - {profile: qwen2.5-7b@a6000, name: q7-fast, replicas: 2, max_num_seqs: 64}\n")
    (m,) = load_cluster(p).models
    assert (m.name, m.replicas, m.max_num_seqs, m.gpu, m.layers) == ("q7-fast", 2, 64, "a6000", 28)
    assert m.workload_model == "qwen2.5-7b"  # still serves the outcomes of the model it is


def test_explicit_entry(tmp_path: Path) -> None:
    p = _write(tmp_path, "models:\n  - {name: my-7b, gpu: a100-80gb, params_b: 7.6, layers: 28, kv_heads: 4, "
                         "head_dim: 128, tp: 1, replicas: 1}\n")
    (m,) = load_cluster(p).models
    assert m.workload_model == "my-7b" and m.hidden is None
    assert StepTimeModel(m).step_time(1, 100, 0) > 0


def _error(tmp_path: Path, text: str) -> str:
    p = _write(tmp_path, text)
    with pytest.raises(ClusterError) as e:
        load_cluster(p)
    msg = str(e.value)
    assert str(p) in msg
    return msg


def test_error_bad_gpu(tmp_path: Path) -> None:
    msg = _error(tmp_path, "models:\n  - {profile: qwen2.5-7b@a6000, name: q7}\n  - {profile: qwen2.5-7b@a6000, "
                           "name: q7b, gpu: a6000x}\n")
    assert "models[1]" in msg and "'q7b'" in msg and "'gpu'" in msg and "a6000x" in msg
    assert all(g in msg for g in ("a6000", "a100-80gb", "h100"))


def test_error_unknown_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, "models:\n  - {profile: qwen2.5-7b@a6000, replica: 2}\n")
    assert "models[0]" in msg and "'replica'" in msg and "did you mean 'replicas'" in msg


def test_error_unknown_profile(tmp_path: Path) -> None:
    msg = _error(tmp_path, "models:\n  - {profile: qwen2.5-7b@a600}\n")
    assert "'profile'" in msg and "qwen2.5-7b@a600" in msg and "qwen2.5-14b@h100" in msg


def test_error_duplicate_names(tmp_path: Path) -> None:
    msg = _error(tmp_path, "models:\n  - {profile: qwen2.5-7b@a6000}\n  - {profile: qwen2.5-7b@h100}\n")
    assert "duplicate" in msg and "'qwen2.5-7b'" in msg and "models[0]" in msg and "models[1]" in msg


def test_error_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ClusterError, match="nope.yaml: cluster file not found"):
        load_cluster(p)


def test_error_missing_key_and_negative(tmp_path: Path) -> None:
    msg = _error(tmp_path, "models:\n  - {name: x, gpu: h100, layers: 28, kv_heads: 4, head_dim: 128}\n")
    assert "'x'" in msg and "missing key 'params_b'" in msg
    msg = _error(tmp_path, "models:\n  - {profile: qwen2.5-7b@h100, replicas: -1}\n")
    assert "'replicas'" in msg and "-1" in msg


def test_error_does_not_fit(tmp_path: Path) -> None:
    msg = _error(tmp_path, "models:\n  - {profile: llama-3.1-70b@h100, tp: 1}\n")
    assert "does not fit" in msg and "141.1 GB weights" in msg and "h100" in msg and "raise tp" in msg


def test_default_cluster_and_examples() -> None:
    assert [m.name for m in default_cluster().models] == ["qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b"]
    assert all(m.gpu == "a6000" for m in default_cluster().models)
    qwen = ROOT / "examples" / "cluster-qwen-a6000.yaml"
    assert load_cluster(qwen) == default_cluster()
    assert (ROOT / "src" / "chimera" / "perfmodel" / "default_cluster.yaml").read_text() == qwen.read_text()
    llama = load_cluster(ROOT / "examples" / "cluster-llama-h100.yaml")
    assert isinstance(llama, ClusterConfig)
    assert [m.name for m in llama.models] == ["llama-3.1-8b", "mixtral-8x7b", "llama-3.1-70b"]


def calibration_table() -> str:
    """Markdown table of every calibration point (copied into docs/perfmodel.md)."""
    rows = ["| point | published | predicted | error | role | assumption |", "|---|---:|---:|---:|---|---|"]
    for p in POINTS:
        status = f"{p.role}; xfail" if p.xfail else p.role
        rows.append(f"| {p.name} | {p.published:g} {p.unit} | {p.predict():.4g} {p.unit} | {p.error:+.1%} | "
                    f"{status} | {p.assumption} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(calibration_table())
