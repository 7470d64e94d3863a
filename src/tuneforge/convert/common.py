"""Pieces both converters share: local paths, the launch line, the global-batch summary, dtypes."""

from __future__ import annotations

from pathlib import Path

from tuneforge.convert.draft import Draft, Source, match_reason
from tuneforge.convert.pyconfig import Opaque
from tuneforge.errors import UserError

DEEPSPEED_NAMES = ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")
GPUS_PER_NODE = 8


def local_path(value, what: str) -> tuple[str, str | None]:
    """(path for the YAML, note). A path that exists relative to the working directory (how
    XTuner and InternEvo resolve them) becomes absolute; anything else is kept with a note."""
    text = str(value)
    for prefix in ("local:",):  # InternEvo's storage prefix for a local folder
        if text.startswith(prefix):
            text = text[len(prefix):]
    if "{{" in text:
        return text, f"{what}: '{{{{ }}}}' placeholders are not filled in: write the real path"
    if "://" in text or text.startswith(("boto3:", "volc:", "oss2:")):
        return text, f"{what}: remote storage is not read; copy it to a local folder and set this path"
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve()), None
    return text, f"{what} {text!r} not found here: a hub id or another machine's path? tuneforge downloads nothing; set a local path"


def deepspeed_name(choice: str | None) -> str | None:
    """XTuner's `--deepspeed deepspeed_zero2` (or `zero2`, or a JSON file) as tuneforge's name."""
    if choice is None:
        return None
    if choice.endswith(".json"):
        return choice
    name = choice.removeprefix("deepspeed_")
    if name not in DEEPSPEED_NAMES:
        raise UserError(f"--deepspeed {choice}: not a DeepSpeed config name",
                        hint=f"use one of {', '.join(DEEPSPEED_NAMES)} (or deepspeed_zero2 ...) or a FILE.json")
    return name


def launch_line(out_name: str, gpus: int, deepspeed: str | None) -> str:
    flag = f" --deepspeed {deepspeed}" if deepspeed else ""
    if gpus > GPUS_PER_NODE and gpus % GPUS_PER_NODE == 0:
        nodes = gpus // GPUS_PER_NODE
        return (f"NNODES={nodes} NODE_RANK=<0..{nodes - 1}> ADDR=<node 0> PORT=29500 NPROC_PER_NODE={GPUS_PER_NODE} "
                f"tuneforge train {out_name}{flag}   (or: srun ... tuneforge train {out_name} --launcher slurm{flag})")
    return f"NPROC_PER_NODE={gpus} tuneforge train {out_name}{flag}"


def add_batch_summary(draft: Draft, gpus: int, source_formula: str, source_rows: int, row_tokens: int,
                      micro: int, accumulation: int, sp: int, tp: int) -> None:
    """Both global batches in the draft's summary; a warning when they differ."""
    dp = gpus // (sp * tp)
    ours = micro * accumulation * dp
    draft.summary += [
        f"Global batch on {gpus} GPUs (the count assumed; convert again with --gpus N for another):",
        f"  {draft.kind}: {source_formula} = {source_rows} rows of {row_tokens} tokens",
        f"  tuneforge: micro_batch_size x gradient_accumulation x ranks/(sequence_parallel x tensor_parallel)"
        f" = {micro} x {accumulation} x {gpus}/({sp} x {tp}) = {ours} rows of {row_tokens} tokens",
    ]
    if ours != source_rows:
        draft.summary.append(f"  WARNING: these differ ({ours} vs {source_rows} rows); adjust "
                             "train.gradient_accumulation to train on the same tokens per step")


def finish_draft(draft: Draft, src: Source, notes: list[str], reasons: list[tuple[str, str]]) -> Draft:
    """The converter's notes, what the reader could not evaluate or read, and every setting left
    unmapped (with the reason from `reasons`), added to `draft`."""
    draft.header += [f"Note: {n}" for n in notes]
    draft.header += src.unevaluated_notes()
    for line, what in src.config.skipped:
        draft.header.append(f"Not read (line {line}): {what}")
    draft.unmapped = src.leftovers(lambda p, v: match_reason(reasons, p, v))
    return draft


def torch_dtype(value) -> str | None:
    """`torch.float16` / "torch.bfloat16" / "bfloat16" / "fp16" as a model.dtype value."""
    name = value.leaf if isinstance(value, Opaque) else str(value).rsplit(".", 1)[-1]
    return {"float16": "float16", "half": "float16", "fp16": "float16", "bfloat16": "bfloat16",
            "bf16": "bfloat16", "float32": "float32", "float": "float32", "fp32": "float32",
            "tf32": "float32"}.get(name.lower())
