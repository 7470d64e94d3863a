"""InternLM2 checkpoints without remote code: conversion to and from the transformers Llama layout.

Owns: recognising an InternLM2 Hugging Face folder (`model_type: internlm2`), turning its
config into a `LlamaConfig` (`bias` -> `attention_bias`, `rope_theta`, `rope_scaling`
dynamic/linear, or transformers 5's `rope_parameters` form -> `rope_parameters`), renaming and splitting its weights into a
`LlamaForCausalLM` state dict and back (the fused `wqkv`), loading such a folder as a Llama
model with `trust_remote_code` off, writing a model back in InternLM2's own names and
config (`save_as_internlm2`), and building a fast tokenizer from InternLM2's SentencePiece
model with its chat special tokens (`internlm2_tokenizer`).

The fused `attention.wqkv` rows are grouped per key/value head: for each of the
`num_key_value_heads` groups come `num_attention_heads // num_key_value_heads` query heads,
then one key head, then one value head, each `head_dim` rows (InternLM2's
`rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + groups)`). Query head `h * groups + j`
belongs to key/value head `h`, which is the order Llama's grouped-query attention uses, and
both use the same rotate-half RoPE, so the split is a pure reshape (no permutation).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from tuneforge.errors import UserError

MODEL_TYPE = "internlm2"
ARCHITECTURE = "InternLM2ForCausalLM"

# The chat tokens InternLM2-chat's tokenizer_config.json puts over the SentencePiece model's
# `[UNUSED_TOKEN_141]` .. `[UNUSED_TOKEN_146]` user-defined pieces.
SPECIAL_TOKENS = {
    92538: "<|plugin|>",
    92539: "<|interpreter|>",
    92540: "<|action_end|>",
    92541: "<|action_start|>",
    92542: "<|im_end|>",
    92543: "<|im_start|>",
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# per-layer InternLM2 name -> Llama name (wqkv is split separately)
_LAYER_NAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# config keys that describe the remote code rather than the network
_NOT_ARCHITECTURE = {"auto_map", "model_type", "architectures", "attn_implementation", "transformers_version",
                     "torch_dtype", "dtype", "_name_or_path", "bias", "rope_scaling", "rope_theta", "rope_parameters"}


def _get(cfg, name, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _dims(cfg) -> tuple[int, int, int]:
    """(key/value heads, query heads per key/value head, head_dim) of an InternLM2 dict or LlamaConfig."""
    heads = int(_get(cfg, "num_attention_heads"))
    kv_heads = int(_get(cfg, "num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UserError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    head_dim = _get(cfg, "head_dim") or int(_get(cfg, "hidden_size")) // heads
    return kv_heads, heads // kv_heads, int(head_dim)


def read_config(folder: str | Path) -> dict | None:
    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_internlm2(folder: str | Path) -> bool:
    """Whether `folder` holds an InternLM2 checkpoint (by its config.json)."""
    config = read_config(folder)
    if not isinstance(config, dict):
        return False
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config.get("architectures") or [])


def _rope_parameters(cfg: dict) -> dict:
    """RoPE theta and scaling from either form a config.json may carry: InternLM2's own
    `rope_theta` + `rope_scaling` ({type, factor}), or the `rope_parameters` dict
    ({rope_type, factor, rope_theta}) transformers 5 writes; the first form wins where both are."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling")
    if not scaling and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("dynamic", "linear"):
        raise UserError(f"InternLM2 rope_scaling type {kind!r} is not supported", hint="expected dynamic or linear")
    factor = float(scaling["factor"])
    if factor < 1.0:
        raise UserError(f"InternLM2 rope_scaling factor must be >= 1, got {factor}")
    return {"rope_type": kind, "factor": factor, "rope_theta": theta}


def internlm2_config_to_llama(cfg: dict):
    """The `LlamaConfig` of the same network as InternLM2 config `cfg` (a parsed config.json)."""
    from transformers import LlamaConfig

    heads = int(cfg["num_attention_heads"])
    kwargs = {k: v for k, v in cfg.items() if k not in _NOT_ARCHITECTURE}
    known = set(LlamaConfig.__dataclass_fields__) if hasattr(LlamaConfig, "__dataclass_fields__") else None
    if known is not None:  # drop keys Llama has no use for (e.g. remote-code-only switches)
        kwargs = {k: v for k, v in kwargs.items() if k in known}
    kwargs.update(
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg["hidden_size"]) // heads,
        attention_bias=bool(cfg.get("bias", False)),
        mlp_bias=False,  # InternLM2's feed-forward never has biases, whatever `bias` says
        rope_parameters=_rope_parameters(cfg),
        architectures=["LlamaForCausalLM"],
    )
    return LlamaConfig(**kwargs)


def _split_wqkv(tensor: torch.Tensor, kv_heads: int, groups: int, head_dim: int):
    rows = kv_heads * (groups + 2) * head_dim
    if tensor.shape[0] != rows:
        raise UserError(f"wqkv has {tensor.shape[0]} rows, expected {rows} "
                        f"({kv_heads} kv heads x ({groups} + 2) x head_dim {head_dim})")
    fused = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
    q = fused[:, :groups].reshape(kv_heads * groups * head_dim, *tensor.shape[1:])
    k = fused[:, groups].reshape(kv_heads * head_dim, *tensor.shape[1:])
    v = fused[:, groups + 1].reshape(kv_heads * head_dim, *tensor.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def _fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int, groups: int, head_dim: int):
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(kv_heads, groups, head_dim, *rest), k.reshape(kv_heads, 1, head_dim, *rest),
                       v.reshape(kv_heads, 1, head_dim, *rest)], dim=1)
    return fused.reshape(kv_heads * (groups + 2) * head_dim, *rest).contiguous()


def internlm2_to_llama_state(sd: dict, cfg) -> dict:
    """Rename InternLM2 weights to `LlamaForCausalLM` names, splitting each fused `wqkv`.

    `cfg` is the InternLM2 config (dict) or the matching LlamaConfig. Rotary `inv_freq`
    buffers are dropped; any other unknown name is a UserError.
    """
    kv_heads, groups, head_dim = _dims(cfg)
    out = {}
    for key, value in sd.items():
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        match = _LAYER_KEY.match(key)
        if not match:
            raise UserError(f"unexpected InternLM2 weight {key!r}")
        layer, name, kind = match.groups()
        prefix = f"model.layers.{layer}."
        if name == "attention.wqkv":
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), _split_wqkv(value, kv_heads, groups, head_dim)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part
        elif name in _LAYER_NAMES:
            out[f"{prefix}{_LAYER_NAMES[name]}.{kind}"] = value
        else:
            raise UserError(f"unexpected InternLM2 weight {key!r}")
    return out


def llama_to_internlm2_state(sd: dict, cfg) -> dict:
    """The inverse of `internlm2_to_llama_state`: Llama names back to InternLM2's, q/k/v fused."""
    kv_heads, groups, head_dim = _dims(cfg)
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    out, pending = {}, {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        match = _LAYER_KEY.match(key)
        if not match:
            raise UserError(f"unexpected Llama weight {key!r} (cannot be written as InternLM2)")
        layer, name, kind = match.groups()
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            pending.setdefault((layer, kind), {})[name[-6]] = value
        elif name in layer_names:
            out[f"model.layers.{layer}.{layer_names[name]}.{kind}"] = value
        else:
            raise UserError(f"unexpected Llama weight {key!r} (cannot be written as InternLM2)")
    for (layer, kind), parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"layer {layer} lacks some of q/k/v_proj.{kind}")
        out[f"model.layers.{layer}.attention.wqkv.{kind}"] = _fuse_wqkv(parts["q"], parts["k"], parts["v"],
                                                                      kv_heads, groups, head_dim)
    return out


def _read_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    sd = {}
    if files:
        for file in files:
            sd.update(load_file(str(file)))
        return sd
    # pickle weights: check_model_folder only lets these through with model.allow_pickle_weights
    for file in sorted(folder.glob("*.bin")):
        if file.name == "training_args.bin":
            continue
        sd.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    if not sd:
        raise UserError(f"{folder} has no weights (*.safetensors)")
    return sd


def load_internlm2_as_llama(folder: str | Path, dtype: torch.dtype = torch.float32, **kwargs):
    """The InternLM2 checkpoint in `folder` as a `LlamaForCausalLM` (no remote code runs).

    `kwargs` go to `LlamaForCausalLM.from_pretrained` (e.g. `attn_implementation`,
    `quantization_config`). The original config is kept on the model as
    `model._tuneforge_internlm2 = {"config": ..., "folder": ...}` so that saving can write the
    InternLM2 layout back (`save_as_internlm2`, used by `tuneforge.model.export.save_hf_folder`).
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    folder = Path(folder)
    original = read_config(folder)
    if original is None:
        raise UserError(f"{folder} has no readable config.json")
    target = dtype  # a torch.dtype, resolved by the caller (`tuneforge.model.load.resolve_dtype`)
    config = internlm2_config_to_llama(original)
    sd = internlm2_to_llama_state(_read_weights(folder), original)
    sd = {k: v.to(target) if v.is_floating_point() else v for k, v in sd.items()}
    with torch.device("meta"):
        expected = set(LlamaForCausalLM(config).state_dict())
    missing = expected - set(sd)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    unexpected = set(sd) - expected
    if missing or unexpected:
        raise UserError(f"the InternLM2 weights in {folder} do not fit its config.json "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    kwargs.pop("trust_remote_code", None)
    kwargs.pop("use_safetensors", None)
    model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=sd, dtype=target, **kwargs)
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except (OSError, ValueError):
            pass
    model._tuneforge_internlm2 = {"config": original, "folder": str(folder)}
    model.config._name_or_path = str(folder)  # what a LoRA adapter records as its base_model_name_or_path
    model.name_or_path = str(folder)
    return model


def internlm2_origin(model) -> dict | None:
    """The `{"config", "folder"}` an InternLM2-converted model carries, or None.

    Read from the instance itself, not through attribute forwarding, so a PeftModel wrapping
    such a model answers None (its adapter is saved as an adapter).
    """
    return vars(model).get("_tuneforge_internlm2")


def save_as_internlm2(model, original_config: dict, out_dir: str | Path, *, source_dir: str | Path | None = None,
                      max_shard_size: str = "5GB") -> Path:
    """Write `model` (a Llama-layout model) in InternLM2's names, with `original_config` as config.json.

    The config keeps its `auto_map`; `vocab_size` and `dtype` follow the model. With
    `source_dir`, the remote-code `*.py` files, `generation_config.json` and `tokenizer.model`
    of the original folder are copied too, so InternLM2's own code can load the result. Weights go to
    `model.safetensors` (sharded with an index above `max_shard_size`). A sharded model (FSDP2
    DTensors) is gathered with `full_tensor()`, which every rank must call. Writes in place: wrap
    it in `tuneforge.model.export.atomic_dir` for an all-or-nothing folder.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[key] = value.detach().to("cpu")
    config = dict(original_config)
    tied = bool(config.get("tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    sd = llama_to_internlm2_state(state, config)
    sd = {k: v.contiguous() for k, v in sd.items()}
    embed = sd["model.tok_embeddings.weight"]
    config["vocab_size"] = int(embed.shape[0])
    config["torch_dtype"] = str(embed.dtype).removeprefix("torch.")
    if "dtype" in config:
        config["dtype"] = config["torch_dtype"]
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source_dir is not None:
        source = Path(source_dir)
        for file in [*source.glob("*.py"), source / "generation_config.json", source / "tokenizer.model"]:
            if file.is_file() and not (out / file.name).exists():
                shutil.copy2(file, out / file.name)
    return out


# ----------------------------------------------------------------------------- tokenizer


def _sp_proto(model_file: Path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def internlm2_tokenizer(model_file: str | Path, chat_template: str | None = CHAT_TEMPLATE):
    """A `PreTrainedTokenizerFast` equal to InternLM2's, built offline from its `tokenizer.model`.

    A byte-fallback BPE over the SentencePiece vocabulary (no dummy prefix, spaces as `▁`),
    `<s>` added in front of every encoded text (`add_bos_token`), eos and pad `</s>`, and the
    chat tokens of `SPECIAL_TOKENS` at ids 92538..92543 (the model file's `[UNUSED_TOKEN_141]`
    .. `[UNUSED_TOKEN_146]`), each encoding as one id. SentencePiece's other user-defined
    pieces stay whole, as SentencePiece keeps them. Decoding does not strip a leading space.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    model_file = Path(model_file)
    if not model_file.is_file():
        raise UserError(f"tokenizer model not found: {model_file}")
    proto = _sp_proto(model_file)
    if proto.trainer_spec.model_type != 2:
        raise UserError(f"{model_file} is not a BPE SentencePiece model (InternLM2's is)")
    if len(proto.pieces) <= max(SPECIAL_TOKENS):
        raise UserError(f"{model_file} has {len(proto.pieces)} pieces; InternLM2's has 92,544")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    for index, name in SPECIAL_TOKENS.items():
        pieces[index] = (name, pieces[index][1])
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, pieces)
    unk = proto.trainer_spec.unk_piece or "<unk>"
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    control = {i for i, p in enumerate(proto.pieces) if p.type == 3} | {proto.trainer_spec.unk_id} | set(SPECIAL_TOKENS)
    user_defined = [i for i, p in enumerate(proto.pieces) if p.type == 4 and i not in SPECIAL_TOKENS]
    backend.add_special_tokens([AddedToken(pieces[i][0], normalized=False, special=True) for i in sorted(control)])
    backend.add_tokens([AddedToken(pieces[i][0], normalized=False, special=False) for i in user_defined])
    bos, eos = "<s>", "</s>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
                                        pad_token=eos, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [SPECIAL_TOKENS[i] for i in sorted(SPECIAL_TOKENS)]})
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def internlm2_folder_tokenizer(folder: str | Path):
    """The tokenizer of an InternLM2 folder whose tokenizer needs remote code, or None.

    Used by `load_tokenizer`: a folder with a `tokenizer.model` and either no `tokenizer.json`
    or a tokenizer_config.json naming remote code gets `internlm2_tokenizer`, with the chat
    template of its tokenizer_config.json when it has one.
    """
    folder = Path(folder)
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        return None
    config_file = folder / "tokenizer_config.json"
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            config = {}
    if (folder / "tokenizer.json").is_file() and "auto_map" not in config:
        return None
    return internlm2_tokenizer(model_file, chat_template=config.get("chat_template") or CHAT_TEMPLATE)
