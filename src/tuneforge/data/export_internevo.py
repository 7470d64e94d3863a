"""`tuneforge tokenize`: a config's datasets, tokenized as training would, written as InternEvo data.

Uses the training pipeline's tokenize step and cache (`tuneforge.data.dataset`) and the
format's writer (`tuneforge.data.internevo.write_internevo`), so it sits above both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tuneforge.data import cache
from tuneforge.data.internevo import write_internevo
from tuneforge.errors import DataError


def tokenize_to_internevo(cfg, out_dir: str | Path, *, cache_root: Path | None = None, log=lambda m: None) -> list[dict]:
    """Tokenize every `data.datasets` entry of `cfg` as training would and write it as InternEvo data.

    Entry i becomes `OUT_DIR/{i:03d}_{name}.bin` (+ `.meta`), so InternEvo's sorted reading
    order is the config's order. Samples are rendered with `data.template` and cut or dropped
    as `data.max_length` / `data.truncation` say (the tokenize cache is shared with training).
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
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    needs_template = any(e.format != "internevo" for e in data_cfg.datasets)
    template = get_template(data_cfg.template, tokenizer) if needs_template else None
    root = Path(cache_root or data_cfg.cache_dir or cache.default_cache_dir())
    tok_fp = cache.tokenizer_fingerprint(tokenizer)
    written = []
    for index, entry in enumerate(data_cfg.datasets):
        store = _tokenized(entry, tokenizer, template, data_cfg, root, tok_fp, log)
        stem = Path(entry.path).name.split(".")[0] or "data"
        path = write_internevo(store, out / f"{index:03d}_{stem}.bin")
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
