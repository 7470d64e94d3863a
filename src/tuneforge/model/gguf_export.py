"""Exporting a checkpoint or a run's `final/` as one GGUF file for llama.cpp and Ollama.

Owns: `export_gguf`. The source is resolved as `tuneforge export` resolves it (a LoRA adapter is
merged into its base first and sharded checkpoints are consolidated, both by
`tuneforge.model.export.export_checkpoint` into a scratch folder beside the output), loaded with
`load_model` (so InternLM2 arrives in its Llama layout), and written with the `gguf` package:
- architecture `llama` (Llama, Mistral, SmolLM2, InternLM2), `qwen2` or `qwen3`, with the
  hyperparameters llama.cpp reads (context length, widths, heads, RoPE base and scaling, RMS norm
  epsilon); Llama-style q/k rows are permuted to llama.cpp's rotary layout;
- tensors under llama.cpp's names, quantized by `gguf.quants` as llama.cpp's converter does:
  1-D tensors, norms and biases stay F32, matrices whose rows do not split into blocks fall back to
  F16, everything else gets the requested type (f32, f16, bf16 or q8_0);
- the tokenizer, special ids and chat template (`tuneforge.model.gguf_vocab`); the template is the
  `chat_template.jinja` the checkpoint carries, else the tokenizer's.
The file is written under a temporary name beside `out_file` and renamed into place when complete;
an existing file is replaced only with `force`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import torch

from tuneforge.errors import UserError

QUANTS = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def gguf_tensor_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise UserError(f"cannot export tensor {name} to GGUF", hint="only Llama / Mistral / Qwen2 / Qwen3 layouts are supported")
    return f"blk.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.{match.group(3)}"


def rotary_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved one."""
    pairs = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name: str, shape: tuple[int, ...], wanted):
    """The GGML type of one tensor when the file type asks for `wanted` (llama.cpp's converter rules)."""
    import gguf

    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _quant_types(quant: str):
    import gguf

    types = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
             "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
             "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
             "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
    return types[quant]


def _rope_parameters(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def rope_freqs(model) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for Llama 3 RoPE scaling: the default frequencies over the scaled ones."""
    rotary = model.model.rotary_emb
    dim = rotary.inv_freq.shape[0] * 2
    theta = _rope_parameters(model.config)["rope_theta"]
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (default / rotary.inv_freq.double()).float()


def _add_hyperparameters(writer, config, arch: str, n_vocab: int) -> bool:
    """Write the model's shape and RoPE; True when Llama 3 scaling needs a `rope_freqs` tensor."""
    import gguf

    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    kind = rope["rope_type"]
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
        for key, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise UserError(f"RoPE scaling '{kind}' cannot be exported to GGUF yet", hint="supported: default, linear, yarn, llama3")
    return kind == "llama3" and arch == "llama"


def _tensors(model, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) pairs in file order; q/k permuted for the `llama` architecture."""
    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        gguf_name = gguf_tensor_name(name)
        if arch == "llama" and ".attn_q." in gguf_name:
            tensor = rotary_permute(tensor, n_head)
        elif arch == "llama" and ".attn_k." in gguf_name:
            tensor = rotary_permute(tensor, n_kv)
        out.append((gguf_name, tensor))
    return out


def _write(path: Path, model, tokenizer, tokenizer_dir: Path, quant: str, name: str, chat_template: str | None) -> None:
    import gguf
    import numpy as np
    from tqdm.auto import tqdm

    from tuneforge.model.gguf_vocab import add_vocab

    arch = ARCHITECTURES[model.config.model_type]
    wanted, file_type = _quant_types(quant)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    needs_rope_freqs = _add_hyperparameters(writer, model.config, arch, n_vocab)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, tokenizer, tokenizer_dir, n_vocab, chat_template)

    tensors = _tensors(model, arch) + ([("rope_freqs.weight", rope_freqs(model))] if needs_rope_freqs else [])
    plan = []
    for tensor_name, tensor in tensors:
        shape = tuple(tensor.shape)
        qtype = tensor_type(tensor_name, shape, wanted)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(tensor_name, shape, np.dtype(dtype), tensor.numel() * np.dtype(dtype).itemsize, qtype)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
        plan.append((tensor, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for tensor, qtype in tqdm(plan, desc=f"gguf {quant}", unit="tensor", file=sys.stderr, leave=False):
            writer.write_tensor_data(gguf.quants.quantize(tensor.detach().float().cpu().numpy(), qtype))
    finally:
        writer.close()


def _source_folder(ckpt_dir: Path, merge_lora: bool, scratch: Path) -> Path:
    """The full Hugging Face model folder to export: the checkpoint's own, or one made in `scratch`."""
    from tuneforge.model.export import export_checkpoint

    model_dir = ckpt_dir / "model" if (ckpt_dir / "model").is_dir() else ckpt_dir
    if (model_dir / "adapter_config.json").is_file():
        if not merge_lora:
            raise UserError(f"{model_dir} is a LoRA adapter; a GGUF file holds a whole model",
                            hint="add --merge-lora to merge it into its base first")
        return export_checkpoint(ckpt_dir, scratch / "merged", merge_lora=True)
    if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
        return model_dir
    return export_checkpoint(ckpt_dir, scratch / "full")  # sharded (FSDP / DeepSpeed) or an error line


def _chat_template(ckpt_dir: Path, folder: Path, tokenizer) -> str | None:
    for candidate in (ckpt_dir / "chat_template.jinja", ckpt_dir / "model" / "chat_template.jinja",
                      folder / "chat_template.jinja"):
        if candidate.is_file():
            return candidate.read_text()
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def _display_name(ckpt_dir: Path) -> str:
    path = ckpt_dir.resolve()
    if path.parent.name == "checkpoints":  # run/checkpoints/step_N
        return f"{path.parent.parent.name}-{path.name}"
    return path.parent.name if path.name == "final" else path.name


def _saved_dtype(folder: Path) -> str:
    """Load in the dtype the weights were saved in: every GGUF type is made from float32 copies."""
    config = json.loads((folder / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def export_gguf(ckpt_dir: str | Path, out_file: str | Path, quant: str = "f16", merge_lora: bool = False,
                force: bool = False) -> Path:
    """Write the model of `ckpt_dir` (a checkpoint, a run's `final/` or a model folder) to `out_file`."""
    import importlib.util

    from tuneforge.config import ModelConfig
    from tuneforge.model.load import load_model, load_tokenizer

    ckpt, out = Path(ckpt_dir), Path(out_file)
    if quant not in QUANTS:
        raise UserError(f"unknown GGUF quantization '{quant}'", hint=f"use one of: {', '.join(QUANTS)}")
    if out.suffix != ".gguf":
        raise UserError(f"the GGUF output must be a file ending in .gguf, got {out}", hint="e.g. model.gguf")
    if out.is_dir() or (out.exists() and not force):
        raise UserError(f"{out} already exists", hint="pass --force to replace it" if not out.is_dir() else "name a file")
    if not ckpt.is_dir():
        raise UserError(f"checkpoint not found: {ckpt}", hint="pass checkpoints/step_N or final/ of a run")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("writing GGUF files needs the gguf package", hint="pip install 'tuneforge[gguf]'")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder = _source_folder(ckpt, merge_lora, scratch)
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in ARCHITECTURES and model_type != "internlm2":  # InternLM2 loads as Llama
            raise UserError(f"cannot export a '{model_type}' model to GGUF",
                            hint="supported: llama, mistral, qwen2, qwen3 and internlm2 (written as llama)")
        model = load_model(ModelConfig(path=str(folder), dtype=_saved_dtype(folder)))
        tokenizer = load_tokenizer(folder)
        _write(tmp, model, tokenizer, folder, quant, _display_name(ckpt), _chat_template(ckpt, folder, tokenizer))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return out
