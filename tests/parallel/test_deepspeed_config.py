"""DeepSpeed config resolution: XTuner's names, JSON files, "auto" filled from our config."""

import json

import pytest

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.parallel.deepspeed_config import NAMES, resolve_deepspeed_config


def cfg(**train):
    return load_config(None, base={"model": {"dtype": "bfloat16"},
                                   "train": {"micro_batch_size": 2, "gradient_accumulation": 4, "max_grad_norm": 0.5,
                                             **train}})


@pytest.mark.parametrize("name", [*NAMES, "deepspeed_zero2"])
def test_shipped_names_fill_auto(name):
    ds = resolve_deepspeed_config(name, cfg(), dp_size=8, device_type="cuda")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    stage = int(name.removeprefix("deepspeed_").removeprefix("zero")[0])
    assert ds["zero_optimization"]["stage"] == stage


def test_cpu_is_fp32_and_unpinned():
    ds = resolve_deepspeed_config("zero3_offload", cfg(), dp_size=2, device_type="cpu")
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["offload_param"]["pin_memory"] is False


def test_user_json_without_clipping_gets_it_set(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2}))
    ds = resolve_deepspeed_config(str(path), cfg(), dp_size=1, device_type="cpu")
    assert ds["gradient_clipping"] == 0.5  # never DeepSpeed's silent default of 1.0


def test_contradictions_and_bad_names(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 but train.micro_batch_size gives 2"):
        resolve_deepspeed_config(str(path), cfg(), dp_size=1, device_type="cpu")
    with pytest.raises(ConfigError, match="did you mean 'zero2'"):
        resolve_deepspeed_config("zeor2", cfg(), dp_size=1, device_type="cpu")
    with pytest.raises(ConfigError, match="file not found"):
        resolve_deepspeed_config(str(tmp_path / "nope.json"), cfg(), dp_size=1, device_type="cpu")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"bad\.json:1: not valid JSON"):
        resolve_deepspeed_config(str(tmp_path / "bad.json"), cfg(), dp_size=1, device_type="cpu")
