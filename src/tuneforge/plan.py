"""`tuneforge plan`: per-device memory before launching, and the smallest change that fits.

Owns the memory model. Sizes are in decimal GB (1e9 bytes), per device:
- model states, as in the ZeRO paper with Ψ parameters, N data-parallel devices and K = 12
  bytes of fp32 master weights + Adam moments per trained parameter under mixed precision:
  ZeRO-1 = 2Ψ + 2Ψ + KΨ/N, ZeRO-2 = 2Ψ + (2 + K)Ψ/N, ZeRO-3 = (4 + K)Ψ/N (7B on 8 GPUs:
  38.5 / 26.25 / 14 GB). In fp32 (CPU) weights, gradients and the two Adam moments take 16
  bytes per trained parameter, with no master copy. LoRA keeps the frozen base in the
  compute dtype and pays optimizer and gradient bytes only for adapter parameters. QLoRA
  keeps the decoder's linear weights in 4-bit NF4 (0.5625 bytes per parameter) and the
  embeddings / LM head in fp32 (bitsandbytes leaves them unquantized and PEFT's k-bit
  preparation upcasts them); on the CPU it adds a fixed `CPU_QLORA_OVERHEAD`. Offload moves
  optimizer states (and under ZeRO-3 the parameters) to host memory;
- activations of a Llama-style layer per token (bytes per element × (9h + 4·kv + 4·i): norms,
  q/k/v and their rotary copies, attention output, and four MLP tensors of width i),
  times layers, or only the layer inputs plus one recomputed layer with gradient
  checkpointing; tokens per device = micro batch × max_length / sequence parallel;
- logits: one chunk (chunked cross-entropy) of fp32 logits, their gradient and softmax;
- a fixed runtime overhead (CUDA context and allocator, or the Python/torch process on CPU).
Preference objectives (`train.objective` dpo | orpo | simpo | reward) train on rows of whole pairs, two
sequences of up to `max_length` each, so a row is 2 x max_length tokens. DPO's reference adds
no resident model: with LoRA it is one more forward per step without gradients (its
activations are freed, layer by layer, before the policy's forward); for full fine-tuning it
is one forward pass over every pair before training, cached on disk (`reference` in the report).
A reward model has no vocabulary logits (its head gives one score per sequence): no logits term.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tuneforge.errors import UserError

GB = 1e9
OPTIMIZER_BYTES = 12  # fp32 master + Adam m + v per trained parameter (mixed precision)
# Measured (tests/test_plan_vs_rss.py): on CPU a PEFT LoRA step holds more than the
# activation memory of the same full fine-tuning step (the adapter path's extra tensors, and
# glibc keeping the holes they leave): about twice as much, or 1.25x with the heap trimmed
# during forward at every check (train.cpu_heap_trim_slack 0); fitted on 8-layer and 30-layer
# Llama shapes. With a slack s the trimmer lets the heap hold up to (1 + s) x what is in use,
# so the trimmed factor grows by (1 + s), up to the untrimmed one. With the decoder blocks
# compiled (model.compile; no trimming then) the fused blocks save less: fitted on two real
# SmolLM2-135M LoRA runs, 4.93 GB peak at 2,048 tokens and 2.96 GB at 1,024 (predicted -3%, +9%).
CPU_LORA_ACTIVATION_FACTOR = {"trimmed": 1.25, "untrimmed": 2.0, "compiled": 1.05}
NF4_BYTES = 0.5625  # 4 bits + one fp32 absmax per 64 weights (double quantization saves a little more)
# Fitted (tests/test_plan_vs_rss.py: mid-qlora at 512 and 128 tokens, smollm2-shape-qlora):
# a 4-bit run on the CPU peaks about 120 MB above its weights and activations, whatever the
# model size (once `release_checkpoint_file` has closed the fp32 file mapping, which otherwise
# kept another 4 bytes per parameter resident). First fitted at 70 MB (errors -10%, +2%, +8%);
# mid-qlora then measured 1.10-1.24 GB across runs on a loaded machine (-20% once), so the
# constant was raised to centre the three cases: about -5..-16%, +11%, +9%.
CPU_QLORA_OVERHEAD = 0.12 * 1e9


@dataclass
class ModelShape:
    params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    embed_params: int = 0  # input embeddings + untied LM head (never quantized)

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        cfg = cfg.get("text_config", cfg)
        h = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads", heads)
        head_dim = cfg.get("head_dim") or h // heads
        inter = cfg.get("intermediate_size", 4 * h)
        layers = cfg["num_hidden_layers"]
        vocab = cfg["vocab_size"]
        experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 1
        attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
        mlp = 3 * h * inter * experts
        embed = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
        return cls(layers * (attn + mlp + 2 * h) + embed + h, h, inter, layers, heads, kv, head_dim, vocab, embed)

    def lora_params(self, r: int) -> int:
        """Adapter parameters of LoRA rank r on every linear layer of every decoder layer."""
        h, kvd, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        qd = self.heads * self.head_dim
        pairs = [(h, qd), (h, kvd), (h, kvd), (qd, h), (h, i), (h, i), (i, h)]
        return self.layers * sum(r * (a + b) for a, b in pairs)


@dataclass
class Setup:
    devices: int = 1
    device_memory_gb: float | None = None
    device: str = "cuda"  # cuda | cpu
    zero: int = 3  # 0 = DDP / single
    offload: bool = False
    lora_rank: int | None = None
    bits: int | None = None  # 4 = QLoRA
    micro_batch: int = 1
    max_length: int = 2048
    sequence_parallel: int = 1
    tensor_parallel: int = 1
    checkpointing: bool = False
    chunk_size: int = 1024
    heap_trim: bool = True  # CPU: train.cpu_heap_trim_every > 0 (eager)
    compiled: bool = False  # model.compile, as resolved for this run (auto: tuneforge.model.compile)
    heap_slack: float = 0.0  # CPU: train.cpu_heap_trim_slack
    sequences_per_row: int = 1  # 2 for preference pairs: a row holds whole pairs
    reference: str | None = None  # DPO's reference: "adapter" (1 extra forward per step) or "cached" (1 pass first)
    scalar_head: bool = False  # train.objective reward: a score per sequence, no vocabulary logits


def estimate(shape: ModelShape, s: Setup) -> dict:
    """Per-device bytes by component (GB) for `shape` trained as `s` describes."""
    psi = shape.params / s.tensor_parallel
    dp = max(s.devices // (s.sequence_parallel * s.tensor_parallel), 1)
    compute_bytes = 4 if s.device == "cpu" else 2
    zero = s.zero if dp > 1 else 0
    if s.lora_rank:
        trained = shape.lora_params(s.lora_rank) / s.tensor_parallel
        base = psi * compute_bytes
        if s.bits == 4:  # NF4 decoder linears; fp32 embeddings and LM head
            embed = shape.embed_params / s.tensor_parallel
            base = (psi - embed) * NF4_BYTES + embed * 4
        weights = base / dp if zero == 3 else base
        adapter_states = trained * (16 if s.device == "cpu" else 4 + OPTIMIZER_BYTES)
        states = adapter_states / dp if zero >= 1 else adapter_states
        params, grads, optim = weights, 0.0, states
    else:  # fp32 everything on the CPU; bf16 weights and gradients + fp32 master/moments on a GPU
        bytes_each = (4, 4, 8) if s.device == "cpu" else (2, 2, OPTIMIZER_BYTES)
        params, grads, optim = (b * psi for b in bytes_each)
        # ZeRO stage k shards the first k of: optimizer state, gradients, parameters
        optim, grads, params = (x / dp if zero >= stage else x for stage, x in ((1, optim), (2, grads), (3, params)))
    host = 0.0
    if s.offload:
        host += optim
        optim = 0.0
        if zero >= 3:
            host += params
            params = 0.0
    tokens = s.micro_batch * s.max_length * s.sequences_per_row / s.sequence_parallel
    per_token_layer = compute_bytes * (9 * shape.hidden + 4 * shape.kv_heads * shape.head_dim
                                       + 4 * shape.intermediate) / s.tensor_parallel
    if s.lora_rank and s.device == "cpu":
        untrimmed = CPU_LORA_ACTIVATION_FACTOR["untrimmed"]
        trimmed = min(untrimmed, CPU_LORA_ACTIVATION_FACTOR["trimmed"] * (1 + s.heap_slack))
        per_token_layer *= CPU_LORA_ACTIVATION_FACTOR["compiled"] if s.compiled else trimmed if s.heap_trim else untrimmed
    if s.checkpointing:
        activations = tokens * (shape.layers * compute_bytes * shape.hidden + per_token_layer)
    else:
        activations = tokens * shape.layers * per_token_layer
    logits = 0 if s.scalar_head else min(s.chunk_size, tokens) * shape.vocab * 4 * 3
    overhead = 0.45 * GB if s.device == "cpu" else 1.0 * GB
    if s.device == "cpu" and s.lora_rank and s.bits == 4:
        overhead += CPU_QLORA_OVERHEAD
    parts = {"params": params, "grads": grads, "optimizer": optim, "activations": activations,
             "logits": logits, "overhead": overhead}
    total = sum(parts.values())
    return {**{k: v / GB for k, v in parts.items()}, "total": total / GB, "host_offload": host / GB,
            "model_states": (params + grads + optim) / GB}


def suggestions(shape: ModelShape, s: Setup) -> list[tuple[str, Setup]]:
    """Candidate changes, cheapest first."""
    out = []
    if not s.checkpointing:
        out.append(("model.gradient_checkpointing: true", replace(s, checkpointing=True)))
    if s.devices > 1 and s.zero < 3:
        out.append((f"parallel.zero: {s.zero + 1}", replace(s, zero=s.zero + 1)))
    if not s.offload and s.devices > 1:
        out.append(("parallel.offload: true", replace(s, offload=True)))
    if s.micro_batch > 1:
        out.append((f"train.micro_batch_size: {s.micro_batch // 2} (double train.gradient_accumulation)",
                    replace(s, micro_batch=s.micro_batch // 2)))
    if not s.lora_rank:
        out.append(("model.lora: {r: 16}", replace(s, lora_rank=16)))
    elif s.bits != 4:  # bitsandbytes runs 4-bit NF4 on CUDA and on the CPU
        out.append(("model.quantization: {bits: 4} (QLoRA)", replace(s, bits=4)))
    out.append((f"--gpus {s.devices * 2}", replace(s, devices=s.devices * 2)))
    return out


def recommend(shape: ModelShape, s: Setup) -> str | None:
    """The first single change that fits, else the first pair, else None."""
    if s.device_memory_gb is None:
        return None
    fits = lambda setup: estimate(shape, setup)["total"] <= s.device_memory_gb  # noqa: E731
    if fits(s):
        return None
    singles = suggestions(shape, s)
    for text, setup in singles:
        if fits(setup):
            return text
    for text, setup in singles:
        for text2, setup2 in suggestions(shape, setup):
            if fits(setup2):
                return f"{text} and {text2}"
    return "no single or double change fits; use more devices or a smaller model"


def setup_from_config(cfg, gpus: int | None, gpu_memory: float | None) -> Setup:
    import os

    device = "cuda" if gpus else ("cpu" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "cuda")
    strategy = cfg.parallel.strategy
    zero = 0 if strategy in ("single", "ddp") else cfg.parallel.zero
    objective = cfg.train.objective
    reference = None
    if objective == "dpo":
        from tuneforge.train.objective import uses_cached_reference

        reference = "cached" if uses_cached_reference(cfg) else "adapter"
    compiles = cfg.model.compile is True  # auto: as the training loop decides, from the model's size
    if cfg.model.compile == "auto" and device == "cpu":
        from tuneforge.model.compile import compile_choice

        shape = model_shape(cfg.model.path)
        compiles = compile_choice(cfg, device, gpus or 1, shape.params - shape.embed_params)[0]
    return Setup(sequences_per_row=1 if objective == "sft" else 2, reference=reference, scalar_head=objective == "reward",
                 devices=gpus or 1, device_memory_gb=gpu_memory, device=device, zero=zero,
                 offload=cfg.parallel.offload, lora_rank=cfg.model.lora.r if cfg.model.lora else None,
                 bits=cfg.model.quantization.bits if cfg.model.quantization else None,
                 micro_batch=cfg.train.micro_batch_size, max_length=cfg.data.max_length,
                 sequence_parallel=cfg.parallel.sequence_parallel, tensor_parallel=cfg.parallel.tensor_parallel,
                 checkpointing=cfg.model.gradient_checkpointing, chunk_size=cfg.train.loss_chunk_size,
                 heap_trim=cfg.train.cpu_heap_trim_every > 0 and not compiles, compiled=compiles,
                 heap_slack=cfg.train.cpu_heap_trim_slack)


# Published shapes (from each model's config.json), so recipes can be planned before download.
KNOWN_CONFIGS = {
    "internlm2-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=92544),
    "internlm2-20b": dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=48,
                          num_key_value_heads=8, vocab_size=92544),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, num_local_experts=8),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


def model_shape(path: str) -> ModelShape:
    """The shape from `path/config.json`, or a published shape matched by the folder's name."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return ModelShape.from_config(json.loads(config_file.read_text()))
    def norm(text: str) -> str:
        return re.sub(r"[-_.]|chat|instruct", "", text.lower())

    for key in sorted(KNOWN_CONFIGS, key=len, reverse=True):
        if norm(key) in norm(Path(path).name):
            return ModelShape.from_config(KNOWN_CONFIGS[key])
    raise UserError(f"{config_file} not found and {Path(path).name!r} is not a model plan knows",
                    hint=f"point model.path at a folder with config.json (known names: {', '.join(KNOWN_CONFIGS)})")


def run_plan(cfg, gpus: int | None, gpu_memory: float | None, as_json: bool) -> int:
    shape = model_shape(cfg.model.path)
    setup = setup_from_config(cfg, gpus, gpu_memory)
    result = estimate(shape, setup)
    advice = recommend(shape, setup)
    if as_json:
        print(json.dumps({"model_params": shape.params, "setup": asdict(setup), "per_device_gb": result,
                          "fits": None if gpu_memory is None else result["total"] <= gpu_memory,
                          "recommendation": advice}))
        return 0
    print(f"model: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}")
    print(f"setup: {setup.devices} x {setup.device}, ZeRO-{setup.zero}{' + offload' if setup.offload else ''}, "
          f"{'LoRA r=' + str(setup.lora_rank) if setup.lora_rank else 'full fine-tune'}"
          f"{' 4-bit' if setup.bits == 4 else ''}, micro batch {setup.micro_batch} x {setup.max_length} tokens"
          f"{', SP=' + str(setup.sequence_parallel) if setup.sequence_parallel > 1 else ''}"
          f"{', checkpointing' if setup.checkpointing else ''}")
    if setup.sequences_per_row == 2:
        print(f"pairs: rows of whole pairs, {setup.sequences_per_row} x {setup.max_length} tokens; reference: "
              + {"adapter": "the model with the adapter disabled (one more forward per step, no extra memory)",
                 "cached": "one forward pass over every pair before training, cached on disk",
                 None: "none (reference-free objective)"}[setup.reference])
    for key in ("params", "grads", "optimizer", "activations", "logits", "overhead"):
        print(f"  {key:<12} {result[key]:>9.2f} GB")
    print(f"  {'total':<12} {result['total']:>9.2f} GB per device"
          + (f"  (+{result['host_offload']:.2f} GB in host memory)" if result["host_offload"] else ""))
    if gpu_memory is not None:
        verdict = "fits" if result["total"] <= gpu_memory else "does NOT fit"
        print(f"{verdict} in {gpu_memory:g} GB" + (f"; smallest change that fits: {advice}" if advice else ""))
    return 0
