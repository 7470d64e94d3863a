"""LoRA and QLoRA: wrapping a causal LM in a PEFT adapter, and deciding on 4/8-bit loading.

Owns: the translation of `LoraConfig` into `peft.LoraConfig` (`apply_lora`), continuing from
an existing PEFT adapter (`load_adapter`, for `model.adapter`), the choice of a bitsandbytes
quantization config for QLoRA (`quantization_config`, used by `load_model`), and counting
trainable parameters.
"""

from __future__ import annotations

import importlib.util

import torch

from tuneforge.config import LoraConfig, ModelConfig
from tuneforge.errors import UserError


def quantization_config(cfg: ModelConfig, device: str | torch.device, compute_dtype: torch.dtype | None = None):
    """A `BitsAndBytesConfig` for `cfg.quantization`, None without it.

    QLoRA needs a CUDA device and bitsandbytes; anything else is a UserError.
    """
    if cfg.quantization is None:
        return None
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if not on_cuda or importlib.util.find_spec("bitsandbytes") is None:
        missing = "a CUDA GPU" if not on_cuda else "the bitsandbytes package"
        raise UserError(
            f"QLoRA (model.quantization) needs a CUDA GPU with bitsandbytes, and {missing} is not available",
            hint="remove model.quantization to train plain LoRA, or install bitsandbytes on a GPU machine",
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def apply_lora(model, lora: LoraConfig):
    """Wrap `model` in a LoRA `PeftModel`; only the adapter weights are trainable."""
    import peft

    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=peft.TaskType.CAUSAL_LM,
    )
    try:
        return peft.get_peft_model(model, peft_config)
    except ValueError:
        if isinstance(lora.target_modules, str):
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"model.lora.target_modules {lora.target_modules} match no layer of the model",
            hint=f"linear layers here: {', '.join(names)}; or use 'all-linear'",
        ) from None


def load_adapter(model, folder: str):
    """Wrap `model` in the PEFT LoRA adapter saved in `folder` (or a run's final/, a checkpoint's
    model/), its weights trainable."""
    from pathlib import Path

    import peft

    from tuneforge.model.source import model_folder

    folder = model_folder(Path(folder))  # a run dir or a checkpoint means its adapter
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"model.adapter: {folder} is not a PEFT adapter folder (no adapter_config.json)",
                        hint="point it at a LoRA run's final/ or a checkpoint's model/")
    try:
        return peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.adapter: the adapter in {folder} does not fit model.path ({first})",
                        hint="use the base model the adapter was trained on") from None


def trainable_parameter_count(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            count *= 2 * (param.element_size() if hasattr(param, "element_size") else 1)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
