"""Data never silently shrinks or grows: counts and warnings in `train` and `check-data`,
dot-entries skipped, UTF-8 / BOM / swapped JSON layouts, odd conversations counted."""

import json

import pytest
from helpers import make_tiny_model, write_config, write_jsonl

from tuneforge.cli import main
from tuneforge.data.records import Message, read_samples
from tuneforge.errors import DataError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import build_tokenizer

    return make_tiny_model(tmp_path_factory.mktemp("reliability_model"), build_tokenizer())


def long_and_short(n_long, n_short):
    long = {"instruction": "the quick brown fox " * 30, "output": "jumps over the lazy dog " * 30}
    short = {"instruction": "two plus three", "output": "five"}
    return [long] * n_long + [short] * n_short


def test_train_prints_the_check_data_counts_and_warns_when_many_are_dropped(tmp_path, model_dir, capsys):
    write_jsonl(tmp_path / "d.jsonl", long_and_short(18, 2))
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}],
                       data={"truncation": "drop"}, train={"max_steps": 1})
    assert main(["check-data", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "20 samples read, 18 dropped, 0 truncated to data.max_length=64" in out.out
    assert "warning: 18 of 20 samples (90%) were dropped (18 longer than data.max_length=64)" in out.err
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "data: 20 samples read, 18 dropped, 0 truncated to data.max_length=64" in err
    assert "warning: 18 of 20 samples (90%) were dropped (18 longer than data.max_length=64)" in err
    assert "d.jsonl: 1 file read: d.jsonl" in err


def test_truncated_counts_and_no_warning_below_five_percent(tmp_path, model_dir, capsys):
    long_answer = {"instruction": "hi", "output": "jumps over the lazy dog " * 30}
    write_jsonl(tmp_path / "d.jsonl", [long_answer] + long_and_short(0, 30))
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}])
    assert main(["check-data", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "31 samples read, 0 dropped, 1 truncated" in out.out
    assert "warning" not in out.err


def test_dot_files_and_dot_folders_are_skipped_and_the_files_read_are_listed(tmp_path, model_dir, capsys):
    folder = tmp_path / "data"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "sub").mkdir()
    write_jsonl(folder / "a.jsonl", long_and_short(0, 3))
    write_jsonl(folder / "sub" / "b.jsonl", long_and_short(0, 2))
    write_jsonl(folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl", long_and_short(0, 3))
    write_jsonl(folder / ".hidden.jsonl", long_and_short(0, 4))
    assert len(read_samples(folder, "alpaca")) == 5
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "data", "format": "alpaca"}])
    assert main(["check-data", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "5 samples read" in out
    assert "2 files read: a.jsonl, sub/b.jsonl" in out
    only_hidden = tmp_path / "hidden_only"
    (only_hidden / ".cache").mkdir(parents=True)
    write_jsonl(only_hidden / ".cache" / "x.jsonl", long_and_short(0, 1))
    with pytest.raises(DataError, match="holds no .json/.jsonl files"):
        read_samples(only_hidden, "alpaca")


def test_internevo_folders_skip_dot_entries(tmp_path):
    import numpy as np

    from tuneforge.data.internevo import internevo_files

    for sub in ("a", ".ipynb_checkpoints"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.bin").write_text(json.dumps({"tokens": [1, 2]}) + "\n")
        np.save(tmp_path / sub / "x.bin.meta", np.array([[0, 2]]))
    (tmp_path / ".y.bin").write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in internevo_files(tmp_path)] == ["a/x.bin"]


RECORD = {"instruction": "two plus three", "output": "five"}


def test_utf8_bom_and_swapped_json_layouts_are_read(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(RECORD) + "\n").encode() * 2)
    assert len(read_samples(bom, "alpaca")) == 2
    bom_json = tmp_path / "bom.json"
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps([RECORD]).encode())
    assert len(read_samples(bom_json, "alpaca")) == 1
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps([RECORD, RECORD, RECORD], indent=2))
    assert len(read_samples(array, "alpaca")) == 3
    lines = tmp_path / "lines.json"
    lines.write_text((json.dumps(RECORD) + "\n") * 4)
    assert len(read_samples(lines, "alpaca")) == 4


BAD_FILES = [
    ("latin1.jsonl", (json.dumps(RECORD) + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n',
     r"latin1\.jsonl:2: not UTF-8: byte 0xe9 .*iconv"),
    ("latin1.json", b'[\n{"instruction": "a",\n "output": "caf\xe9"}]', r"latin1\.json:3: not UTF-8: byte 0xe9"),
    ("broken_array.jsonl", b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": \n]',
     r"broken_array\.jsonl:1: malformed JSON .*rename it to \.json"),
    ("broken_lines.json", (json.dumps(RECORD) + "\n").encode() + b'{"instruction": "a", "output"\n',
     r"broken_lines\.json:2: malformed JSON .*rename it to \.jsonl"),
]


@pytest.mark.parametrize("name,content,pattern", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_encodings_and_layouts_name_the_line_and_the_fix(tmp_path, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        read_samples(tmp_path / name, "alpaca")


def test_not_utf8_is_a_user_error_with_exit_2(tmp_path, model_dir, capsys):
    (tmp_path / "d.jsonl").write_bytes((json.dumps(RECORD) + "\n").encode() + b'{"instruction": "\xff"}\n')
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}])
    assert main(["check-data", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:2: not UTF-8" in err and "Traceback" not in err


def conversation(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_conversation_issues_kinds():
    from tuneforge.data.records import conversation_issues

    m = [Message(r, c) for r, c in [("system", "s"), ("user", "u"), ("assistant", "a")]]
    assert conversation_issues(m) == []
    assert conversation_issues([Message("user", "u"), Message("user", "v"), Message("assistant", "a")]) == ["roles_out_of_order"]
    assert conversation_issues([Message("assistant", "a"), Message("user", "u"), Message("assistant", "b")]) == ["roles_out_of_order"]
    assert conversation_issues([Message("user", "u"), Message("system", "s"), Message("assistant", "a")]) == ["roles_out_of_order"]
    assert conversation_issues([Message("user", "u"), Message("assistant", "  ")]) == ["empty_turns"]


def test_odd_conversations_are_counted_and_warned_with_the_first_line(tmp_path, model_dir, capsys):
    records = [conversation(("user", "hi"), ("assistant", "hello")),
               conversation(("user", "a"), ("user", "b"), ("assistant", "c")),
               conversation(("user", "x"), ("assistant", "")),
               conversation(("user", "a"), ("user", "b"), ("assistant", "c"))]
    write_jsonl(tmp_path / "chat.jsonl", records)
    issues = {}
    assert len(read_samples(tmp_path / "chat.jsonl", "openai", issues=issues)) == 4
    assert issues == {"roles_out_of_order": [2, f"{tmp_path / 'chat.jsonl'}:2"],
                      "empty_turns": [1, f"{tmp_path / 'chat.jsonl'}:3"]}
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "chat.jsonl", "format": "openai"}])
    for _ in range(2):  # the second run reads the tokenized cache: the warning must survive it
        assert main(["check-data", str(cfg)]) == 0
        err = capsys.readouterr().err
        assert f"warning: 2 conversations with roles out of order in {tmp_path / 'chat.jsonl'} (first at " \
               f"{tmp_path / 'chat.jsonl'}:2)" in err
        assert f"warning: 1 conversations with an empty turn in {tmp_path / 'chat.jsonl'} (first at " \
               f"{tmp_path / 'chat.jsonl'}:3)" in err


def test_texts_far_beyond_max_length_are_cut_without_changing_the_kept_tokens(tokenizer):
    """The cut before tokenizing keeps exactly the tokens, masks and counts of tokenizing the whole
    text: the first max_length tokens equal the uncut tokenization's, for word text, runs of the
    longest token, multi-byte characters, and a trained answer that crosses the cut."""
    import random

    from tuneforge.data.records import Sample
    from tuneforge.data.templates import get_template
    from tuneforge.data.tokenize import CUT_FACTOR, TextCutter, encode_samples, longest_token_chars

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog two plus three is five 12 + 7 = ?".split()
    prose = " ".join(rng.choice(words) for _ in range(6000))
    samples = [
        Sample(text=prose),
        Sample(text="#" * 40000),
        Sample(text="中文 😀 —— " * 3000),
        Sample(messages=[Message("user", "hi"), Message("assistant", prose)]),
        Sample(messages=[Message("user", prose), Message("assistant", "five")]),  # answer beyond the cut: no loss
        Sample(text="short text"),
    ]
    template = get_template("chatml", tokenizer)
    max_length = 32
    limit = CUT_FACTOR * max_length * longest_token_chars(tokenizer)
    assert all(len(s.text or prose) > 5 * limit for s in samples[:4])  # the cut really happens
    assert len(TextCutter(tokenizer, max_length)(prose, [(0, len(prose))])[0]) == limit
    for truncation in ("right", "drop"):
        cut = encode_samples(samples, template, tokenizer, max_length, truncation)
        whole = encode_samples(samples, template, tokenizer, max_length, truncation, cut_long_texts=False)
        assert cut.tokens.tolist() == whole.tokens.tolist()
        assert cut.trained.tolist() == whole.trained.tolist()
        assert cut.offsets.tolist() == whole.offsets.tolist() and cut.origin.tolist() == whole.origin.tolist()
        assert cut.counts == whole.counts
    right = encode_samples(samples, template, tokenizer, max_length, "right")
    assert right.counts["truncated"] == 4 and right.counts["dropped"] == 1, right.counts
    first = tokenizer(prose, add_special_tokens=False).input_ids[:max_length]  # the uncut tokenization
    start = tokenizer("a").input_ids[:1] if tokenizer("a").input_ids[0] == tokenizer.bos_token_id else []
    assert right.tokens[: right.offsets[1]].tolist() == (start + first)[:max_length]
