"""Packing invariants, the collated batch contract, and truncation counts."""

from pathlib import Path

import numpy as np
import pytest

from tuneforge.data.collate import IGNORE, collate_rows
from tuneforge.data.packing import mixed_order, pack_hard, pack_none, pack_soft
from tuneforge.data.records import Message, Sample
from tuneforge.data.templates import get_template
from tuneforge.data.tokenize import encode_samples

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k_train.jsonl"


def pieces_by_row(packs):
    return [packs.pieces[packs.row_offsets[r]: packs.row_offsets[r + 1]].tolist() for r in range(len(packs))]


@pytest.mark.parametrize("buffer", [7, 64, 10_000])
def test_soft_packing_keeps_every_sample_whole_and_fits(buffer):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    packs = pack_soft(rng.permutation(500), lengths, max_length=128, buffer=buffer)
    seen = []
    for row in pieces_by_row(packs):
        assert sum(end - start for _, start, end in row) <= 128
        for sample, start, end in row:
            assert (start, end) == (0, lengths[sample])  # never cut
            seen.append(sample)
    assert sorted(seen) == list(range(500))  # token conservation: every sample exactly once
    assert packs.row_lengths().sum() == lengths.sum()
    if buffer >= 500:  # one buffer: best-fit decreasing is within a row of optimal
        assert len(packs) <= int(np.ceil(lengths.sum() / 128)) + 1


def test_hard_packing_cuts_at_exactly_max_length():
    lengths = np.array([50, 30, 100, 7])
    packs = pack_hard(np.arange(4), lengths, max_length=64)
    assert packs.row_lengths().tolist() == [64, 64, 59]
    rows = pieces_by_row(packs)
    assert rows[0] == [[0, 0, 50], [1, 0, 14]]
    assert rows[1] == [[1, 14, 30], [2, 0, 48]]
    assert rows[2] == [[2, 48, 100], [3, 0, 7]]


def test_none_is_one_sample_per_row():
    packs = pack_none(np.array([2, 0, 1]), np.array([3, 4, 5]))
    assert pieces_by_row(packs) == [[[2, 0, 5]], [[0, 0, 3]], [[1, 0, 4]]]


def test_mixing_weights_repeat_and_subsample():
    dataset_of = np.array([0] * 10 + [1] * 20)
    order = mixed_order(dataset_of, [2.5, 0.5], seed=3)
    counts = np.bincount(dataset_of[order], minlength=2)
    assert counts.tolist() == [25, 10]
    per_sample = np.bincount(order, minlength=30)
    assert set(per_sample[:10].tolist()) == {2, 3} and (per_sample[:10] == 3).sum() == 5
    assert (per_sample[10:] <= 1).all()
    assert np.array_equal(order, mixed_order(dataset_of, [2.5, 0.5], seed=3))


def test_collate_positions_restart_and_labels_never_cross_samples():
    a = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1], bool), ("d", 0))
    b = (np.array([20, 21, 22]), np.array([0, 1, 1], bool), ("d", 1))
    c = (np.array([30, 31]), np.array([0, 1], bool), ("d", 2))
    batch = collate_rows([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22], [30, 31, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    # shifted per sample: 13 is never trained to predict 20
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 21, 22, IGNORE], [31, IGNORE] + [IGNORE] * 5]
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 9, 14]
    assert batch["max_seqlen"] == 5 and batch["num_loss_tokens"] == 5 and batch["num_tokens"] == 9


def test_truncation_right_and_drop_are_counted(tokenizer):
    long_answer = " ".join(["five"] * 80)
    samples = [Sample(messages=[Message("user", "hi"), Message("assistant", "ok")]),
               Sample(messages=[Message("user", "hi"), Message("assistant", long_answer)]),
               Sample(messages=[Message("user", " ".join(["fox"] * 80)), Message("assistant", "ok")])]
    tmpl = get_template("chatml", tokenizer)
    right = encode_samples(samples, tmpl, tokenizer, max_length=32, truncation="right")
    assert right.counts == {"samples": 3, "dropped": 1, "truncated": 1, "no_loss": 0, "too_long": 1}
    assert np.diff(right.offsets).tolist()[1] == 32 and right.origin.tolist() == [0, 1]
    drop = encode_samples(samples, tmpl, tokenizer, max_length=32, truncation="drop")
    assert drop.counts["dropped"] == 2 and drop.counts["truncated"] == 0 and drop.origin.tolist() == [0]


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k_train.jsonl is not present")
def test_gsm8k_soft_packing_efficiency_at_2048(tokenizer, tmp_path):
    from tuneforge.config import load_config
    from tuneforge.data.dataset import build_data

    cfg = load_config(None, base={"data": {"datasets": [{"path": str(GSM8K), "format": "alpaca",
                                                         "columns": {"instruction": "question", "output": "answer"}}],
                                           "template": "chatml", "max_length": 2048, "packing": "soft"}})
    data = build_data(cfg, tokenizer, cache_root=tmp_path)
    assert data.report["samples"] == 7473 and data.report["dropped"] == 0
    assert data.report["packing_efficiency"] >= 0.98
