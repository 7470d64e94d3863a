"""Building the training (and eval) data from the config: read, tokenize, mix, pack, cache.

Owns the pipeline order and its cache keys. `build_data` returns a `PackedData` whose
rows the collator turns into batches, and a `report` of what happened to every sample
(what `check-data` prints). Each dataset entry is tokenized and cached on its own, so that
changing one dataset, or only the packing, does not re-tokenize the others. Pre-tokenized
`internevo` entries skip records, template and tokenizer (`tuneforge.data.internevo`); their
key follows the `.bin`/`.meta` bytes, and whether packing is `hard` (long samples kept whole).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tuneforge.data import cache
from tuneforge.data.packing import Packs, mixed_order, pack
from tuneforge.data.preference import encode_pairs, pack_pairs, read_pairs
from tuneforge.data.records import data_files, read_samples
from tuneforge.data.templates import get_template
from tuneforge.data.tokenize import Encoded, encode_samples
from tuneforge.errors import DataError


@dataclass
class TokenStore:
    """One dataset entry's tokens (memory-mapped) with its sample offsets."""

    name: str
    tokens: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    origin: np.ndarray
    counts: dict
    key: str  # the cache key of this tokenization
    files: list = field(default_factory=list)  # the files read
    issues: dict = field(default_factory=dict)  # {kind: [count, first where]}: see records.conversation_issues


@dataclass
class PackedData:
    """Rows of packed sequence pieces over one or more token stores."""

    stores: list[TokenStore]
    packs: Packs
    max_length: int
    sample_base: np.ndarray  # first global sample id of each store
    report: dict = field(default_factory=dict)
    _lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.packs)

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self.packs.row_lengths()
        return self._lengths

    def locate(self, sample: int) -> tuple[TokenStore, int]:
        store = int(np.searchsorted(self.sample_base, sample, side="right")) - 1
        return self.stores[store], sample - int(self.sample_base[store])

    def row(self, index: int) -> list[tuple[np.ndarray, np.ndarray, tuple[str, int]]]:
        """The pieces of row `index`: (token ids, trained mask, (dataset, sample index))."""
        out = []
        begin, end = self.packs.row_offsets[index], self.packs.row_offsets[index + 1]
        for sample, start, stop in self.packs.pieces[begin:end].tolist():
            store, local = self.locate(sample)
            base = int(store.offsets[local])
            out.append((np.asarray(store.tokens[base + start: base + stop]),
                        np.asarray(store.trained[base + start: base + stop]),
                        (store.name, int(store.origin[local]))))
        return out


def _tokenized(entry, tokenizer, template, data_cfg, root: Path, tok_fp: str, log) -> TokenStore:
    pretokenized = entry.format == "internevo"  # token ids on disk: no template, no tokenizer
    if pretokenized:
        from tuneforge.data import internevo

        key = cache.make_key(internevo.cache_parts(entry, data_cfg))
        files = internevo.internevo_files(entry.path)
    else:
        files = data_files(entry.path)
        key = cache.make_key({
            "stage": "tokenized",
            "files": [(f.name, cache.file_digest(f)) for f in files],
            "format": entry.format, "columns": entry.columns, "system": entry.system,
            "tokenizer": tok_fp, "template": data_cfg.template,
            "max_length": data_cfg.max_length, "truncation": data_cfg.truncation,
        })
    hit = cache.load_entry(root, key)
    note = None
    issues: dict = {}
    if hit is None:
        started = time.time()
        if pretokenized:
            enc = _read_internevo_with_progress(entry, data_cfg)
        else:
            pairs = entry.format == "preference"  # two conversations per record (tuneforge.data.preference)
            if pairs:
                samples = read_pairs(entry.path, entry.columns, entry.system)
            else:
                samples = read_samples(entry.path, entry.format, entry.columns, entry.system, issues=issues)
            if not samples:
                raise DataError(f"dataset {entry.path} is empty")
            enc = _encode_with_progress(samples, template, tokenizer, data_cfg, Path(entry.path).name,
                                        encode_pairs if pairs else encode_samples)
        cache.save_entry(root, key, {"tokens": enc.tokens, "trained": enc.trained, "offsets": enc.offsets,
                                     "origin": enc.origin}, {"counts": enc.counts, "path": str(entry.path),
                                                               "issues": issues})
        hit = cache.load_entry(root, key)
        note = f"tokenized {entry.path}: {enc.counts['samples']} samples in {time.time() - started:.1f}s"
    arrays, meta = hit
    counts = meta["counts"]
    if len(arrays["offsets"]) == 1:
        short = f", {counts['short']} shorter than min_length={entry.min_length}" if counts.get("short") else ""
        raise DataError(f"every sample of {entry.path} was dropped ({counts['too_long']} longer than "
                        f"data.max_length={data_cfg.max_length}, {counts['no_loss']} without trained tokens{short})",
                        hint="raise data.max_length or use data.truncation=right")
    if counts.get("max_token", -1) >= len(tokenizer):
        raise DataError(f"{entry.path} holds token id {counts['max_token']}, beyond the tokenizer's "
                        f"{len(tokenizer)} tokens", hint="the data was tokenized for another model; check model.path")
    if note:
        log(note)
    return TokenStore(str(entry.path), arrays["tokens"], arrays["trained"], arrays["offsets"], arrays["origin"],
                      counts, key, [str(f) for f in files], meta.get("issues") or {})


def _read_internevo_with_progress(entry, data_cfg) -> Encoded:
    from tqdm.auto import tqdm

    from tuneforge.data.internevo import read_internevo

    with tqdm(desc=f"read {Path(entry.path).name}", unit="sample", disable=None, leave=False) as bar:
        return read_internevo(entry.path, data_cfg.max_length, data_cfg.truncation, entry.min_length,
                              keep_long=data_cfg.packing == "hard", progress=bar.update)


def _encode_with_progress(samples, template, tokenizer, data_cfg, label, encode=encode_samples) -> Encoded:
    from tqdm.auto import tqdm

    total = len(samples) * (2 if encode is encode_pairs else 1)
    with tqdm(total=total, desc=f"tokenize {label}", unit="sequence", disable=None, leave=False) as bar:
        return encode(samples, template, tokenizer, data_cfg.max_length, data_cfg.truncation, progress=bar.update)


def build_data(cfg, tokenizer, *, eval_split: bool = False, cache_root: Path | None = None, log=lambda m: None) -> PackedData:
    """Tokenize (cached), mix by weight, hold out an eval split if asked, and pack (cached)."""
    data_cfg = cfg.data
    entries = data_cfg.eval_datasets if (eval_split and data_cfg.eval_datasets) else data_cfg.datasets
    if not entries:
        raise DataError("no datasets configured", hint="set data.datasets: [{path: ..., format: ...}]")
    root = Path(cache_root or data_cfg.cache_dir or cache.default_cache_dir())
    needs_template = any(e.format != "internevo" for e in entries)  # pre-tokenized data has none
    template = get_template(data_cfg.template, tokenizer) if needs_template else None
    tok_fp = cache.tokenizer_fingerprint(tokenizer)
    stores = [_tokenized(e, tokenizer, template, data_cfg, root, tok_fp, log) for e in entries]
    sizes = np.array([len(s.offsets) - 1 for s in stores], dtype=np.int64)
    sample_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    lengths = np.concatenate([np.diff(np.asarray(s.offsets)) for s in stores]).astype(np.int64)
    dataset_of = np.repeat(np.arange(len(stores)), sizes)

    pairs = entries[0].format == "preference"  # then all are (config check): pack pair p = sequences 2p, 2p+1
    if pairs:
        dataset_of = dataset_of[0::2]
    held_out = data_cfg.eval_split if not data_cfg.eval_datasets else 0.0  # eval_datasets: all of them are eval
    if eval_split and not data_cfg.eval_datasets and held_out <= 0:
        raise DataError("no eval data", hint="set data.eval_datasets or data.eval_split")
    key = cache.make_key({
        "stage": "packed", "tokenized": [s.key for s in stores],
        "packing": data_cfg.packing, "max_length": data_cfg.max_length, "seed": data_cfg.seed,
        "weights": [e.weight for e in entries], "buffer": data_cfg.pack_buffer,
        "held_out": held_out, "eval": eval_split, "pairs": pairs,
    })
    hit = cache.load_entry(root, key)
    if hit is None:
        order = _split_order(dataset_of, [e.weight for e in entries] if not eval_split else [1.0] * len(entries),
                             data_cfg.seed, held_out, eval_split)
        if pairs:  # a row holds whole pairs, up to two sequences of max_length each
            packs = pack_pairs(data_cfg.packing, order, lengths, 2 * data_cfg.max_length, data_cfg.pack_buffer)
        else:
            packs = pack(data_cfg.packing, order, lengths, data_cfg.max_length, data_cfg.pack_buffer)
        cache.save_entry(root, key, {"pieces": packs.pieces, "row_offsets": packs.row_offsets}, {})
        hit = cache.load_entry(root, key)
    arrays, _ = hit
    row_length = data_cfg.max_length * (2 if pairs else 1)
    data = PackedData(stores, Packs(arrays["pieces"], arrays["row_offsets"]), row_length, sample_base)
    data.report = summarize(data, data_cfg.packing, [e.weight for e in entries], cfg.train.micro_batch_size)
    if pairs:
        data.report.update(pair_report(data, data_cfg.max_length))
    return data


def _split_order(dataset_of, weights, seed, held_out, eval_split) -> np.ndarray:
    """Sample order for packing; with `held_out` > 0, a seeded fraction goes to eval (`eval_split`
    picks that fraction, otherwise the rest)."""
    if held_out <= 0:
        return mixed_order(dataset_of, weights, seed)
    rng = np.random.default_rng(seed + 1)
    n = len(dataset_of)
    n_eval = max(1, int(round(n * held_out)))
    eval_ids = np.sort(rng.permutation(n)[:n_eval])
    keep = np.zeros(n, dtype=bool)
    keep[eval_ids] = True
    if not eval_split:
        keep = ~keep
    ids = np.flatnonzero(keep)
    local = mixed_order(dataset_of[ids], weights, seed)
    return ids[local]


def pair_report(data: PackedData, max_length: int) -> dict:
    """check-data's pair numbers: pairs read/used/dropped/truncated, sequences per row, mean lengths."""
    pieces = np.asarray(data.packs.pieces)
    used = len(pieces) // 2
    sizes = pieces[:, 2] - pieces[:, 1]
    return {"pairs": used, "pairs_read": int(sum(s.counts["samples"] for s in data.stores)),
            "pairs_dropped": int(sum(s.counts["dropped"] for s in data.stores)),
            "pairs_truncated": int(sum(s.counts["truncated"] for s in data.stores)),
            "pairs_identical": int(sum(s.counts.get("identical", 0) for s in data.stores)),
            "mean_chosen_tokens": float(sizes[0::2].mean()) if used else 0.0,
            "mean_rejected_tokens": float(sizes[1::2].mean()) if used else 0.0,
            "row_length": data.max_length, "max_length": max_length}


def summarize(data: PackedData, packing: str, weights: list[float], micro_batch_size: int = 1) -> dict:
    """The numbers check-data reports: counts, tokens, loss tokens, packing efficiency."""
    pieces = np.asarray(data.packs.pieces)
    lengths = data.lengths
    real = int(lengths.sum())
    loss = 0
    per_dataset = []
    sample_counts = np.zeros(len(data.stores), dtype=np.int64)
    token_counts = np.zeros(len(data.stores), dtype=np.int64)
    for index, store in enumerate(data.stores):
        base = int(data.sample_base[index])
        n = len(store.offsets) - 1
        mine = pieces[(pieces[:, 0] >= base) & (pieces[:, 0] < base + n)]
        offs = np.asarray(store.offsets)
        trained = np.asarray(store.trained)
        # trained targets: positions start+1..end-1 of each piece (the first token is never a target)
        csum = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
        starts = offs[mine[:, 0] - base] + mine[:, 1]
        ends = offs[mine[:, 0] - base] + mine[:, 2]
        loss += int((csum[ends] - csum[starts + 1]).sum()) if len(mine) else 0
        sample_counts[index] = len(np.unique(mine[:, 0])) if len(mine) else 0
        token_counts[index] = int((mine[:, 2] - mine[:, 1]).sum()) if len(mine) else 0
        per_dataset.append({"path": store.name, "weight": weights[index], "samples_read": store.counts["samples"],
                            "samples_used": int(len(mine)) if packing != "hard" else int(sample_counts[index]),
                            "tokens": int(token_counts[index]), **{k: store.counts[k] for k in ("dropped", "truncated")},
                            "drop_reasons": {k: store.counts[k] for k in ("too_long", "no_loss", "short") if store.counts.get(k)},
                            "files": store.files, "issues": store.issues})
    packs = len(data)
    if packing == "none":  # padded per micro-batch, in the packed (shuffled) order
        groups = [lengths[i: i + micro_batch_size] for i in range(0, packs, micro_batch_size)]
        slots = int(sum(len(g) * int(g.max()) for g in groups))
    else:
        slots = packs * data.max_length
    return {
        "samples": int(sum(s.counts["samples"] for s in data.stores)),
        "dropped": int(sum(s.counts["dropped"] for s in data.stores)),
        "truncated": int(sum(s.counts["truncated"] for s in data.stores)),
        "tokens": real,
        "loss_tokens": loss,
        "packs": packs,
        "pack_slots": int(slots),
        "packing_efficiency": real / slots if slots else 0.0,
        "max_length": data.max_length,
        "packing": packing,
        "datasets": per_dataset,
    }
