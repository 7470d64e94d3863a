"""Eval data: `data.eval_datasets` (whole files held out) and `data.eval_split` (a seeded fraction
of the training files), and the error when neither is set."""

import pytest
from helpers import alpaca_records, build_tokenizer, write_jsonl

from tuneforge.config import load_config
from tuneforge.data.dataset import build_data
from tuneforge.errors import UserError


def sample_origins(data) -> set:
    """(dataset name, sample index) of every sample packed into `data`."""
    return {origin for row in range(len(data)) for _ids, _trained, origin in data.row(row)}


def config(tmp_path, **data):
    return load_config(None, base={"data": {"template": "chatml", "max_length": 64, "cache_dir": str(tmp_path / "cache"),
                                            **data}})


def test_eval_datasets_are_the_eval_rows(tmp_path):
    tokenizer = build_tokenizer()
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_records(40, seed=1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", alpaca_records(7, seed=2))
    cfg = config(tmp_path, datasets=[{"path": str(train_file), "format": "alpaca"}],
                 eval_datasets=[{"path": str(eval_file), "format": "alpaca"}])
    train = build_data(cfg, tokenizer)
    evaluation = build_data(cfg, tokenizer, eval_split=True)
    assert len(sample_origins(train)) == 40
    assert {index for _name, index in sample_origins(evaluation)} == set(range(7))
    assert {name for name, _index in sample_origins(evaluation)} == {str(eval_file)}
    assert evaluation.report["samples"] == 7


def test_eval_split_is_a_disjoint_fraction(tmp_path):
    tokenizer = build_tokenizer()
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_records(50, seed=3))
    cfg = config(tmp_path, datasets=[{"path": str(train_file), "format": "alpaca"}], eval_split=0.2)
    train, evaluation = build_data(cfg, tokenizer), build_data(cfg, tokenizer, eval_split=True)
    held, kept = sample_origins(evaluation), sample_origins(train)
    assert len(held) == 10 and len(kept) == 40 and not held & kept


def test_no_eval_data_is_a_clear_error(tmp_path):
    tokenizer = build_tokenizer()
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_records(10))
    cfg = config(tmp_path, datasets=[{"path": str(train_file), "format": "alpaca"}])
    with pytest.raises(UserError, match="no eval data"):
        build_data(cfg, tokenizer, eval_split=True)


def test_metric_items_are_the_held_out_records(tmp_path):
    """train.eval_metric generates for exactly the held-out samples, as prompt + reference."""
    from tuneforge.train.evaluate import metric_items

    tokenizer = build_tokenizer()
    records = alpaca_records(50, seed=3)
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = config(tmp_path, datasets=[{"path": str(train_file), "format": "alpaca"}], eval_split=0.2)
    evaluation = build_data(cfg, tokenizer, eval_split=True)
    held = sorted(index for _name, index in sample_origins(evaluation))
    items = metric_items(cfg, evaluation, limit=100)
    assert [item.index for item in items] == held
    assert [(item.prompt[-1].content, item.reference) for item in items] == \
        [(records[i]["instruction"], records[i]["output"]) for i in held]
    assert [item.index for item in metric_items(cfg, evaluation, limit=3)] == held[:3]
