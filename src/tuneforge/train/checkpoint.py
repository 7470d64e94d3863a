"""Checkpoints: atomic save, verified load, exact resume, pruning, and the final model.

A checkpoint `checkpoints/step_N/` holds
- `model/`: a Hugging Face folder (a PEFT adapter folder for LoRA, full weights otherwise),
- `optimizer.pt`, `scheduler.pt`: their `state_dict`s,
- `rng.pt` (the RNG states of every rank) and `state.json`: step/epoch counters, the sampler
  position of every rank, the data-parallel world size and the checkpoint `format`,
- `manifest.json`, written last: every file with its size and sha256.
That is format "hf", written by rank 0 alone: one process, or DDP (whose ranks hold equal
weights and optimizer state). Under FSDP (format "dcp") every rank writes its shards of the
model (trainable parameters only for LoRA) and optimizer to `dcp/` through
torch.distributed.checkpoint; `model/` then holds the config (and, for LoRA, the gathered
adapter) and `optimizer.pt` is absent. `tuneforge export` consolidates `dcp/` into a plain
Hugging Face folder. Under DeepSpeed (format "deepspeed") every rank writes DeepSpeed's own
checkpoint files (module, ZeRO partitions, optimizer state) to `deepspeed/state/`; `model/` is
as under FSDP, and `state.json` adds the `zero_stage`. Several nodes need `train.work_dir` on a
filesystem they all share.

A checkpoint is written under a hidden temporary name, flushed, and renamed into place by
rank 0 only when every rank has finished writing, so a crash at any moment leaves either the
whole checkpoint or nothing that `latest_checkpoint` would pick. Resuming needs the same
format and the same number of data-parallel ranks (sampler positions are per rank and the
global batch depends on it); anything else is refused with a clear message before loading.
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
from tuneforge.model.run_template import stamp_template
from tuneforge.parallel.context import LocalContext

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


def checkpoint_problem(folder: Path, verify_hashes: bool = False) -> str | None:
    """What is wrong with `folder` against its manifest (sizes, and hashes when asked); None if nothing."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (an unfinished save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest.json says {meta['size']}"
        if verify_hashes and _sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256 in manifest.json"
    return None


def is_complete(folder: Path, verify_hashes: bool = False) -> bool:
    """True when `folder` has a manifest and every listed file has its size (and hash)."""
    return checkpoint_problem(folder, verify_hashes) is None


def resume_checkpoint(root: Path, resume: str, ctx=None, log=print) -> Path:
    """The checkpoint `--resume` starts from (`resume` is "latest" or a folder), every file
    verified against its manifest's sha256. "latest" falls back past corrupt checkpoints,
    naming each; none left, or a corrupt folder given by name, is a UserError. Rank 0 reads
    the files and every rank gets its answer."""
    ctx = ctx or LocalContext()
    chosen, error = None, None
    if ctx.is_main:
        try:
            chosen = str(_verified_checkpoint(root, resume, log))
        except UserError as exc:
            error = exc
    chosen, message = ctx.all_gather_object((chosen, None if error is None else str(error)))[0]
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return Path(chosen)


def _verified_checkpoint(root: Path, resume: str, log) -> Path:
    if resume != "latest":
        if not Path(resume).is_dir():
            raise UserError(f"--resume: checkpoint folder not found: {resume}", hint="pass a checkpoints/step_N folder")
        read_state(Path(resume))  # a folder that is no checkpoint at all: said so
        problem = checkpoint_problem(Path(resume), verify_hashes=True)
        if problem is not None:
            raise UserError(f"checkpoint {resume} is not intact: {problem}",
                            hint="resume from another checkpoints/step_N, or with --resume alone from the newest intact one")
        return Path(resume)
    found = complete_checkpoints(root)
    for _, folder in reversed(found):
        problem = checkpoint_problem(folder, verify_hashes=True)
        if problem is None:
            return folder
        log(f"checkpoint {folder} is corrupt ({problem}): skipped, trying the one before")
    raise UserError(f"--resume: no intact checkpoint in {root}" + (f" ({len(found)} corrupt)" if found else ""),
                    hint="start over with --force")


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
                    tokenizer=None, *, trainer=None, ctx=None, template: str | None = None) -> Path:
    """Write `root/step_{step}` atomically, then prune to the newest `keep_last` up to `step`.

    With a distributed `ctx` this is a collective: every rank calls it. `trainer` is the
    wrapped training module (needed for FSDP's sharded state). With `tokenizer`, `model/`
    also holds it and the chat template training used (`template`, see `model.run_template`).
    """
    ctx = ctx or LocalContext()
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    rngs = ctx.all_gather_object(rng_state())
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    ctx.barrier()
    fmt = _format(ctx)
    try:
        if fmt == "deepspeed":
            from tuneforge.parallel import deepspeed_engine

            deepspeed_engine.save_engine_state(tmp / deepspeed_engine.ENGINE_DIR, trainer, frozen_excluded=_is_peft(model))
            adapter = deepspeed_engine.full_model_state(model, trainable_only=True) if _is_peft(model) else None
            state = {**state, "zero_stage": ctx.stage}
        elif ctx.sharded:
            from tuneforge.parallel import fsdp

            fsdp.save_sharded(tmp / "dcp", trainer, optimizer)  # every rank writes its shards
            adapter = fsdp.full_model_state(trainer) if _is_peft(model) else None
        if ctx.is_main:
            if fmt == "hf":
                from tuneforge.model.lora import write_quantization_note

                model.save_pretrained(tmp / "model", safe_serialization=True)
                write_quantization_note(model, tmp / "model")  # QLoRA: `export --merge-lora` dequantizes
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            elif adapter is not None:
                model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=adapter)
            else:  # the weights are in dcp/ (deepspeed/); export consolidates them with this config
                _save_model_config(model, tmp / "model")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
                if template is not None:
                    stamp_template(tmp / "model", template, tokenizer)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "format": fmt}, indent=1))
            write_manifest(tmp)
            _fsync_tree(tmp)
            if final.exists():  # an older run's step with the same number: replace it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
    except Exception as exc:  # noqa: BLE001 - the filesystem's error, whichever library raised it
        raise_write_failure(exc, f"checkpoint {final}", root, "the previous checkpoint is intact; free disk space and --resume")
    finally:
        if ctx.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    ctx.barrier()
    if ctx.is_main:
        prune(root, keep_last, upto=step)
    return final


def raise_write_failure(exc: Exception, what: str, folder: Path, hint: str) -> None:
    """Re-raise `exc` as one UserError line when it is a failed write (see `write_failure`), else as is."""
    reason = write_failure(exc, folder)
    if reason is None:
        raise exc
    raise UserError(f"could not write {what}: {reason}", hint=hint) from None


def write_failure(exc: BaseException, folder: Path | None = None) -> str | None:
    """The reason a save into `folder` failed when `exc` is a failed write (from Python,
    safetensors or torch.save), normalised so that a full disk reads the same whichever
    library noticed (torch.save says only "file write failed"); None for any other error."""
    import errno

    text = str(exc)
    if isinstance(exc, OSError):
        return os.strerror(exc.errno) if exc.errno else (exc.strerror or text)
    if "Disk quota exceeded" in text or "os error 122" in text:
        return os.strerror(errno.EDQUOT)
    if any(marker in text for marker in ("No space left on device", "StorageFull", "os error 28")):
        return os.strerror(errno.ENOSPC)
    if type(exc).__name__ == "SafetensorError" or "file write failed" in text or "IoError" in text:
        try:
            nearly_full = folder is not None and shutil.disk_usage(folder).free < 64 * 2**20
        except OSError:
            nearly_full = False
        return os.strerror(errno.ENOSPC) if nearly_full else (text.splitlines()[0] if text else type(exc).__name__)
    return None


def _format(ctx) -> str:
    """The checkpoint format of a run context: "hf", "dcp" (FSDP) or "deepspeed"."""
    return getattr(ctx, "checkpoint_format", "dcp" if ctx.sharded else "hf")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _save_model_config(model, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def save_final_model(out_dir: Path, model, tokenizer, *, trainer=None, ctx=None, template: str | None = None) -> Path:
    """Write `model` (or its adapter) with `tokenizer` as a Hugging Face folder; a collective
    under FSDP, where the weights are gathered to rank 0 first. `template` (the run's
    `data.template`) is saved as the folder's chat template and named in `tuneforge.json`."""
    from tuneforge.model.export import atomic_dir, save_hf_folder
    from tuneforge.model.reward_head import is_reward_model

    ctx = ctx or LocalContext()
    final_dir = Path(out_dir)
    write_dir = final_dir  # a LoRA reward model's adapter goes beside it first (see `_merge_reward_adapter`)
    if _is_peft(model) and is_reward_model(model):
        write_dir = final_dir.with_name(f".{final_dir.name}-adapter")
    weights = None
    if _format(ctx) == "deepspeed":  # the fp32 master weights of every ZeRO stage
        from tuneforge.parallel.deepspeed_engine import full_model_state

        weights = full_model_state(model, trainable_only=_is_peft(model))
    elif _format(ctx) != "hf":
        from tuneforge.parallel import fsdp

        weights = fsdp.full_model_state(trainer)
    try:
        if ctx.is_main and weights is not None:
            with atomic_dir(write_dir) as tmp:
                model.save_pretrained(str(tmp), state_dict=weights)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
                    if template is not None:
                        stamp_template(tmp, template, tokenizer)
        elif ctx.is_main:
            save_hf_folder(model, tokenizer, write_dir, template=template)
        if ctx.is_main and write_dir != final_dir:
            _merge_reward_adapter(write_dir, final_dir)
    except Exception as exc:  # noqa: BLE001 - a full disk reads the same whichever library noticed
        newest = latest_checkpoint(final_dir.parent / "checkpoints")
        raise_write_failure(exc, f"the final model {final_dir}", final_dir.parent,
                            f"free disk space and --resume from {newest.name}, which is intact" if newest is not None
                            else "free disk space; no checkpoint was saved (train.save_every: 0), so the run starts over")
    ctx.barrier()
    return final_dir


def _merge_reward_adapter(adapter_dir: Path, out_dir: Path) -> None:
    """Merge a LoRA reward model's adapter (and its score head) into its base as `out_dir`, a
    folder `AutoModelForSequenceClassification` loads as it is (an adapter folder would load
    its base's config, whose num_labels is not 1); the adapter stays in the checkpoints."""
    from tuneforge.model.export import merge_adapter

    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        merge_adapter(base, adapter_dir, out_dir, "float32", check_out_dir=False)
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)


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


def prune(root: Path, keep_last: int, upto: int | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temporaries.

    With `upto`, only checkpoints up to that step count and go: ones from a later step (left
    by a run resumed from an earlier or a verified-good checkpoint past a corrupt one) stay
    until this run saves that step again, so they never crowd out the new ones."""
    found = [(step, path) for step, path in complete_checkpoints(root) if upto is None or step <= upto]
    for _, path in found[:-keep_last]:
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


def read_state(folder: Path) -> dict:
    """The `state.json` of a complete checkpoint (a UserError for anything else)."""
    if not is_complete(folder):
        raise UserError(f"{folder} is not a complete checkpoint", hint="pass a checkpoints/step_N folder with a manifest.json")
    return json.loads((folder / "state.json").read_text())


def load_checkpoint(folder: Path, model, optimizer, scheduler, *, trainer=None, ctx=None) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved `state` dict.

    Collective under FSDP and DeepSpeed. Refuses, before loading anything, a checkpoint of
    another format (or ZeRO stage) or another number of data-parallel ranks.
    """
    ctx = ctx or LocalContext()
    state = read_state(folder)
    if state["world_size"] != ctx.dp_size:
        raise UserError(f"checkpoint {folder} was written by {state['world_size']} data-parallel ranks, "
                        f"this run has {ctx.dp_size}", hint="resume with the same number of processes")
    fmt, want = state.get("format", "hf"), _format(ctx)
    if fmt != want:
        names = {"dcp": "FSDP (sharded)", "hf": "one process or DDP", "deepspeed": "DeepSpeed"}
        raise UserError(f"checkpoint {folder} was written by {names.get(fmt, fmt)}; this run uses "
                        f"{names.get(want, want).removesuffix(' (sharded)')}",
                        hint="resume with the parallel.strategy the run started with")
    if fmt == "deepspeed":
        from tuneforge.parallel import deepspeed_engine

        deepspeed_engine.check_resume(state, ctx, folder)
        deepspeed_engine.load_engine_state(folder / deepspeed_engine.ENGINE_DIR, trainer, frozen_excluded=_is_peft(model))
    elif ctx.sharded:
        from tuneforge.parallel import fsdp

        fsdp.load_sharded(folder / "dcp", trainer, optimizer)
    else:
        load_model_weights(model, folder / "model")
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rngs = torch.load(folder / "rng.pt", weights_only=True)
    set_rng_state(rngs[ctx.rank] if isinstance(rngs, list) else rngs)  # a dict: older one-process checkpoints
    return state
