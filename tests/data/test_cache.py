"""The tokenized/packed cache: a second build loads it, any changed input invalidates it."""

import time

from helpers import alpaca_records, write_jsonl

from tuneforge.config import load_config
from tuneforge.data.dataset import build_data


def config(path, **data):
    return load_config(None, base={"data": {"datasets": [{"path": str(path), "format": "alpaca"}], "max_length": 64,
                                            "template": "chatml", **data}})


def entries(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_cache_hit_then_invalidation(tokenizer, tmp_path):
    data_file = write_jsonl(tmp_path / "d.jsonl", alpaca_records(200))
    root = tmp_path / "cache"
    first = build_data(config(data_file), tokenizer, cache_root=root)
    assert len(entries(root)) == 2  # tokenized + packed
    started = time.time()
    again = build_data(config(data_file), tokenizer, cache_root=root)
    assert time.time() - started < 2
    assert entries(root) == entries(root) and len(entries(root)) == 2
    assert again.report == first.report
    assert type(again.stores[0].tokens).__name__ == "memmap"
    # packing-only change: new packed entry, tokenized entry reused
    build_data(config(data_file, packing="hard"), tokenizer, cache_root=root)
    assert len(entries(root)) == 3
    # template, max_length and content changes each make a new tokenized entry
    build_data(config(data_file, template="tokenizer"), tokenizer, cache_root=root)
    build_data(config(data_file, max_length=48), tokenizer, cache_root=root)
    assert len(entries(root)) == 7
    write_jsonl(data_file, alpaca_records(200, seed=1))
    changed = build_data(config(data_file), tokenizer, cache_root=root)
    assert len(entries(root)) == 9
    assert changed.report["tokens"] != first.report["tokens"]


def test_tokenizer_change_invalidates(tokenizer, tmp_path):
    import copy

    data_file = write_jsonl(tmp_path / "d.jsonl", alpaca_records(20))
    root = tmp_path / "cache"
    build_data(config(data_file), tokenizer, cache_root=root)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["jumps over"])
    build_data(config(data_file), other, cache_root=root)
    assert len(entries(root)) == 4


def test_mixing_weights_show_in_the_report(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_records(40, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_records(30, seed=2))
    cfg = load_config(None, base={"data": {"datasets": [{"path": str(a), "format": "alpaca", "weight": 2.5},
                                                        {"path": str(b), "format": "alpaca", "weight": 0.5}],
                                           "max_length": 64, "template": "chatml", "packing": "none"}})
    data = build_data(cfg, tokenizer, cache_root=tmp_path / "cache")
    first, second = data.report["datasets"]
    assert (first["samples_read"], first["samples_used"]) == (40, 100)  # two copies + a random half
    assert (second["samples_read"], second["samples_used"]) == (30, 15)
    assert len(data) == 115 and first["tokens"] + second["tokens"] == data.report["tokens"]
