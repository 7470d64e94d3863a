"""Preference pairs through the SFT data pipeline: formats, masks, truncation, drops and packing."""

import json

import numpy as np
import pytest

from helpers import write_jsonl
from pref_helpers import pair_records
from tuneforge.config import load_config
from tuneforge.data.dataset import build_data
from tuneforge.data.preference import encode_pairs, read_pairs
from tuneforge.data.templates import get_template
from tuneforge.errors import DataError


def _encode(tmp_path, tokenizer, records, max_length=256, truncation="right", **kw):
    path = write_jsonl(tmp_path / "p.jsonl", records)
    pairs = read_pairs(path, **kw)
    return encode_pairs(pairs, get_template("chatml", tokenizer), tokenizer, max_length, truncation)


def _decoded(tokenizer, enc, k, trained_only=False):
    a, b = enc.offsets[k], enc.offsets[k + 1]
    ids = enc.tokens[a:b][enc.trained[a:b]] if trained_only else enc.tokens[a:b]
    return tokenizer.decode(ids.tolist())


def test_forms_give_the_same_tokens_and_only_answers_are_trained(tmp_path, tokenizer):
    encs = {form: _encode(tmp_path, tokenizer, pair_records(5, form=form)) for form in ("conversational", "strings", "implicit")}
    ref = encs["conversational"]
    for form, enc in encs.items():
        assert np.array_equal(enc.tokens, ref.tokens) and np.array_equal(enc.trained, ref.trained), form
    records = pair_records(5)
    for i, record in enumerate(records):
        assert _decoded(tokenizer, ref, 2 * i, True) == record["chosen"][0]["content"] + "<|im_end|>"
        assert _decoded(tokenizer, ref, 2 * i + 1, True) == record["rejected"][0]["content"] + "<|im_end|>"
        assert record["prompt"][0]["content"] in _decoded(tokenizer, ref, 2 * i)
    assert list(ref.origin) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_multi_turn_prompt_is_context_and_columns_map_fields(tmp_path, tokenizer):
    record = {"q": [{"role": "user", "content": "two plus three"}, {"role": "assistant", "content": "five"},
                    {"role": "user", "content": "the fox"}],
              "good": "jumps over", "bad": "lazy dog"}
    enc = _encode(tmp_path, tokenizer, [record], columns={"prompt": "q", "chosen": "good", "rejected": "bad"},
                  system="You are a helpful assistant.")
    assert _decoded(tokenizer, enc, 0, True) == "jumps over<|im_end|>"  # the prompt's assistant turn is not trained
    assert _decoded(tokenizer, enc, 1, True) == "lazy dog<|im_end|>"
    assert _decoded(tokenizer, enc, 0).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_long_prompt_dropped_and_long_answers_cut_alike(tmp_path, tokenizer):
    long_prompt = {"prompt": "the fox " * 40, "chosen": "two", "rejected": "three"}
    long_answer = {"prompt": "two plus", "chosen": "three is five " * 30, "rejected": "lazy dog " * 30}
    short = {"prompt": "two plus", "chosen": "five", "rejected": "four"}
    enc = _encode(tmp_path, tokenizer, [long_prompt, long_answer, short], max_length=32)
    assert enc.counts == {"samples": 3, "pairs": 2, "dropped": 1, "truncated": 1, "too_long": 1, "no_loss": 0,
                          "identical": 0}
    assert list(enc.origin) == [1, 1, 2, 2]
    lengths = np.diff(enc.offsets)
    assert lengths[0] == lengths[1] == 32  # both members of the long pair cut at max_length
    enc = _encode(tmp_path, tokenizer, [long_prompt, long_answer, short], max_length=32, truncation="drop")
    assert enc.counts["pairs"] == 1 and list(enc.origin) == [2, 2]


def test_bad_record_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"p.jsonl:2.*missing field 'rejected'"):
        read_pairs(path)


@pytest.mark.parametrize("packing", ["soft", "none"])
def test_packing_keeps_each_pair_in_one_row(tmp_path, tokenizer_dir, packing):
    path = write_jsonl(tmp_path / "p.jsonl", pair_records(40, seed=4))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps({"model": {"path": str(tokenizer_dir)}, "train": {"objective": "dpo"},
                                    "data": {"datasets": [{"path": str(path), "format": "preference"}], "template": "chatml",
                                             "max_length": 48, "packing": packing, "cache_dir": str(tmp_path / "cache"),
                                             "eval_split": 0.2}}))
    from tuneforge.model.load import load_tokenizer

    cfg = load_config(cfg_file)
    tok = load_tokenizer(cfg.model.path)
    seen = []
    for eval_split in (False, True):
        data = build_data(cfg, tok, eval_split=eval_split)
        for r in range(len(data)):
            pieces = data.row(r)
            assert sum(len(ids) for ids, _, _ in pieces) <= 2 * 48
            names = [sid for _, _, sid in pieces]
            assert len(names) % 2 == 0 and names[0::2] == names[1::2]  # chosen then rejected of the same pair
            seen += [origin for _, origin in names[0::2]]
        report = data.report
        assert report["pairs"] == len(data.packs.pieces) // 2 and report["max_length"] == 48 and report["row_length"] == 96
    kept = sorted(set(data.stores[0].origin.tolist()))
    assert sorted(seen) == kept and len(kept) + report["pairs_dropped"] == 40  # every kept pair once; drops counted
    assert report["pairs_dropped"] > 0  # max_length 48 leaves some prompts no room



def test_pair_identical_once_cut_is_dropped_and_counted(tmp_path, tokenizer):
    same_start = {"prompt": "two plus", "chosen": "the fox jumps " * 20 + "five", "rejected": "the fox jumps " * 20 + "four"}
    differs_early = {"prompt": "two plus", "chosen": "five " + "the fox " * 20, "rejected": "four " + "the fox " * 20}
    enc = _encode(tmp_path, tokenizer, [same_start, differs_early], max_length=32)
    assert enc.counts["identical"] == 1 and enc.counts["dropped"] == 1 and list(enc.origin) == [1, 1]
    enc = _encode(tmp_path, tokenizer, [same_start, differs_early], max_length=512)  # uncut, they differ
    assert enc.counts["identical"] == 0 and enc.counts["pairs"] == 2
