"""Checkpoints of a single-process run: atomic save, verified load, exact resume, pruning.

A checkpoint `checkpoints/step_N/` holds
- `model/`: a Hugging Face folder (a PEFT adapter folder for LoRA, full weights otherwise),
- `optimizer.pt`, `scheduler.pt`: their `state_dict`s,
- `rng.pt` and `state.json`: RNG states, step/epoch counters and the sampler position,
- `manifest.json`, written last: every file with its size and sha256.
It is written under a hidden temporary name, flushed, and renamed into place only when
complete, so a crash at any moment leaves either the whole checkpoint or nothing that
`latest_checkpoint` would pick.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tuneforge.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"files": files}, indent=1))


def is_complete(folder: Path, verify_hashes: bool = False) -> bool:
    """True when `folder` has a manifest and every listed file has its size (and hash)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if verify_hashes and _sha256(path) != meta["sha256"]:
            return False
    return True


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": keys.tolist(), "numpy_rest": [int(pos), int(has_gauss), float(gauss)],
            "python": repr(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate(ast.literal_eval(state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int,
                    tokenizer=None) -> Path:
    """Write `root/step_{step}` atomically, then prune to the newest `keep_last`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():  # an older run's step with the same number: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {exc.strerror or exc}",
                        hint="the previous checkpoint is intact; free disk space and --resume") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(root, keep_last)
    return final


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temporaries."""
    for _, path in complete_checkpoints(root)[:-keep_last]:
        doomed = path.with_name(f".del-{path.name}")
        os.rename(path, doomed)  # atomic: never a half-deleted step_N
        shutil.rmtree(doomed, ignore_errors=True)
    for stale in root.glob(".del-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_model_weights(model, folder: Path) -> None:
    """Restore trainable weights saved by `save_checkpoint` into `model` (in place)."""
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise UserError(f"checkpoint adapter {folder} does not fit this model ({len(unexpected)} unexpected keys)")
        return
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise UserError(f"checkpoint {folder} holds no weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} does not fit this model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                        hint="resume with the same model.path and LoRA settings")


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved `state` dict."""
    if not is_complete(folder):
        raise UserError(f"{folder} is not a complete checkpoint", hint="pass a checkpoints/step_N folder with a manifest.json")
    load_model_weights(model, folder / "model")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
    return json.loads((folder / "state.json").read_text())
