"""Writing models out: HF folders, merged LoRA adapters and exported checkpoints.

Owns: `save_hf_folder` (a full model or a PEFT adapter folder, safetensors only), merging a
LoRA adapter into its base (`merge_adapter`), exporting a training checkpoint's `model/`
(`export_checkpoint`; FSDP and DeepSpeed checkpoints are consolidated by their modules, which
hand the whole model back to be saved here: export uses the strategies, never the reverse),
casting a saved folder's weights to another dtype, and `atomic_dir`: every output is written
to a temp folder beside its target and renamed into place, so a crash never leaves a
half-written model where a complete one is expected. `export`/`merge` destinations are
checked first (`tuneforge.model.destination`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from tuneforge.config import ModelConfig
from tuneforge.errors import UserError
from tuneforge.model.adapter_base import check_adapter_base
from tuneforge.model.destination import check_destination
from tuneforge.model.load import load_model, load_tokenizer, resolve_dtype
from tuneforge.model.run_template import read_run_info, stamp_template

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@contextmanager
def atomic_dir(out_dir: str | Path):
    """Yield a fresh temp folder beside `out_dir`; on success it replaces `out_dir` (a folder or
    a file). Whatever fails, no temp folder is left behind and the old `out_dir` stays."""
    out = Path(out_dir).resolve()  # "." has no name to put a temp folder beside
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)  # put the old destination back
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def convert_folder_dtype(folder: str | Path, dtype: str | torch.dtype) -> None:
    """Cast the floating-point tensors of every `*.safetensors` in `folder`, and its config.json."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    target = resolve_dtype(dtype)
    folder = Path(folder)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata=metadata)
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = str(target).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_hf_folder(model, tokenizer, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                   template: str | None = None) -> Path:
    """Save `model` (full weights, or just the adapter of a PeftModel) and `tokenizer`, atomically.

    `dtype` casts the saved weights; the in-memory model is left as it is. A full model loaded
    from an InternLM2 folder is written back in InternLM2's layout and config (its remote-code
    files copied along); adapters keep the Llama names they were trained with. `template` (a
    `data.template` name) is written as the chat template and recorded (`model.run_template`).
    """
    from tuneforge.model.internlm2 import internlm2_origin, save_as_internlm2

    from tuneforge.model.lora import write_quantization_note

    origin = internlm2_origin(model)
    with atomic_dir(out_dir) as tmp:
        if origin is not None:
            save_as_internlm2(model, origin["config"], tmp, source_dir=origin["folder"])
        else:
            model.save_pretrained(str(tmp))
            write_quantization_note(model, tmp)  # a QLoRA adapter: merges dequantize the same base
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            if template is not None:
                stamp_template(tmp, template, tokenizer)
        if dtype is not None:
            convert_folder_dtype(tmp, dtype)
    return Path(out_dir)


def save_consolidated(model, state: dict, files_dir: Path, out_dir: str | Path,
                      dtype: str | torch.dtype | None = None) -> Path:
    """Save a model gathered from a sharded checkpoint: `state` (tied duplicates left out) as a
    Hugging Face folder, with the tokenizer and other files saved beside the checkpoint's
    config (`files_dir`), atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), state_dict=state)
        for extra in Path(files_dir).iterdir():
            if extra.is_file() and not (tmp / extra.name).exists():
                shutil.copy2(extra, tmp / extra.name)
        if dtype is not None:
            convert_folder_dtype(tmp, dtype)
    return Path(out_dir)


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def merge_adapter(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = "float32",
    force: bool = False, check_out_dir: bool = True,
) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into the model in `base_dir`; save a plain HF folder.

    The merge is done in float32 and the result cast to `dtype`. The tokenizer comes from the
    adapter folder when it holds one, else from the base; so does the chat template, and the
    template name training recorded (`tuneforge.json`) is kept. `out_dir` must pass
    `check_destination` (`force` replaces a non-empty one); only training, writing its own
    `final/`, skips that check (`check_out_dir`). A QLoRA adapter (its folder holds
    `QUANTIZATION_NOTE`) was trained against the quantized base: the base is quantized the same
    way, dequantized to float32, and the adapter merged into that, so the plain folder computes
    what the 4-bit base + adapter did (not the full-precision base + adapter). A reward model's
    adapter (PEFT task SEQ_CLS, with its `score` head) gives a sequence-classification folder.
    """
    from peft import PeftModel

    from tuneforge.model.lora import read_quantization_note

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    if check_out_dir:
        check_destination(out_dir, [base_dir, adapter_dir], force)
    target = resolve_dtype(dtype if dtype is not None else "float32")  # `tuneforge merge` without --dtype
    check_adapter_base(base_dir, adapter)  # trained on another base: one line naming both
    quantization = read_quantization_note(adapter)
    base = load_model(ModelConfig(path=str(base_dir), dtype="float32", quantization=quantization))
    if quantization is not None:
        base = base.dequantize()  # the NF4 weights as float32 nn.Linear layers
    tokenizer_dir = adapter if has_tokenizer(adapter) else Path(base_dir)
    tokenizer = load_tokenizer(tokenizer_dir)  # InternLM2 bases too
    if json.loads((adapter / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS":
        from tuneforge.model.reward_head import as_reward_model  # a reward model's adapter: its score head rides along

        base = as_reward_model(base, tokenizer.pad_token_id)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    template = read_run_info(adapter).get("template") or read_run_info(tokenizer_dir).get("template")
    return save_hf_folder(merged, tokenizer, out_dir, dtype=None if target == torch.float32 else target, template=template)


def export_checkpoint(
    ckpt_dir: str | Path, out_dir: str | Path, merge_lora: bool = False, dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Export the `model/` of a training checkpoint (or a run's `final/`) to `out_dir`.

    An adapter is merged into the base its `adapter_config.json` names when `merge_lora`, else
    copied; a full model is copied. `dtype` casts the weights (merges default to float32).
    `out_dir` must pass `check_destination` (`force` replaces a non-empty one).
    """
    model_dir = Path(ckpt_dir) / "model"
    if not model_dir.is_dir():  # a run's final/ (or any HF / adapter folder) is its own model folder
        model_dir = Path(ckpt_dir)
    if not ((model_dir / "config.json").is_file() or (model_dir / "adapter_config.json").is_file()):
        raise UserError(f"{ckpt_dir} is neither a checkpoint (with model/) nor a model or adapter folder",
                        hint="pass checkpoints/step_N or final/ of a run")
    check_destination(out_dir, [ckpt_dir], force)
    adapter_config = model_dir / "adapter_config.json"
    if merge_lora and adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise UserError(
                f"the adapter in {model_dir} names base model {base!r}, which is not a local folder",
                hint=f"fix base_model_name_or_path in {adapter_config}, or export without merging",
            )
        return merge_adapter(base, model_dir, out_dir, dtype if dtype is not None else "float32", force=force)
    if not any(model_dir.glob("*.safetensors")) and (Path(ckpt_dir) / "dcp").is_dir():
        from tuneforge.parallel.fsdp import consolidated_model  # an FSDP checkpoint: consolidate its shards

        target = None if dtype is None else resolve_dtype(dtype)
        return save_consolidated(*consolidated_model(ckpt_dir), model_dir, out_dir, target)
    if not any(model_dir.glob("*.safetensors")) and (Path(ckpt_dir) / "deepspeed").is_dir():
        from tuneforge.parallel.deepspeed_engine import merged_model  # merge the ZeRO partitions

        target = None if dtype is None else resolve_dtype(dtype)
        return save_consolidated(*merged_model(ckpt_dir), model_dir, out_dir, target)
    if not any(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir} holds no *.safetensors weights", hint="is this a tuneforge checkpoint?")
    if dtype is not None:
        resolve_dtype(dtype)
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        if dtype is not None:
            convert_folder_dtype(tmp, dtype)
    return Path(out_dir)
