"""GPU datasheet figures plus the few constants fitted to published vLLM measurements (see docs/perfmodel.md)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    """One accelerator: vendor figures (`source`) and fitted efficiency constants (`fit`)."""

    name: str
    memory_gb: float  # datasheet capacity
    usable_mib: int  # total reported by nvidia-smi / torch.cuda.mem_get_info (what vLLM's utilisation applies to)
    hbm_bw_gbs: float  # datasheet memory bandwidth, GB/s
    tflops_fp16: float  # dense fp16/bf16 tensor-core peak, TFLOPS (no sparsity)
    link_bw_gbs: float  # GPU-to-GPU bandwidth per direction, GB/s (tensor-parallel all-reduce)
    source: str
    # Fitted / assumed constants (see `fit`).
    bw_eff: float  # achieved fraction of hbm_bw_gbs when streaming weights and KV
    mfu: float  # achieved fraction of tflops_fp16 in large GEMMs
    step_overhead_s: float  # fixed cost per engine step (scheduling, sampling, launch)
    layer_overhead_s: float  # fixed cost per transformer layer per step (small kernels)
    allreduce_latency_s: float  # per all-reduce call when tp > 1
    fit: str

    @property
    def memory_bytes(self) -> int:
        return self.usable_mib * MIB

    @property
    def bw_bytes_s(self) -> float:
        return self.hbm_bw_gbs * 1e9 * self.bw_eff

    @property
    def flops_s(self) -> float:
        return self.tflops_fp16 * 1e12 * self.mfu


_GA102_FIT = (
    "bw_eff 0.93, mfu 0.60, step overhead 1.1 ms fitted (least squares, 3 constants) to the 5 published "
    "A6000 Qwen2.5-7B median TPOTs (21.9/22.3/27.5/36.0/53.1 ms at concurrency 1/8/64/128/256, vLLM 0.23); "
    "no per-layer term (one model depth only, so it is not identifiable)"
)

GPUS: dict[str, GPU] = {
    "a6000": GPU(
        name="a6000",
        memory_gb=48,
        usable_mib=49140,
        hbm_bw_gbs=768,
        tflops_fp16=154.8,
        link_bw_gbs=25,  # PCIe 4.0 x16, effective
        source="NVIDIA RTX A6000 datasheet: 48 GB GDDR6, 768 GB/s, 309.7 fp16 tensor TFLOPS sparse, 154.8 dense",
        bw_eff=0.93,
        mfu=0.60,
        step_overhead_s=1.1e-3,
        layer_overhead_s=0.0,
        allreduce_latency_s=30e-6,  # NCCL over PCIe, small messages (assumed, no published TP point)
        fit=_GA102_FIT,
    ),
    "a40": GPU(
        name="a40",
        memory_gb=48,
        usable_mib=46068,  # ECC is on by default on the A40
        hbm_bw_gbs=696,
        tflops_fp16=149.7,
        link_bw_gbs=25,
        source="NVIDIA A40 datasheet: 48 GB GDDR6 with ECC, 696 GB/s, 149.7 TFLOPS fp16 tensor (dense)",
        bw_eff=0.93,
        mfu=0.60,
        step_overhead_s=1.1e-3,
        layer_overhead_s=0.0,
        allreduce_latency_s=30e-6,
        fit="same GA102 silicon as the A6000: A6000 constants reused, not refitted (" + _GA102_FIT + ")",
    ),
    "a100-80gb": GPU(
        name="a100-80gb",
        memory_gb=80,
        usable_mib=81920,
        hbm_bw_gbs=2039,
        tflops_fp16=312,
        link_bw_gbs=300,  # NVLink 3: 600 GB/s total, 300 per direction
        source="NVIDIA A100 80GB SXM datasheet: 80 GB HBM2e, 2,039 GB/s, 312 TFLOPS bf16 tensor (dense)",
        bw_eff=0.90,
        mfu=0.72,
        step_overhead_s=1.4e-3,
        layer_overhead_s=0.083e-3,
        allreduce_latency_s=10e-6,  # vLLM custom all-reduce over NVLink (assumed)
        fit=(
            "bw_eff 0.90 assumed (HBM streaming); step 1.4 ms + 0.083 ms/layer fitted to the Qwen2.5 speed "
            "benchmark batch-1 rates on vLLM (1.5B 183, 7B 84.3, 14B 46.3 tok/s); mfu 0.72 fitted to the "
            "Llama-3-8B prefill rate of ~14k tok/s"
        ),
    ),
    "h100": GPU(
        name="h100",
        memory_gb=80,
        usable_mib=81559,
        hbm_bw_gbs=3350,
        tflops_fp16=989.4,
        link_bw_gbs=450,  # NVLink 4: 900 GB/s total, 450 per direction
        source="NVIDIA H100 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s, 1,979 bf16 tensor TFLOPS sparse, 989.4 dense",
        bw_eff=0.90,
        mfu=0.69,
        step_overhead_s=1.15e-3,
        layer_overhead_s=0.0,
        allreduce_latency_s=8e-6,
        fit=(
            "bw_eff 0.90 assumed (HBM streaming); step overhead 1.15 ms fitted to Llama-3.1-8B TPOT 6.48 ms at "
            "concurrency 1 (vLLM 0.21); mfu 0.69 fitted to the Llama-2-7B prefill rate of ~50k tok/s"
        ),
    ),
}


def gpu(name: str) -> GPU:
    """Look a GPU up by name; the error lists the known ones."""
    try:
        return GPUS[name]
    except KeyError:
        raise KeyError(f"unknown gpu {name!r}; known: {', '.join(sorted(GPUS))}") from None
