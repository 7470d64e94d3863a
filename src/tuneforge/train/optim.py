"""The optimizer and learning-rate schedule of a run.

Owns AdamW over trainable parameters only (no weight decay on biases and norms; the fused
kernel where the device has one, else foreach) and the warmup + cosine/linear/constant
schedule as a `LambdaLR`, so both save and restore through their own `state_dict`s.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, train_cfg.weight_decay)
    device_type = next(p for g in groups for p in g["params"]).device.type
    fused = device_type in ("cuda", "xpu")
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer, train_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(math.ceil(train_cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, train_cfg.lr_scheduler, train_cfg.min_lr_ratio))
