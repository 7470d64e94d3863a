"""The command line: fast help, check-data's JSON contract, one-line errors with non-zero exit."""

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import alpaca_records, write_config, write_jsonl


def tuneforge(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "tuneforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.time(); from tuneforge.cli import build_parser; build_parser().format_help();"
            "print(time.time()-t); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"]
    assert float(out[0]) < 0.5
    result = tuneforge("--help")
    assert result.returncode == 0 and "check-data" in result.stdout and "train" in result.stdout


def test_check_data_json(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(40))
    cfg = write_config(tmp_path / "c.yaml", tokenizer_dir, [{"path": "d.jsonl", "format": "alpaca"}])
    result = tuneforge("check-data", cfg, "--json", "data.packing=soft")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("samples", "dropped", "truncated", "tokens", "loss_tokens", "packs", "pack_slots",
                "packing_efficiency", "max_length"):
        assert key in report
    assert report["samples"] == 40 and report["max_length"] == 64
    assert report["packing_efficiency"] == pytest.approx(report["tokens"] / (report["packs"] * 64))
    human = tuneforge("check-data", cfg, "--show", "1")
    assert human.returncode == 0 and "packing efficiency" in human.stdout and "«" in human.stdout
    assert data.exists()


def test_print_config_resolves_paths_and_overrides(tmp_path, tokenizer_dir):
    cfg = write_config(tmp_path / "c.yaml", tokenizer_dir, [{"path": "d.jsonl", "format": "alpaca"}])
    result = tuneforge("check-data", cfg, "train.lr=1e-4", "--print-config")
    assert result.returncode == 0
    assert "lr: 0.0001" in result.stdout and str(tmp_path / "d.jsonl") in result.stdout


BAD_CONFIGS = [
    ({"train": {"lrr": 1}}, [], r"c\.yaml:\d+: unknown key 'train.lrr' \(did you mean 'lr'\?\)"),
    ({"train": {"lr": "fast"}}, [], "train.lr: input should be a valid number"),
    ({"train": {"lr": 0}}, [], "train.lr: input should be greater than 0"),
    ({"train": {"micro_batch_size": 0}}, [], "train.micro_batch_size: input should be greater than 0"),
    ({"data": {"max_length": 1}}, [], "data.max_length: input should be greater than or equal to 2"),
    ({}, ["data.packing=sotf"], r"command-line override: data.packing: .*did you mean 'soft'"),
    ({}, ["data.template=chatlm"], "unknown template 'chatlm'"),
    ({"data": {"truncation": "drop", "max_length": 8}}, [], "every sample of .* was dropped"),
]


@pytest.mark.parametrize("sections,overrides,message", BAD_CONFIGS)
def test_bad_config_is_one_line_error(tmp_path, tokenizer_dir, sections, overrides, message):
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))
    cfg = write_config(tmp_path / "c.yaml", tokenizer_dir, [{"path": "d.jsonl", "format": "alpaca"}], **sections)
    result = tuneforge("check-data", cfg, *overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]


def test_bad_data_through_cli_names_file_and_line(tmp_path, tokenizer_dir):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    cfg = write_config(tmp_path / "c.yaml", tokenizer_dir, [{"path": "d.jsonl", "format": "alpaca"}])
    result = tuneforge("check-data", cfg)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'd.jsonl'}:2: malformed JSON (Expecting property name enclosed in double quotes at column 2)"
    debug = tuneforge("check-data", cfg, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_missing_config_and_empty_dataset(tmp_path, tokenizer_dir):
    result = tuneforge("check-data", tmp_path / "nope.yaml")
    assert result.returncode == 2 and "config file not found" in result.stderr
    (tmp_path / "d.jsonl").write_text("\n")
    cfg = write_config(tmp_path / "c.yaml", tokenizer_dir, [{"path": "d.jsonl", "format": "alpaca"}])
    result = tuneforge("check-data", cfg)
    assert result.returncode == 2 and "is empty" in result.stderr
