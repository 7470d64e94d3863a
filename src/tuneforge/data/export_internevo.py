"""`tuneforge tokenize`: a config's datasets, tokenized as training would, written as InternEvo data.

Uses the training pipeline's tokenize step and cache (`tuneforge.data.dataset`) and the
format's writer (`tuneforge.data.internevo.write_internevo`), so it sits above both.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tuneforge.data import cache
from tuneforge.data.internevo import write_internevo
from tuneforge.errors import DataError



def _type_id_matches(folder: str, path: str) -> bool:
    """InternEvo's rule for which top-level folder of `train_folder` a .bin file belongs to
    (`get_dataset_type_id`: `re.search(rf"/[z_]*{key}/", path)`, which must match exactly one)."""
    return re.search(rf"/[z_]*{folder}/", path) is not None


def dataset_folder_names(entries) -> list[str]:
    """One sub-folder name per dataset entry: its file (or folder) name without suffixes, reduced
    to letters, digits, `-` and `_`, made unique so that InternEvo's type-id lookup matches
    each file to exactly one folder."""
    def clashes(name, names):
        return any(name == other or _type_id_matches(name, f"/{other}/") or _type_id_matches(other, f"/{name}/")
                   for other in names)

    names: list[str] = []
    for entry in entries:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(entry.path).name.split(".")[0]).strip("_") or "data"
        name, number = stem, 1
        while clashes(name, names):
            number += 1
            name = f"{stem}_{number}"
        names.append(name)
    return names


def tokenize_to_internevo(cfg, out_dir: str | Path, *, cache_root: Path | None = None, log=lambda m: None) -> list[dict]:
    """Tokenize every `data.datasets` entry of `cfg` as training would and write it as InternEvo data.

    Entry `data/train.jsonl` becomes `OUT_DIR/train/train.bin` (+ `.meta`): InternEvo's loader
    takes the type id of each `.bin` from the top-level sub-folder of its `train_folder` it sits
    in, so OUT_DIR is a `train_folder` as it is (names are made unique, see
    `dataset_folder_names`). Samples are rendered with `data.template` and cut or dropped as
    `data.max_length` / `data.truncation` say (the tokenize cache is shared with training).
    Mixing weights are not part of the format. Returns one `{path, samples, tokens, loss_tokens}`
    per file. `out_dir` must not already hold .bin files.
    """
    from tuneforge.data.dataset import _tokenized
    from tuneforge.data.templates import get_template
    from tuneforge.model.load import load_tokenizer

    out = Path(out_dir)
    if out.is_dir() and any(out.rglob("*.bin")):
        raise DataError(f"{out} already holds .bin files", hint="write to an empty or new folder")
    data_cfg = cfg.data
    if not data_cfg.datasets:
        raise DataError("no datasets configured", hint="set data.datasets: [{path: ..., format: ...}]")
    names = dataset_folder_names(data_cfg.datasets)
    for name in names:  # the absolute path of OUT_DIR itself must not match another folder's name
        target = f"{out.resolve()}/{name}/{name}.bin"
        if [n for n in names if _type_id_matches(n, target)] != [name]:
            raise DataError(f"InternEvo would not find one type id for {target}: the path of {out} contains a "
                            f"folder named like a dataset ({', '.join(names)})", hint="write to another folder")
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    needs_template = any(e.format != "internevo" for e in data_cfg.datasets)
    template = get_template(data_cfg.template, tokenizer) if needs_template else None
    root = Path(cache_root or data_cfg.cache_dir or cache.default_cache_dir())
    tok_fp = cache.tokenizer_fingerprint(tokenizer)
    written = []
    for entry, name in zip(data_cfg.datasets, names):
        store = _tokenized(entry, tokenizer, template, data_cfg, root, tok_fp, log)
        path = write_internevo(store, out / name / f"{name}.bin")
        trained = np.asarray(store.trained)
        written.append({"path": str(path), "samples": len(store.offsets) - 1, "tokens": int(len(store.tokens)),
                        "loss_tokens": int(trained.sum())})
        log(f"wrote {path}: {written[-1]['samples']} samples, {written[-1]['tokens']} tokens")
    return written


def run_tokenize(cfg, out_dir: str | Path) -> int:
    """`tuneforge tokenize CONFIG OUT_DIR`: write the config's datasets as InternEvo `.bin`/`.meta`."""
    import sys

    from tuneforge.quiet import quiet_libraries

    quiet_libraries()
    written = tokenize_to_internevo(cfg, out_dir, log=lambda m: print(m, file=sys.stderr))
    samples = sum(w["samples"] for w in written)
    tokens = sum(w["tokens"] for w in written)
    print(f"wrote {len(written)} file(s) to {out_dir}: {samples:,} samples, {tokens:,} tokens")
    return 0
