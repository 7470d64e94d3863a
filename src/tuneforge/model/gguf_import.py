"""Importing a GGUF file (llama.cpp format) as a float32 Hugging Face model folder.

Owns: `import_gguf`, which lets transformers read and dequantize the file, drops the GGUF
quantization marker from the config, and writes model (safetensors) and tokenizer (with the
chat template the file carries) to `out_dir` atomically.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.model.export import save_hf_folder


def import_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Convert `gguf_file` into an HF folder at `out_dir` (float32 weights, tokenizer)."""
    file = Path(gguf_file)
    if not file.is_file():
        raise UserError(f"GGUF file not found: {file}", hint="check the path")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the gguf package", hint="pip install 'tuneforge[gguf]'")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_complete(file)
    folder, name = str(file.resolve().parent), file.name
    extra = {}
    if hasattr(transformers, "GgufConfig"):  # newer transformers may keep weights packed otherwise
        extra["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **extra)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot import {file}: {str(exc).strip().splitlines()[0]}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return save_hf_folder(model, tokenizer, out_dir)


def _check_complete(file: Path) -> None:
    """Read the header and tensor table with gguf's own reader: a truncated file is one clear line."""
    from gguf import GGUFReader

    with file.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"cannot import {file}: it does not start with the GGUF magic bytes, so it is not a GGUF file")
    try:
        GGUFReader(str(file))
    except (struct.error, EOFError, ValueError, IndexError) as exc:  # the reader ran past the end of the file
        raise UserError(f"cannot import {file}: it ends before its header and tensor table say it should, so it is "
                        f"truncated or corrupt ({file.stat().st_size:,} bytes; {exc})",
                        hint="download or copy it again") from None
