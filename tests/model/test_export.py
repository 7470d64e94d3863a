"""Saving and exporting: plain-transformers reloads, dtype casts, checkpoints, atomic replacement."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tuneforge.config import LoraConfig, ModelConfig
from tuneforge.errors import UserError
from tuneforge.model.export import atomic_dir, export_checkpoint, save_hf_folder
from tuneforge.model.load import load_model
from tuneforge.model.lora import apply_lora


def dtypes_in(folder) -> set:
    found = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            found |= {handle.get_slice(k).get_dtype() for k in handle.keys()}
    return found


def reload(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_full_model_reloads_with_equal_logits(tiny_model, tiny_tokenizer, tmp_path, sample_ids, logits_of, tie):
    model = tiny_model(len(tiny_tokenizer), tie=tie)
    save_hf_folder(model, tiny_tokenizer, tmp_path / "out")
    assert dtypes_in(tmp_path / "out") == {"F32"}
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    reloaded = reload(tmp_path / "out")
    torch.testing.assert_close(logits_of(reloaded, sample_ids), logits_of(model, sample_ids), rtol=0, atol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_export(tiny_model, tiny_tokenizer, tmp_path, sample_ids, logits_of, tie):
    model = tiny_model(len(tiny_tokenizer), tie=tie)
    save_hf_folder(model, tiny_tokenizer, tmp_path / "out", dtype="bfloat16")
    assert model.dtype == torch.float32  # the in-memory model is untouched
    assert dtypes_in(tmp_path / "out") == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    assert (logits_of(rounded, sample_ids) - logits_of(model, sample_ids)).abs().max() > 1e-4  # rounding shows
    # fp32 compute on the saved bf16 weights equals fp32 compute on the rounded weights
    reloaded = reload(tmp_path / "out")
    torch.testing.assert_close(logits_of(reloaded, sample_ids), logits_of(rounded, sample_ids), rtol=0, atol=1e-6)


def test_save_adapter_in_bf16(tiny_model_dir, tmp_path):
    peft_model = apply_lora(load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32")), LoraConfig(r=2))
    save_hf_folder(peft_model, None, tmp_path / "adapter", dtype="bfloat16")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert dtypes_in(tmp_path / "adapter") == {"BF16"}


def make_checkpoint(tmp_path, src):
    ckpt = tmp_path / "ckpt" / "step-10"
    shutil.copytree(src, ckpt / "model")
    return ckpt


def test_export_full_checkpoint(tiny_model_dir, tmp_path, sample_ids, logits_of):
    ckpt = make_checkpoint(tmp_path, tiny_model_dir)
    export_checkpoint(ckpt, tmp_path / "fp32", merge_lora=True)  # nothing to merge: copied
    torch.testing.assert_close(
        logits_of(reload(tmp_path / "fp32"), sample_ids), logits_of(reload(tiny_model_dir), sample_ids), rtol=0, atol=0
    )
    export_checkpoint(ckpt, tmp_path / "bf16", merge_lora=False, dtype="bfloat16")
    assert dtypes_in(tmp_path / "bf16") == {"BF16"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert dtypes_in(ckpt / "model") == {"F32"}  # the checkpoint is untouched


@pytest.fixture()
def adapter_checkpoint(tiny_model_dir, tmp_path, tiny_tokenizer):
    peft_model = apply_lora(load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32")), LoraConfig(r=2))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    ckpt = tmp_path / "ckpt" / "step-5"
    save_hf_folder(peft_model, tiny_tokenizer, ckpt / "model")
    return ckpt, peft_model.eval()


def test_export_adapter_checkpoint_merged(adapter_checkpoint, tmp_path, sample_ids, logits_of):
    ckpt, peft_model = adapter_checkpoint
    export_checkpoint(ckpt, tmp_path / "merged", merge_lora=True)
    merged = reload(tmp_path / "merged")
    torch.testing.assert_close(logits_of(merged, sample_ids), logits_of(peft_model, sample_ids), rtol=0, atol=1e-5)


def test_export_adapter_checkpoint_unmerged(adapter_checkpoint, tmp_path):
    ckpt, _ = adapter_checkpoint
    export_checkpoint(ckpt, tmp_path / "adapter", merge_lora=False)
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names


def test_export_adapter_with_missing_base(adapter_checkpoint, tmp_path):
    ckpt, _ = adapter_checkpoint
    config_file = ckpt / "model" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="names base model .*gone', which is not a local folder"):
        export_checkpoint(ckpt, tmp_path / "merged", merge_lora=True)


def test_export_without_model_folder(tmp_path):
    with pytest.raises(UserError, match="neither a checkpoint \\(with model/\\) nor a model or adapter folder"):
        export_checkpoint(tmp_path, tmp_path / "out", merge_lora=False)


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while saving")
    assert (out / "a.txt").read_text() == "first"
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folders left
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
