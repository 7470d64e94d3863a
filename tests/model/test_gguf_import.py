"""GGUF import: a tiny llama GGUF written here round-trips to the HF model it was made from."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.errors import UserError
from tuneforge.model.gguf_import import import_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'tuneforge[gguf]')")

GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The q/k row order llama.cpp's converter writes (transformers undoes it on load)."""
    pairs = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = array
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = array
        elif name == "lm_head.weight":
            tensors["output.weight"] = array
        else:
            _, _, layer, module = name.removesuffix(".weight").split(".", 3)
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, config.num_key_value_heads)
            tensors[f"blk.{layer}.{GGUF_NAMES[module]}.weight"] = array
    return tensors


def write_tiny_gguf(path: Path, model, tokenizer) -> None:
    """A float32 llama GGUF with a byte-level BPE ("gpt2") vocabulary and a chat template."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    for name, array in gguf_tensors(model).items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_gguf_round_trip(tmp_path, tiny_model, tiny_tokenizer, logits_of):
    model = tiny_model(len(tiny_tokenizer))
    write_tiny_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer)

    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]  # no temp folder left
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    imported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)

    text = "hello world, the quick brown fox jumps"
    ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer(text)["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(logits_of(imported, ids), logits_of(model, ids), rtol=0, atol=1e-5)

    messages = [{"role": "user", "content": "What is 2+3?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found: .*nope.gguf"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_gguf_package_missing(tmp_path, monkeypatch):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(UserError, match=r"needs the gguf package.*tuneforge\[gguf\]"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out")


SMOLLM2 = os.environ.get("TUNEFORGE_SMOLLM2_GGUF", "")


@pytest.mark.skipif(not Path(SMOLLM2).is_file(), reason="slow (~40 s): set TUNEFORGE_SMOLLM2_GGUF to a SmolLM2 GGUF")
def test_real_smollm2(tmp_path):
    started = time.time()
    out = import_gguf(SMOLLM2, tmp_path / "smol")
    print(f"imported in {time.time() - started:.1f}s")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt")
    answer = model.generate(**ids, max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert "5" in tokenizer.decode(answer, skip_special_tokens=True)


@pytest.mark.parametrize("keep", [9, 200, 0.5])
def test_truncated_file_is_one_clear_line(tmp_path, tiny_model, tiny_tokenizer, capsys, keep):
    from tuneforge.cli import main

    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model(len(tiny_tokenizer)), tiny_tokenizer)
    data = (tmp_path / "tiny.gguf").read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    assert main(["import-gguf", str(tmp_path / "cut.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot import") and "error: error" not in err and len(err.splitlines()) == 1, err
    assert "so it is truncated or corrupt" in err, err
    assert not (tmp_path / "out").exists()
