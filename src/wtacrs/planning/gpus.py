"""Public spec figures of the GPUs a plan can be made for, and the step-time model.

Dense (no structured sparsity) peak FLOP/s and memory bandwidth, from each vendor data sheet
named in `source`. A GB here is 10⁹ bytes, as the data sheets state memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wtacrs.planning.tracer import Kernel

# The time model's own constants (everything else is a data-sheet figure):
HOST_S_PER_CALL = 6e-6  # host time per ATen call that runs a kernel: Python, dispatcher and launch (eager PyTorch)
DEVICE_S_PER_KERNEL = 2e-6  # shortest time a kernel occupies the GPU (launch latency, tail of a tiny grid)


@dataclass(frozen=True)
class GPU:
    """One GPU's data-sheet figures: memory (bytes), bandwidth (bytes/s) and dense FLOP/s."""

    name: str
    memory_bytes: float
    bandwidth: float
    fp32_flops: float
    tf32_flops: float
    bf16_flops: float
    compute_capability: tuple[int, int]
    source: str

    def matmul_flops(self, dtype: torch.dtype, tf32: bool = False) -> float:
        """Peak FLOP/s of a matmul in `dtype` (fp32 matmuls use TF32 only if allowed: PyTorch's
        default `torch.backends.cuda.matmul.allow_tf32` is False)."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16_flops
        return self.tf32_flops if tf32 else self.fp32_flops


T = 1e12
GPUS: dict[str, GPU] = {g.name: g for g in (
    # NVIDIA H100 Tensor Core GPU data sheet (SXM5): 80 GB HBM3, 3.35 TB/s; FP32 67, TF32 494.5, BF16 989.5 dense.
    GPU("h100-80gb", 80e9, 3.35e12, 67 * T, 494.5 * T, 989.5 * T, (9, 0), "NVIDIA H100 data sheet (SXM5)"),
    # NVIDIA H200 Tensor Core GPU data sheet (SXM): 141 GB HBM3e, 4.8 TB/s; compute as the H100 SXM.
    GPU("h200", 141e9, 4.8e12, 67 * T, 494.5 * T, 989.5 * T, (9, 0), "NVIDIA H200 data sheet (SXM)"),
    # NVIDIA A100 Tensor Core GPU data sheet (SXM): 40 GB HBM2 1,555 GB/s / 80 GB HBM2e 2,039 GB/s;
    # FP32 19.5, TF32 156, BF16 312 dense.
    GPU("a100-40gb", 40e9, 1.555e12, 19.5 * T, 156 * T, 312 * T, (8, 0), "NVIDIA A100 data sheet (SXM 40GB)"),
    GPU("a100-80gb", 80e9, 2.039e12, 19.5 * T, 156 * T, 312 * T, (8, 0), "NVIDIA A100 data sheet (SXM 80GB)"),
    # NVIDIA L4 data sheet: 24 GB GDDR6, 300 GB/s; FP32 30.3, TF32 60, BF16 121 dense (half the sparse figures).
    GPU("l4", 24e9, 300e9, 30.3 * T, 60 * T, 121 * T, (8, 9), "NVIDIA L4 data sheet"),
    # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 24 GB GDDR6X, 1,008 GB/s;
    # FP32 82.6, TF32 82.6, BF16 (FP32 accumulate) 165.2 dense.
    GPU("rtx-4090", 24e9, 1.008e12, 82.6 * T, 82.6 * T, 165.2 * T, (8, 9), "NVIDIA Ada Lovelace whitepaper"),
)}


def gpu(name: str) -> GPU:
    """The table's GPU `name`; ValueError naming the choices otherwise."""
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[name]


def kernel_seconds(kernel: Kernel, device: GPU, dtype: torch.dtype) -> float:
    """Roofline time of one kernel on `device`: the longer of its FLOPs at the matmul peak of
    `dtype` and its bytes at the memory bandwidth, and at least DEVICE_S_PER_KERNEL."""
    compute = kernel.flops / device.matmul_flops(dtype) if kernel.flops else 0.0
    return max(compute, kernel.bytes / device.bandwidth, DEVICE_S_PER_KERNEL)


def step_seconds(kernels: list[Kernel], device: GPU, dtype: torch.dtype) -> float:
    """Predicted seconds of a traced step on `device`.

    The host issues the calls in order, HOST_S_PER_CALL each; a kernel starts when both the host
    has issued it and the device has finished the one before (the GPU runs ahead of the host).
    Host-only calls (real host tensors) cost host time only. A host sync (a device value read)
    makes the host wait for the device, splitting the stream into parts whose host and device
    times do not overlap; the step ends when both are done (its loss is read)."""
    host = device_free = 0.0
    for kernel in kernels:
        host += HOST_S_PER_CALL
        if kernel.host:
            continue
        device_free = max(device_free, host) + kernel_seconds(kernel, device, dtype)
        if kernel.sync:
            host = max(host, device_free)
    return max(host, device_free)
