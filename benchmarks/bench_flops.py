"""FLOP accounting for the CPU benchmark (see compare.py): this CPU's fp32 matmul peak at the
model's shapes, the useful FLOPs of a LoRA training step, and what each system executes.

Useful FLOPs of one LoRA step over real tokens (frozen base weights, so no weight gradients
for them; `P` = decoder matmul parameters, `P_lora` = adapter parameters, `h` hidden size,
`V` vocabulary, `H` query heads of size `d`, `n` layers):

    4 P T                 base forward (2 P T) + input gradients (2 P T)
  + 6 P_lora T            adapter forward, input and weight gradients
  + 12 H d n pairs        attention scores and values, forward (4) and backward (8) per
                          (query, key) pair; causal, each document alone: L (L + 1) / 2 pairs
  + 4 h V T_loss          LM head forward + input gradient, on the loss tokens only

What a system executes can be more: a padded batch (the HF Trainer) runs the dense layers on
its pad tokens too, full L_max^2 attention per sample (a padding mask rules out the causal
half-skip) and the LM head on every position; TRL's padding-free rows run the LM head on every
real token. `executed_flops` counts those, so useful / executed is the work a system wastes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def model_dims(model_path: str) -> dict:
    """The shape numbers the counts need, from the model folder's config.json (Llama-style)."""
    c = json.loads((Path(model_path) / "config.json").read_text())
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return {"hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "layers": c["num_hidden_layers"],
            "heads": heads, "kv_heads": c.get("num_key_value_heads", heads), "head_dim": head_dim,
            "vocab": c["vocab_size"]}


def linear_shapes(d: dict) -> list[tuple[str, int, int]]:
    """(name, in, out) of one decoder layer's seven linears (q, k, v, o, gate, up, down)."""
    h, i, kv = d["hidden"], d["intermediate"], d["kv_heads"] * d["head_dim"]
    q = d["heads"] * d["head_dim"]
    return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


def _counts(d: dict, r: int) -> tuple[int, int]:
    shapes = linear_shapes(d)
    dense = d["layers"] * sum(a * b for _, a, b in shapes)
    lora = d["layers"] * sum(r * (a + b) for _, a, b in shapes)
    return dense, lora


def useful_flops(d: dict, r: int, steps: list[list[dict]]) -> float:
    """Useful FLOPs of the whole workload (`steps`: lists of samples with input_ids / labels)."""
    dense, lora = _counts(d, r)
    samples = [e for s in steps for e in s]
    tokens = sum(len(e["input_ids"]) for e in samples)
    loss_tokens = sum(sum(1 for x in e["labels"] if x != -100) for e in samples)
    pairs = sum(len(e["input_ids"]) * (len(e["input_ids"]) + 1) // 2 for e in samples)
    attention = 12 * d["heads"] * d["head_dim"] * d["layers"] * pairs
    return float(4 * dense * tokens + 6 * lora * tokens + attention + 4 * d["hidden"] * d["vocab"] * loss_tokens)


def executed_flops(d: dict, r: int, steps: list[list[dict]], system: str) -> float:
    """FLOPs `system` executes on `steps` (its own batches): "hf" pads each step's samples to
    the longest; "trl" runs the LM head on every token; "tuneforge" executes the useful ones."""
    if system == "tuneforge":
        return useful_flops(d, r, steps)
    dense, lora = _counts(d, r)
    total = 0.0
    for s in steps:
        lengths = [len(e["input_ids"]) for e in s]
        if system == "hf":
            tokens = len(s) * max(lengths)
            pairs = len(s) * max(lengths) ** 2
        else:
            tokens = sum(lengths)
            pairs = sum(n * (n + 1) // 2 for n in lengths)
        total += (4 * dense + 6 * lora + 4 * d["hidden"] * d["vocab"]) * tokens
        total += 12 * d["heads"] * d["head_dim"] * d["layers"] * pairs
    return total


def matmul_peak(d: dict, tokens: int, chunk: int = 1024, min_s: float = 0.5, repeats: int = 3) -> dict:
    """This CPU's fp32 `torch.mm` FLOP/s at the model's shapes (`tokens` rows through each linear
    of a layer, and a `chunk`-row LM-head block), best of `repeats` timings of at least `min_s`
    seconds each; `peak` is the best shape's, the one the fractions are taken against."""
    import torch

    shapes = [(name, tokens, a, b) for name, a, b in linear_shapes(d)]
    shapes.append(("lm_head", min(chunk, tokens), d["hidden"], d["vocab"]))
    per_shape = {}
    for name, m, k, n in shapes:
        x, w = torch.randn(m, k), torch.randn(k, n)
        torch.mm(x, w)  # warm-up
        best = 0.0
        for _ in range(repeats):
            count, started = 0, time.perf_counter()
            while True:
                torch.mm(x, w)
                count += 1
                elapsed = time.perf_counter() - started
                if elapsed >= min_s:
                    break
            best = max(best, 2.0 * m * k * n * count / elapsed)
        per_shape[f"{name} {m}x{k}x{n}"] = best
    return {"peak_flops": max(per_shape.values()), "per_shape_flops": per_shape, "threads": torch.get_num_threads()}
