"""InternEvo / ftdp pre-tokenized data (`format: internevo`): reading and writing `.bin` + `.bin.meta`.

Owns the on-disk format and its checks. A dataset path is a `.bin` file or a folder of them
(searched recursively). Each `.bin` holds JSON lines `{"tokens": [...]}`; a negative id means
"context, no loss": the input id is `|t|` and the token is a learning target only when
`t > 0` (so id 0 can never be a target). Beside each `foo.bin` lies `foo.bin.meta`, an
`np.save`d `(N, 2)` integer array (int32 or int64) of (byte offset, token count) per line.

Reading memory-maps the `.bin` bytes, checks the meta against them (offsets inside the file,
a `{` at every offset, token counts) and parses each line's JSON from its own byte slice. The
result is an `Encoded`, so the cache, packing and collation treat it like any tokenized
dataset. Conventions kept from InternEvo/XTuner:
- file order: InternEvo's `os.walk(folder, followlinks=True)` with sorted folders and files
  (a folder's own files before its sub-folders; dot-files and dot-folders skipped). XTuner's `data_order_path` is supported as a
  file named `data_order.txt` in the dataset folder: one `.bin` path per line, relative to the
  folder (blank lines and `#` comments skipped); only the files it lists are read, in its order.
- `min_length` (dataset entry key): lines with fewer tokens are skipped (InternEvo keeps
  `count >= min_length`), judged on the meta's counts.
- samples stay in file order here; `data.seed` (default 1024, InternEvo's fixed seed) shuffles
  them in the packing stage, so `packing: hard` is "shuffle, then concatenate and cut every
  `max_length` tokens". With `packing: hard` a long sample is not truncated (it is cut across
  rows, as InternEvo does); with `soft`/`none` it follows `data.truncation`. Differences from
  InternEvo's exact rows: its shuffle is per `.bin` file with NumPy's legacy `RandomState`, and
  each file is packed on its own, dropping its last partial pack; here one seeded shuffle runs
  over the whole dataset entry and the last partial row is kept.
- the first token of a sample is never a target; samples left without any target are dropped
  (counted as `no_loss`).

Writing (`write_internevo`) turns any tokenized dataset back into this format: trained tokens
positive, context tokens negative, int64 meta (`tuneforge.data.export_internevo` does it for a
config's datasets: `tuneforge tokenize`).
"""

from __future__ import annotations

import json
import os
from itertools import chain
from pathlib import Path

import numpy as np

from tuneforge.data import cache
from tuneforge.data.tokenize import Encoded
from tuneforge.errors import DataError

ORDER_FILE = "data_order.txt"
META_SUFFIX = ".meta"
REBUILD_HINT = "rebuild the .bin/.meta pair, e.g. with `tuneforge tokenize CONFIG OUT_DIR` or InternEvo's tokenizer script"


def meta_path(bin_file: Path) -> Path:
    return bin_file.with_name(bin_file.name + META_SUFFIX)


def internevo_files(path: str | Path) -> list[Path]:
    """The `.bin` files behind a dataset path, in InternEvo's order (see the module docstring)."""
    root = Path(path)
    if root.is_file():
        if root.suffix != ".bin":
            raise DataError(f"{root} is not a .bin file", hint="format internevo reads .bin files (with .bin.meta beside)")
        return [root]
    if not root.is_dir():
        raise DataError(f"data file not found: {root}", hint="paths in a config are relative to the config file")
    order = root / ORDER_FILE
    if order.is_file():
        files = []
        for number, line in enumerate(order.read_text().splitlines(), 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            file = root / name
            if not file.is_file():
                raise DataError(f"lists {name}, which does not exist in {root}", where=f"{order}:{number}")
            files.append(file)
    else:
        files = []
        for folder, dirs, names in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .ipynb_checkpoints/ etc. are not data
            files.extend(Path(folder) / name for name in sorted(names) if name.endswith(".bin") and not name.startswith("."))
    if not files:
        raise DataError(f"folder {root} holds no .bin files", hint="format internevo reads InternEvo/ftdp .bin + .bin.meta")
    return files


def read_meta(bin_file: Path) -> np.ndarray:
    """The (N, 2) int64 array of (byte offset, token count) in `bin_file`'s `.meta`."""
    meta_file = meta_path(bin_file)
    if not meta_file.is_file():
        raise DataError(f"{bin_file} has no {meta_file.name} beside it", hint=REBUILD_HINT)
    try:
        with meta_file.open("rb") as handle:
            meta = np.load(handle, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{meta_file} is not an np.save'd array ({exc})", hint=REBUILD_HINT) from None
    if meta.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if meta.ndim != 2 or meta.shape[1] < 2 or meta.dtype.kind not in "iu":
        raise DataError(f"{meta_file} holds a {meta.dtype} array of shape {meta.shape}, expected (N, 2) integers "
                        "(byte offset, token count)", hint=REBUILD_HINT)
    return np.stack([meta[:, 0], meta[:, -1]], axis=1).astype(np.int64)


def cache_parts(entry, data_cfg) -> dict:
    """What the tokenized cache key of an internevo dataset entry depends on."""
    files = internevo_files(entry.path)
    root = Path(entry.path)
    listed = []
    for file in files:
        meta = meta_path(file)
        if not meta.is_file():
            raise DataError(f"{file} has no {meta.name} beside it", hint=REBUILD_HINT)
        name = os.path.relpath(file, root) if root.is_dir() else file.name
        listed.append((name, cache.file_digest(file), cache.file_digest(meta)))
    return {"stage": "tokenized", "format": "internevo", "files": listed, "min_length": entry.min_length,
            "max_length": data_cfg.max_length, "truncation": data_cfg.truncation,
            "keep_long": data_cfg.packing == "hard"}


def _parse_file(bin_file: Path, meta: np.ndarray, keep: np.ndarray, progress=None, batch: int = 4096):
    """Signed token ids (int64, flat) of the lines `keep` selects, checked against the meta."""
    size = bin_file.stat().st_size
    offsets, counts = meta[:, 0], meta[:, 1]
    where = str(bin_file)
    if len(meta) and (offsets.min() < 0 or offsets.max() >= size):
        bad = int(np.flatnonzero((offsets < 0) | (offsets >= size))[0])
        raise DataError(f"the meta puts line {bad} at byte {int(offsets[bad])}, outside the file's {size} bytes",
                        where=where, hint=REBUILD_HINT)
    if (counts < 0).any():
        raise DataError("the meta has a negative token count", where=where, hint=REBUILD_HINT)
    picked = np.flatnonzero(keep)
    if not len(picked):
        return np.zeros(0, dtype=np.int64)
    data = np.memmap(bin_file, dtype=np.uint8, mode="r")
    starts = data[offsets[picked]]
    if (starts != ord("{")).any():
        bad = int(picked[np.flatnonzero(starts != ord("{"))[0]])
        raise DataError(f"no JSON line starts at byte {int(offsets[bad])} (line {bad} of the meta)",
                        where=where, hint=f"the .meta does not describe this .bin; {REBUILD_HINT}")
    bounds = np.unique(np.append(offsets, size))
    ends = bounds[np.searchsorted(bounds, offsets[picked], side="right")]
    parts = []
    for begin in range(0, len(picked), batch):
        lists = []
        for line, start, end in zip(picked[begin: begin + batch].tolist(), offsets[picked[begin: begin + batch]].tolist(),
                                    ends[begin: begin + batch].tolist()):
            raw = data[start:end].tobytes()
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                raise DataError(f"malformed JSON line at byte {start} (line {line} of the meta): {reason}",
                                where=where, hint=f"the .meta may not describe this .bin; {REBUILD_HINT}") from None
            tokens = record.get("tokens") if isinstance(record, dict) else None
            if not isinstance(tokens, list):
                raise DataError(f"the line at byte {start} has no \"tokens\" list", where=where)
            if len(tokens) != counts[line]:
                raise DataError(f"the meta says line {line} (byte {start}) has {int(counts[line])} tokens, "
                                f"it has {len(tokens)}", where=where, hint=REBUILD_HINT)
            lists.append(tokens)
        total = int(counts[picked[begin: begin + batch]].sum())
        try:
            parts.append(np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=total))
        except (TypeError, ValueError, OverflowError):
            raise DataError("a line's \"tokens\" holds something other than integer ids", where=where) from None
        if progress is not None:
            progress(len(lists))
    del data
    return np.concatenate(parts)


def read_internevo(path: str | Path, max_length: int, truncation: str = "right", min_length: int = 0, *,
                   keep_long: bool = False, progress=None) -> Encoded:
    """All samples of an InternEvo dataset path as an `Encoded` (file order, see the module docstring).

    `min_length` skips lines with fewer tokens; `keep_long` (for `packing: hard`) keeps samples
    longer than `max_length` whole, otherwise `truncation` right-truncates or drops them.
    `origin` is a sample's line number over all files of the path, in reading order.
    """
    counts = {"samples": 0, "dropped": 0, "truncated": 0, "no_loss": 0, "too_long": 0, "short": 0, "max_token": -1}
    signed_parts, length_parts, origin_parts = [], [], []
    base = 0
    for file in internevo_files(path):
        meta = read_meta(file)
        keep = meta[:, 1] >= min_length if min_length > 0 else np.ones(len(meta), dtype=bool)
        signed_parts.append(_parse_file(file, meta, keep, progress))
        length_parts.append(meta[keep, 1])
        origin_parts.append(base + np.flatnonzero(keep))
        counts["samples"] += len(meta)
        counts["short"] += int((~keep).sum())
        base += len(meta)
    signed = np.concatenate(signed_parts) if signed_parts else np.zeros(0, np.int64)
    lens = np.concatenate(length_parts).astype(np.int64) if length_parts else np.zeros(0, np.int64)
    origin = np.concatenate(origin_parts).astype(np.int64) if origin_parts else np.zeros(0, np.int64)
    ids = np.abs(signed)
    if len(ids) and ids.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path} holds token id {int(ids.max())}, too large for a vocabulary")
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    position = np.arange(len(ids)) - np.repeat(starts, lens)
    trained = (signed > 0) & (position > 0)  # the first token of a sample is never predicted
    too_long = lens > max_length
    kept_len = lens if keep_long else np.minimum(lens, max_length)
    in_row = position < np.repeat(kept_len, lens)
    loss = np.bincount(np.repeat(np.arange(len(lens)), lens), weights=trained & in_row, minlength=len(lens))
    keep_sample = loss > 0
    if not keep_long:
        if truncation == "drop":
            keep_sample &= ~too_long
            counts["too_long"] += int(too_long.sum())
        else:
            counts["too_long"] += int((too_long & ~keep_sample).sum())
        counts["truncated"] += int((too_long & keep_sample).sum())
    counts["no_loss"] += int(((loss == 0) & ~(too_long & ~keep_long)).sum())
    counts["dropped"] += int((~keep_sample).sum()) + counts["short"]
    keep_token = in_row & np.repeat(keep_sample, lens)
    lengths = kept_len[keep_sample]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = ids[keep_token].astype(np.int32)
    counts["max_token"] = int(tokens.max()) if len(tokens) else -1
    return Encoded(tokens=tokens, trained=trained[keep_token], offsets=offsets, origin=origin[keep_sample],
                   counts=counts)


# ----------------------------------------------------------------------------- writing


def write_internevo(encoded, out_file: str | Path, meta_dtype=np.int64) -> Path:
    """Write `encoded` (an `Encoded`, or anything with `tokens`/`trained`/`offsets`) as `out_file` + `.meta`.

    A trained token is written as its id, any other as `-id`; reading the file back gives the
    same tokens and masks, except that a trained token with id 0 comes back untrained (the
    format cannot mark id 0 as a target). Both files are written under temporary names and
    renamed into place.
    """
    out = Path(out_file)
    if out.suffix != ".bin":
        raise DataError(f"{out}: an InternEvo data file must end in .bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(encoded.tokens).astype(np.int64)
    signed = np.where(np.asarray(encoded.trained, dtype=bool), tokens, -tokens)
    offsets = np.asarray(encoded.offsets, dtype=np.int64)
    meta = np.zeros((len(offsets) - 1, 2), dtype=np.int64)
    tmp_bin = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp_meta = out.with_name(f".{out.name}.meta.tmp-{os.getpid()}")
    try:
        with tmp_bin.open("wb") as handle:
            position = 0
            for index in range(len(offsets) - 1):
                row = signed[offsets[index]: offsets[index + 1]].tolist()
                line = ('{"tokens": [' + ", ".join(map(str, row)) + "]}\n").encode()
                meta[index] = (position, len(row))
                handle.write(line)
                position += len(line)
        with tmp_meta.open("wb") as handle:  # a file object: np.save would add ".npy" to a name
            np.save(handle, meta.astype(meta_dtype))
        os.replace(tmp_bin, out)
        os.replace(tmp_meta, meta_path(out))
    finally:
        for tmp in (tmp_bin, tmp_meta):
            if tmp.exists():
                tmp.unlink()
    return out
