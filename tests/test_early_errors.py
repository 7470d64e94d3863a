"""A wrong data path, template name, model folder or eval setting is reported before torch is
imported (so in about a second, not after 7-14 s of imports and model loading): the CLI runs
in a subprocess that prints whether `torch` was ever imported when the error came."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tuneforge

SCRIPT = ("import sys; from tuneforge.cli import main; code = main(sys.argv[1:]); "
          "print('torch imported:', 'torch' in sys.modules); sys.exit(code)")
SRC = str(Path(tuneforge.__file__).resolve().parents[1])  # the tuneforge under test


@pytest.fixture
def cfg(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"")  # never read: the errors come first
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "model"}, "data": {"datasets": [{"path": "d.jsonl"}],
                                                                      "template": "chatml"},
                                    "train": {"work_dir": "run"}}))
    return path


CASES = [
    ("data path", ["data.datasets.0.path=missing.jsonl"], "data file not found"),
    ("bad first record", ["data.datasets.0.format=openai"], r"d.jsonl:1: missing field 'messages'"),
    ("template", ["data.template=chatmll"], "unknown template 'chatmll' (did you mean 'chatml'?)"),
    ("model folder", ["model.path=nowhere"], "model folder not found"),
]
RUNS = [("train", *c) for c in CASES] + [("check-data", *c) for c in CASES] + [
    ("train", "eval split", ["data.eval_split=0.2"], "train.eval_every is 0"),  # train only: check-data builds no eval
]


@pytest.mark.parametrize("verb,case,overrides,message", RUNS, ids=[f"{r[0]}-{r[1]}" for r in RUNS])
def test_errors_come_before_torch_is_imported(cfg, verb, case, overrides, message):
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", SCRIPT, verb, str(cfg), *overrides], capture_output=True,
                          text=True, env=env, cwd=cfg.parent, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "torch imported: False" in done.stdout, (done.stdout, done.stderr)
