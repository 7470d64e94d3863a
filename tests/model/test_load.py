"""load_model / load_tokenizer: the happy path against plain transformers, and every user error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.config import ModelConfig
from tuneforge.errors import UserError
from tuneforge.model.load import load_model, load_tokenizer


def cfg(path, **kw) -> ModelConfig:
    return ModelConfig(path=str(path), dtype=kw.pop("dtype", "float32"), **kw)


def test_load_model_matches_plain_transformers(tiny_model_dir, sample_ids, logits_of):
    model = load_model(cfg(tiny_model_dir))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    torch.testing.assert_close(logits_of(model.eval(), sample_ids), logits_of(reference, sample_ids), rtol=0, atol=0)


def test_dtype_from_config_and_override(tiny_model_dir):
    assert load_model(cfg(tiny_model_dir, dtype="bfloat16")).dtype == torch.bfloat16
    assert load_model(cfg(tiny_model_dir, dtype="bfloat16"), dtype="float16").dtype == torch.float16


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(UserError, match="unknown dtype 'float8'.*float32, bfloat16, float16"):
        load_model(cfg(tiny_model_dir), dtype="float8")


def checkpointing(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    return flag if flag is not None else model.is_gradient_checkpointing


def test_gradient_checkpointing_and_attention(tiny_model_dir):
    plain = load_model(cfg(tiny_model_dir))
    assert not checkpointing(plain) and plain.config.use_cache is not False
    model = load_model(cfg(tiny_model_dir, gradient_checkpointing=True), attn_implementation="eager")
    assert checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "eager"


def test_flash_attention_needs_cuda(tiny_model_dir):
    with pytest.raises(UserError, match="flash_attention_2.* needs a CUDA"):
        load_model(cfg(tiny_model_dir, attn_implementation="flash_attention_2"))


def test_config_attention_is_resolved(tiny_model_dir):
    assert load_model(cfg(tiny_model_dir, attn_implementation="eager")).config._attn_implementation == "eager"
    varlen = load_model(cfg(tiny_model_dir, attn_implementation="varlen"))
    assert varlen.config._attn_implementation == "tuneforge_varlen"


def test_tokenizer_gets_pad_token_without_resizing(tiny_model_dir, tiny_tokenizer):
    assert tiny_tokenizer.pad_token is None
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.is_fast
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == len(tiny_tokenizer)


def test_tokenizer_missing_folder(tmp_path):
    with pytest.raises(UserError, match="^model folder not found"):
        load_tokenizer(tmp_path / "nope")


# ------------------------------------------------------------------------ user errors


def copy_without(src, dst, *drop):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def test_empty_path():
    with pytest.raises(UserError, match="model.path is not set"):
        load_model(ModelConfig())


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match=f"model folder not found: {missing} .*check model.path"):
        load_model(cfg(missing))


def test_folder_without_config(tiny_model_dir, tmp_path):
    folder = copy_without(tiny_model_dir, tmp_path / "m", "config.json")
    with pytest.raises(UserError, match=f"{folder} has no config.json"):
        load_model(cfg(folder))


def test_folder_without_weights(tiny_model_dir, tmp_path):
    folder = copy_without(tiny_model_dir, tmp_path / "m", "*.safetensors")
    with pytest.raises(UserError, match=f"{folder} has no weights"):
        load_model(cfg(folder))


@pytest.fixture()
def pickle_folder(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = copy_without(tiny_model_dir, tmp_path / "m", "*.safetensors")
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_refused_by_default(pickle_folder):
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle_weights: true"):
        load_model(cfg(pickle_folder))


def test_pickle_weights_when_allowed(pickle_folder, tiny_model_dir, sample_ids, logits_of):
    model = load_model(cfg(pickle_folder, allow_pickle_weights=True))
    reference = load_model(cfg(tiny_model_dir))
    torch.testing.assert_close(logits_of(model, sample_ids), logits_of(reference, sample_ids), rtol=0, atol=0)


def write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_remote_code_refused(tiny_model_dir, tmp_path):
    folder = copy_without(tiny_model_dir, tmp_path / "m")
    write_config(folder, model_type="mystery", auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryLM"})
    with pytest.raises(UserError, match="needs its own Python code.*executes.*trust_remote_code: true"):
        load_model(cfg(folder))


def test_known_model_type_with_auto_map_loads(tiny_model_dir, tmp_path):
    folder = copy_without(tiny_model_dir, tmp_path / "m")
    write_config(folder, auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryLM"})
    assert type(load_model(cfg(folder))).__name__ == "LlamaForCausalLM"


def test_unknown_model_type(tiny_model_dir, tmp_path):
    folder = copy_without(tiny_model_dir, tmp_path / "m")
    write_config(folder, model_type="mystery")
    with pytest.raises(UserError, match="model_type 'mystery', which this transformers does not know"):
        load_model(cfg(folder))
