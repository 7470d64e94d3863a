"""Mixed precision: the one decision of which dtype a run computes in, for every strategy.

`compute_dtype` says what a run computes in: `model.dtype` (bfloat16 or float16) on a CUDA
GPU, and on the CPU only with `model.cpu_mixed_precision: true` (the CPU default is fp32:
bf16 matmuls are ~100x slower than fp32 on the CPUs this project is tested on, so the opt-in
exists to run the GPU's precision paths in CPU tests). `None` means fp32 throughout.

What the strategies do with it (the master weights and optimizer states always stay fp32):
- one process and DDP: `torch.autocast` around forward; for float16 a `torch.amp.GradScaler`
  scales the loss (its state is saved with checkpoints so a resume is exact);
- FSDP2: `MixedPrecisionPolicy(param_dtype=..., reduce_dtype=float32)` (float16 is refused);
- DeepSpeed: its `bf16` / `fp16` section is enabled and it casts the model itself;
- LoRA: the frozen base is loaded in that dtype (the adapter stays fp32, PEFT's default).
"""

from __future__ import annotations

import torch


def compute_dtype(model_cfg, device_type: str) -> torch.dtype | None:
    """The reduced precision a run computes in on `device_type`, or None for fp32."""
    if model_cfg.dtype == "float32":
        return None
    if device_type == "cuda" or (device_type == "cpu" and model_cfg.cpu_mixed_precision):
        return getattr(torch, model_cfg.dtype)
    return None


def grad_scaler(device_type: str, dtype: torch.dtype | None, owned_by_engine: bool) -> torch.amp.GradScaler:
    """Loss scaling for float16 (a disabled scaler, which passes everything through, otherwise)."""
    return torch.amp.GradScaler(device_type, enabled=dtype == torch.float16 and not owned_by_engine)
