"""InternLM2 without remote code: the wqkv layout against a reference forward, round trips, config, tokenizer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tuneforge.config import ModelConfig
from tuneforge.model.internlm2 import (
    SPECIAL_TOKENS,
    internlm2_config_to_llama,
    internlm2_to_llama_state,
    is_internlm2,
    llama_to_internlm2_state,
    load_internlm2_as_llama,
    save_as_internlm2,
)
from tuneforge.model.load import load_model

SP_MODEL = Path(__file__).resolve().parents[3] / "shared/data/internlm2_tokenizer.model"
needs_sp_model = pytest.mark.skipif(not SP_MODEL.is_file(), reason=f"the InternLM2 tokenizer model is not at {SP_MODEL}")

AUTO_MAP = {"AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}


def internlm2_config(**over) -> dict:
    """A tiny InternLM2 config.json: GQA with 4 query heads over 2 key/value heads."""
    cfg = {"architectures": ["InternLM2ForCausalLM"], "auto_map": AUTO_MAP, "model_type": "internlm2",
           "attn_implementation": "eager", "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 96, "initializer_range": 0.02,
           "max_position_embeddings": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": None,
           "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.41.0",
           "use_cache": True, "vocab_size": 120}
    cfg.update(over)
    return cfg


def internlm2_state(cfg: dict, seed: int = 0) -> dict:
    """Random weights under InternLM2's own names (written directly, not by the converter)."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = hidden // heads

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.tok_embeddings.weight": rnd(vocab, hidden, scale=1.0), "model.norm.weight": 1 + rnd(hidden),
          "output.weight": rnd(vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = rnd((heads + 2 * kv) * d, hidden, scale=0.2)
        sd[p + "attention.wo.weight"] = rnd(hidden, heads * d)
        if cfg["bias"]:
            sd[p + "attention.wqkv.bias"] = rnd((heads + 2 * kv) * d)
            sd[p + "attention.wo.bias"] = rnd(hidden)
        sd[p + "feed_forward.w1.weight"] = rnd(inter, hidden)
        sd[p + "feed_forward.w3.weight"] = rnd(inter, hidden)
        sd[p + "feed_forward.w2.weight"] = rnd(hidden, inter)
        sd[p + "attention_norm.weight"] = 1 + rnd(hidden)
        sd[p + "ffn_norm.weight"] = 1 + rnd(hidden)
    return sd


def write_internlm2(folder: Path, cfg: dict, sd: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    # remote code that must never run: loading goes through the converter
    for name in ("modeling_internlm2.py", "configuration_internlm2.py"):
        (folder / name).write_text("raise RuntimeError('InternLM2 remote code was executed')\n")
    return folder


# ----------------------------------------------------------------------------- reference InternLM2 forward


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_qkv(sd, cfg, layer, h):
    """InternLM2's split of the fused projection: per kv group, `groups` query heads, one key, one value."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    groups, d = heads // kv, cfg["hidden_size"] // heads
    p = f"model.layers.{layer}.attention."
    qkv = h @ sd[p + "wqkv.weight"].T
    if cfg["bias"]:
        qkv = qkv + sd[p + "wqkv.bias"]
    b, s = h.shape[:2]
    qkv = qkv.reshape(b, s, kv, groups + 2, d)  # "b q (h gs d) -> b q h gs d"
    q = qkv[..., :groups, :].reshape(b, s, kv * groups, d)  # "b q h gs d -> b q (h gs) d"
    return q, qkv[..., -2, :], qkv[..., -1, :]


def reference_logits(sd, cfg, ids):
    """InternLM2's forward written from its weights (fused wqkv), eager causal attention."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    groups, d, eps = heads // kv, cfg["hidden_size"] // heads, cfg["rms_norm_eps"]
    scaling = cfg.get("rope_scaling") or {}
    factor = scaling.get("factor", 1.0) if scaling.get("type") == "linear" else 1.0
    b, s = ids.shape
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32) / factor, inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos()[None, :, None], torch.cat([freqs, freqs], -1).sin()[None, :, None]
    mask = torch.full((s, s), float("-inf")).triu(1)
    x = sd["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k, v = reference_qkv(sd, cfg, i, _rms(x, sd[p + "attention_norm.weight"], eps))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)  # head h*groups+j -> kv h
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + mask
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, heads * d)
        out = out @ sd[p + "attention.wo.weight"].T
        if cfg["bias"]:
            out = out + sd[p + "attention.wo.bias"]
        x = x + out
        h = _rms(x, sd[p + "ffn_norm.weight"], eps)
        gate, up = h @ sd[p + "feed_forward.w1.weight"].T, h @ sd[p + "feed_forward.w3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "feed_forward.w2.weight"].T
    return _rms(x, sd["model.norm.weight"], eps) @ sd["output.weight"].T


IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 61, 7, 110, 2, 33, 19]])


@pytest.mark.parametrize("over", [
    {},
    {"bias": True},
    {"rope_theta": 1000000},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 500000},  # within max_position: no change
], ids=["plain", "bias", "rope_theta", "linear", "dynamic"])
def test_converted_llama_matches_reference_forward(tmp_path, over):
    cfg = internlm2_config(**over)
    sd = internlm2_state(cfg)
    folder = write_internlm2(tmp_path / "internlm2", cfg, sd)
    model = load_internlm2_as_llama(folder, torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        want = reference_logits(sd, cfg, IDS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_projections_match_fused_wqkv():
    cfg = internlm2_config(bias=True)
    sd = internlm2_state(cfg)
    llama = internlm2_to_llama_state(sd, cfg)
    h = torch.randn(2, 5, cfg["hidden_size"])
    q, k, v = reference_qkv(sd, cfg, 1, h)
    for name, ref in (("q", q), ("k", k), ("v", v)):
        p = f"model.layers.1.self_attn.{name}_proj."
        proj = h @ llama[p + "weight"].T + llama[p + "bias"]
        torch.testing.assert_close(proj.reshape(ref.shape), ref, rtol=0, atol=1e-6)


def test_round_trip_llama_internlm2_llama_is_exact():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=120, attention_bias=True)
    torch.manual_seed(0)
    sd = LlamaForCausalLM(config).state_dict()
    there = llama_to_internlm2_state(sd, config)
    assert "model.layers.0.attention.wqkv.weight" in there and "model.layers.0.attention.wqkv.bias" in there
    assert there["model.layers.0.attention.wqkv.weight"].shape == ((4 + 2 * 2) * 16, 64)
    back = internlm2_to_llama_state(there, config)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_config_carries_bias_theta_and_rope_scaling():
    plain = internlm2_config_to_llama(internlm2_config())
    assert plain.attention_bias is False and plain.mlp_bias is False
    assert plain.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert plain.num_key_value_heads == 2 and plain.head_dim == 16 and plain.architectures == ["LlamaForCausalLM"]
    biased = internlm2_config_to_llama(internlm2_config(bias=True))
    assert biased.attention_bias is True and biased.mlp_bias is False
    dynamic = internlm2_config_to_llama(internlm2_config(rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.5}))
    assert dynamic.rope_parameters == {"rope_type": "dynamic", "factor": 2.5, "rope_theta": 1000000.0}
    linear = internlm2_config_to_llama(internlm2_config(rope_scaling={"type": "linear", "factor": 4.0}))
    assert linear.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    from tuneforge.errors import UserError

    with pytest.raises(UserError, match="rope_scaling type 'yarn'"):
        internlm2_config_to_llama(internlm2_config(rope_scaling={"type": "yarn", "factor": 2.0}))


def test_dynamic_rope_scales_beyond_max_positions(tmp_path):
    """Past max_position_embeddings, dynamic NTK changes the logits, as InternLM2's rotary does."""
    cfg = internlm2_config(max_position_embeddings=8, rope_scaling={"type": "dynamic", "factor": 2.0})
    sd = internlm2_state(cfg)
    scaled = load_internlm2_as_llama(write_internlm2(tmp_path / "a", cfg, sd), torch.float32).eval()
    assert scaled.model.rotary_emb.rope_type == "dynamic"
    plain = load_internlm2_as_llama(write_internlm2(tmp_path / "b", internlm2_config(max_position_embeddings=8), sd),
                                    torch.float32).eval()
    with torch.no_grad():
        short = IDS[:, :8]
        torch.testing.assert_close(scaled(input_ids=short).logits, plain(input_ids=short).logits)
        assert not torch.allclose(scaled(input_ids=IDS).logits, plain(input_ids=IDS).logits)


def test_load_model_hook_ignores_remote_code_and_export_writes_internlm2(tmp_path):
    from safetensors.torch import load_file

    from tuneforge.model.export import save_hf_folder

    cfg = internlm2_config(bias=True, rope_scaling={"type": "dynamic", "factor": 2.0})
    sd = internlm2_state(cfg)
    folder = write_internlm2(tmp_path / "internlm2", cfg, sd)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 92542]}))
    assert is_internlm2(folder) and not is_internlm2(tmp_path)
    for trust in (False, True):  # the fake remote code raises if it is ever imported
        model = load_model(ModelConfig(path=str(folder), dtype="float32", trust_remote_code=trust))
        assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.generation_config.eos_token_id == [2, 92542]
    out = save_hf_folder(model, None, tmp_path / "out")
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(sd)
    for key, value in sd.items():
        assert torch.equal(saved[key], value), key
    written = json.loads((out / "config.json").read_text())
    assert written == cfg  # incl. auto_map, bias and rope_scaling
    assert (out / "modeling_internlm2.py").is_file() and (out / "generation_config.json").is_file()
    again = load_model(ModelConfig(path=str(out), dtype="float32"))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits,
                                   rtol=0, atol=0)


def test_save_as_internlm2_direct_and_tied(tmp_path):
    cfg = internlm2_config(tie_word_embeddings=True)
    sd = internlm2_state(cfg)
    del sd["output.weight"]
    model = load_internlm2_as_llama(write_internlm2(tmp_path / "tied", cfg, sd), torch.float32)
    out = save_as_internlm2(model, cfg, tmp_path / "out")
    from safetensors.torch import load_file

    assert set(load_file(str(out / "model.safetensors"))) == set(sd)
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_mismatched_weights_are_a_clear_error(tmp_path):
    from tuneforge.errors import UserError

    cfg = internlm2_config()
    sd = internlm2_state(cfg)
    sd["model.layers.0.attention.extra.weight"] = torch.zeros(2)
    with pytest.raises(UserError, match="unexpected InternLM2 weight 'model.layers.0.attention.extra.weight'"):
        load_internlm2_as_llama(write_internlm2(tmp_path / "x", cfg, sd), torch.float32)
    sd = internlm2_state(cfg)
    del sd["model.layers.1.ffn_norm.weight"]
    with pytest.raises(UserError, match="do not fit its config.json.*post_attention_layernorm"):
        load_internlm2_as_llama(write_internlm2(tmp_path / "y", cfg, sd), torch.float32)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def internlm2_tok():
    if not SP_MODEL.is_file():
        pytest.skip(f"the InternLM2 tokenizer model is not at {SP_MODEL}")
    from tuneforge.model.internlm2 import internlm2_tokenizer

    return internlm2_tokenizer(SP_MODEL)


@needs_sp_model
def test_tokenizer_special_tokens(internlm2_tok):
    tok = internlm2_tok
    assert len(tok) == 92544
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id, tok.unk_token_id) == ("<s>", 1, "</s>", 2, 0)
    assert SPECIAL_TOKENS == {92538: "<|plugin|>", 92539: "<|interpreter|>", 92540: "<|action_end|>",
                              92541: "<|action_start|>", 92542: "<|im_end|>", 92543: "<|im_start|>"}
    for index, name in SPECIAL_TOKENS.items():
        assert tok.encode(name, add_special_tokens=False) == [index]
        assert tok.convert_ids_to_tokens(index) == name
    assert tok("hello").input_ids[0] == 1  # add_bos_token
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)) == "<|im_start|>user\nhi<|im_end|>"


@needs_sp_model
def test_tokenizer_matches_sentencepiece(internlm2_tok):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    demo = Path(__file__).resolve().parents[2] / "src/tuneforge/demo/gsm8k_excerpt.jsonl"
    texts = ["hello world  two  spaces\n\nx 12345", "你好，世界！这是一个测试。", " leading space", "tab\tend  ",
             "emoji 😀 and ——dash…… Ｅxyz", "def f(x):\n    return x**2\n", "mixed中文english123abc", "\u00a0nbsp"]
    if demo.is_file():
        for line in demo.read_text().splitlines()[:100]:
            record = json.loads(line)
            texts.append(record["question"] + "\n" + record["answer"])
    for text in texts:
        ids = internlm2_tok(text, add_special_tokens=False).input_ids
        assert ids == sp.encode(text), text
        assert internlm2_tok.decode(ids) == text


@needs_sp_model
def test_internlm2_chat_template_with_real_tokenizer(internlm2_tok):
    from tuneforge.data.records import Message, Sample
    from tuneforge.data.templates import get_template
    from tuneforge.data.tokenize import encode_samples

    tok = internlm2_tok
    template = get_template("internlm2_chat", tok)
    sample = Sample(messages=[Message("system", "Be brief."), Message("user", "What is 2+3?"),
                              Message("assistant", "5")])
    enc = encode_samples([sample], template, tok, max_length=128, truncation="right")
    ids, trained = enc.tokens.tolist(), enc.trained.tolist()
    text = "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [1, 92543] and ids[-2:] == [92542, 364]
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == "5<|im_end|>"
    rows = [{"role": m.role, "content": m.content} for m in sample.messages]
    assert tok.apply_chat_template(rows, tokenize=False) == text
    prompt = tok.apply_chat_template(rows[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n") and prompt.startswith("<s><|im_start|>")


@needs_sp_model
def test_load_tokenizer_of_an_internlm2_folder(tmp_path):
    from tuneforge.model.load import load_tokenizer

    folder = tmp_path / "internlm2"
    folder.mkdir()
    shutil.copy(SP_MODEL, folder / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps(internlm2_config()))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer", "chat_template": "{{ bos_token }}custom"}))
    tok = load_tokenizer(folder)
    assert tok.is_fast and tok.convert_tokens_to_ids("<|im_end|>") == 92542 and tok.pad_token == "</s>"
    assert tok.chat_template == "{{ bos_token }}custom"


def test_merged_lora_is_written_as_internlm2(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from tuneforge.model.export import merge_adapter

    cfg = internlm2_config()
    sd = internlm2_state(cfg)
    folder = write_internlm2(tmp_path / "internlm2", cfg, sd)
    model = load_model(ModelConfig(path=str(folder), dtype="float32"))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model.eval()(input_ids=IDS).logits
    out = merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged")
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(sd)
    assert not torch.equal(saved["model.layers.0.attention.wqkv.weight"], sd["model.layers.0.attention.wqkv.weight"])
    assert torch.equal(saved["model.layers.0.feed_forward.w1.weight"], sd["model.layers.0.feed_forward.w1.weight"])
    merged = load_model(ModelConfig(path=str(out), dtype="float32")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_lora_adapter_records_the_internlm2_base_and_export_merges_it(tmp_path, tiny_tokenizer):
    from tuneforge.config import LoraConfig
    from tuneforge.model.export import export_checkpoint
    from tuneforge.model.lora import apply_lora

    cfg = internlm2_config()
    folder = write_internlm2(tmp_path / "internlm2", cfg, internlm2_state(cfg))
    model = apply_lora(load_model(ModelConfig(path=str(folder), dtype="float32")), LoraConfig(r=4, dropout=0.0))
    model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer.save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(folder)
    out = export_checkpoint(tmp_path / "adapter", tmp_path / "merged", merge_lora=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "internlm2"


ROPE_FORMS = [  # (InternLM2's own keys, the same in transformers 5's rope_parameters form)
    ({"rope_theta": 500000, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000}}),
    ({"rope_theta": 1000000, "rope_scaling": {"type": "linear", "factor": 3.0}},
     {"rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 1000000}}),
    ({"rope_theta": 20000, "rope_scaling": None}, {"rope_parameters": {"rope_type": "default", "rope_theta": 20000}}),
]


@pytest.mark.parametrize("legacy,new", ROPE_FORMS, ids=["dynamic", "linear", "default"])
def test_rope_parameters_form_equals_rope_scaling_form(tmp_path, legacy, new):
    """A config.json with only `rope_parameters` keeps theta and scaling: same config, same logits
    as the reference forward of the legacy form, also past max_position_embeddings."""
    old_cfg = internlm2_config(max_position_embeddings=8, **legacy)
    new_cfg = {k: v for k, v in internlm2_config(max_position_embeddings=8, **new).items()
               if k not in ("rope_theta", "rope_scaling")}
    assert internlm2_config_to_llama(new_cfg).rope_parameters == internlm2_config_to_llama(old_cfg).rope_parameters
    sd = internlm2_state(old_cfg)
    model = load_internlm2_as_llama(write_internlm2(tmp_path / "new", new_cfg, sd), torch.float32,
                                    attn_implementation="eager").eval()
    reference = load_internlm2_as_llama(write_internlm2(tmp_path / "old", old_cfg, sd), torch.float32,
                                        attn_implementation="eager").eval()
    with torch.no_grad():  # short first: transformers' dynamic RoPE keeps its longest-seen scaling
        torch.testing.assert_close(model(input_ids=IDS[:, :8]).logits, reference_logits(sd, old_cfg, IDS[:, :8]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=0, atol=0)


def test_tokenizer_of_a_remote_code_folder_never_prompts(tmp_path, tiny_tokenizer, capsys):
    """A folder whose tokenizer_config.json names remote code (as InternLM2 outputs do) loads the
    fast tokenizer from tokenizer.json with remote code off: no "[y/N]" prompt, no code run."""
    from tuneforge.model.load import load_tokenizer

    cfg = internlm2_config()
    folder = write_internlm2(tmp_path / "internlm2", cfg, internlm2_state(cfg))
    tiny_tokenizer.save_pretrained(folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.T", "tokenization_internlm2_fast.T"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for name in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py"):
        (folder / name).write_text("raise RuntimeError('remote tokenizer code was executed')\n")
    tok = load_tokenizer(folder)
    captured = capsys.readouterr()
    assert "custom code" not in captured.out + captured.err
    assert tok.is_fast and tok.encode("<|im_end|>", add_special_tokens=False) == [
        tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
