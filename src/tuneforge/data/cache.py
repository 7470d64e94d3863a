"""The on-disk cache of tokenized and packed data.

Owns cache keys (derived from the data files' bytes, the tokenizer, the template and every
setting that changes the result) and the storage: one folder per key holding `.npy` arrays
that are memory-mapped on load, plus `meta.json`. A folder is written under a temporary name
and renamed into place when complete, so a reader never sees a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("TUNEFORGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tuneforge" / "data"


def file_digest(path: Path, _memo: dict = {}) -> str:
    """blake2b of a file's bytes (memoised per path, size and mtime within one process)."""
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _memo:
        digest = hashlib.blake2b(digest_size=16)
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _memo[memo_key] = digest.hexdigest()
    return _memo[memo_key]


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything in a tokenizer that changes token ids or templates."""
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    digest.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token], default=str).encode())
    return digest.hexdigest()


def make_key(parts: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def load_entry(root: Path, key: str) -> tuple[dict, dict] | None:
    """(arrays memory-mapped read-only, meta) for a complete entry, or None."""
    folder = root / key
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return arrays, meta


def save_entry(root: Path, key: str, arrays: dict, meta: dict) -> None:
    """Write an entry atomically; if another process finished first, keep theirs."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": sorted(arrays)}, indent=1))
        try:
            os.rename(tmp, root / key)
        except OSError:
            if not (root / key / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
