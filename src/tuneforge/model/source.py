"""Which model, adapter and chat template a path means, and loading them for inference.

`tuneforge chat` and `tuneforge eval` take a MODEL_DIR (a Hugging Face folder), a RUN_DIR
(a `train.work_dir`: its `final/`), a checkpoint (`checkpoints/step_N`: its `model/`) or an
adapter folder (its base is the local folder `adapter_config.json` names), plus an optional
`--adapter DIR`. `resolve_source` turns that into a `ModelSource`: base folder, adapter
folder, tokenizer folder, and the template the run trained with (`model.run_template`)
unless one is given. `load_for_inference` loads it (SDPA attention; bf16 on a GPU, fp32 on
the CPU) in eval mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.model.folders import model_folder
from tuneforge.model.run_template import template_for


@dataclass(frozen=True)
class ModelSource:
    base: Path
    adapter: Path | None
    tokenizer: Path
    template: str


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def resolve_source(path: str | Path, adapter: str | Path | None = None, template: str | None = None) -> ModelSource:
    folder = model_folder(Path(path))
    if not folder.is_dir():
        raise UserError(f"model folder not found: {path}", hint="pass a model folder, a run's work dir or a checkpoint")
    adapter_dir = Path(adapter) if adapter else None
    if adapter_dir is not None:
        adapter_dir = model_folder(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    if (folder / "adapter_config.json").is_file():
        if adapter_dir is not None:
            raise UserError(f"{path} is itself an adapter; --adapter {adapter} would be a second one",
                            hint="pass the base model folder with --adapter, or the adapter alone")
        adapter_dir = folder
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise UserError(f"the adapter in {folder} names base model {base!r}, which is not a local folder",
                            hint=f"pass the base folder and --adapter {folder}")
        folder = Path(base)
    if not (folder / "config.json").is_file():
        unfinished = (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir()
        raise UserError(f"{folder} is not a model folder (no config.json)",
                        hint="the run has no final/ yet: pass one of its checkpoints/step_N" if unfinished else
                        "an FSDP/DeepSpeed checkpoint of a full model: `tuneforge export` it first")
    if adapter_dir is not None:  # trained on another base: one line naming both
        from tuneforge.model.adapter_base import check_adapter_base

        check_adapter_base(folder, adapter_dir)
    tokenizer = adapter_dir if adapter_dir is not None and _has_tokenizer(adapter_dir) else folder
    return ModelSource(folder, adapter_dir, tokenizer, template or template_for(adapter_dir, folder))


def load_for_inference(source: ModelSource, device: str | None = None):
    """(model in eval mode, tokenizer) for `source`."""
    import torch

    from tuneforge.config import ModelConfig
    from tuneforge.model.load import load_model, load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    model = load_model(ModelConfig(path=str(source.base), dtype=dtype, attn_implementation="sdpa"), device=device)
    tokenizer = load_tokenizer(source.tokenizer)
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter))
    model.eval()
    return model, tokenizer
