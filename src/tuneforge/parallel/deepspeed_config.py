"""DeepSpeed configs: XTuner's names, user JSON files, and the one place "auto" is filled.

`--deepspeed zero2` (also `deepspeed_zero2`, `zero1`, `zero2_offload`, `zero3`,
`zero3_offload`) picks a shipped JSON from `recipes/deepspeed/`; any other value is a path to
a JSON file. `resolve_deepspeed_config` fills every "auto" from our config: micro batch,
accumulation, global batch, gradient clipping (always set explicitly: DeepSpeed clips at
1.0 when the key is absent) and precision; a value the user wrote that contradicts our
config is an error rather than a silent override. Precision follows
`tuneforge.train.precision.compute_dtype` (bf16/fp16 on a GPU; on the CPU only with
`model.cpu_mixed_precision`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import ConfigError, did_you_mean

SHIPPED = Path(__file__).resolve().parent.parent / "recipes" / "deepspeed"
NAMES = ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")


def load_deepspeed_json(name_or_file: str) -> dict:
    name = name_or_file.removeprefix("deepspeed_")
    if name in NAMES:
        return json.loads((SHIPPED / f"{name}.json").read_text())
    path = Path(name_or_file)
    if path.suffix != ".json" and not path.is_file():
        raise ConfigError(f"--deepspeed {name_or_file!r} is neither a shipped config nor a JSON file",
                          hint=did_you_mean(name, NAMES) or f"use one of {', '.join(NAMES)} or a .json path")
    if not path.is_file():
        raise ConfigError(f"--deepspeed: file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None


def _fill(tree: dict, key: str, value, source: str) -> None:
    current = tree.get(key, "auto")
    if current == "auto":
        tree[key] = value
    elif current != value:
        raise ConfigError(f"DeepSpeed config sets {key}={current!r} but {source} gives {value!r}",
                          hint=f"set it to \"auto\" in the JSON, or change {source}")


def resolve_deepspeed_config(name_or_file: str, cfg, dp_size: int, device_type: str) -> dict:
    """The DeepSpeed config dict for this run, with every "auto" filled from `cfg`."""
    ds = load_deepspeed_json(name_or_file)
    tc = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", tc.micro_batch_size, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", tc.gradient_accumulation, "train.gradient_accumulation")
    _fill(ds, "train_batch_size", tc.micro_batch_size * tc.gradient_accumulation * dp_size,
          "micro_batch_size x gradient_accumulation x data-parallel size")
    _fill(ds, "gradient_clipping", float(tc.max_grad_norm), "train.max_grad_norm")
    from tuneforge.train.precision import compute_dtype

    gpu = device_type == "cuda"
    precision = compute_dtype(cfg.model, device_type)  # None: fp32 (the CPU without model.cpu_mixed_precision)
    source = f"model.dtype={cfg.model.dtype} on {device_type}" + (
        "" if gpu else f" with model.cpu_mixed_precision={str(cfg.model.cpu_mixed_precision).lower()}")
    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        section = dict(ds.get(key) or {})
        section["enabled"] = section.get("enabled", "auto")
        _fill(section, "enabled", precision is not None and cfg.model.dtype == dtype, source)
        ds[key] = section
    zero = ds.get("zero_optimization") or {}
    if not gpu:  # pinned host memory needs CUDA
        for part in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(part), dict):
                zero[part]["pin_memory"] = False
    return ds
