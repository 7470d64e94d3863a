"""InternEvo/ftdp `.bin` + `.bin.meta` data: reading, checks, order, writing, and a hard-packed build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import alpaca_records, write_jsonl

from tuneforge.config import load_config
from tuneforge.data.collate import IGNORE, collate_rows
from tuneforge.data.dataset import build_data
from tuneforge.data.export_internevo import tokenize_to_internevo
from tuneforge.data.internevo import internevo_files, read_internevo, write_internevo
from tuneforge.data.records import read_samples
from tuneforge.data.templates import get_template
from tuneforge.data.tokenize import encode_samples
from tuneforge.errors import DataError


def write_bin(path: Path, samples: list[list[int]], meta_dtype=np.int64, meta=True) -> Path:
    """A .bin of JSON lines plus its np.save'd (offset, count) meta, written by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, offset, blob = [], 0, b""
    for tokens in samples:
        line = (json.dumps({"tokens": tokens}) + "\n").encode()
        rows.append((offset, len(tokens)))
        blob += line
        offset += len(line)
    path.write_bytes(blob)
    if meta:
        with open(f"{path}.meta", "wb") as handle:
            np.save(handle, np.asarray(rows, dtype=meta_dtype).reshape(-1, 2))
    return path


SAMPLES = [[1, -5, -6, 7, 8, 2], [-1, -9, 10, 11], [3, 4, 5], [-1, -2, -3, -4, 12]]


@pytest.mark.parametrize("meta_dtype", [np.int32, np.int64])
def test_reads_tokens_and_masks(tmp_path, meta_dtype):
    file = write_bin(tmp_path / "a.bin", SAMPLES, meta_dtype)
    enc = read_internevo(file, max_length=64)
    assert enc.offsets.tolist() == [0, 6, 10, 13, 18]
    assert enc.tokens.dtype == np.int32
    assert enc.tokens.tolist() == [abs(t) for s in SAMPLES for t in s]
    # trained = positive id, never the first token of a sample
    assert enc.trained.tolist() == [False, False, False, True, True, True,
                                    False, False, True, True,
                                    False, True, True,
                                    False, False, False, False, True]
    assert enc.origin.tolist() == [0, 1, 2, 3]
    assert enc.counts["samples"] == 4 and enc.counts["dropped"] == 0


def test_min_length_truncation_and_no_loss(tmp_path):
    file = write_bin(tmp_path / "a.bin", SAMPLES + [[5, -6, -7]])  # the last has no target
    enc = read_internevo(file, max_length=64, min_length=4)
    assert enc.origin.tolist() == [0, 1, 3]  # [3, 4, 5] and [5, -6, -7] are shorter than 4
    assert enc.counts["short"] == 2 and enc.counts["no_loss"] == 0 and enc.counts["dropped"] == 2
    enc = read_internevo(file, max_length=64)
    assert enc.origin.tolist() == [0, 1, 2, 3] and enc.counts["no_loss"] == 1 and enc.counts["dropped"] == 1
    # right-truncation to 4 tokens: sample 3 loses its only target (id 12)
    enc = read_internevo(file, max_length=4, truncation="right")
    assert enc.origin.tolist() == [0, 1, 2] and enc.counts["truncated"] == 1 and enc.counts["too_long"] == 1
    assert np.diff(enc.offsets).tolist() == [4, 4, 3]
    enc = read_internevo(file, max_length=4, truncation="drop")
    assert enc.origin.tolist() == [1, 2]
    # packing: hard keeps long samples whole (they are cut across rows)
    enc = read_internevo(file, max_length=4, keep_long=True)
    assert np.diff(enc.offsets).tolist() == [6, 4, 3, 5] and enc.counts["truncated"] == 0


def test_missing_meta_is_a_clear_error(tmp_path):
    write_bin(tmp_path / "d" / "a.bin", SAMPLES, meta=False)
    with pytest.raises(DataError, match=r"a\.bin has no a\.bin\.meta beside it.*tuneforge tokenize"):
        read_internevo(tmp_path / "d", max_length=64)


def bad_meta(file: Path, rows):
    with open(f"{file}.meta", "wb") as handle:
        np.save(handle, np.asarray(rows, dtype=np.int64))


def test_inconsistent_meta_is_a_clear_error(tmp_path):
    file = write_bin(tmp_path / "a.bin", SAMPLES)
    good = np.load(f"{file}.meta")
    size = file.stat().st_size
    bad_meta(file, [[0, 6], [size + 10, 4]])
    with pytest.raises(DataError, match=rf"a\.bin: the meta puts line 1 at byte {size + 10}, outside the file's {size} bytes"):
        read_internevo(file, max_length=64)
    bad_meta(file, [[0, 6], [int(good[1, 0]) + 1, 4]])
    with pytest.raises(DataError, match=r"a\.bin: no JSON line starts at byte \d+ \(line 1 of the meta\).*rebuild"):
        read_internevo(file, max_length=64)
    rows = good.copy()
    rows[2, 1] = 4
    bad_meta(file, rows)
    with pytest.raises(DataError, match=r"a\.bin: the meta says line 2 \(byte \d+\) has 4 tokens, it has 3"):
        read_internevo(file, max_length=64)
    bad_meta(file, good[[0, 2, 3]])  # a line missing from the meta: its slice runs into the next line
    with pytest.raises(DataError, match=r"a\.bin: malformed JSON line at byte 0 \(line 0 of the meta\)"):
        read_internevo(file, max_length=64)
    (tmp_path / "a.bin.meta").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"a\.bin\.meta is not an np\.save'd array"):
        read_internevo(file, max_length=64)
    bad_meta(file, good[:, :1])
    with pytest.raises(DataError, match=r"expected \(N, 2\) integers"):
        read_internevo(file, max_length=64)


def test_file_order_walks_sorted_and_follows_data_order(tmp_path):
    root = tmp_path / "data"
    for name in ("z.bin", "b.bin", "sub/a.bin", "sub/deeper/c.bin", "a_sub/x.bin"):
        write_bin(root / name, [[1, 2]])
    (root / "notes.txt").write_text("ignored")
    # InternEvo: a folder's own files (sorted) before its sub-folders (sorted), depth first
    assert [str(p.relative_to(root)) for p in internevo_files(root)] == [
        "b.bin", "z.bin", "a_sub/x.bin", "sub/a.bin", "sub/deeper/c.bin"]
    (root / "data_order.txt").write_text("# XTuner data_order_path\nsub/a.bin\n\nz.bin\n")
    assert [str(p.relative_to(root)) for p in internevo_files(root)] == ["sub/a.bin", "z.bin"]
    (root / "data_order.txt").write_text("missing.bin\n")
    with pytest.raises(DataError, match=r"data_order\.txt:1: lists missing\.bin, which does not exist"):
        internevo_files(root)


def test_origin_counts_lines_over_files(tmp_path):
    write_bin(tmp_path / "d" / "a.bin", [[1, 2, 3], [4, 5]])
    write_bin(tmp_path / "d" / "b.bin", [[6, 7], [8], [9, 10, 11]])
    enc = read_internevo(tmp_path / "d", max_length=64)
    assert enc.origin.tolist() == [0, 1, 2, 4]  # [8] has no target
    assert enc.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11]


def test_write_then_read_round_trip(tokenizer, tmp_path):
    samples = read_samples(write_jsonl(tmp_path / "d.jsonl", alpaca_records(50)), "alpaca")
    enc = encode_samples(samples, get_template("chatml", tokenizer), tokenizer, 64, "right")
    assert not (enc.trained & (enc.tokens == 0)).any()  # id 0 cannot be a target in this format
    file = write_internevo(enc, tmp_path / "out" / "train.bin")
    meta = np.load(f"{file}.meta")
    assert meta.dtype == np.int64 and meta.shape == (len(enc.offsets) - 1, 2)
    back = read_internevo(file, max_length=64)
    assert back.tokens.tolist() == enc.tokens.tolist()
    assert back.trained.tolist() == enc.trained.tolist()
    assert back.offsets.tolist() == enc.offsets.tolist()
    first = json.loads(file.read_text().splitlines()[0])["tokens"]
    assert first[0] < 0 and any(t > 0 for t in first)


def config(datasets, tokenizer_dir, cache, **data):
    return load_config(None, base={"model": {"path": str(tokenizer_dir)},
                                   "data": {"datasets": datasets, "max_length": 16, "template": "chatml",
                                            "cache_dir": str(cache), **data}})


def test_tokenize_to_internevo_reproduces_tokens_and_masks(tokenizer, tokenizer_dir, tmp_path):
    jsonl = write_jsonl(tmp_path / "train.jsonl", alpaca_records(40))
    cfg = config([{"path": str(jsonl), "format": "alpaca"}], tokenizer_dir, tmp_path / "cache", max_length=64)
    written = tokenize_to_internevo(cfg, tmp_path / "ie")
    assert [Path(w["path"]).relative_to(tmp_path / "ie").as_posix() for w in written] == ["train/train.bin"]
    original = build_data(cfg, tokenizer)
    again = build_data(config([{"path": str(tmp_path / "ie"), "format": "internevo"}], tokenizer_dir,
                              tmp_path / "cache", max_length=64), tokenizer)
    a, b = original.stores[0], again.stores[0]
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.trained, b.trained)
    assert np.array_equal(a.offsets, b.offsets)
    assert again.report["loss_tokens"] == original.report["loss_tokens"] == written[0]["loss_tokens"]
    with pytest.raises(DataError, match="already holds .bin files"):
        tokenize_to_internevo(cfg, tmp_path / "ie")


def test_hard_packing_is_shuffle_then_cut(tokenizer, tokenizer_dir, tmp_path):
    rng = np.random.default_rng(3)
    samples = [[int(t) * (1 if rng.random() < 0.7 else -1) for t in rng.integers(3, 250, size=n)]
               for n in rng.integers(2, 40, size=60)]
    samples[0] = list(range(10, 60))  # longer than max_length: cut across rows, never truncated
    write_bin(tmp_path / "ie" / "part-000.bin", samples[:25], np.int32)
    write_bin(tmp_path / "ie" / "part-001.bin", samples[25:])
    cfg = config([{"path": str(tmp_path / "ie"), "format": "internevo"}], tokenizer_dir, tmp_path / "cache",
                  packing="hard", max_length=16)
    assert cfg.data.seed == 1024
    data = build_data(cfg, tokenizer)
    store = data.stores[0]
    kept = store.origin.tolist()
    # rows: the kept samples in a seeded shuffle, concatenated, cut every max_length tokens
    order = np.random.default_rng(1024).permutation(len(kept))
    stream = np.concatenate([np.abs(samples[kept[i]]) for i in order])
    rows = [np.concatenate([ids for ids, _, _ in data.row(r)]) for r in range(len(data))]
    assert all(len(r) == 16 for r in rows[:-1]) and 0 < len(rows[-1]) <= 16
    assert np.array_equal(np.concatenate(rows), stream)
    # what check-data reports
    report = data.report
    assert report["samples"] == 60 and report["tokens"] == len(stream) and report["packs"] == -(-len(stream) // 16)
    assert report["packing_efficiency"] == pytest.approx(len(stream) / (report["packs"] * 16))
    batch = collate_rows([data.row(r) for r in range(len(data))], pad_id=0)
    assert batch["num_loss_tokens"] == report["loss_tokens"]
    # every label is a positive id of the data, predicted within its own piece
    labels = batch["labels"].numpy()
    positive = {t for s in samples for t in s if t > 0}
    assert set(labels[labels != IGNORE].tolist()) <= positive
    # a second build is a cache hit; with packing soft the long sample is truncated instead
    assert build_data(cfg, tokenizer).report == report
    soft = build_data(config([{"path": str(tmp_path / "ie"), "format": "internevo"}], tokenizer_dir,
                             tmp_path / "cache", packing="soft", max_length=16), tokenizer)
    assert soft.report["truncated"] >= 1 and max(np.diff(soft.stores[0].offsets)) <= 16


def test_cache_follows_bin_and_meta_bytes_and_needs_no_template(tokenizer, tokenizer_dir, tmp_path):
    file = write_bin(tmp_path / "ie" / "a.bin", SAMPLES)
    cache = tmp_path / "cache"
    # template "tokenizer" would need a chat template; pre-tokenized data does not use one
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="<|im_end|>")
    cfg = config([{"path": str(tmp_path / "ie"), "format": "internevo"}], tokenizer_dir, cache, template="tokenizer")
    first = build_data(cfg, tok)
    entries = lambda: sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))  # noqa: E731
    assert len(entries()) == 2 and first.report["samples"] == 4
    build_data(cfg, tok)
    assert len(entries()) == 2  # cache hit
    write_bin(file, SAMPLES, np.int32)  # same .bin, meta stored as int32: other bytes, new key
    build_data(cfg, tok)
    assert len(entries()) == 4
    write_bin(file, SAMPLES[:3], np.int32)
    assert build_data(cfg, tok).report["samples"] == 3


def test_token_ids_beyond_the_tokenizer_and_records_api(tokenizer, tokenizer_dir, tmp_path):
    write_bin(tmp_path / "ie" / "a.bin", [[1, 2, 3, len(tokenizer) + 5]])
    cfg = config([{"path": str(tmp_path / "ie"), "format": "internevo"}], tokenizer_dir, tmp_path / "cache")
    with pytest.raises(DataError, match=r"holds token id \d+, beyond the tokenizer's \d+ tokens"):
        build_data(cfg, tokenizer)
    with pytest.raises(DataError, match="format internevo holds token ids"):
        read_samples(tmp_path / "ie", "internevo")


def internevo_type_id(train_folder, path):
    """InternEvo's own lookup (internlm/data/utils.py, get_dataset_type_ids_map + get_dataset_type_id):
    sorted top-level entries of train_folder; exactly one must match `/[z_]*{key}/` in the path."""
    import os
    import re

    type_ids = {key: idx for idx, key in enumerate(sorted(os.listdir(train_folder)))}
    matches = [idx for key, idx in type_ids.items() if re.search(rf"/[z_]*{key}/", str(path))]
    assert len(matches) == 1, f"{path}, match_idxes should be 1, but got {matches} from {type_ids}"
    return matches[0]


def test_tokenize_writes_a_train_folder_internevo_reads_as_is(tokenizer, tokenizer_dir, tmp_path):
    from tuneforge.data.export_internevo import dataset_folder_names

    for name in ("en.jsonl", "zen.jsonl", "en.json", "my data+v2.jsonl"):
        write_jsonl(tmp_path / name, alpaca_records(3)) if name.endswith("l") else \
            (tmp_path / name).write_text(json.dumps(alpaca_records(3)))
    datasets = [{"path": str(tmp_path / n), "format": "alpaca"} for n in ("en.jsonl", "zen.jsonl", "en.json",
                                                                         "my data+v2.jsonl")]
    cfg = config(datasets, tokenizer_dir, tmp_path / "cache", max_length=64)
    assert dataset_folder_names(cfg.data.datasets) == ["en", "zen_2", "en_3", "my_data_v2"]  # en_2 would match /zen_2/
    written = tokenize_to_internevo(cfg, tmp_path / "out")
    ids = [internevo_type_id(tmp_path / "out", w["path"]) for w in written]
    assert sorted(ids) == [0, 1, 2, 3]  # each file under exactly one type id, all different
    for w in written:
        assert Path(w["path"]).parent.parent == tmp_path / "out"
