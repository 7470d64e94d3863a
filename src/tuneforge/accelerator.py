"""What only a CUDA device has, behind small functions that do nothing (or say None) elsewhere,
so the code around them runs unchanged in the CPU test suite.

Owns the CUDA memory counters (`peak_memory_gb`, `reset_peak_memory`), `synchronize` and
`release_cached_memory`. The other GPU-only pieces have their own seams: the flash-attention
kernel behind `tuneforge.model.attention._flash_varlen_func` / `flash_attn_available` (the
per-document SDPA path runs everywhere), the NCCL-or-gloo choice in
`tuneforge.parallel.launch.init_distributed`, and the bf16 peak FLOP/s table in
`tuneforge.train.metrics.peak_flops`.
"""

from __future__ import annotations

import torch


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def peak_memory_gb(device: torch.device | str) -> float | None:
    """Peak memory torch allocated on a CUDA `device` (GiB) since the last reset; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if _is_cuda(device) else None


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new `peak_memory_gb` window (CUDA only)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for the queued kernels of a CUDA `device` (for timing); nothing elsewhere."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def release_cached_memory(device: torch.device | str) -> None:
    """Hand the CUDA caching allocator's free blocks back (between runs in one process)."""
    if _is_cuda(device):
        torch.cuda.empty_cache()
