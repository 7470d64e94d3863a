"""Whether a LoRA adapter belongs to the base model it is about to be applied to.

Owns `check_adapter_base`, used by `merge`, `export --merge-lora` and `chat --adapter` before
PEFT sees the adapter: each adapter matrix's shape is compared with the base weight it adapts
(read from safetensors headers, nothing loaded), so an adapter trained on another base is one
line naming both bases instead of PEFT's long size-mismatch error. When the shapes fit but the
adapter's recorded base (`base_model_name_or_path`) is another local folder holding different
weights (a sampled fingerprint of the weight files), a one-line warning names both: the merge
is then still done, since a copy in another dtype or place is a legitimate base.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

from tuneforge.errors import UserError

SAMPLE_BYTES = 1 << 20  # fingerprint: size plus the first and last MiB of each weight file


def safetensors_shapes(folder: Path) -> dict[str, tuple]:
    """{tensor name: shape} over the `*.safetensors` files of `folder`, from their headers."""
    shapes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with file.open("rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def weights_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as handle:
            digest.update(str(size).encode() + handle.read(SAMPLE_BYTES))
            handle.seek(max(0, size - SAMPLE_BYTES))
            digest.update(handle.read())
    return digest.hexdigest()


def _describe(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return str(folder)
    cfg = cfg.get("text_config", cfg)
    dims = ", ".join(f"{label} {cfg[key]}" for key, label in (("hidden_size", "hidden"), ("num_hidden_layers", "layers"),
                                                              ("vocab_size", "vocab")) if key in cfg)
    return f"{folder} ({cfg.get('model_type', '?')}{', ' + dims if dims else ''})"


def _base_key(adapter_key: str) -> tuple[str, str] | None:
    """`base_model.model.X.lora_A.weight` -> (`X.weight`, "A")."""
    key = adapter_key.removeprefix("base_model.model.")
    for part in ("A", "B"):
        marker = f".lora_{part}."
        if marker in key:
            head, _, tail = key.partition(marker)
            return f"{head}.{tail.split('.')[-1]}", part
    return None


def _first_mismatch(adapter_shapes: dict, base_shapes: dict) -> str | None:
    """The first adapter matrix that does not fit its base weight; `""` when none could be compared
    (e.g. an InternLM2 base, whose files use fused names), None when all fit."""
    compared = 0
    for key, shape in sorted(adapter_shapes.items()):
        found = _base_key(key)
        if found is None or found[0] not in base_shapes or len(shape) != 2:
            continue
        compared += 1
        base_shape = base_shapes[found[0]]
        side = shape[1] if found[1] == "A" else shape[0]  # lora_A: (r, in); lora_B: (out, r)
        want = base_shape[-1] if found[1] == "A" else base_shape[0]
        if side != want:
            return f"{key} is {list(shape)} but the base's {found[0]} is {list(base_shape)}"
    return None if compared else ""


def check_adapter_base(base_dir: str | Path, adapter_dir: str | Path, warn=None) -> None:
    """Raise a UserError naming both bases when the adapter cannot apply to `base_dir`; `warn`
    (default: print to stderr) gets the line about a same-shaped but different base."""
    warn = warn or (lambda line: print(line, file=sys.stderr))
    base, adapter = Path(base_dir), Path(adapter_dir)
    if not base.is_dir():
        return  # loading the base reports the missing folder
    try:
        recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return  # the caller reports a missing or broken adapter_config.json
    trained_on = Path(recorded) if recorded and recorded != "None" else None
    named = _describe(trained_on) if trained_on is not None and trained_on.is_dir() else repr(recorded)
    mismatch = _first_mismatch(safetensors_shapes(adapter), safetensors_shapes(base))
    if mismatch == "" and trained_on is not None and trained_on.is_dir():  # no names in common: compare the configs
        if _describe(trained_on).removeprefix(str(trained_on)) != _describe(base).removeprefix(str(base)):
            mismatch = "their configs differ"
    if mismatch:
        raise UserError(f"the adapter in {adapter} was trained on {named}, not on {_describe(base)}: {mismatch}",
                        hint="use the base model the adapter was trained on")
    if trained_on is None or not trained_on.is_dir() or trained_on.resolve() == base.resolve():
        return
    if weights_fingerprint(trained_on) != weights_fingerprint(base):
        warn(f"warning: the adapter in {adapter} was trained on {trained_on}, and {base} holds other weights "
             "of the same shapes; applying it anyway")
