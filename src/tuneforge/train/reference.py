"""DPO's reference log-probs for full fine-tuning: one pass before training, cached on disk.

Keeping a second resident model costs memory a LoRA run never pays (its reference is the
same model with the adapter disabled). Full fine-tuning instead computes, once before the
first step, the initial model's summed log-probs of the answer tokens of every pair of every
dataset entry, and stores them in the data cache (`tuneforge.data.cache`) under a key made of
the tokenized entry's key (files, tokenizer, template, max_length, truncation) and the
model's weight files (by content), dtype and attention; a rerun or a resume reads them back.
The pass runs through the wrapped training module (FSDP/DDP/DeepSpeed as in training), each
data-parallel rank taking every W-th batch of one pair per row, and ranks exchange results.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tuneforge.data import cache
from tuneforge.errors import UserError


class ReferenceTable:
    """Cached reference log-prob sums: per dataset entry, an array [pairs in file, 2]."""

    def __init__(self, tables: dict[str, np.ndarray]):
        self.tables = tables

    def lookup(self, sample_ids) -> torch.Tensor:
        """The reference sums of a batch's sequences (chosen, rejected, chosen, ...)."""
        values = [self.tables[name][origin, k % 2] for k, (name, origin) in enumerate(sample_ids)]
        out = torch.tensor(values, dtype=torch.float32)
        if torch.isnan(out).any():
            raise UserError("the cached reference log-probs miss pairs of this batch", hint="clear data.cache_dir")
        return out


def model_fingerprint(model_cfg) -> str:
    """A key part that changes with the model's weights (by content), dtype and attention."""
    folder = Path(model_cfg.path)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")) if folder.is_dir() else []
    return cache.make_key({"weights": [(f.name, cache.file_digest(f)) for f in files], "dtype": model_cfg.dtype,
                           "attn": model_cfg.attn_implementation, "quantization": model_cfg.model_dump(mode="json")["quantization"]})


def _pair_rows(store, pairs: list[int]) -> list[list]:
    """One row per pair: its chosen and rejected pieces, as `PackedData.row` gives them."""
    rows = []
    for p in pairs:
        row = []
        for k in (2 * p, 2 * p + 1):
            a, b = int(store.offsets[k]), int(store.offsets[k + 1])
            row.append((np.asarray(store.tokens[a:b]), np.asarray(store.trained[a:b]), (store.name, int(store.origin[k]))))
        rows.append(row)
    return rows


@torch.no_grad()
def _compute(store, objective, trainer, ctx, pad_id, autocast, micro: int) -> np.ndarray:
    from tqdm.auto import tqdm

    from tuneforge.data.collate import collate_rows

    n = (len(store.offsets) - 1) // 2
    batches = [list(range(i, min(i + micro, n))) for i in range(0, n, micro)]
    mine = batches[ctx.dp_rank:: ctx.dp_size]
    rounds = math.ceil(len(batches) / ctx.dp_size)  # the same number of forwards on every rank (FSDP)
    results = []
    was_training = trainer.training
    trainer.eval()
    objective.reference_pass = True
    try:
        for index in tqdm(range(rounds), desc=f"reference log-probs {Path(store.name).name}", unit="batch",
                          disable=not ctx.is_main or None, leave=False):
            pairs = mine[index] if index < len(mine) else batches[0]
            batch = collate_rows(_pair_rows(store, pairs), pad_id)
            batch = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast():
                logps = trainer(batch).double().cpu().numpy()
            if index < len(mine):
                results.append((pairs, logps.reshape(-1, 2)))
    finally:
        objective.reference_pass = False
        trainer.train(was_training)
    table = np.full((int(store.origin.max()) + 1 if n else 0, 2), np.nan)
    for part in ctx.all_gather_object(results)[:: ctx.world_size // ctx.dp_size]:
        for pairs, logps in part:
            table[np.asarray(store.origin)[2 * np.asarray(pairs)]] = logps
    return table


def reference_table(cfg, objective, trainer, ctx, datasets, pad_id, autocast) -> ReferenceTable:
    """The reference table for every dataset entry of `datasets` (PackedData), computed where missing."""
    root = Path(cfg.data.cache_dir or cache.default_cache_dir())
    model_key = model_fingerprint(cfg.model)
    tables = {}
    stores = {store.key: store for data in datasets for store in data.stores}
    for store in stores.values():
        key = cache.make_key({"stage": "reference", "tokenized": store.key, "model": model_key})
        hit = cache.load_entry(root, key)
        if ctx.all_reduce_sum(int(hit is None)) > 0:  # computed together when any rank lacks it
            table = _compute(store, objective, trainer, ctx, pad_id, autocast, cfg.train.micro_batch_size)
            if hit is None:
                cache.save_entry(root, key, {"logps": table}, {"path": store.name, "model": cfg.model.path})
            tables[store.name] = table
        else:
            tables[store.name] = np.asarray(hit[0]["logps"])
    return ReferenceTable(tables)
