"""The resume contract: which settings may change on `--resume`, and the lr rule.

`--resume` compares the config with the run's saved `config.yaml`, key by key:
- keys in `MAY_CHANGE` take effect in the resumed run: the learning rate and its schedule
  (see `apply_schedule`), the run's length (`train.max_steps`, `train.epochs`), the
  save/eval/log intervals, `train.keep_last`, timeouts, and knobs that change memory or speed
  but not the result (gradient checkpointing, loss chunking, heap trimming, compile,
  data-loading workers, the cache folder), plus what only evaluation or clipping reads;
- every other key (the data stream: data.*, the sampler, seeds, micro-batch and accumulation;
  the model: model.*, LoRA; the parallel layout; weight decay, which the restored optimizer
  keeps) would silently break the promise that a resumed run continues the same run, so a
  change is refused with ONE line listing every changed key as `key: old -> new` (exit 2).
The number of ranks and the checkpoint format are checked against the checkpoint itself
(train/checkpoint.py), and the data against the checkpoint's `data_fingerprint` (the content
digests of the data files with the tokenizer and template that tokenized them), so a data
file edited in place is refused as well (`check_same_data`).

The lr rule: the restored scheduler keeps its position (the optimizer steps taken); the lr of
every later step is the NEW `train.lr` times the NEW schedule (`lr_scheduler`, `warmup_ratio`,
`min_lr_ratio`, over the new total number of steps) evaluated at that position. So raising
`max_steps` stretches the remaining decay, and a new lr applies from the first resumed step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tuneforge.errors import UserError

MAY_CHANGE = frozenset({
    "train.lr", "train.lr_scheduler", "train.warmup_ratio", "train.min_lr_ratio",
    "train.max_steps", "train.epochs",
    "train.save_every", "train.eval_every", "train.log_every", "train.keep_last",
    "train.eval_prompts", "train.eval_at_start", "train.eval_metric", "train.eval_metric_samples",
    "train.eval_max_new_tokens", "train.eval_metric_pattern", "train.max_grad_norm", "train.skip_nonfinite", "train.work_dir",
    "train.loss_chunk_size", "train.cpu_heap_trim_every", "train.cpu_heap_trim_slack",
    "model.gradient_checkpointing", "model.compile",
    "data.num_workers", "data.cache_dir", "data.eval_datasets",
    "parallel.timeout_s",
})


def flatten(tree, prefix: str = "") -> dict:
    """{'a.b': value} for the leaves of nested dicts; lists of dicts are indexed (`data.datasets.0.path`)."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(tree, list) and any(isinstance(item, dict) for item in tree):
        for index, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{index}."))
        if not tree:
            out[prefix.rstrip(".")] = []
    else:
        out[prefix.rstrip(".")] = tree
    return out


def _saved_tree(saved: Path) -> dict:
    """The saved config, with today's defaults filled in when it still validates."""
    from tuneforge.config import Config

    tree = yaml.safe_load(saved.read_text()) or {}
    try:
        return Config.model_validate(tree).model_dump(mode="json")
    except ValueError:
        return tree


def _allowed(key: str) -> bool:
    return key in MAY_CHANGE or any(key.startswith(name + ".") for name in MAY_CHANGE)


def _get(tree, key: str):
    for part in key.split("."):
        if isinstance(tree, list):
            tree = tree[int(part)] if part.isdigit() and int(part) < len(tree) else None
        else:
            tree = (tree or {}).get(part)
    return tree


def changed_keys(cfg, saved: Path) -> dict[str, tuple]:
    """{key: (old, new)} for every key of `cfg` that differs from the saved config; a section
    set on one side only (`model.lora: None -> {...}`) is one key."""
    old_tree, new_tree = _saved_tree(saved), cfg.model_dump(mode="json")
    old, new = flatten(old_tree), flatten(new_tree)
    changes = {}
    for key in dict.fromkeys([*new, *old]):
        if old.get(key) != new.get(key):
            parts = key.split(".")
            whole = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in old or p in new), key)
            changes[whole] = (_get(old_tree, whole), _get(new_tree, whole))
    return changes


def check_resume_contract(cfg, saved: Path, log=lambda m: print(m, file=sys.stderr)) -> None:
    """Refuse a resume that changes the data stream or the model; say what changes take effect."""
    if not saved.is_file():
        return
    changes = changed_keys(cfg, saved)
    refused = {k: v for k, v in changes.items() if not _allowed(k)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise UserError(f"--resume cannot change the data stream or the model ({saved}): {listed}",
                        hint="resume with the old values, or start a new run (another train.work_dir, or --force)")
    shown = {k: v for k, v in changes.items() if k != "train.work_dir"}
    if shown:
        log("--resume: these changes take effect: " + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in shown.items()))


def apply_schedule(scheduler, lr: float) -> None:
    """After a restore: the configured peak `lr` and the new schedule, at the restored position."""
    scheduler.base_lrs = [lr for _ in scheduler.optimizer.param_groups]
    position = scheduler.last_epoch
    rates = [base * fn(position) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["initial_lr"] = lr
        group["lr"] = rate
    scheduler._last_lr = rates


def data_fingerprint(data) -> str:
    """One digest of the training data's tokenization keys: file contents, tokenizer, template."""
    import hashlib

    return hashlib.blake2b("|".join(store.key for store in data.stores).encode(), digest_size=12).hexdigest()


def check_same_data(state: dict, data, folder: Path) -> None:
    """Refuse to resume `folder` on data other than the data it was trained on."""
    saved = state.get("data_fingerprint")
    if saved is not None and saved != data_fingerprint(data):
        raise UserError(f"--resume: the training data changed since {folder} was written "
                        "(a data file's content, or the tokenizer or template that tokenizes it)",
                        hint="restore the data the run started with, or start a new run (another train.work_dir, or --force)")
