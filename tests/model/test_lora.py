"""LoRA: adapter wiring, save/reload equality, merging, and the QLoRA set-up errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from tuneforge.config import LoraConfig, ModelConfig, QuantizationConfig
from tuneforge.errors import UserError
from tuneforge.model.export import merge_adapter, save_hf_folder
from tuneforge.model.load import load_model
from tuneforge.model.lora import apply_lora, quantization_config, trainable_parameter_count


def base_cfg(path) -> ModelConfig:
    return ModelConfig(path=str(path), dtype="float32")


def perturbed_lora(model, lora=LoraConfig(r=4, alpha=8, dropout=0.0)):
    """A LoRA model whose B matrices are random, so the adapter changes the output."""
    peft_model = apply_lora(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return peft_model.eval()


def test_apply_lora_trains_only_adapters(tiny_model_dir):
    model = load_model(base_cfg(tiny_model_dir))
    total_before = sum(p.numel() for p in model.parameters())
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8))
    linears = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    # all-linear: every projection of both layers (7 each), never lm_head
    assert len(linears) == 14
    expected = sum(4 * (m.in_features + m.out_features) for m in linears)
    assert trainable_parameter_count(peft_model) == (expected, total_before + expected)
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.task_type) == (4, 8, "CAUSAL_LM")


def test_target_module_list(tiny_model_dir):
    peft_model = apply_lora(load_model(base_cfg(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}


def test_unknown_target_module(tiny_model_dir):
    with pytest.raises(UserError, match=r"\['qproj'\] match no layer.*q_proj"):
        apply_lora(load_model(base_cfg(tiny_model_dir)), LoraConfig(target_modules=["qproj"]))


def test_saved_adapter_reloads_with_same_logits(tiny_model_dir, tmp_path, sample_ids, logits_of, tiny_tokenizer):
    base_logits = logits_of(load_model(base_cfg(tiny_model_dir)), sample_ids)
    peft_model = perturbed_lora(load_model(base_cfg(tiny_model_dir)))
    expected = logits_of(peft_model, sample_ids)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter is not a no-op

    save_hf_folder(peft_model, tiny_tokenizer, tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    reloaded = PeftModel.from_pretrained(load_model(base_cfg(tiny_model_dir)), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(reloaded, sample_ids), expected, rtol=0, atol=1e-6)


def test_merged_adapter_equals_base_plus_adapter(tiny_model_dir, tmp_path, sample_ids, logits_of, tiny_tokenizer):
    peft_model = perturbed_lora(load_model(base_cfg(tiny_model_dir)))
    expected = logits_of(peft_model, sample_ids)
    save_hf_folder(peft_model, None, tmp_path / "adapter")

    merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(merged, sample_ids), expected, rtol=0, atol=1e-5)
    # no tokenizer in the adapter folder: the base one is copied
    assert json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_merge_needs_an_adapter_folder(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        merge_adapter(tiny_model_dir, tiny_model_dir, tmp_path / "merged")


def test_qlora_8bit_on_cpu_is_a_user_error(tiny_model_dir):
    cfg = ModelConfig(path=str(tiny_model_dir), lora=LoraConfig(), quantization=QuantizationConfig(bits=8))
    with pytest.raises(UserError, match="bits: 8 needs a CUDA GPU.*bits: 4"):
        quantization_config(cfg, "cpu")
    with pytest.raises(UserError, match="bits: 8 needs a CUDA GPU"):
        load_model(cfg)


def test_qlora_without_bitsandbytes_is_a_user_error(tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = ModelConfig(path=str(tiny_model_dir), lora=LoraConfig(), quantization=QuantizationConfig(bits=4))
    with pytest.raises(UserError, match="QLoRA .*needs the bitsandbytes package.*pip install bitsandbytes"):
        quantization_config(cfg, "cpu")


def test_no_quantization_without_config(tiny_model_dir):
    assert quantization_config(ModelConfig(path=str(tiny_model_dir)), "cpu") is None
