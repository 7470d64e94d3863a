"""`tuneforge plan` for preference objectives: rows of two sequences, and the reference it names."""

import json

from tuneforge.config import load_config
from tuneforge.plan import run_plan


def _plan(tmp_path, capsys, train: dict, lora: bool):
    lora_line = "  lora: {r: 16}\n" if lora else ""
    fmt = "alpaca" if train.get("objective", "sft") == "sft" else "preference"
    (tmp_path / "c.yaml").write_text(
        f"model:\n  path: models/internlm2-chat-7b\n{lora_line}"
        f"data:\n  datasets: [{{path: pairs.jsonl, format: {fmt}}}]\n  max_length: 2048\n"
        f"train: {json.dumps(train)}\n")
    assert run_plan(load_config(tmp_path / "c.yaml"), gpus=1, gpu_memory=80, as_json=True) == 0
    return json.loads(capsys.readouterr().out)


def test_pairs_double_the_row_and_the_reference_is_named(tmp_path, capsys):
    sft = _plan(tmp_path, capsys, {}, lora=True)
    dpo = _plan(tmp_path, capsys, {"objective": "dpo"}, lora=True)
    assert dpo["per_device_gb"]["activations"] == 2 * sft["per_device_gb"]["activations"]
    assert dpo["per_device_gb"]["params"] == sft["per_device_gb"]["params"]  # no second resident model
    assert dpo["setup"]["sequences_per_row"] == 2 and dpo["setup"]["reference"] == "adapter"
    assert _plan(tmp_path, capsys, {"objective": "dpo"}, lora=False)["setup"]["reference"] == "cached"
    assert _plan(tmp_path, capsys, {"objective": "orpo"}, lora=True)["setup"]["reference"] is None
    reward = _plan(tmp_path, capsys, {"objective": "reward"}, lora=True)
    assert reward["setup"]["reference"] is None and reward["per_device_gb"]["logits"] == 0
    assert reward["per_device_gb"]["activations"] == dpo["per_device_gb"]["activations"]
    assert sft["setup"]["sequences_per_row"] == 1
    run_plan(load_config(tmp_path / "c.yaml"), gpus=1, gpu_memory=80, as_json=False)
    assert "reference: none" in capsys.readouterr().out
