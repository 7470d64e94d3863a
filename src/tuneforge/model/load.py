"""Loading a tokenizer and a causal LM from a local Hugging Face folder, safely.

Owns: checking the model folder before transformers sees it (folder, `config.json`, weights,
pickle weights, remote code) so every mistake is one `UserError` line with the path and a fix;
resolving the dtype and attention implementation from `ModelConfig`; gradient checkpointing.
InternLM2 folders are loaded through `tuneforge.model.internlm2` (converted to Llama, no remote code).
The QLoRA quantization decision lives in `tuneforge.model.lora.quantization_config`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.config import ModelConfig
from tuneforge.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Files a Hugging Face training run leaves beside the weights that are pickles but not weights.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`; a UserError for anything not in `DTYPES`."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'", hint=f"use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The fast tokenizer in `path`; a missing pad token is set to eos (or unk), vocab unchanged.

    Remote code stays off unless `trust_remote_code` (model.trust_remote_code) is set, so a
    folder whose tokenizer_config.json carries an `auto_map` (InternLM2's, and the folders
    tuneforge writes from it) never makes transformers ask whether to run its Python.
    """
    from transformers import AutoTokenizer

    from tuneforge.model.internlm2 import internlm2_folder_tokenizer, is_internlm2

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"model folder not found: {folder}", hint="check the path; models are never downloaded")
    try:
        tokenizer = internlm2_folder_tokenizer(folder) if is_internlm2(folder) else None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {folder}: {_one_line(exc)}",
                        hint="the folder needs tokenizer.json (or the files its tokenizer_config.json names)") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer in {folder} is not a fast tokenizer", hint="add a tokenizer.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def check_model_folder(cfg: ModelConfig) -> dict:
    """Validate `cfg.path` before loading; returns the parsed `config.json`."""
    if not cfg.path:
        raise UserError("model.path is not set", hint="point model.path at a Hugging Face model folder")
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise UserError(f"model folder not found: {folder}", hint="check model.path; models are never downloaded")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{folder} has no config.json", hint="model.path must be a Hugging Face model folder (save_pretrained)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file} is not valid JSON: {exc}") from None

    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p for p in [*folder.glob("*.bin"), *folder.glob("*.pt")] if p.name not in _NOT_WEIGHTS]
    if not safetensors and not pickles:
        raise UserError(f"{folder} has no weights (*.safetensors)", hint="save the model with save_pretrained")
    if not safetensors and not cfg.allow_pickle_weights:
        raise UserError(
            f"{folder} has only pickle weights ({pickles[0].name}), which can run code when loaded",
            hint="convert them to safetensors, or set model.allow_pickle_weights: true if you trust the files",
        )

    _check_remote_code(cfg, folder, config)
    from tuneforge.model.reward_head import classifier_class_name

    head = classifier_class_name(config.get("architectures"))
    if head:
        raise UserError(f"{folder} holds a reward / classification model ({head}), not a causal LM",
                        hint="load it with transformers' AutoModelForSequenceClassification; train, chat, eval "
                             "and export start from a causal LM")
    return config


def _check_remote_code(cfg: ModelConfig, folder: Path, config: dict) -> None:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING or cfg.trust_remote_code or model_type == "internlm2":  # converted, no remote code
        return
    if "auto_map" in config:
        raise UserError(
            f"{folder} needs its own Python code (model_type '{model_type}' is unknown to transformers); "
            "running it executes whatever the folder contains",
            hint="read the .py files there, then set model.trust_remote_code: true if you trust them",
        )
    raise UserError(
        f"{folder}/config.json has model_type '{model_type}', which this transformers does not know",
        hint="upgrade transformers, or check the folder",
    )


def _attn_implementation(cfg: ModelConfig, override: str | None, device: str | torch.device) -> str | None:
    """An explicit override wins; config "auto" keeps transformers' default; others are resolved."""
    if override is not None:
        return override
    if cfg.attn_implementation == "auto":
        return None
    from tuneforge.model.attention import resolve_attn_implementation

    return resolve_attn_implementation(cfg.attn_implementation, torch.device(device).type)


def load_model(
    cfg: ModelConfig,
    *,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    dtype: str | torch.dtype | None = None,
):
    """The causal LM in `cfg.path`, in `dtype` (default `cfg.dtype`), on `device`.

    `attn_implementation` is a transformers name used as given (training passes the one
    `tuneforge.model.attention.resolve_attn_implementation` picks); without it, config "auto"
    keeps transformers' default and other config values are resolved by that function.
    `cfg.quantization` loads it in 4 bits (CPU or CUDA) or 8 bits (CUDA) with bitsandbytes, for QLoRA.
    On the meta device it builds the architecture from `config.json` without reading any
    weight (`build_on_meta`: FSDP ranks > 0, whose shards come from rank 0 through
    `tuneforge.parallel.rank0_load`).
    """
    from transformers import AutoModelForCausalLM

    from tuneforge.model.internlm2 import is_internlm2, load_internlm2_as_llama
    from tuneforge.model.lora import quantization_config

    torch_dtype = resolve_dtype(dtype if dtype is not None else cfg.dtype)
    check_model_folder(cfg)
    quant = quantization_config(cfg, device, compute_dtype=torch_dtype)
    kwargs = dict(
        dtype=torch_dtype,
        attn_implementation=_attn_implementation(cfg, attn_implementation, device),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=None if cfg.allow_pickle_weights else True,
    )
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": torch.device(device)})
    try:
        if torch.device(device).type == "meta":  # an FSDP rank > 0: the architecture only, rank 0 sends the weights
            model = build_on_meta(cfg.path, **kwargs)
        elif is_internlm2(cfg.path):  # converted to Llama whatever trust_remote_code says
            model = load_internlm2_as_llama(cfg.path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model in {cfg.path}: {_one_line(exc)}") from None

    if quant is not None:
        from peft import prepare_model_for_kbit_training

        from tuneforge.model.lora import release_checkpoint_file

        if torch.device(device).type == "cpu":
            release_checkpoint_file(model)

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model.to(device)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    return model


def build_on_meta(path: str | Path, *, dtype: torch.dtype, attn_implementation: str | None = None,
                  trust_remote_code: bool = False, **_ignored):
    """The causal LM of the folder `path` with every parameter and buffer on the meta device.

    Same architecture, dtype and attention implementation as `load_model` would load (InternLM2
    folders are converted to Llama as there); no weight file is opened."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

    from tuneforge.model.internlm2 import internlm2_config_to_llama, is_internlm2, read_config

    folder = Path(path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        if is_internlm2(folder):
            original = read_config(folder)
            model = LlamaForCausalLM._from_config(internlm2_config_to_llama(original), dtype=dtype, **extra)
            model._tuneforge_internlm2 = {"config": original, "folder": str(folder)}
        else:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if (folder / "generation_config.json").is_file():  # as from_pretrained (generation during eval)
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except (OSError, ValueError):
            pass
    return model.eval()  # from_pretrained returns eval mode too


def enable_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing, under either transformers API name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _one_line(exc: BaseException) -> str:
    """A library's multi-line message as one line, nothing cut off."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__
