"""Every data format, the column mapping, and each bad-input case with its file:line message."""

import json

import pytest

from tuneforge.data.records import read_samples
from tuneforge.errors import DataError


def roles(sample):
    return [(m.role, m.content, m.trained) for m in sample.messages]


def test_alpaca_with_input_and_system(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"instruction": "Add", "input": "2 3", "output": "5", "system": "Be brief"}) + "\n\n"
                 + json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    first, second = read_samples(f, "alpaca")
    assert roles(first) == [("system", "Be brief", False), ("user", "Add\n2 3", False), ("assistant", "5", True)]
    assert roles(second) == [("user", "Say hi", False), ("assistant", "hi", True)]


def test_column_mapping_gsm8k_style(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    (s,) = read_samples(f, "alpaca", columns={"instruction": "question", "output": "answer"})
    assert roles(s) == [("user", "1+1?", False), ("assistant", "2\n#### 2", True)]


def test_openai_loss_override_and_json_list(tmp_path):
    f = tmp_path / "o.json"
    f.write_text(json.dumps([{"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u1", "loss": True},
        {"role": "assistant", "content": "a1", "loss": False},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"}]}]))
    (s,) = read_samples(f, "openai")
    assert [m.trained for m in s.messages] == [False, True, False, False, True]


def test_sharegpt_and_xtuner_and_text(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "H"},
                                               {"from": "gpt", "value": "G"}]}) + "\n")
    assert roles(read_samples(f, "sharegpt")[0]) == [("system", "S", False), ("user", "H", False), ("assistant", "G", True)]
    x = tmp_path / "x.jsonl"
    x.write_text(json.dumps({"conversation": [{"system": "S", "input": "i1", "output": "o1"},
                                              {"input": "i2", "output": "o2"}]}) + "\n")
    assert [m.role for m in read_samples(x, "xtuner")[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps({"text": "hello world"}) + "\n")
    assert read_samples(t, "text")[0].text == "hello world"


def test_folder_of_files_in_sorted_order(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n")
    (tmp_path / "d" / "a.json").write_text(json.dumps([{"text": "first"}]))
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    assert [s.text for s in read_samples(tmp_path / "d", "text")] == ["first", "second"]


BAD = [
    ("malformed.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', "alpaca", r"malformed\.jsonl:2: malformed JSON"),
    ("toplevel.json", '"just a string"', "alpaca", "expected a JSON list"),
    ("notobject.jsonl", '[1, 2]\n', "alpaca", r"notobject\.jsonl:1: expected a JSON object"),
    ("missing.jsonl", '{"instruction": "a"}\n', "alpaca", r"missing\.jsonl:1: missing field 'output'"),
    ("role.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', "openai", r"role\.jsonl:1: .*unknown role 'robot'"),
    ("empty.jsonl", '{"messages": []}\n', "openai", r"empty\.jsonl:1: empty conversation"),
    ("noassist.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', "openai", "no assistant turn"),
    ("speaker.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}\n', "sharegpt", "unknown speaker 'bot'"),
    ("content.jsonl", '{"messages": [{"role": "user", "content": 3}]}\n', "openai", "'content' must be a string"),
    ("xt.jsonl", '{"conversation": [{"input": "a"}]}\n', "xtuner", "missing or non-string 'output'"),
    ("text.jsonl", '{"text": ""}\n', "text", "empty text"),
    ("wrongtype.jsonl", '{"instruction": ["a"], "output": "b"}\n', "alpaca", "field 'instruction' must be a str"),
]


@pytest.mark.parametrize("name,content,fmt,message", BAD, ids=[b[0] for b in BAD])
def test_bad_records_name_file_and_line(tmp_path, name, content, fmt, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        read_samples(f, fmt)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_samples(tmp_path / "nope.jsonl", "alpaca")
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="unknown format 'alpacca'"):
        read_samples(tmp_path / "a.jsonl", "alpacca")
