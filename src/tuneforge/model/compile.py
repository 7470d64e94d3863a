"""`model.compile`: torch.compile each decoder block, not the whole model; and where `auto`
(the default) does so.

Every decoder layer of a model runs the same code, so compiling per block compiles that code
once and reuses it for all layers (parameters are graph inputs), which keeps compile time
roughly independent of depth: minutes for a 70B model instead of the hour a whole-model
graph can take. `dynamic=True` because packed rows differ in length from step to step.
Our varlen attention reads document boundaries from the batch (data-dependent), so each
block is compiled in two pieces around it; that is where the win comes from anyway: the
norms, rotary embedding, SwiGLU and LoRA adds fuse, and the backward recomputes those
elementwise ops instead of saving their outputs (on the CPU LoRA benchmark: -30% peak RSS,
-9% step time, after a one-time compile of about a minute on 2 cores).

Wrappers (LoRA before, DDP/FSDP after) stay outside the compiled blocks; the training loop
calls `compile_decoder_layers` once, between them.

`auto` compiles only where compiling is both measured to pay and covered by the tests: SFT in
one fp32 process on the CPU, without quantization or gradient checkpointing, for a decoder of
at least 50M matmul parameters, when a C++ compiler is found and builds one small kernel (so a
missing header means an eager run, not a failed one). On SmolLM2-135M with LoRA (2 CPU
cores, 3-round medians, docs/benchmarks_packing.md) it made training 1.23x faster on Alpaca's
packed 2,048-token rows and 1.20x on GSM8K's 1,024, at lower peak RSS (4.6 vs 5.1 GB, 3.0 vs
3.2; heap trimming is then not needed), after a one-time compile of ~70 s (paid back after
about 20 and 45 steps). A smaller model would spend longer compiling than a run saves, and the
other setups are not measured yet: they stay eager unless `model.compile: true`.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from tuneforge.errors import UserError


def has_cxx_compiler() -> bool:
    """torch.compile on the CPU builds C++ kernels: CXX, or g++/clang++ on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) is not None
    return any(shutil.which(name) for name in ("g++", "clang++", "c++"))


AUTO_MIN_MATMUL_PARAMS = 50_000_000


def cpu_compile_error() -> str | None:
    """None when torch.compile builds and runs a small C++ kernel here; else why not, in one line
    (a compiler without Python's headers, a broken toolchain). Seconds the first time; torch
    caches the kernel."""
    import torch

    try:
        torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True, dynamic=False)(torch.ones(8))
    except Exception as error:  # noqa: BLE001  whatever the toolchain raises, auto then trains eagerly
        first = (str(error).strip().splitlines() or [""])[0]
        return f"torch.compile failed here ({type(error).__name__}: {first[:160]})"
    return None


def compile_choice(cfg, device_type: str, world_size: int, matmul_params: int,
                   try_compiler: bool = False) -> tuple[bool, str | None]:
    """(compile the decoder blocks?, why `auto` stays eager, or None) for this run; with
    `try_compiler`, auto also compiles one small kernel first (`cpu_compile_error`)."""
    if cfg.model.compile != "auto":
        return bool(cfg.model.compile), None
    reasons = (
        device_type != "cpu" and f"auto compiles on the CPU only (set model.compile: true on {device_type})",
        world_size > 1 and "auto compiles single-process runs only",
        cfg.train.objective != "sft" and f"auto compiles SFT only, not {cfg.train.objective}",
        cfg.model.quantization is not None and "auto does not compile quantized models",
        cfg.model.cpu_mixed_precision and "auto does not compile with model.cpu_mixed_precision",
        cfg.model.gradient_checkpointing and "auto does not compile with gradient checkpointing",
        matmul_params < AUTO_MIN_MATMUL_PARAMS
        and f"{matmul_params / 1e6:.1f}M matmul parameters: too small for the one-time compile to pay",
        not has_cxx_compiler() and "no C++ compiler found ($CXX, g++, clang++): install one to compile on the CPU",
    )
    reason = next((r for r in reasons if r), None)
    if reason is None and try_compiler:
        reason = cpu_compile_error()
    return reason is None, reason


def compile_decoder_layers(model: nn.Module, device_type: str) -> int:
    """Compile every decoder block of `model` in place; returns how many."""
    if device_type == "cpu" and not has_cxx_compiler():
        raise UserError("model.compile needs a C++ compiler on the CPU (none of $CXX, g++, clang++ found)",
                        hint="install g++, or set model.compile: false")
    from tuneforge.train.loss import decoder_layers

    layers = decoder_layers(model, purpose="compile", hint="set model.compile: false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
